"""Sparsemax and α-entmax (1 < α <= 2) block by block: exact, without the ``(Tq, Tk)`` matrix.

``p_ij = [x_ij - τ_i]_+^(1/(α-1))`` with ``x = (α - 1) s`` and each row's threshold ``τ_i`` such
that ``Σ_j p_ij = 1`` (Peters, Niculae & Martins 2019; sparsemax is α = 2). A query block's
scores over its live keys are computed once and held (``BLOCK_BYTES`` at most: taller blocks are
cut into fewer rows, down to one row, ``O(B · H · Tk)``). Every weight is at most 1, so a row's
support lies in ``x > max - 1``: the keys come in groups of ``GROUP``, and the threshold computed
in closed form from the values of the groups whose maxima exceed ``max - 1`` is the row's own
when every key left out is below it (the usual case: supports are narrow). Rows with more such
groups than ``CANDIDATE_GROUPS`` find ``τ`` by Newton's method on
``f(τ) = Σ_j [x_j - τ]_+^(1/(α-1))``, started from that threshold of the kept values (a lower
bound: the other keys only add to ``f``), one pass over the held scores per step.

Why Newton is safe and exact here: for α <= 2, ``f`` is convex and decreasing, so Newton started
left of the root (``f(τ_0) >= 1``) climbs monotonically to ``τ*`` and never overshoots. For sparsemax ``f`` is piecewise linear and each step is Michelot's projection
step ``τ = (Σ_{x > τ} x - 1) / |{x > τ}|``: it stops, exactly, as soon as the support stops
changing; other α stop at float precision (Newton converges quadratically).

The output comes from the same held scores, with ``out_g = Σ_j g_ij v_j / Σ_j g_ij`` where
``g = p^(2-α)`` (the entmax Jacobian's weights): the backward's row term ``Σ_j g_j dp_j / Σ_j g_j``
is then ``dO_i · out_g_i``, so the backward is the softmax backward's, with ``dS = g ∘ (dP - D)``
(:func:`attnkit.kernels.tiled.tiled_backward`), and nothing ``(Tq, Tk)``-sized is stored: ``τ``
and ``out_g`` are ``O(Tq)`` per head.
"""

from __future__ import annotations

import torch

from ..spec import AttentionSpec
from .plan import Plan
from .tile import NEG_INF, Tile, entmax_alpha, entmax_gates, expand

Tensor = torch.Tensor
#: at most this many Newton passes (the iteration stops long before on every input tried)
MAX_STEPS = 60
#: each row's threshold is found among the keys of its ``CANDIDATE_GROUPS`` groups of ``GROUP``
#: consecutive keys with the largest maxima; rows with more groups near their maximum (wide
#: supports) refine it by Newton passes
GROUP, CANDIDATE_GROUPS = 32, 64
#: the lower bound that picks the groups is the threshold of this many largest group maxima
FIRST_GROUPS = 32
#: a query block's scores are held whole while its thresholds and output are computed: blocks
#: whose scores would take more than this are cut into fewer rows at a time
BLOCK_BYTES = 32 * 2**20


