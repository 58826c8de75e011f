"""Seed 001's gated attention, made consistent and trainable.

Two modules (the equations, and what changed from the seed, are in ``docs/gated_attention.md``):

* :class:`GatedAttentionHeads` -- a sigmoid input gate, ``K`` learned-query attention heads over
  the gated sequence, and a sigmoid output gate;
* :class:`AttentionMemory` -- a recurrent memory that, for a number of steps, attends over the
  inputs (scores use ``x_i``, the input mean ``x̄`` and the previous output ``y_{t-1}``) and
  writes a gated update into a memory cell.

Both score positions through :func:`attnkit.attention`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import masks as _masks
from .. import scores as _scores
from .._checks import check_positive
from ..functional import attention
from .additive import _check_dims, _check_input, _check_padding, _linear, _padding_mask

Tensor = torch.Tensor


class GatedAttentionHeads(nn.Module):
    r"""Gated multi-head attention pooling (seed 001 §3(1), made consistent).

    .. math::
        H = \sigma(X W_x + b_x) \in (0, 1)^{T \times n_h}                      \quad\text{(input gate)}

        K^{(i)} = \tanh(H W^{(i)} + \theta^{(i)}) \in (-1, 1)^{T \times d}     \quad i = 1..K

        \alpha^{(i)} = \mathrm{softmax}_t\big(q_i^\top K^{(i)}_t / \sqrt{d}\big)  \quad\text{(over real positions)}

        r_i = \sum_t \alpha^{(i)}_t H_t \in (0, 1)^{n_h}

        y = \sigma(W_o [r_1; \dots; r_K] + b_o) \in (0, 1)^{out}                \quad\text{(output gate)}

    Head ``i`` has its own learned query ``q_i`` and key map ``(W^{(i)}, θ^{(i)})``; all heads
    pool the gated sequence ``H`` (the seed weights ``H``, and ``H`` is what the input gate
    lets through). The heads run as one call of :func:`attnkit.attention` with ``K`` heads and
    the ``"scaled_dot"`` score.

    Args:
        input_dim: ``D``, features of ``X``.
        hidden_dim: ``n_h``, width of the gated representation ``H``.
        num_heads: ``K``.
        head_dim: ``d``, width of the per-head keys and queries.
        output_dim: width of ``y`` (default ``hidden_dim``).

    Forward:
        ``x (B, T, D)``, ``key_padding_mask`` bool ``(B, T)`` (True = padding).

    Returns:
        ``y (B, output_dim)`` in ``(0, 1)`` and the head weights ``(B, K, T)``.

    Example::

        >>> import torch, attnkit
        >>> heads = attnkit.nn.GatedAttentionHeads(input_dim=6, hidden_dim=8, num_heads=3, head_dim=4)
        >>> y, w = heads(torch.randn(2, 5, 6))
        >>> y.shape, w.shape, bool(((y > 0) & (y < 1)).all())
        (torch.Size([2, 8]), torch.Size([2, 3, 5]), True)
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_heads: int, head_dim: int,
                 output_dim: int | None = None):
        super().__init__()
        output_dim = hidden_dim if output_dim is None else output_dim
        _check_dims(input_dim=input_dim, hidden_dim=hidden_dim, num_heads=num_heads, head_dim=head_dim,
                    output_dim=output_dim)
        self.input_dim, self.hidden_dim, self.num_heads, self.head_dim = input_dim, hidden_dim, num_heads, head_dim
        self.output_dim = output_dim
        self.input_proj = nn.Linear(input_dim, hidden_dim)                 # W_x, b_x
        self.key_proj = nn.Linear(hidden_dim, num_heads * head_dim)        # W^(i), θ^(i) stacked over heads
        self.queries = nn.Parameter(torch.randn(num_heads, head_dim))      # q_i
        self.out_proj = nn.Linear(num_heads * hidden_dim, output_dim)      # W_o, b_o

    def input_gate(self, x: Tensor) -> Tensor:
        """``H = σ(X W_x + b_x)``: ``(B, T, D) -> (B, T, hidden_dim)``."""
        return torch.sigmoid(_linear(x, self.input_proj))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input("x", x, (3,), self.input_dim, "(B, T, D)")
        B, T, _ = x.shape
        mask = _padding_mask("key_padding_mask", key_padding_mask, B, T, "(B, T)")
        K, d = self.num_heads, self.head_dim
        H = self.input_gate(x)                                                     # (B, T, n_h)
        keys = torch.tanh(_linear(H, self.key_proj)).view(B, T, K, d).transpose(1, 2)  # (B, K, T, d)
        q = self.queries.to(x.dtype).view(1, K, 1, d).expand(B, K, 1, d)         # (B, K, 1, d)
        values = H.unsqueeze(1).expand(B, K, T, self.hidden_dim)                  # (B, K, T, n_h), no copy
        r, w = attention(q, keys, values, score="scaled_dot", mask=mask, return_weights=True)
        y = torch.sigmoid(_linear(r.reshape(B, K * self.hidden_dim), self.out_proj))  # concat heads -> gate
        return y, w.squeeze(2)                                                    # (B, out), (B, K, T)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, output_dim={self.output_dim}")


