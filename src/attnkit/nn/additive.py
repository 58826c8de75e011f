"""Additive (concat) attention of Bahdanau et al. 2015, https://arxiv.org/abs/1409.0473.

Also holds the small input checks shared by the single-head classic modules
(``luong``, ``pooling``, ``bidaf``, ``hierarchical``, ``gated``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks as _masks
from .. import scores as _scores
from .._checks import check_positive, check_probability, lookup, shape_str
from ..functional import attention

Tensor = torch.Tensor


# -- shared helpers (private) -------------------------------------------------------------
def _check_input(name: str, x: object, ndims: tuple[int, ...], features: int | None, layout: str) -> Tensor:
    """``x`` must be a floating tensor with one of ``ndims`` dims and ``features`` in its last dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}; got {type(x).__name__}")
    if x.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be a {want} tensor {layout}; got shape {shape_str(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16); got {x.dtype}")
    if features is not None and x.shape[-1] != features:
        raise ValueError(f"{name} must have {features} features in its last dim {layout}; got shape {shape_str(x)}")
    return x


def _check_padding(name: str, mask: object, batch: int, length: int, layout: str = "(B, T)") -> Tensor | None:
    """Validate a torch-convention padding mask (bool, ``True`` = padding) and return the keep-mask."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor {layout} with True = padding; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor {layout} with True = padding; got dtype {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape ({batch}, {length}) {layout}, True = padding; "
                         f"got shape {shape_str(mask)}")
    return ~mask


def _padding_mask(name: str, mask: object, batch: int, length: int, layout: str = "(B, Tk)"):
    """torch's ``key_padding_mask`` (True = padding) -> an :func:`attnkit.masks.key_padding` mask or None."""
    keep = _check_padding(name, mask, batch, length, layout)
    return None if keep is None else _masks.key_padding(keep)


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)`` with the parameters cast to ``x``'s dtype (as :mod:`attnkit.scores` does), so
    a float32 module runs on float64 or bfloat16 inputs."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def _choice(name: str, value: object, options) -> str:
    """A string option: ``TypeError`` for a non-string, ``ValueError`` listing the valid names otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(repr(o) for o in sorted(options))}; "
                        f"got {type(value).__name__}")
    lookup(name, value, {o: o for o in options})
    return value


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        check_positive(name, value, integer=True)


def attend_one_head(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Tensor | None, need_weights: bool,
                    projected_key: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Shared body of the single-head classic modules (Bahdanau, Luong): check the inputs, run
    ``attnkit.attention`` with ``module.score`` on one head, and drop the head (and, for a 2-D
    one-step query, the time) dimension again.

    Returns ``context (B, Tq, dv)`` or ``(B, dv)``, ``weights (B, Tq, Tk)`` or ``(B, Tk)`` (or None),
    and the 3-D query ``(B, Tq, dq)`` (Luong's output layer reads it).
    """
    _check_input("query", query, (2, 3), module.query_dim, "(B, Tq, dq) or (B, dq)")
    _check_input("key", key, (3,), module.key_dim, "(B, Tk, dk)")
    _check_input("value", value, (3,), module.value_dim, "(B, Tk, dv)")
    step = query.dim() == 2
    q = query.unsqueeze(1) if step else query  # (B, Tq, dq)
    if key.shape[0] != q.shape[0] or value.shape[:2] != key.shape[:2]:
        raise ValueError(f"query (B, Tq, dq), key (B, Tk, dk) and value (B, Tk, dv) must agree on B and Tk; "
                         f"got query {shape_str(query)}, key {shape_str(key)}, value {shape_str(value)}")
    mask = _padding_mask("key_padding_mask", key_padding_mask, key.shape[0], key.shape[1])
    score, k = module.score, key
    if projected_key is not None:  # W_k k + b computed once for many decoder steps
        if projected_key.shape[:2] != key.shape[:2]:
            raise ValueError(f"projected_key must be (B, Tk, hidden) for key {shape_str(key)}; "
                             f"got {shape_str(projected_key)}")
        score, k = module.score.with_projected_keys(), projected_key
    res = attention(q.unsqueeze(1), k.unsqueeze(1), value.unsqueeze(1), score=score, scale=1.0, mask=mask,
                    dropout_p=module.dropout if module.training else 0.0, return_weights=need_weights)
    ctx, w = res if need_weights else (res, None)
    ctx = ctx.squeeze(1)  # (B, 1, Tq, dv) -> (B, Tq, dv)
    w = None if w is None else w.squeeze(1)
    if step:  # one decoder step: (B, 1, .) -> (B, .)
        ctx, w = ctx.squeeze(1), (None if w is None else w.squeeze(1))
    return ctx, w, q


