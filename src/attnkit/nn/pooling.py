"""Attention pooling: a learned query summarizes a sequence into one vector (seed 000 §3, §5;
Yang et al. 2016, https://aclanthology.org/N16-1174/)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import attention
from .additive import _check_dims, _check_input, _choice, _linear, _padding_mask

Tensor = torch.Tensor

MODES = ("query", "mlp")


class AttentionPooling(nn.Module):
    r"""Pool a sequence ``x_1..x_T`` into ``z = Σ_i α_i x_i`` with learned-query attention.

    ``mode="query"`` (seed 000 §3, learned-query pooling):

    .. math:: \alpha = \mathrm{softmax}_i(q^\top x_i),\qquad z = \sum_i \alpha_i x_i

    ``mode="mlp"`` (seed 000 §5; the word/sentence attention of HAN, Yang et al. 2016,
    https://aclanthology.org/N16-1174/):

    .. math:: u_i = \tanh(W x_i + b),\qquad \alpha = \mathrm{softmax}_i(u_i^\top u_w),\qquad
              z = \sum_i \alpha_i x_i

    Both run through :func:`attnkit.attention` with the ``"dot"`` score, one head, the learned
    query (``q`` or the context vector ``u_w``) as the query, keys ``x_i`` (or ``u_i``) and values
    ``x_i``. With ``num_queries=n`` there are ``n`` learned queries and ``n`` pooled vectors.

    Args:
        input_dim: ``D``, features of ``x``.
        hidden_dim: size of ``u_i`` and ``u_w`` in ``mode="mlp"`` (default ``input_dim``); must
            be None in ``mode="query"``.
        mode: ``"query"`` or ``"mlp"``.
        num_queries: None (one query; outputs without a query dim) or ``n >= 1`` (outputs keep a
            dim of ``n``).

    Forward:
        ``x (B, T, D)``, ``key_padding_mask`` bool ``(B, T)`` with True = padding.

    Returns:
        ``(pooled (B, D), weights (B, T))``, or ``(B, n, D)`` and ``(B, n, T)`` with
        ``num_queries=n``. Padded positions get weight 0; an all-padding row pools to zeros.

    Example::

        >>> import torch, attnkit
        >>> pool = attnkit.nn.AttentionPooling(6, mode="mlp", hidden_dim=4)
        >>> z, w = pool(torch.randn(2, 5, 6), key_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
        >>> z.shape, w[1, 3:].tolist()
        (torch.Size([2, 6]), [0.0, 0.0])
    """

    def __init__(self, input_dim: int, hidden_dim: int | None = None, mode: str = "query",
                 num_queries: int | None = None):
        super().__init__()
        _choice("mode", mode, MODES)
        if mode == "query" and hidden_dim is not None:
            raise ValueError(f"hidden_dim is only used by mode='mlp'; got hidden_dim={hidden_dim} with mode='query'")
        hidden_dim = input_dim if hidden_dim is None else hidden_dim
        _check_dims(input_dim=input_dim, hidden_dim=hidden_dim)
        if num_queries is not None:
            _check_dims(num_queries=num_queries)
        self.input_dim, self.mode, self.num_queries = input_dim, mode, num_queries
        n = 1 if num_queries is None else num_queries
        if mode == "query":
            self.hidden_dim = None
            self.proj = None
            self.query = nn.Parameter(torch.randn(n, input_dim) / math.sqrt(input_dim))
        else:
            self.hidden_dim = hidden_dim
            self.proj = nn.Linear(input_dim, hidden_dim)
            self.query = nn.Parameter(torch.randn(n, hidden_dim) / math.sqrt(hidden_dim))  # u_w

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input("x", x, (3,), self.input_dim, "(B, T, D)")
        B, T, _ = x.shape
        mask = _padding_mask("key_padding_mask", key_padding_mask, B, T, "(B, T)")
        keys = x if self.proj is None else torch.tanh(_linear(x, self.proj))  # x_i or u_i: (B, T, D|hidden)
        q = self.query.to(x.dtype).expand(B, 1, -1, -1)  # (B, 1, n, D|hidden)
        z, w = attention(q, keys.unsqueeze(1), x.unsqueeze(1), score="dot", mask=mask, return_weights=True)
        z, w = z.squeeze(1), w.squeeze(1)  # (B, n, D), (B, n, T)
        if self.num_queries is None:
            z, w = z.squeeze(1), w.squeeze(1)
        return z, w

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, mode={self.mode!r}, "
                f"num_queries={self.num_queries}")


__all__ = ["AttentionPooling", "MODES"]
