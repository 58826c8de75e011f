"""What every tile body shares: evaluating one tile's scores, score mods and mask on index grids,
and the GQA helpers (query heads grouped over one key/value head)."""

from __future__ import annotations

import torch

from ..masks.base import index_grid
from ..normalizers.base import Normalize, Sigmoid, Softmax
from ..normalizers.sparse import Entmax, Entmax15, Sparsemax
from ..spec import AttentionSpec
from .dropout import row_hash

Tensor = torch.Tensor
NEG_INF = float("-inf")


def expand(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reduce_groups(x: Tensor, groups: int) -> Tensor:
    """Sum the gradient of head-expanded keys/values back onto the Hkv heads."""
    if groups == 1:
        return x
    B, H, T, D = x.shape
    return x.view(B, H // groups, groups, T, D).sum(2)


class Tile:
    """Evaluates scores and the mask on one (query block, run) tile."""

    def __init__(self, spec: AttentionSpec, device, prescaled: bool = False):
        self.spec = spec
        self.device = device
        self.prescaled = prescaled
        self.inv_temp = 1.0 / spec.normalizer.temperature if isinstance(spec.normalizer, Softmax) else 1.0

    def grid(self, qs, qe, ks, ke):
        b, h, q, kv = index_grid(self.spec.B, self.spec.H, qe - qs, ke - ks, self.device)
        return b, h, q + qs, kv + ks

    def row_biases(self, qs: int, grid, dtype):
        """The prescaled plan's row-separable biases: one ``(1, H, 1 or r, tk)`` row each per
        tile, relative to the tile's first query (the row term cancels in the softmax; see
        :meth:`ScoreMod.key_bias`), already divided by the temperature."""
        spec = self.spec
        for mod in spec.score_mods:
            bias = mod.key_bias(grid[1], grid[3], self.q_ref(qs, grid), spec.Tq, spec.Tk).to(dtype)
            yield bias * self.inv_temp if self.inv_temp != 1.0 else bias

    def scores(self, qp: Tensor, kp: Tensor, qs: int, ks: int, grid, raw: Tensor | None = None,
               slopes: list | None = None) -> Tensor:
        """The tile's scores after scale, score mods and temperature (from ``raw``, the score's
        own tile, when the caller has it already). With a list ``slopes``, each mod that is a
        function of the score alone appends its derivative there (:meth:`ScoreMod.pointwise_slope`): their
        product is ``d s / d (scale · raw)`` up to the temperature, for a closed-form backward."""
        spec = self.spec
        s = spec.score.tile(qp, kp) if raw is None else raw
        if self.prescaled:
            for bias in self.row_biases(qs, grid, s.dtype):
                s = s.add_(bias)
            return s
        c = spec.scale
        if c != 1.0:
            s = s * c
        for mod in spec.score_mods:
            s = mod.score_mod(s, *grid, spec.Tq, spec.Tk)
            if slopes is not None and mod.pointwise:
                slopes.append(mod.pointwise_slope(s))
        if self.inv_temp != 1.0:
            s = s * self.inv_temp
        return s

    #: set by tiled_weights: the forward's query-block size, so rows use their block's reference
    rows_block: int | None = None

    def q_ref(self, qs: int, grid):
        if self.rows_block is None:
            return qs  # the forward/backward tile's first query
        return (grid[2] // self.rows_block) * self.rows_block  # per row: its forward block's first query

    def allowed(self, grid) -> Tensor:
        return self.spec.mask.mask_mod(*grid, self.spec.Tq, self.spec.Tk)


def dropout_rows(seed: int | None, spec: AttentionSpec, qs: int, qe: int, device) -> Tensor | None:
    if seed is None:
        return None
    b, h, q, _ = index_grid(spec.B, spec.H, qe - qs, 1, device)
    return row_hash(seed, b, h, q + qs)  # (B, H, bq, 1)


def normalizer_kind(spec: AttentionSpec) -> str:
    n = spec.normalizer
    if isinstance(n, (Sparsemax, Entmax15, Entmax)):
        return "entmax"
    return "sigmoid" if isinstance(n, Sigmoid) else "normalize" if isinstance(n, Normalize) else "softmax"


def entmax_alpha(spec: AttentionSpec) -> float:
    """α of a sparse normalizer: sparsemax 2, 1.5-entmax 1.5, ``Entmax(alpha)`` its own."""
    n = spec.normalizer
    return 2.0 if isinstance(n, Sparsemax) else 1.5 if isinstance(n, Entmax15) else float(n.alpha)


def entmax_gates(d: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """From ``d = [x - τ]_+`` (``x = (α - 1) s``): the weights ``p = d^(1/(α-1))`` and the
    Jacobian's ``g = p^(2-α)`` (``1`` on the support for sparsemax, ``d`` for 1.5-entmax)."""
    if alpha == 2.0:
        return d, (d > 0).to(d.dtype)
    if alpha == 1.5:
        return d * d, d
    inv = 1.0 / (alpha - 1.0)
    return d.pow(inv), torch.where(d > 0, d.pow(inv * (2.0 - alpha)), 0.0)


def entmax_d(s: Tensor, tau_i: Tensor, alpha: float, allowed: Tensor | None) -> Tensor:
    """``[(α - 1) s - τ]_+`` of a tile, 0 where ``allowed`` is False (``τ = +inf``: a dead row)."""
    d = (s * (alpha - 1.0) if alpha != 2.0 else s) - tau_i.unsqueeze(-1)
    d = d.clamp_min_(0.0) if d is not s else d.clamp_min(0.0)
    return d.masked_fill_(~allowed, 0.0) if allowed is not None else d


def probabilities(s: Tensor, lse_i: Tensor | None, spec: AttentionSpec, allowed: Tensor | None) -> Tensor:
    """A tile's normalized weights from its scores ``s`` and its rows' statistic ``lse_i`` (the
    log-sum-exp for softmax, the denominators for :class:`Normalize`, the thresholds ``τ`` for
    sparsemax and entmax; unused for sigmoid), zero where ``allowed`` is False."""
    kind = normalizer_kind(spec)
    if kind == "entmax":  # lse_i holds the thresholds τ
        alpha = entmax_alpha(spec)
        return entmax_gates(entmax_d(s, lse_i, alpha, allowed), alpha)[0]
    if kind == "sigmoid":
        p = torch.sigmoid(s + spec.normalizer.offset(spec.Tk))
    elif kind == "normalize":
        p = s / lse_i.unsqueeze(-1)  # lse_i holds the denominators
    else:
        # dead rows have lse = -inf: make their probabilities 0 instead of e^(+inf)
        p = torch.exp(s - lse_i.masked_fill(lse_i == NEG_INF, float("inf")).unsqueeze(-1))
    if allowed is not None:
        p = p.masked_fill(~allowed, 0.0)
    return p