def _width(runs) -> int:
    """The runs' total length rounded up to a multiple of ``GROUP``."""
    return -(-sum(r.stop - r.start for r in runs) // GROUP) * GROUP


def _view(work: Tensor, *shape: int) -> Tensor:
    """A contiguous ``shape`` view of the start of the flat workspace ``work``."""
    n = 1
    for d in shape:
        n *= d
    return work[:n].view(shape)


def block_scores(qi: Tensor, kp: Tensor, qs: int, qe: int, runs, tile: Tile, spec: AttentionSpec,
                 work: Tensor | None = None) -> Tensor:
    """``x = (α - 1) s`` of rows ``[qs, qe)`` over their live runs, side by side: ``(B, H, rows, L)``
    with ``L`` the runs' total length rounded up to a multiple of ``GROUP`` (the padding, and the
    masked keys of partial runs, are ``-inf``); written into the flat workspace ``work`` when given
    (one allocation for every block: fresh pages cost more than the products written into them).
    Dot scores without mods are written in place."""
    am1 = entmax_alpha(spec) - 1.0
    live = sum(r.stop - r.start for r in runs)
    shape = (spec.B, spec.H, qe - qs, _width(runs))
    buf = qi.new_empty(shape) if work is None else _view(work, *shape)
    buf[..., live:] = NEG_INF
    direct = tile.prescaled and not spec.score_mods
    qx = qi * am1 if direct and am1 != 1.0 else qi
    at = 0
    for r in runs:
        dst = buf[..., at:at + r.stop - r.start]
        at += r.stop - r.start
        kj = expand(kp[:, :, r.start:r.stop], spec.groups)
        grid = tile.grid(qs, qe, r.start, r.stop) if r.partial or not direct else None
        if direct:
            torch.matmul(qx, kj.transpose(-2, -1), out=dst)
        else:
            dst.copy_(tile.scores(qi, kj, qs, r.start, grid))
            if am1 != 1.0:
                dst.mul_(am1)
        if r.partial:
            dst.masked_fill_(~tile.allowed(grid), NEG_INF)
    return buf


def thresholds(x: Tensor, spec: AttentionSpec) -> Tensor:
    """``τ (B, H, rows, 1)`` of the rows of ``x`` (:func:`block_scores`); ``+inf`` for rows with no
    live key. The keys come in groups of ``GROUP``; the threshold of the few largest group maxima
    is a lower bound ``τ_0`` of the row's (a subset's threshold is at most the whole row's: its
    other keys only add to ``f``), so the support lies in the groups whose maxima exceed it. The
    threshold of those groups' values above ``τ_0``, in closed form, is the row's own when every key
    left out is at or below it (checked); rows with more such groups than ``CANDIDATE_GROUPS``
    refine it by Newton passes over the whole row (see the module docstring)."""
    alpha = entmax_alpha(spec)
    inv = 1.0 / (alpha - 1.0)
    acc = torch.float64  # the row sums are (rows, 1): add them up in float64 whatever the input
    groups = x.unflatten(-1, (-1, GROUP))
    gmax = groups.amax(-1)
    width = gmax.shape[-1]
    first = gmax.topk(min(FIRST_GROUPS, width), -1).values.to(acc)
    m = first[..., :1]
    dead = m == NEG_INF
    tau = torch.where(dead, torch.zeros_like(m), m - 1.0)  # a weight is at most 1: τ >= max - 1
    low = _top_threshold(first, alpha, tau)
    low = torch.where(dead, tau, torch.maximum(tau, low))
    near = gmax.to(acc) > low
    n = max(1, min(int(near.sum(-1).max()), CANDIDATE_GROUPS))
    best = gmax.topk(min(n + 1, width), -1)
    # the largest maximum among the groups left out: every key outside the kept ones is at most this
    rest = best.values[..., n:n + 1].to(acc) if width > n else None
    idx = best.indices[..., :n]
    kept = groups.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, GROUP)).flatten(-2)
    k = max(1, min(int((kept.to(acc) > low).sum(-1).max()), kept.shape[-1]))
    top = kept.topk(k, -1).values.to(acc)
    # the threshold of the top values is a lower bound of the row's, and is the row's own when it
    # is at least every other key: those of the kept groups not in ``top`` are at most ``low`` (no
    # row has more than k above it), those of the groups left out at most ``rest``
    tau_top = _top_threshold(top, alpha, low)
    within = tau_top >= low if rest is None else (tau_top >= low) & (tau_top >= rest)
    tau = torch.where(dead, tau, torch.maximum(low, tau_top))
    done = dead | within
    scale = 1.0 + tau.abs()
    tol = 4 * torch.finfo(x.dtype).eps * scale
    last_step = torch.full_like(tau, float("inf"))
    prev_count = None
    for _ in range(MAX_STEPS):
        if bool(done.all()):
            break
        t = tau.to(x.dtype)
        d = (x - t).clamp_min_(0.0)
        # row sums in the working dtype over one block, added up in float64
        if alpha == 2.0:
            f = d.sum(-1, keepdim=True).to(acc)                 # Σ [x - τ]_+
            fp = (d > 0).sum(-1, keepdim=True).to(acc)          # the support's size
        elif alpha == 1.5:
            fp = d.sum(-1, keepdim=True).to(acc)
            f = d.mul_(d).sum(-1, keepdim=True).to(acc)
        else:
            f = d.pow(inv).sum(-1, keepdim=True).to(acc)
            fp = torch.where(d > 0, d.pow(inv - 1.0), 0.0).sum(-1, keepdim=True).to(acc)
        del d
        # Newton's step; for sparsemax it is Michelot's τ = (Σ_S x - 1) / |S|, exact once the
        # support S stops changing
        new = tau + (f - 1.0) / (inv * fp).clamp_min(torch.finfo(acc).tiny)
        if alpha == 2.0:
            stable = fp == prev_count if prev_count is not None else torch.zeros_like(done)
            prev_count = fp
        else:
            stable = torch.zeros_like(done)
        new = torch.maximum(new, tau)  # monotone from the left (guards against rounding)
        step = new - tau
        tau = torch.where(done, tau, new)
        # converged: a step below float resolution, a support that stopped changing (sparsemax),
        # or Newton stalled at the rounding floor (a step not halving the last one, both tiny)
        done = done | (step <= tol) | stable | ((step >= 0.5 * last_step) & (step <= 1e3 * tol))
        last_step = step
    return tau.to(x.dtype).masked_fill(dead, float("inf"))


