r"""Sparse normalizers: sparsemax, 1.5-entmax and α-entmax.

They map a row of scores ``z`` to a probability vector that can put *exactly zero* weight on
low-scoring keys. All three are members of the α-entmax family (Peters et al. 2019,
https://arxiv.org/abs/1905.05702)::

    entmax_α(z) = argmax_{p ∈ Δ} pᵀz + H_α(p)   =   [(α - 1) z - τ]_+ ^ (1 / (α - 1))

where ``τ`` is the unique threshold that makes the row sum to 1. ``α → 1`` is softmax, ``α = 2``
is sparsemax (Martins & Astudillo 2016, https://arxiv.org/abs/1602.02068) and ``α = 1.5`` is
"1.5-entmax". Sparsemax and 1.5-entmax have exact sort-based solutions; other ``α`` are found
by bisection on ``τ``.

All of them have a closed-form backward on the support ``S = {j : p_j > 0}``: with
``s = p^(2-α)`` on ``S`` (0 elsewhere),

    dz = g ⊙ s - s · (Σ_j g_j s_j) / (Σ_j s_j)

(for sparsemax ``s`` is the support indicator, so ``dz = g - mean_S(g)`` on ``S``).

Masked keys arrive as ``-inf`` scores: they are never in the support, get exactly 0 weight and
0 gradient, and a row that is all ``-inf`` gives zeros (never NaN). ``+inf`` scores are not
supported. Low-precision inputs (bfloat16, float16) are computed in float32 and cast back.
"""

from __future__ import annotations

import torch

from .._checks import check_positive
from .base import Normalizer, check_scores

Tensor = torch.Tensor

_NEG_INF = float("-inf")


# -- shared helpers --------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shift_by_max(z: Tensor) -> Tensor:
    """``z - max(z)`` per row; rows that are all ``-inf`` are left as they are (shift 0)."""
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return z - m


def _sorted_finite(z: Tensor) -> tuple[Tensor, Tensor]:
    """Scores sorted in descending order, with the trailing ``-inf`` replaced by 0, and the
    mask of the finite sorted positions (a prefix of every row)."""
    zs, _ = torch.sort(z, dim=-1, descending=True)
    finite = zs > _NEG_INF
    return torch.where(finite, zs, torch.zeros_like(zs)), finite


def _ranks(z: Tensor) -> Tensor:
    """``1, 2, ..., n`` shaped to broadcast against the last dim of ``z``."""
    n = z.shape[-1]
    return torch.arange(1, n + 1, device=z.device, dtype=z.dtype).view(*([1] * (z.dim() - 1)), n)


def _entmax_backward(grad: Tensor, gppr: Tensor) -> Tensor:
    """``dz = g ⊙ s - s · Σ(g ⊙ s) / Σ s`` with ``s = gppr`` (0 off the support)."""
    dz = grad * gppr
    total = gppr.sum(dim=-1, keepdim=True)
    q = dz.sum(dim=-1, keepdim=True) / torch.where(total > 0, total, torch.ones_like(total))
    return dz - q * gppr