# -- the module ---------------------------------------------------------------------------
class AdditiveAttention(nn.Module):
    r"""Additive ("concat") attention of Bahdanau, Cho and Bengio 2015,
    https://arxiv.org/abs/1409.0473.

    .. math::
        e_{ij} = v^\top \tanh(W_q q_i + W_k k_j + b),\qquad
        \alpha_{ij} = \frac{\exp e_{ij}}{\sum_{j'} \exp e_{ij'}},\qquad
        c_i = \sum_j \alpha_{ij} v_j

    The score is :class:`attnkit.scores.Additive` (``self.score``) and the attention runs
    through :func:`attnkit.attention` with one head.

    Args:
        query_dim: ``dq``, features of the query (the decoder state).
        key_dim: ``dk``, features of the keys (the encoder annotations).
        hidden_dim: size of the hidden layer of the scoring MLP.
        value_dim: ``dv``; when given, ``value`` must have this many features (not checked if None).
        dropout: dropout on the attention weights while training.

    Forward:
        ``query (B, Tq, dq)`` or one decoder step ``(B, dq)``; ``key (B, Tk, dk)``;
        ``value (B, Tk, dv)``; ``key_padding_mask`` bool ``(B, Tk)`` with ``True`` = padding
        (torch's convention); ``need_weights``.

    Returns:
        ``(context (B, Tq, dv), weights (B, Tq, Tk))`` -- or ``(B, dv)`` and ``(B, Tk)`` for a 2-D
        query; ``weights`` is None when ``need_weights=False``. Padded keys get weight 0; a query
        whose keys are all padding gets a zero context.

    Equivalent PyTorch::

        e = (torch.tanh(q @ Wq.T)[:, :, None] + (k @ Wk.T + b)[:, None]) @ v_w   # (B, Tq, Tk)
        w = torch.softmax(e.masked_fill(key_padding_mask[:, None], -inf), -1); c = w @ value

    Example::

        >>> import torch, attnkit
        >>> attn = attnkit.nn.AdditiveAttention(query_dim=4, key_dim=6, hidden_dim=8)
        >>> ctx, w = attn(torch.randn(2, 4), torch.randn(2, 5, 6), torch.randn(2, 5, 3))
        >>> ctx.shape, w.shape, bool(torch.allclose(w.sum(-1), torch.ones(2)))
        (torch.Size([2, 3]), torch.Size([2, 5]), True)
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, value_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        _check_dims(query_dim=query_dim, key_dim=key_dim, hidden_dim=hidden_dim)
        if value_dim is not None:
            _check_dims(value_dim=value_dim)
        self.query_dim, self.key_dim, self.hidden_dim, self.value_dim = query_dim, key_dim, hidden_dim, value_dim
        self.dropout = check_probability("dropout", dropout)
        self.score = _scores.Additive(query_dim, key_dim, hidden_dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, projected_key: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        ctx, w, _ = attend_one_head(self, query, key, value, key_padding_mask, need_weights, projected_key)
        return ctx, w

    def project_keys(self, key: Tensor) -> Tensor:
        """``W_k key + b`` ``(B, Tk, hidden)``: pass it as ``projected_key=`` on every decoder step
        over the same keys to skip re-projecting them (the result is identical)."""
        return self.score.project_keys(key)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}, "
                f"value_dim={self.value_dim}, dropout={self.dropout}")


__all__ = ["AdditiveAttention"]