def entmax_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
    """``out (B, H, Tq, Dv)``, ``τ (B, H, Tq)`` and ``out_g (B, H, Tq, Dv)`` (see the module
    docstring) for a sparse normalizer, over ``plan``'s live tiles. Each query block's scores are
    computed once and held (cut into fewer rows when they exceed ``BLOCK_BYTES``)."""
    alpha = entmax_alpha(spec)
    B, H = spec.B, spec.H
    tile = Tile(spec, qp.device, plan.prescaled)
    out = torch.zeros(B, H, spec.Tq, v.shape[-1], dtype=qp.dtype, device=qp.device)
    out_g = torch.zeros_like(out)
    taus = torch.full((B, H, spec.Tq), float("inf"), dtype=qp.dtype, device=qp.device)
    def rows_at_once(runs) -> int:  # rows whose held scores fit in BLOCK_BYTES (at least one)
        return max(1, BLOCK_BYTES // (B * H * _width(runs) * qp.element_size()))

    size = max((B * H * min(qe - qs, rows_at_once(runs)) * _width(runs)
                for (qs, qe), runs in zip(plan.q_blocks, plan.runs) if runs), default=0)
    work = (qp.new_empty(size), qp.new_empty(size))  # the scores, and the gates of sparsemax/1.5-entmax
    for (qs0, qe0), runs in zip(plan.q_blocks, plan.runs):
        if not runs:
            continue  # no live key: output 0, τ = +inf
        rows = rows_at_once(runs)
        for qs in range(qs0, qe0, rows):  # a run full for the block is full for any of its rows
            qe = min(qe0, qs + rows)
            x = block_scores(qp[:, :, qs:qe], kp, qs, qe, runs, tile, spec, work[0])
            tau = thresholds(x, spec)
            d = x.sub_(tau).clamp_min_(0.0)
            p, g = _gates(d, alpha, _view(work[1], *d.shape))
            acc = torch.zeros(B, H, qe - qs, v.shape[-1], dtype=qp.dtype, device=qp.device)
            acc_g = torch.zeros_like(acc)
            at = 0
            for r in runs:
                vj = expand(v[:, :, r.start:r.stop], spec.groups)
                span = slice(at, at + r.stop - r.start)
                acc += p[..., span] @ vj
                acc_g += g[..., span] @ vj
                at = span.stop
            g_sum = g.sum(-1, keepdim=True)
            out[:, :, qs:qe] = acc
            out_g[:, :, qs:qe] = acc_g / g_sum.masked_fill(g_sum == 0, 1.0)
            taus[:, :, qs:qe] = tau.squeeze(-1)
            del x, d, p, g
    return out, taus, out_g


def _gates(d: Tensor, alpha: float, work: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`entmax_gates` of ``d`` with the new one written into ``work`` (``d``'s shape)."""
    if alpha == 2.0:
        return d, torch.sign(d, out=work)  # d >= 0: the support's indicator
    if alpha == 1.5:
        return torch.mul(d, d, out=work), d
    return entmax_gates(d, alpha)


def _top_threshold(top: Tensor, alpha: float, tau0: Tensor) -> Tensor:
    """The threshold of the values ``top`` alone (descending, ``-inf`` where a row has fewer): a
    lower bound of the threshold of any set that holds them. Sparsemax and 1.5-entmax in closed
    form (sort-based, Peters et al. 2019, Algorithm 2); other α by Newton's method from ``tau0``
    (a lower bound)."""
    finite = top > NEG_INF
    xs = torch.where(finite, top, torch.zeros_like(top))
    rho = torch.arange(1, top.shape[-1] + 1, device=top.device, dtype=top.dtype)
    if alpha == 2.0:
        taus = (xs.cumsum(-1) - 1.0) / rho
    elif alpha == 1.5:
        mean = xs.cumsum(-1) / rho
        delta = (1.0 - rho * ((xs * xs).cumsum(-1) / rho - mean * mean)) / rho
        taus = mean - torch.sqrt(delta.clamp_min(0.0))
    else:
        inv = 1.0 / (alpha - 1.0)
        tau = tau0.clone()
        for _ in range(MAX_STEPS):
            d = (top - tau).clamp_min(0.0)
            f = d.pow(inv).sum(-1, keepdim=True)
            fp = torch.where(d > 0, d.pow(inv - 1.0), 0.0).sum(-1, keepdim=True)
            step = ((f - 1.0) / (inv * fp).clamp_min(torch.finfo(top.dtype).tiny)).clamp_min(0.0)
            tau = tau + step
            if bool((step <= 4 * torch.finfo(top.dtype).eps * (1.0 + tau.abs())).all()):
                break
        return tau
    size = ((taus <= xs) & finite).sum(-1, keepdim=True).clamp_min(1)
    tau = taus.gather(-1, size - 1)
    return tau