# -- sparsemax -------------------------------------------------------------------------------
def _sparsemax_forward(z: Tensor) -> Tensor:
    """Exact sparsemax along the last dim (Martins & Astudillo 2016, Algorithm 1)."""
    z = _shift_by_max(z)
    zs, finite = _sorted_finite(z)
    k = _ranks(z)
    cumsum = zs.cumsum(dim=-1)
    # key j (in sorted order) is in the support iff 1 + j·z_(j) > Σ_{i<=j} z_(i); this holds on a prefix
    in_support = (1 + k * zs > cumsum) & finite
    size = in_support.sum(dim=-1, keepdim=True).clamp_min(1)
    tau = (cumsum.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return torch.clamp(z - tau, min=0)


class _SparsemaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        p = _sparsemax_forward(z.to(_compute_dtype(z.dtype)))
        ctx.save_for_backward(p)
        return p.to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        support = (p > 0).to(p.dtype)
        return _entmax_backward(grad.to(p.dtype), support).to(grad.dtype)


def sparsemax(scores: Tensor) -> Tensor:
    """Sparsemax along the last dim: ``p = [z - τ]_+`` with ``Σ p = 1`` (see :class:`Sparsemax`)."""
    check_scores(scores)
    if scores.shape[-1] == 0:  # no keys at all
        return scores.clone()
    return _SparsemaxFunction.apply(scores)


# -- 1.5-entmax ------------------------------------------------------------------------------
def _entmax15_forward(z: Tensor) -> Tensor:
    """Exact sort-based 1.5-entmax along the last dim (Peters et al. 2019, Algorithm 2)."""
    x = _shift_by_max(z / 2)  # (α - 1) z with α = 1.5
    xs, finite = _sorted_finite(x)
    rho = _ranks(x)
    mean = xs.cumsum(dim=-1) / rho
    mean_sq = (xs * xs).cumsum(dim=-1) / rho
    ss = rho * (mean_sq - mean * mean)
    delta = (1 - ss) / rho
    # τ if the support were the top-ρ keys: solves Σ_{i<=ρ} (x_(i) - τ)² = 1
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    size = ((tau <= xs) & finite).sum(dim=-1, keepdim=True).clamp_min(1)
    tau_star = tau.gather(-1, size - 1)
    return torch.clamp(x - tau_star, min=0) ** 2


class _Entmax15Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        p = _entmax15_forward(z.to(_compute_dtype(z.dtype)))
        ctx.save_for_backward(p)
        return p.to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        return _entmax_backward(grad.to(p.dtype), p.sqrt()).to(grad.dtype)


def entmax15(scores: Tensor) -> Tensor:
    """Exact 1.5-entmax along the last dim (see :class:`Entmax15`)."""
    check_scores(scores)
    if scores.shape[-1] == 0:  # no keys at all
        return scores.clone()
    return _Entmax15Function.apply(scores)


# -- α-entmax by bisection --------------------------------------------------------------------
def default_n_iter(dtype: torch.dtype) -> int:
    """Bisection steps that shrink the bracket on ``τ`` (width < 1) below the compute dtype's
    resolution: 60 for float64, 30 otherwise (computed in float32)."""
    return 60 if dtype == torch.float64 else 30


def _entmax_bisect_forward(z: Tensor, alpha: float, n_iter: int) -> Tensor:
    """α-entmax along the last dim by bisection on ``τ`` (Blondel et al. 2019,
    https://arxiv.org/abs/1901.02324; the ``entmax`` package's algorithm)."""
    inv = 1.0 / (alpha - 1)
    x = _shift_by_max(z * (alpha - 1))  # max of every live row is 0
    n = (x > _NEG_INF).sum(dim=-1, keepdim=True).clamp_min(1).to(x.dtype)
    # p_j = [x_j - τ]_+^(1/(α-1)) sums to >= 1 at τ = -1 (the max key alone gives 1) and to <= 1 at
    # τ = -(1/n)^(α-1) (each of the n live keys gives at most 1/n): bisect between them.
    tau_lo = torch.full_like(n, -1.0)
    width = 1.0 - (1.0 / n) ** (alpha - 1)
    for _ in range(n_iter):
        width = width / 2
        tau_m = tau_lo + width
        mass = (torch.clamp(x - tau_m, min=0) ** inv).sum(dim=-1, keepdim=True)
        tau_lo = torch.where(mass >= 1, tau_m, tau_lo)
    p = torch.clamp(x - tau_lo, min=0) ** inv
    total = p.sum(dim=-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))  # exact sum 1; dead rows stay 0


class _EntmaxBisectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, alpha: float, n_iter: int | None) -> Tensor:
        dtype = _compute_dtype(z.dtype)
        p = _entmax_bisect_forward(z.to(dtype), alpha, default_n_iter(dtype) if n_iter is None else n_iter)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p.to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (p,) = ctx.saved_tensors
        support = p > 0
        # p^(2-α) on the support; computed on a clamped copy so that α > 2 never forms 0^(negative)
        gppr = torch.where(support, p.clamp_min(torch.finfo(p.dtype).tiny) ** (2 - ctx.alpha), torch.zeros_like(p))
        return _entmax_backward(grad.to(p.dtype), gppr).to(grad.dtype), None, None


def entmax_bisect(scores: Tensor, alpha: float = 1.5, n_iter: int | None = None) -> Tensor:
    """α-entmax along the last dim by bisection (see :class:`Entmax`)."""
    check_scores(scores)
    if scores.shape[-1] == 0:  # no keys at all
        return scores.clone()
    return _EntmaxBisectFunction.apply(scores, float(alpha), n_iter)


