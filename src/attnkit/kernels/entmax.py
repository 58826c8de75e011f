"""Sparsemax and α-entmax (1 < α <= 2) tile by tile: exact, in ``O(block · chunk)`` memory.

``p_ij = [x_ij - τ_i]_+^(1/(α-1))`` with ``x = (α - 1) s`` and each row's threshold ``τ_i`` such
that ``Σ_j p_ij = 1`` (Peters, Niculae & Martins 2019; sparsemax is α = 2). No row is ever held
whole. A first pass over a query block's live key tiles keeps each row's largest ``TOP_K``
values; when the threshold computed from them alone is at least the smallest of them, every
other key is below it and adds nothing, so that threshold is exact (the usual case: supports are
narrow). The other rows find ``τ`` by Newton's method on ``f(τ) = Σ_j [x_j - τ]_+^(1/(α-1))``,
started from that same threshold of the top values (a lower bound: the other keys only add to
``f``), one pass over the tiles per step, each adding up ``f`` and ``f'`` tile by tile.

Why Newton is safe and exact here: for α <= 2, ``f`` is convex and decreasing, so Newton started
left of the root (``f(τ_0) >= 1``) climbs monotonically to ``τ*`` and never overshoots. For sparsemax ``f`` is piecewise linear and each step is Michelot's projection
step ``τ = (Σ_{x > τ} x - 1) / |{x > τ}|``: it stops, exactly, as soon as the support stops
changing; other α stop at float precision (Newton converges quadratically).

The output comes in one more pass, with ``out_g = Σ_j g_ij v_j / Σ_j g_ij`` where
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
#: the first pass keeps each row's largest TOP_K values: a row whose support lies among them gets
#: its threshold from them, exactly, with no Newton pass
TOP_K = 64


def _live_x(tile: Tile, qi: Tensor, kp: Tensor, qs: int, qe: int, r, spec: AttentionSpec, am1: float) -> Tensor:
    grid = tile.grid(qs, qe, r.start, r.stop)
    x = tile.scores(qi, expand(kp[:, :, r.start:r.stop], spec.groups), qs, r.start, grid)
    if am1 != 1.0:
        x = x * am1
    return x.masked_fill(~tile.allowed(grid), NEG_INF) if r.partial else x


def thresholds(qi: Tensor, kp: Tensor, qs: int, qe: int, runs, tile: Tile, spec: AttentionSpec) -> Tensor:
    """``τ (B, H, rows, 1)`` of one query block (in ``x = (α - 1) s`` units); ``+inf`` for rows with
    no live key. One pass over the block's live key tiles keeps each row's largest values; rows
    whose support lies among them are done, the others take one pass per Newton step (see the
    module docstring)."""
    alpha = entmax_alpha(spec)
    am1, inv = alpha - 1.0, 1.0 / (alpha - 1.0)

    def xs():
        return (_live_x(tile, qi, kp, qs, qe, r, spec, am1) for r in runs)

    # pass 1: each row's largest TOP_K values (their first is the row maximum)
    top = None
    for x in xs():
        t = x.topk(min(TOP_K, x.shape[-1]), dim=-1).values
        top = t if top is None else torch.cat([top, t], -1).topk(min(TOP_K, top.shape[-1] + t.shape[-1]), -1).values
    m = top[..., :1]
    acc = torch.float64  # the row sums are (rows, 1): add them up in float64 whatever the input
    dead = m == NEG_INF
    tau = torch.where(dead, torch.zeros_like(m), m - 1.0).to(acc)
    # the threshold of the top values alone is a lower bound of the row's (the other keys only add
    # to f), and is the row's own when the support lies among them (it is at least the smallest);
    # the other rows (wide supports) start their Newton passes from it
    tau_top, within = _top_threshold(top.to(acc), alpha, tau)
    tau = torch.where(dead, tau, torch.maximum(tau, tau_top))
    done = dead | within
    scale = 1.0 + tau.abs()
    tol = 4 * torch.finfo(qi.dtype).eps * scale
    last_step = torch.full_like(tau, float("inf"))
    prev_count = None
    for _ in range(MAX_STEPS):
        if bool(done.all()):
            break
        f = torch.zeros_like(tau)      # Σ [x - τ]_+^(1/(α-1))
        fp = torch.zeros_like(tau)     # Σ [x - τ]_+^(1/(α-1) - 1): the support's size for sparsemax
        t = tau.to(qi.dtype)
        for x in xs():
            # row sums of a tile in the working dtype (at most a chunk of keys), added up in float64
            d = (x - t).clamp_min_(0.0)
            if alpha == 2.0:
                f += d.sum(-1, keepdim=True).to(acc)
                fp += (d > 0).sum(-1, keepdim=True).to(acc)
            elif alpha == 1.5:
                fp += d.sum(-1, keepdim=True).to(acc)
                f += d.mul_(d).sum(-1, keepdim=True).to(acc)
            else:
                f += d.pow(inv).sum(-1, keepdim=True).to(acc)
                fp += torch.where(d > 0, d.pow(inv - 1.0), 0.0).sum(-1, keepdim=True).to(acc)
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
    return tau.to(qi.dtype).masked_fill(dead, float("inf"))


def entmax_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
    """``out (B, H, Tq, Dv)``, ``τ (B, H, Tq)`` and ``out_g (B, H, Tq, Dv)`` (see the module
    docstring) for a sparse normalizer, over ``plan``'s live tiles."""
    alpha = entmax_alpha(spec)
    am1 = alpha - 1.0
    B, H = spec.B, spec.H
    tile = Tile(spec, qp.device, plan.prescaled)
    out = torch.zeros(B, H, spec.Tq, v.shape[-1], dtype=qp.dtype, device=qp.device)
    out_g = torch.zeros_like(out)
    taus = torch.full((B, H, spec.Tq), float("inf"), dtype=qp.dtype, device=qp.device)
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        if not runs:
            continue  # no live key: output 0, τ = +inf
        qi = qp[:, :, qs:qe]
        tau = thresholds(qi, kp, qs, qe, runs, tile, spec)
        acc = torch.zeros(B, H, qe - qs, v.shape[-1], dtype=qp.dtype, device=qp.device)
        acc_g = torch.zeros_like(acc)
        g_sum = torch.zeros(B, H, qe - qs, 1, dtype=qp.dtype, device=qp.device)
        for r in runs:
            d = (_live_x(tile, qi, kp, qs, qe, r, spec, am1) - tau).clamp_min_(0.0)
            p, g = entmax_gates(d, alpha)
            vj = expand(v[:, :, r.start:r.stop], spec.groups)
            acc += p @ vj
            acc_g += g @ vj
            g_sum += g.sum(-1, keepdim=True)
        out[:, :, qs:qe] = acc
        out_g[:, :, qs:qe] = acc_g / g_sum.masked_fill(g_sum == 0, 1.0)
        taus[:, :, qs:qe] = tau.squeeze(-1)
    return out, taus, out_g


def _top_threshold(top: Tensor, alpha: float, tau0: Tensor) -> tuple[Tensor, Tensor]:
    """The threshold computed from each row's largest values ``top`` (descending, ``-inf`` where
    a row has fewer live keys), and whether it is the row's true threshold: it is when the row
    has no other key, or when it is at least the smallest of ``top`` (every other key is then at
    or below it and adds nothing). Sparsemax and 1.5-entmax in closed form (sort-based, Peters et
    al. 2019, Algorithm 2); other α by Newton's method on the top values alone."""
    finite = top > NEG_INF
    n = finite.sum(-1, keepdim=True)
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
        complete = n < top.shape[-1]
        return tau, complete | (tau >= top[..., -1:])
    size = ((taus <= xs) & finite).sum(-1, keepdim=True).clamp_min(1)
    tau = taus.gather(-1, size - 1)
    complete = n < top.shape[-1]   # fewer live keys than TOP_K: top holds the whole row
    return tau, complete | (tau >= top[..., -1:])
