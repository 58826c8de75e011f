"""The reference backend: materializes every intermediate, in any dtype. It is the oracle
that every other path is tested against, and the plainest statement of what attention is::

    s   = score(q, k) * scale                  (B, H, Tq, Tk)
    s   = score_mod(s, b, h, i, j)  for each bias
    w   = normalizer(s, mask)                  masked -> 0, fully masked rows -> 0
    w   = w * weight_factor(mask)              (Luong local-p only)
    out = dropout(w) @ v                       (B, H, Tq, Dv)
"""

from __future__ import annotations

import torch

from ..kernels.dropout import draw_seed, keep_mask, row_hash
from ..masks.base import index_grid
from ..spec import AttentionSpec

Tensor = torch.Tensor


def expand_kv(x: Tensor, groups: int) -> Tensor:
    """Repeat each key/value head ``groups`` times: ``(B, Hkv, T, D) -> (B, Hkv*groups, T, D)``.
    Query head ``h`` reads key/value head ``h // groups`` (as SDPA's ``enable_gqa``)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def dropout_weights(w: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout on the weights ``(B, H, Tq, Tk)``, from a counter-based hash of the
    positions and a seed drawn from ``generator`` (see :mod:`attnkit.kernels.dropout`), so the
    tiled backend drops exactly the same weights for the same generator state."""
    if p == 0.0:
        return w
    b, h, q, kv = index_grid(*w.shape, device=w.device)
    keep = keep_mask(row_hash(draw_seed(generator), b, h, q), kv, p)
    return w * keep.to(w.dtype) / (1.0 - p)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Returns ``out (B, H, Tq, Dv)`` and the pre-dropout weights ``(B, H, Tq, Tk)``."""
    k, v = expand_kv(k, spec.groups), expand_kv(v, spec.groups)
    s = spec.score(q, k)
    if spec.scale != 1.0:
        s = s * spec.scale
    for mod in spec.score_mods:
        s = mod.apply_to_scores(s)
    allowed = None
    if spec.mask is not None:
        allowed = spec.mask.materialize(spec.Tq, spec.Tk, spec.B, spec.H, device=q.device)
    w = spec.normalizer(s, allowed)
    if spec.mask is not None and spec.mask.has_weight_factor:
        w = w * spec.mask.materialize_factor(spec.Tq, spec.Tk, spec.B, spec.H, device=q.device, dtype=w.dtype)
    out = dropout_weights(w, spec.dropout_p, spec.generator) @ v
    return out, w


class ReferenceBackend:
    name = "reference"

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        return []

    def describe(self, spec: AttentionSpec) -> str:
        """How this backend will run ``spec`` (for :func:`attnkit.explain`)."""
        return f"the plain formula, materializing the (B, H, Tq, Tk) = ({spec.B}, {spec.H}, {spec.Tq}, {spec.Tk}) scores"

    def __call__(self, q, k, v, spec):
        out, w = reference_attention(q, k, v, spec)
        return out, (spec.weights.select(w) if spec.return_weights else None)