# -- the Normalizer classes -------------------------------------------------------------------
class Sparsemax(Normalizer):
    r"""Sparsemax (Martins & Astudillo 2016, https://arxiv.org/abs/1602.02068): the Euclidean
    projection of the scores onto the probability simplex,

    ``p = argmin_{p ∈ Δ} ‖p - z‖²  =  [z - τ(z)]_+``,  with ``τ`` such that ``Σ_j p_j = 1``.

    Computed exactly by sorting (``O(Tk log Tk)`` per row). Gradient: ``dz_j = g_j - mean_{S}(g)``
    for ``j`` in the support ``S = {j : p_j > 0}``, 0 elsewhere. Shapes: ``(..., Tk) -> (..., Tk)``.

    Example::

        >>> import torch, attnkit
        >>> attnkit.normalizers.Sparsemax()(torch.tensor([1.0, 0.5, -1.0])).tolist()
        [0.75, 0.25, 0.0]
        >>> attnkit.normalizers.Sparsemax()(torch.tensor([1.0, 0.5, 9.0]), torch.tensor([True, True, False])).tolist()
        [0.75, 0.25, 0.0]
    """

    name = "sparsemax"

    def normalize(self, scores: Tensor) -> Tensor:
        return sparsemax(scores)


class Entmax15(Normalizer):
    r"""1.5-entmax (Peters, Niculae & Martins 2019, https://arxiv.org/abs/1905.05702):

    ``p = [z / 2 - τ]_+²``,  with ``τ`` such that ``Σ_j p_j = 1``,

    between softmax (dense) and sparsemax (sparser). Computed exactly by sorting. Gradient:
    ``dz = g ⊙ s - s Σ(g ⊙ s) / Σ s`` with ``s = √p``. Shapes: ``(..., Tk) -> (..., Tk)``.

    Example::

        >>> import torch, attnkit
        >>> p = attnkit.normalizers.Entmax15()(torch.tensor([1.0, 0.6, -1.0]))
        >>> [round(x, 4) for x in p.tolist()]
        [0.64, 0.36, 0.0]
    """

    name = "entmax15"

    def normalize(self, scores: Tensor) -> Tensor:
        return entmax15(scores)


class Entmax(Normalizer):
    r"""α-entmax for any ``α > 1`` (Peters, Niculae & Martins 2019, https://arxiv.org/abs/1905.05702):

    ``p = [(α - 1) z - τ]_+ ^ (1/(α - 1))``,  with ``τ`` such that ``Σ_j p_j = 1``,

    found by bisection on ``τ`` (then renormalized so rows sum to 1 exactly). ``α = 2`` is
    sparsemax, ``α = 1.5`` is 1.5-entmax, ``α → 1`` tends to softmax (use ``"softmax"``). The
    string ``"entmax"`` means ``Entmax(alpha=1.5)``. Gradient: ``dz = g ⊙ s - s Σ(g ⊙ s) / Σ s``
    with ``s = p^(2-α)`` on the support.

    Args:
        alpha: ``α > 1``.
        n_iter: bisection steps; default ``None`` picks by dtype (60 in float64, 30 in float32 and
            below), which narrows ``τ`` to the dtype's resolution.

    Example::

        >>> import torch, attnkit
        >>> z = torch.tensor([1.0, 0.5, -1.0])
        >>> [round(x, 4) for x in attnkit.normalizers.Entmax(alpha=2.0)(z).tolist()]
        [0.75, 0.25, 0.0]
    """

    name = "entmax"

    def __init__(self, alpha: float = 1.5, n_iter: int | None = None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a number > 1; got {type(alpha).__name__}")
        if not (alpha > 1 and alpha != float("inf")):
            raise ValueError(f"alpha must be a finite number > 1 (alpha = 1 is softmax: use 'softmax'); got {alpha}")
        if n_iter is not None:
            n_iter = int(check_positive("n_iter", n_iter, integer=True))
        self.alpha = float(alpha)
        self.n_iter = n_iter

    def normalize(self, scores: Tensor) -> Tensor:
        return entmax_bisect(scores, self.alpha, self.n_iter)


__all__ = ["Sparsemax", "Entmax15", "Entmax", "sparsemax", "entmax15", "entmax_bisect", "default_n_iter"]
