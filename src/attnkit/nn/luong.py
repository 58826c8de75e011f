"""Global attention of Luong, Pham and Manning 2015, https://arxiv.org/abs/1508.04025."""

from __future__ import annotations

import torch
from torch import nn

from .. import scores as _scores
from .._checks import check_probability
from .additive import _check_dims, _choice, _linear, attend_one_head

Tensor = torch.Tensor

SCORES = ("dot", "general", "concat")


class LuongAttention(nn.Module):
    r"""Luong et al. 2015 global attention, https://arxiv.org/abs/1508.04025 (§3.1).

    .. math::
        \mathrm{score}(h_t, \bar h_s) = \begin{cases}
            h_t^\top \bar h_s & \text{dot} \\
            h_t^\top W_a \bar h_s & \text{general} \\
            v_a^\top \tanh(W_a [h_t; \bar h_s]) & \text{concat}
        \end{cases}

        a_t = \mathrm{softmax}_s(\mathrm{score}(h_t, \bar h_s)),\quad
        c_t = \sum_s a_{ts} \bar h_s,\quad
        \tilde h_t = \tanh(W_c [c_t; h_t])

    The scores are :class:`attnkit.scores.Dot`, :class:`~attnkit.scores.General` and
    :class:`~attnkit.scores.Additive` (``concat``: ``W_a [h_t; h_s] = W_1 h_t + W_2 h_s``, no bias,
    as in the paper); the attention runs through :func:`attnkit.attention` with one head.

    Args:
        query_dim: features of the decoder state ``h_t``.
        key_dim: features of the source states ``h̄_s`` (default ``query_dim``; ``dot`` needs them equal).
        score: ``"dot"``, ``"general"`` or ``"concat"``.
        attentional: return the attentional state ``h̃_t`` (True) or the context ``c_t`` (False).
        output_dim: features of ``h̃_t`` (default ``query_dim``); only with ``attentional=True``.
        hidden_dim: hidden size of the ``concat`` scorer (default ``query_dim``).
        value_dim: features of ``value`` (default ``key_dim``; the paper attends over the keys).
        dropout: dropout on the attention weights while training.

    Forward:
        ``query (B, Tq, dq)`` or one decoder step ``(B, dq)``; ``key (B, Tk, dk)``; ``value``
        ``(B, Tk, dv)`` or None (= ``key``); ``key_padding_mask`` bool ``(B, Tk)``, True = padding.

    Returns:
        ``(h_tilde (B, Tq, output_dim) if attentional else context (B, Tq, dv), weights (B, Tq, Tk))``,
        without the ``Tq`` dim for a 2-D query; ``weights`` is None when ``need_weights=False``.

    Example::

        >>> import torch, attnkit
        >>> attn = attnkit.nn.LuongAttention(8, score="general")
        >>> h, w = attn(torch.randn(2, 3, 8), torch.randn(2, 5, 8))
        >>> h.shape, w.shape
        (torch.Size([2, 3, 8]), torch.Size([2, 3, 5]))
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, score: str = "dot", attentional: bool = True,
                 output_dim: int | None = None, *, hidden_dim: int | None = None, value_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        value_dim = key_dim if value_dim is None else value_dim
        output_dim = query_dim if output_dim is None else output_dim
        _check_dims(query_dim=query_dim, key_dim=key_dim, hidden_dim=hidden_dim, value_dim=value_dim,
                    output_dim=output_dim)
        _choice("score", score, SCORES)
        if not isinstance(attentional, bool):
            raise TypeError(f"attentional must be a bool; got {type(attentional).__name__}")
        if score == "dot" and key_dim != query_dim:
            raise ValueError(f"score 'dot' needs key_dim == query_dim; got query_dim={query_dim}, key_dim={key_dim} "
                             "(use score='general' or 'concat')")
        self.query_dim, self.key_dim, self.value_dim = query_dim, key_dim, value_dim
        self.score_name, self.attentional = score, attentional
        self.output_dim = output_dim if attentional else value_dim
        self.dropout = check_probability("dropout", dropout)
        if score == "dot":
            self.score = _scores.Dot()
        elif score == "general":
            self.score = _scores.General(query_dim, key_dim)
        else:
            self.score = _scores.Additive(query_dim, key_dim, hidden_dim, bias=False)
        # W_c [c_t; h_t]: no bias in the paper's eq. (5)
        self.out_proj = nn.Linear(value_dim + query_dim, output_dim, bias=False) if attentional else None

    def forward(self, query: Tensor, key: Tensor, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        value = key if value is None else value
        ctx, w, q = attend_one_head(self, query, key, value, key_padding_mask, need_weights)
        if not self.attentional:
            return ctx, w
        step = query.dim() == 2
        ctx3 = ctx.unsqueeze(1) if step else ctx  # (B, Tq, dv)
        out = torch.tanh(_linear(torch.cat([ctx3, q], dim=-1), self.out_proj))  # h~ = tanh(W_c [c; h])
        return (out.squeeze(1) if step else out), w

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score_name!r}, "
                f"attentional={self.attentional}, output_dim={self.output_dim}, dropout={self.dropout}")


__all__ = ["LuongAttention", "SCORES"]
