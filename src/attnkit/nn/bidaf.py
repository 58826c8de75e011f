"""Bidirectional attention flow (BiDAF), Seo et al. 2017, https://arxiv.org/abs/1611.01603 (§2.4)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import masks as _masks
from .. import scores as _scores
from .._checks import shape_str
from ..functional import attention
from .additive import _check_dims, _check_input, _check_padding

Tensor = torch.Tensor


class Trilinear(_scores.Score):
    r"""BiDAF's similarity ``S_tj = w_sᵀ [c_t; q_j; c_t ∘ q_j]``, computed as
    ``(c_t ∘ w_m)·q_j + w_cᵀ c_t + w_qᵀ q_j`` (``w_s = [w_c; w_q; w_m]``) so that the
    ``(B, T, J, 3d)`` tensor is never built.

    A :class:`attnkit.scores.Score`: ``forward(c (B, H, T, d), q (B, H, J, d)) -> (B, H, T, J)``.

    Example::

        >>> import torch
        >>> from attnkit.nn.bidaf import Trilinear
        >>> s = Trilinear(2)
        >>> with torch.no_grad(): _ = s.weight.copy_(torch.tensor([1.0, 0, 0, 1, 1, 1]))
        >>> s(torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[3.0, 4.0]]]])).tolist()  # 1 + 4 + (3 + 8)
        [[[[16.0]]]]
    """

    name = "trilinear"

    def __init__(self, dim: int):
        super().__init__()
        _check_dims(dim=dim)
        self.dim = dim
        bound = 1.0 / math.sqrt(3 * dim)  # as nn.Linear(3d, 1)
        self.weight = nn.Parameter(torch.empty(3 * dim).uniform_(-bound, bound))  # [w_c; w_q; w_m]

    def forward(self, c: Tensor, q: Tensor) -> Tensor:
        w_c, w_q, w_m = self.weight.to(c.dtype).split(self.dim)
        return ((c * w_m) @ q.transpose(-2, -1)            # (c_t ∘ w_m) · q_j   (B, H, T, J)
                + (c @ w_c).unsqueeze(-1)                   # w_cᵀ c_t            (B, H, T, 1)
                + (q @ w_q).unsqueeze(-2))                  # w_qᵀ q_j            (B, H, 1, J)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class BidirectionalAttention(nn.Module):
    r"""The attention flow layer of BiDAF (Seo et al. 2017, https://arxiv.org/abs/1611.01603).

    .. math::
        S_{tj} = w_s^\top [c_t; q_j; c_t \circ q_j]

        \text{context-to-query:}\quad a_{t\cdot} = \mathrm{softmax}_j(S_{t\cdot}),\quad
        \tilde u_t = \sum_j a_{tj} q_j

        \text{query-to-context:}\quad b = \mathrm{softmax}_t(\max_j S_{tj}),\quad
        \tilde h = \sum_t b_t c_t \ \text{(tiled over } t)

        G_t = [c_t; \tilde u_t; c_t \circ \tilde u_t; c_t \circ \tilde h]

    ``S`` comes from the :class:`Trilinear` score (``self.similarity``) without materializing the
    ``(B, T, J, 3d)`` tensor; both attentions run through :func:`attnkit.attention` (the
    query-to-context one with the keys ``max_j S_tj`` and a ``"dot"`` score against a query of 1).

    Args:
        dim: ``d``, features of the context and query encodings.

    Forward:
        ``context (B, T, d)``, ``query (B, J, d)``, ``context_padding_mask`` bool ``(B, T)`` and
        ``query_padding_mask`` bool ``(B, J)`` (True = padding, torch's convention).

    Returns:
        ``G (B, T, 4d)``, context-to-query weights ``a (B, T, J)``, query-to-context weights
        ``b (B, T)``. Padded query words get ``a = 0``, padded context words get ``b = 0``, and
        rows of ``G`` and ``a`` at padded context positions are 0.

    Example::

        >>> import torch, attnkit
        >>> flow = attnkit.nn.BidirectionalAttention(8)
        >>> G, a, b = flow(torch.randn(2, 7, 8), torch.randn(2, 4, 8))
        >>> G.shape, a.shape, b.shape
        (torch.Size([2, 7, 32]), torch.Size([2, 7, 4]), torch.Size([2, 7]))
    """

    def __init__(self, dim: int):
        super().__init__()
        _check_dims(dim=dim)
        self.dim = dim
        self.similarity = Trilinear(dim)

    def forward(self, context: Tensor, query: Tensor, context_padding_mask: Tensor | None = None,
                query_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        _check_input("context", context, (3,), self.dim, "(B, T, d)")
        _check_input("query", query, (3,), self.dim, "(B, J, d)")
        if context.shape[0] != query.shape[0]:
            raise ValueError(f"context (B, T, d) and query (B, J, d) must have the same batch size; "
                             f"got context {shape_str(context)}, query {shape_str(query)}")
        B, T, _ = context.shape
        J = query.shape[1]
        c_keep = _check_padding("context_padding_mask", context_padding_mask, B, T, "(B, T)")
        q_keep = _check_padding("query_padding_mask", query_padding_mask, B, J, "(B, J)")
        c4, q4 = context.unsqueeze(1), query.unsqueeze(1)  # (B, 1, T, d), (B, 1, J, d)

        # context-to-query: each context word attends over the (real) query words
        c2q_mask = None if q_keep is None else _masks.key_padding(q_keep)
        if c_keep is not None:
            rows = _masks.from_mod(lambda b, h, q_idx, kv_idx: c_keep[b, q_idx])  # padded context rows: none
            c2q_mask = rows if c2q_mask is None else c2q_mask & rows
        u, a = attention(c4, q4, q4, score=self.similarity, scale=1.0, mask=c2q_mask, return_weights=True)

        # query-to-context: softmax over t of max_j S_tj (real j only)
        S = self.similarity(c4, q4).squeeze(1)  # (B, T, J)
        if q_keep is not None:
            S = S.masked_fill(~q_keep.unsqueeze(1), float("-inf"))
            m = torch.where(q_keep.any(-1, keepdim=True), S.amax(-1), torch.zeros((), dtype=S.dtype))  # (B, T)
        else:
            m = S.amax(-1)
        one = context.new_ones(B, 1, 1, 1)
        h, b = attention(one, m[:, None, :, None], c4, score="dot", scale=1.0,
                         mask=None if c_keep is None else _masks.key_padding(c_keep), return_weights=True)
        u, a, h, b = u.squeeze(1), a.squeeze(1), h.squeeze(1), b.reshape(B, T)  # (B,T,d) (B,T,J) (B,1,d) (B,T)

        G = torch.cat([context, u, context * u, context * h], dim=-1)  # (B, T, 4d); h̃ broadcasts over T
        if c_keep is not None:
            G = G.masked_fill(~c_keep.unsqueeze(-1), 0.0)
        return G, a, b

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


__all__ = ["BidirectionalAttention", "Trilinear"]