class AttentionMemory(nn.Module):
    r"""Seed 001's attention memory module (§3(2)), made consistent: for ``t = 1..num_steps``

    .. math::
        \bar x = \tfrac{1}{n}\textstyle\sum_i x_i \ \text{(real positions)},\qquad
        m_0 = 0,\qquad y_0 = \sigma(b_o)

        e_{ti} = v^\top \tanh(W_x x_i + W_a \bar x + W_y y_{t-1} + \theta) / \sqrt{d_a},\qquad
        F_{t\cdot} = \mathrm{softmax}_i(e_{t\cdot})        \quad\text{(attention matrix)}

        c_t = \textstyle\sum_i F_{ti} x_i

        u_t = \tanh(W_u c_t + U_u y_{t-1} + b_u)            \quad\text{(update vector)}

        g_t = \sigma(W_g c_t + U_g y_{t-1} + b_g)           \quad\text{(control gate)}

        m_t = g_t \circ u_t + (1 - g_t) \circ m_{t-1}       \quad\text{(memory cell)}

        y_t = \sigma(W_o m_t + b_o)                         \quad\text{(output)}

    The score is :class:`attnkit.scores.Additive` with query ``[x̄; y_{t-1}]`` and keys ``x_i``
    (``W_q [x̄; y] = W_a x̄ + W_y y``, the key bias is ``θ``), run through :func:`attnkit.attention`.

    Args:
        input_dim: ``D``, features of each ``x_i``.
        memory_dim: ``M``, width of the memory cell ``m_t`` and the output ``y_t``.
        attn_dim: ``d_a``, hidden size of the additive scorer (default ``memory_dim``).
        num_steps: default number of steps ``T`` (``forward(num_steps=)`` overrides it).

    Forward:
        ``x (B, n, D)``, ``key_padding_mask`` bool ``(B, n)`` (True = padding), ``num_steps``,
        ``return_gates``.

    Returns:
        ``outputs (B, T, M)`` (``y_1..y_T``, in ``(0, 1)``) and the attention matrices
        ``F (B, T, n)``; with ``return_gates=True`` also the control gates ``g (B, T, M)``.

    Example::

        >>> import torch, attnkit
        >>> mem = attnkit.nn.AttentionMemory(input_dim=6, memory_dim=8, num_steps=4)
        >>> y, F = mem(torch.randn(2, 5, 6))
        >>> y.shape, F.shape, bool(torch.allclose(F.sum(-1), torch.ones(2, 4)))
        (torch.Size([2, 4, 8]), torch.Size([2, 4, 5]), True)
    """

    def __init__(self, input_dim: int, memory_dim: int, attn_dim: int | None = None, num_steps: int = 3):
        super().__init__()
        attn_dim = memory_dim if attn_dim is None else attn_dim
        _check_dims(input_dim=input_dim, memory_dim=memory_dim, attn_dim=attn_dim, num_steps=num_steps)
        self.input_dim, self.memory_dim, self.attn_dim, self.num_steps = input_dim, memory_dim, attn_dim, num_steps
        self.score = _scores.Additive(input_dim + memory_dim, input_dim, attn_dim)  # query [x̄; y], key x_i
        self.update = nn.Linear(input_dim + memory_dim, memory_dim)   # [W_u U_u], b_u on [c_t; y_{t-1}]
        self.gate = nn.Linear(input_dim + memory_dim, memory_dim)     # [W_g U_g], b_g on [c_t; y_{t-1}]
        self.output = nn.Linear(memory_dim, memory_dim)               # W_o, b_o

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, num_steps: int | None = None,
                return_gates: bool = False):
        _check_input("x", x, (3,), self.input_dim, "(B, n, D)")
        steps = self.num_steps if num_steps is None else int(check_positive("num_steps", num_steps, integer=True))
        B, n, _ = x.shape
        keep = _check_padding("key_padding_mask", key_padding_mask, B, n, "(B, n)")
        mask = None if keep is None else _masks.key_padding(keep)
        if keep is None:
            x_bar = x.mean(1)                                                           # (B, D)
        else:
            w = keep.to(x.dtype).unsqueeze(-1)
            x_bar = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        x4 = x.unsqueeze(1)                                                             # (B, 1, n, D)
        scale = 1.0 / math.sqrt(self.attn_dim)
        m = x.new_zeros(B, self.memory_dim)                                             # m_0
        y = torch.sigmoid(self.output.bias.to(x.dtype)).expand(B, -1)                   # y_0 = σ(W_o m_0 + b_o)
        outputs, attn, gates = [], [], []
        for _ in range(steps):
            q = torch.cat([x_bar, y], dim=-1).view(B, 1, 1, -1)                         # (B, 1, 1, D + M)
            c, F_t = attention(q, x4, x4, score=self.score, scale=scale, mask=mask, return_weights=True)
            c = c.view(B, -1)                                                           # (B, D)
            cy = torch.cat([c, y], dim=-1)
            u = torch.tanh(_linear(cy, self.update))
            g = torch.sigmoid(_linear(cy, self.gate))
            m = g * u + (1 - g) * m
            y = torch.sigmoid(_linear(m, self.output))
            outputs.append(y), attn.append(F_t.view(B, n)), gates.append(g)
        res = (torch.stack(outputs, 1), torch.stack(attn, 1))
        return res + (torch.stack(gates, 1),) if return_gates else res

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, memory_dim={self.memory_dim}, attn_dim={self.attn_dim}, "
                f"num_steps={self.num_steps}")


__all__ = ["GatedAttentionHeads", "AttentionMemory"]
