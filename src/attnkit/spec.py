"""The canonical form of an attention request.

``attnkit.attention(...)`` validates its arguments once and turns every named option into
objects (a :class:`~attnkit.scores.Score`, a :class:`~attnkit.normalizers.Normalizer`, a
:class:`~attnkit.masks.Mask`, a tuple of :class:`~attnkit.positions.ScoreMod`). The frozen
:class:`AttentionSpec` is all that backends ever see.

Shape legend: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads (``H % Hkv == 0``),
``Tq`` queries, ``Tk`` keys, ``D`` query/key features, ``Dv`` value features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import normalizers as _normalizers
from . import scores as _scores
from ._checks import check_probability, check_qkv
from .masks.base import Mask, as_mask
from .positions.base import FromBias, FromScoreMod, ScoreMod, TensorBias, as_score_mod

Tensor = torch.Tensor


@dataclass(frozen=True)
class WeightsRequest:
    """Which weights to return: a subset of ``heads`` and of query ``rows`` (None = all), so that
    looking at a long sequence costs ``O(len(rows) · Tk)`` instead of ``O(Tq · Tk)``; and whether
    to ``average`` the chosen heads.

    Pass it as ``return_weights=WeightsRequest(heads=[0, 3], rows=range(0, 4096, 512))``; the
    weights then have shape ``(B, len(heads), len(rows), Tk)``, in the order given. With
    ``average=True`` they are the mean over those heads, ``(B, 1, len(rows), Tk)``
    (``nn.MultiheadAttention``'s ``average_attn_weights``): the tiled backend sums the heads tile
    by tile, so the per-head ``(B, H, Tq, Tk)`` tensor never exists.

    Example::

        >>> import torch, attnkit
        >>> q = k = v = torch.randn(1, 4, 6, 8)
        >>> _, w = attnkit.attention(q, k, v, return_weights=attnkit.WeightsRequest(average=True))
        >>> _, full = attnkit.attention(q, k, v, return_weights=True)
        >>> w.shape, torch.allclose(w, full.mean(1, keepdim=True))
        (torch.Size([1, 1, 6, 6]), True)
    """

    heads: Optional[tuple[int, ...]] = None
    rows: Optional[tuple[int, ...]] = None
    average: bool = False

    def __init__(self, heads=None, rows=None, average: bool = False):
        if not isinstance(average, bool):
            raise TypeError(f"WeightsRequest average must be a bool; got {type(average).__name__}")
        object.__setattr__(self, "heads", None if heads is None else _index_tuple("heads", heads))
        object.__setattr__(self, "rows", None if rows is None else _index_tuple("rows", rows))
        object.__setattr__(self, "average", average)

    @property
    def everything(self) -> bool:
        """Every head and every row asked for (averaged or not)."""
        return self.heads is None and self.rows is None

    def check(self, H: int, Tq: int) -> None:
        for name, idx, n in (("heads", self.heads, H), ("rows", self.rows, Tq)):
            if idx is not None and any(not 0 <= i < n for i in idx):
                raise ValueError(f"WeightsRequest {name} must lie in [0, {n}); got {list(idx)}")

    def select(self, w: Tensor) -> Tensor:
        """Pick the requested heads and rows out of full weights ``(B, H, Tq, Tk)`` (and average
        the heads when asked)."""
        if self.heads is not None:
            w = w[:, list(self.heads)]
        if self.rows is not None:
            w = w[:, :, list(self.rows)]
        return w.mean(1, keepdim=True) if self.average else w


def _index_tuple(name: str, idx) -> tuple[int, ...]:
    if isinstance(idx, int) and not isinstance(idx, bool):
        return (idx,)
    try:
        out = tuple(int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx))
    except (TypeError, ValueError):
        raise TypeError(f"WeightsRequest {name} must be an int or a sequence of ints; got {type(idx).__name__}") from None
    if not out:
        raise ValueError(f"WeightsRequest {name} must not be empty")
    return out


@dataclass(frozen=True)
class AttentionSpec:
    score: _scores.Score
    normalizer: _normalizers.Normalizer
    mask: Optional[Mask]
    score_mods: tuple[ScoreMod, ...]
    scale: float
    dropout_p: float
    return_weights: bool
    weights: Optional[WeightsRequest]  # which weights, when return_weights
    generator: Optional[torch.Generator]
    B: int
    H: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    Dv: int
    dtype: torch.dtype
    device: torch.device
    #: the output may need a gradient (see :func:`_needs_grad`)
    requires_grad: bool
    #: user score mod callables whose result needs a gradient: they close over a tensor that
    #: requires grad (found by :meth:`~attnkit.positions.FromScoreMod.closes_over_grad`)
    grad_mods: tuple[str, ...] = ()

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.H // self.Hkv


def canonicalize(q: Tensor, k: Tensor, v: Tensor, *, score="scaled_dot", normalizer="softmax", mask=None,
                 bias=None, scale: float | None = None, dropout_p: float = 0.0, return_weights: bool | WeightsRequest = False,
                 generator: torch.Generator | None = None) -> AttentionSpec:
    """Validate an attention request and return its :class:`AttentionSpec` (see ``attnkit.attention``)."""
    check_qkv(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1:3]

    score_obj = _scores.get(score)
    score_obj.check(q, k)
    norm_obj = _normalizers.get(normalizer)

    if scale is None:
        scale = score_obj.default_scale(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    elif not (scale > 0 and scale == scale and scale != float("inf")):
        raise ValueError(f"scale must be a finite number > 0; got {scale}")

    dropout_p = check_probability("dropout_p", dropout_p)
    weights = None
    if isinstance(return_weights, WeightsRequest):
        return_weights.check(H, Tq)
        weights, return_weights = return_weights, True
    elif not isinstance(return_weights, bool):
        raise TypeError(f"return_weights must be a bool or an attnkit.WeightsRequest; got {type(return_weights).__name__}")
    elif return_weights:
        weights = WeightsRequest()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")

    mask_obj = None if mask is None else as_mask(mask)
    if mask_obj is not None:
        mask_obj.check(B, H, Tq, Tk)
        if not mask_obj.has_weight_factor and mask_obj.sees_every_key(Tq, Tk):
            mask_obj = None  # e.g. causal for one query at the end of the cache: the unmasked call

    if bias is None:
        mods: tuple[ScoreMod, ...] = ()
    elif isinstance(bias, (list, tuple)):
        mods = tuple(as_score_mod(b) for b in bias)
    else:
        mods = (as_score_mod(bias),)
    for m in mods:
        m.check(B, H, Tq, Tk)

    grad_mods = tuple(repr(m) for m in mods if isinstance(m, (FromScoreMod, FromBias))
                      and m.closes_over_grad(q.dtype, q.device)) if torch.is_grad_enabled() else ()
    return AttentionSpec(
        score=score_obj, normalizer=norm_obj, mask=mask_obj, score_mods=mods, scale=float(scale),
        dropout_p=dropout_p, return_weights=return_weights, weights=weights, generator=generator,
        B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, D=D, Dv=v.shape[-1], dtype=q.dtype, device=q.device,
        requires_grad=torch.is_grad_enabled() and (bool(grad_mods) or _needs_grad((q, k, v), score_obj, mods)),
        grad_mods=grad_mods,
    )


def _needs_grad(qkv, score: "_scores.Score", mods: tuple[ScoreMod, ...]) -> bool:
    """Whether the output may need a gradient: an input, a score parameter or a bias needs one
    (user callables are probed separately, see ``grad_mods``)."""
    if any(x.requires_grad for x in qkv) or any(p.requires_grad for p in score.parameters()):
        return True
    for m in mods:
        if isinstance(m, TensorBias) and m.tensor.requires_grad:
            return True
        if isinstance(m, torch.nn.Module) and any(p.requires_grad for p in m.parameters()):
            return True
    return False
