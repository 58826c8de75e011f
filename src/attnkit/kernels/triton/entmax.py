"""Sparsemax, 1.5-entmax and α-entmax (1 < α <= 2) attention in Triton, forward and backward, under
any mask, ALiBi and GQA.

``p_ij = [x_ij - τ_i]_+^(1/(α-1))`` with ``x = (α - 1) s`` over the keys the mask allows and each
row's threshold ``τ_i`` such that ``Σ_j p_ij = 1`` (Peters, Niculae & Martins 2019; sparsemax is
α = 2, 1.5-entmax α = 1.5; other α take Newton's steps alone, with powers, where these two have
closed forms). Nothing ``(Tq, Tk)``-sized is stored: the scores of a query block
are recomputed, tile by tile, on each pass over its live key tiles.

**Forward** (``_fwd``, one program per (query block, batch · head)):

1. one pass over the live key tiles for each row's maximum ``m``. A weight is at most 1, so
   ``τ >= m - 1``: only keys above ``m - 1`` can be in the support. With ``candidates = C > 0``
   (the default) the pass also keeps, per row, every key above ``max(m - 1, lb)`` with the
   running maximum (a superset of the support) in a ``(rows, C)`` float32 workspace. When a row's
   keys would not fit, the threshold of the keys held (a subset's threshold is at most the
   row's) becomes the lower bound ``lb`` and the held keys at or below it are dropped. Rows whose
   candidates still do not fit are marked;
2. the threshold of each row's held keys, in registers (no pass over the keys): the row's own
   when they all fit, since every key left out is at or below a lower bound of ``τ``. Rows that
   did not fit (or ``C = 0``) raise their lower bound by passes over the live tiles: each sums, over
   the keys above the current ``τ``, their count ``c``, ``s1 = Σ (x - τ)`` and ``s2 = Σ (x - τ)²``
   and takes Newton's step on ``f(τ) = Σ_j [x_j - τ]_+^(1/(α-1)) - 1`` (convex and decreasing
   for α <= 2, so Newton from the left climbs to the root without overshooting). Both searches
   take the same steps: for sparsemax the step is the closed form on the support ``{x > τ}``
   (Michelot's ``τ = (Σ_S x - 1) / |S|``), exact as soon as the support is found unchanged; for
   1.5-entmax the closed form on the same support (the smaller root of ``Σ_S (x - τ)² = 1``) is an
   upper bound, exact when that support is the row's, and the search stops when the bracket
   (Newton's lower bound, the closed form's upper) closes to float32 resolution. Bisection from
   ``[m - 1, m]`` would take about 24 steps to reach float32 resolution; these take a handful;
3. one pass for the output, ``out = Σ_j p_ij v_j``, and ``out_g = Σ_j g_ij v_j / Σ_j g_ij`` with
   ``g = p^(2-α)`` (the support's indicator for sparsemax, ``[x - τ]_+`` for 1.5-entmax).

So the forward computes ``q·k`` twice where the candidates fit (random scores at N = 8,192,
D = 128 fit in C = 128 for both α: ``tests/backends/test_triton_entmax.py``), the workspace is
``O(Tq · C)``, and the passes of step 2 count in the ``steps`` :func:`entmax_forward` returns.

**Backward**: ``dL/ds_ij = g_ij (dP_ij - r_i)`` with ``dP = dO Vᵀ`` and ``r_i = Σ_j g_ij dP_ij /
Σ_j g_ij = dO_i · out_g_i``, so it is the softmax backward's shape with ``g`` for ``p``: ``_bwd_dq``
(query-major) and ``_bwd_dkdv`` (key-major, GQA's query heads summed in the program), from ``τ``
(``(B, H, Tq)``) and ``out_g`` saved by the forward; no atomics.

Scores and accumulators are float32 whatever the input dtype; float32 inputs multiply with
float32 accuracy (see :func:`.common.launch_kwargs`). Under ``TRITON_INTERPRET=1`` the kernels
run on CPU tensors (how the test suite checks them without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import BlockTables
from .common import (_head_slope, _key_block, _key_tile_scores, _live_range, _query_block, _rows, _store_key_grads,
                     _tile_scores, dense, launch_kwargs, pad, table_args, tile_strides)

Tensor = torch.Tensor
#: at most this many threshold steps per query block, in registers or as passes over the keys
#: (sparsemax's support and 1.5-entmax's bracket settle in far fewer on every input tried; the
#: tests count them)
MAX_STEPS = 64


@triton.jit
def _gates(d, MODE: tl.constexpr, inv):
    """From ``d = [x - τ]_+``: the weights ``p = d^(1/(α-1))`` and the Jacobian's ``g = p^(2-α)``
    (``MODE``: 0 1.5-entmax, 1 sparsemax, 2 any other α, with ``inv = 1/(α-1)``)."""
    if MODE == 1:
        return d, tl.where(d > 0, 1.0, 0.0)
    elif MODE == 0:
        return d * d, d
    else:
        # 2**-126, float32's smallest normal: triton <= 3.6 types a smaller literal float64 (which
        # would make every sum float64 and, carried through the threshold loop, fails to compile)
        ld = tl.log(tl.maximum(d, 1.1754943508222875e-38))
        return tl.where(d > 0, tl.exp(inv * ld), 0.0), tl.where(d > 0, tl.exp((inv - 1.0) * ld), 0.0)


@triton.jit
def _sums(d, MODE: tl.constexpr, inv):
    """Per row of ``d = [x - τ]_+``: the support's size ``c`` and ``s1 = Σ d``, ``s2 = Σ d²``
    (``MODE`` 0, 1); for any other α, ``s1 = Σ d^(1/(α-1) - 1)`` and ``s2 = Σ d^(1/(α-1))``."""
    c = tl.sum(tl.where(d > 0, 1.0, 0.0), 1)
    if MODE == 2:
        p, g = _gates(d, MODE, inv)
        return c, tl.sum(g, 1), tl.sum(p, 1)
    else:
        return c, tl.sum(d, 1), tl.sum(d * d, 1)


@triton.jit
def _raise(tau, hi, prev, last, done, c, s1, s2, MODE: tl.constexpr, inv):
    """One step of the threshold search from ``τ`` (a lower bound) given the sums over ``{x > τ}``
    (:func:`_sums`): the new ``τ``, upper bound, support size, step and which rows are done."""
    cc = tl.maximum(c, 1.0)
    tol = 4.0 * 1.1920928955078125e-07 * (1.0 + tl.abs(tau))
    if MODE == 1:
        new = tl.maximum(tau + (s1 - 1.0) / cc, tau)    # the closed form on {x > τ}
        exact = c == prev                                # τ's support is the last one's: τ is exact
        final = tau
    elif MODE == 2:
        new = tl.maximum(tau + (s2 - 1.0) / tl.maximum(inv * s1, 1e-30), tau)   # Newton, no closed form
        exact = c < 0.0
        final = tau
    else:
        new = tl.maximum(tau + (s2 - 1.0) / tl.maximum(2.0 * s1, 1e-30), tau)   # Newton
        disc = s1 * s1 - c * (s2 - 1.0)
        up = tau + (s1 - tl.sqrt(tl.maximum(disc, 0.0))) / cc                     # the closed form
        hi = tl.where(disc >= 0.0, tl.minimum(hi, tl.maximum(up, new)), hi)
        exact = hi - new <= tol
        final = hi
    step = new - tau
    # Newton stalled at the rounding floor: a step not halving the last one, both tiny
    stalled = (step <= tol) | ((step >= 0.5 * last) & (step <= 1e3 * tol))
    tau = tl.where(done, tau, tl.where(exact, final, new))
    return tau, hi, c, step, done | exact | stalled


@triton.jit
def _solve(xb, tau, hi, done, max_steps, MODE: tl.constexpr, inv):
    """The thresholds of the values ``xb (rows, C)`` held in registers (``-inf``: none), from the
    lower bounds ``τ``: no pass over the keys."""
    prev = tl.full(tau.shape, -1.0, tl.float32)
    last = tl.full(tau.shape, float("inf"), tl.float32)
    it = 0
    left = tl.sum((~done).to(tl.int32), 0)
    while (left > 0) & (it < max_steps):
        c, s1, s2 = _sums(tl.maximum(xb - tau[:, None], 0.0), MODE, inv)
        tau, hi, prev, last, done = _raise(tau, hi, prev, last, done, c, s1, s2, MODE, inv)
        it += 1
        left = tl.sum((~done).to(tl.int32), 0)
    return tau, hi, done


@triton.jit
def _held(CAND, cbase, cnt, row_ok, CAND_C: tl.constexpr):
    """The candidates held for each row, ``(rows, CAND_C)``, ``-inf`` past each row's count."""
    offs_c = tl.arange(0, CAND_C)
    return tl.load(CAND + cbase[:, None] + offs_c[None, :], mask=(offs_c[None, :] < cnt[:, None]) & row_ok[:, None],
                   other=float("-inf"))


@triton.jit
def _tile_gates(q, K, V, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, offs_dv, tau,
                skb, skh, skn, skd, svb, svh, svn, svd, stp, stb, sth, stm, stn, Tk, D, DV, xscale, inv, shift, slope,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
                MODE: tl.constexpr, PREC: tl.constexpr):
    """Query-major live tile ``t`` given the rows' thresholds: its weights ``p``, the Jacobian's
    ``g``, its keys and its values."""
    x, keep, k, offs_n, col_ok = _tile_scores(
        q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
        Tk, D, xscale, 0.0, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
    p, g = _gates(tl.maximum(tl.where(keep, x - tau[:, None], 0.0), 0.0), MODE, inv)
    return p, g, k, _rows(V, b * svb + hk * svh, offs_n, col_ok, svn, offs_dv, svd, DV)


@triton.jit
def _row_stats(TAU, R, b, h, H, Tq, offs_m, row_ok):
    """The thresholds ``τ`` (``+inf`` past the rows) and the backward's row terms ``r`` of rows ``offs_m``."""
    at = (b * H + h) * Tq + offs_m
    return tl.load(TAU + at, mask=row_ok, other=float("inf")), tl.load(R + at, mask=row_ok, other=0.0)


@triton.jit
def _fwd(Q, K, V, O, OG, TAU, STEPS, CAND, SLOPES, PTR, COLS, TILES, MT,
         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
         stp, stb, sth, stm, stn,
         H, G, Tq, Tk, D, DV, xscale, inv, shift, NBLK, max_steps,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
         CAND_C: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, MODE: tl.constexpr,
         PREC: tl.constexpr):
    # O and OG (float32) share strides; TAU is contiguous (B, H, Tq); CAND (B·H·Tq, CAND_C) float32
    i, b, h, hk, offs_m, offs_d, offs_dv, row_ok, q, slope = _query_block(
        Q, SLOPES, sqb, sqh, sqm, sqd, H, G, Tq, D, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_ALIBI)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    cbase = ((b * H + h) * Tq + offs_m).to(tl.int64) * CAND_C
    # 1. each row's maximum; with candidates, every key that may be in the support is kept
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lb = tl.full([BLOCK_M], float("-inf"), tl.float32)    # a lower bound of τ from the held keys
    cnt = tl.zeros([BLOCK_M], tl.int32)
    ovf = tl.zeros([BLOCK_M], tl.int32)                     # 1: a row's candidates did not fit
    for t in range(start, end):
        x, keep, k, offs_n, col_ok = _tile_scores(
            q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
            Tk, D, xscale, 0.0, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
        x = tl.where(keep, x, float("-inf"))
        m = tl.maximum(m, tl.max(x, 1))
        if CAND_C > 0:
            floor = tl.maximum(m - 1.0, lb)     # no key at or below it is in the support
            cand = x > floor[:, None]
            n_new = tl.sum(cand.to(tl.int32), 1)
            if tl.max(tl.where(ovf == 0, cnt + n_new, 0), 0) > CAND_C:   # rows that overflowed: sweeps
                # full: raise the lower bound to the threshold of the held keys (a subset's is at
                # most the row's) and drop the held keys at or below it
                tl.debug_barrier()
                xb = _held(CAND, cbase, cnt, row_ok, CAND_C)
                nothing = m == float("-inf")
                tb, _, _ = _solve(xb, tl.where(nothing, 0.0, floor), tl.where(nothing, 0.0, m), nothing,
                                  max_steps, MODE, inv)
                lb = tl.where(nothing, lb, tl.maximum(lb, tb))
                floor = tl.maximum(m - 1.0, lb)
                kept = xb > floor[:, None]
                tl.debug_barrier()
                tl.store(CAND + cbase[:, None] + tl.cumsum(kept.to(tl.int32), 1) - 1, xb, mask=kept)
                cnt = tl.sum(kept.to(tl.int32), 1)
                cand = x > floor[:, None]
                n_new = tl.sum(cand.to(tl.int32), 1)
            pos = cnt[:, None] + tl.cumsum(cand.to(tl.int32), 1) - 1
            tl.store(CAND + cbase[:, None] + pos, x, mask=cand & (pos < CAND_C))
            ovf = tl.maximum(ovf, (cnt + n_new > CAND_C).to(tl.int32))
            cnt = tl.minimum(cnt + n_new, CAND_C)
    dead = m == float("-inf")
    hi = tl.where(dead, 0.0, m)             # an upper bound (the closed form's, once it applies)
    if CAND_C > 0:
        # 2a. the threshold of the held keys: the row's own when they all fit, else a lower bound
        tl.debug_barrier()
        xb = _held(CAND, cbase, cnt, row_ok, CAND_C)
        tau, hi, done = _solve(xb, tl.where(dead, 0.0, tl.maximum(m - 1.0, lb)), hi, dead, max_steps, MODE, inv)
        done = dead | (done & (ovf == 0))
        hi = tl.where(ovf != 0, tl.where(dead, 0.0, m), hi)
    else:
        tau = tl.where(dead, 0.0, m - 1.0)  # a lower bound: no weight exceeds 1
        done = dead
    # 2b. rows whose candidates did not fit (or no candidates kept): raise τ to the root, a pass
    # over the live tiles per step
    prev = tl.full([BLOCK_M], -1.0, tl.float32)
    last = tl.full([BLOCK_M], float("inf"), tl.float32)
    steps = 0
    left = tl.sum((~done).to(tl.int32), 0)
    while (left > 0) & (steps < max_steps):
        c = tl.zeros([BLOCK_M], tl.float32)
        s1 = tl.zeros([BLOCK_M], tl.float32)
        s2 = tl.zeros([BLOCK_M], tl.float32)
        for t in range(start, end):
            x, keep, k, offs_n, col_ok = _tile_scores(
                q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm,
                stn, Tk, D, xscale, 0.0, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
            ct, s1t, s2t = _sums(tl.maximum(tl.where(keep, x - tau[:, None], 0.0), 0.0), MODE, inv)
            c += ct
            s1 += s1t
            s2 += s2t
        tau, hi, prev, last, done = _raise(tau, hi, prev, last, done, c, s1, s2, MODE, inv)
        steps += 1
        left = tl.sum((~done).to(tl.int32), 0)
    # 3. the output and the backward's row term
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_M], tl.float32)
    for t in range(start, end):
        p, g, k, v = _tile_gates(
            q, K, V, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, offs_dv, tau, skb, skh, skn, skd,
            svb, svh, svn, svd, stp, stb, sth, stm, stn, Tk, D, DV, xscale, inv, shift, slope,
            BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, MODE, PREC)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
        acc_g += tl.dot(g.to(v.dtype), v, input_precision=PREC)
        g_sum += tl.sum(g, 1)
    out_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
    at = b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    tl.store(O + at, acc.to(O.dtype.element_ty), mask=out_ok)
    tl.store(OG + at, acc_g / tl.where(g_sum == 0.0, 1.0, g_sum)[:, None], mask=out_ok)
    tl.store(TAU + (b * H + h) * Tq + offs_m, tl.where(dead, float("inf"), tau), mask=row_ok)
    tl.store(STEPS + tl.program_id(1) * tl.num_programs(0) + i, steps)


@triton.jit
def _bwd_dq(Q, K, V, DO, DQ, TAU, R, SLOPES, PTR, COLS, TILES, MT,
            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
            stp, stb, sth, stm, stn,
            H, G, Tq, Tk, D, DV, xscale, scale, inv, shift, NBLK,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):
    # DQ shares Q's strides and DO shares O's; TAU and R are contiguous (B, H, Tq)
    i, b, h, hk, offs_m, offs_d, offs_dv, row_ok, q, slope = _query_block(
        Q, SLOPES, sqb, sqh, sqm, sqd, H, G, Tq, D, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_ALIBI)
    do = _rows(DO, b * sob + h * soh, offs_m, row_ok, som, offs_dv, sod, DV)
    tau, r = _row_stats(TAU, R, b, h, H, Tq, offs_m, row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    for t in range(start, end):
        p, g, k, v = _tile_gates(
            q, K, V, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, offs_dv, tau, skb, skh, skn, skd,
            svb, svh, svn, svd, stp, stb, sth, stm, stn, Tk, D, DV, xscale, inv, shift, slope,
            BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, MODE, PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = g * (dp - r[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv(Q, K, V, DO, DK, DV_, TAU, R, SLOPES, PTR, ROWS, TILES, MT,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              stp, stb, sth, stm, stn,
              H, Hkv, G, Tq, Tk, D, DV, xscale, scale, inv, shift, NBLK,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):
    # DK shares K's strides, DV_ V's; transposed tiles: rows are keys, columns queries
    j, b, hk, offs_n, offs_d, offs_dv, col_ok, k, v = _key_block(
        K, V, skb, skh, skn, skd, svb, svh, svn, svd, Hkv, Tk, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start, end = _live_range(PTR, j, NBLK, HAS_MASK)
    for g in range(0, G):
        h, slope = _head_slope(SLOPES, hk, G, g, HAS_ALIBI)
        for t in range(start, end):
            xt, keep, q, do, offs_m, row_ok = _key_tile_scores(
                k, Q, DO, ROWS, TILES, MT, t, b, h, offs_n, col_ok, offs_d, offs_dv, sqb, sqh, sqm, sqd,
                sob, soh, som, sod, stp, stb, sth, stm, stn, Tq, D, DV, xscale, 0.0, shift, slope,
                BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
            tau, r = _row_stats(TAU, R, b, h, H, Tq, offs_m, row_ok)
            pt, gt = _gates(tl.maximum(tl.where(keep, xt - tau[None, :], 0.0), 0.0), MODE, inv)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = gt * (dpt - r[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    _store_key_grads(DK, DV_, dk, dv, b, hk, offs_n, offs_d, offs_dv, col_ok, skb, skh, skn, skd,
                     svb, svh, svn, svd, D, DV, scale)


def mode(alpha: float) -> int:
    """The kernels' ``MODE`` for ``alpha``: 0 1.5-entmax, 1 sparsemax, 2 any other α in (1, 2)."""
    return 1 if alpha == 2.0 else 0 if alpha == 1.5 else 2


def entmax_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, alpha: float, slopes: Tensor | None,
                   tab: BlockTables | None, config: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel's results: ``out (B, H, Tq, Dv)`` in ``q``'s dtype, ``τ (B, H, Tq)``
    (``+inf`` for rows with no key), ``out_g (B, H, Tq, Dv)`` (float32) and the number of
    threshold passes over the keys each program took (``(B · H, query blocks)``; 0 when every
    row's candidates fit in ``config["candidates"]``). ``q (B, H, Tq, D)``,
    ``k (B, Hkv, Tk, D)``, ``v (B, Hkv, Tk, Dv)`` with the layout :func:`.common.dense` gives;
    ``tab`` the mask's block tables at ``config["fwd"]["block"]`` (None: no mask)."""
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2] (1.5: 1.5-entmax, 2: sparsemax); got {alpha}")
    B, H, Tq, D = q.shape
    Hkv, Tk, DV = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, H, Tq, DV, dtype=q.dtype, device=q.device)
    out_g = torch.empty(B, H, Tq, DV, dtype=torch.float32, device=q.device)
    tau = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    bm, bn = config["fwd"]["block"]
    grid = (triton.cdiv(Tq, bm), B * H)
    steps = torch.empty(B * H, grid[0], dtype=torch.int32, device=q.device)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    cand_c = config.get("candidates", 0)
    cand = torch.empty(B * H * Tq, cand_c, dtype=torch.float32, device=q.device) if cand_c else dummy
    _fwd[grid](
        q, k, v, out, out_g, tau, steps, cand, slopes * (alpha - 1.0) if slopes is not None else dummy,
        *table_args(tab, "q", dummy), *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tile_strides(tab),
        H, H // Hkv, Tq, Tk, D, DV, (alpha - 1.0) * scale, 1.0 / (alpha - 1.0), Tk - Tq, triton.cdiv(Tk, bn),
        config.get("max_steps", MAX_STEPS),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pad(D), BLOCK_DV=pad(DV), CAND_C=cand_c, HAS_MASK=tab is not None,
        HAS_ALIBI=slopes is not None, MODE=mode(alpha), **launch_kwargs(config["fwd"], q))
    return out, tau, out_g, steps


class EntmaxAttentionFn(torch.autograd.Function):
    """``(q, k, v) -> (out, τ)`` for α-entmax, ``1 < alpha <= 2`` (sparsemax ``alpha = 2``,
    1.5-entmax ``alpha = 1.5``, both in closed form; other α by Newton's steps alone);
    the backward returns ``dq, dk, dv`` (``τ (B, H, Tq)``, float32, carries no gradient: it is for
    the weights, :func:`.weights.triton_weights`). ``slopes`` are ALiBi's per query head (or None).
    See the module docstring."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, alpha: float, slopes: Tensor | None,
                tables: dict, config: dict):
        q, k, v = (dense(x) for x in (q, k, v))
        out, tau, out_g, _ = entmax_forward(q, k, v, scale, alpha, slopes, tables.get("fwd"), config)
        xslopes = slopes * (alpha - 1.0) if slopes is not None else None
        ctx.save_for_backward(q, k, v, xslopes, tau, out_g)
        ctx.args = (scale, alpha, tables, config)
        ctx.mark_non_differentiable(tau)
        return out, tau

    @staticmethod
    def backward(ctx, dout: Tensor, dtau: Tensor | None = None):
        q, k, v, xslopes, tau, out_g = ctx.saved_tensors
        scale, alpha, tables, config = ctx.args
        B, H, Tq, D = q.shape
        Hkv, Tk, DV = k.shape[1], k.shape[2], v.shape[-1]
        dout = dout.contiguous()   # DO shares O's layout in the kernels: contiguous (B, H, Tq, Dv)
        r = (dout.float() * out_g).sum(-1).contiguous()   # r_i = dO_i · out_g_i
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        sl = xslopes if xslopes is not None else dummy
        common = (H // Hkv, Tq, Tk, D, DV, (alpha - 1.0) * scale, scale, 1.0 / (alpha - 1.0), Tk - Tq)
        flags = dict(BLOCK_D=pad(D), BLOCK_DV=pad(DV), HAS_ALIBI=xslopes is not None, MODE=mode(alpha))
        tab = tables.get("dq")
        bm, bn = config["dq"]["block"]
        _bwd_dq[(triton.cdiv(Tq, bm), B * H)](
            q, k, v, dout, dq, tau, r, sl, *table_args(tab, "q", dummy),
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *tile_strides(tab), H, *common, triton.cdiv(Tk, bn),
            BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=tab is not None, **flags, **launch_kwargs(config["dq"], q))
        tab = tables.get("dkdv")
        bm, bn = config["dkdv"]["block"]
        _bwd_dkdv[(triton.cdiv(Tk, bn), B * Hkv)](
            q, k, v, dout, dk, dv, tau, r, sl, *table_args(tab, "k", dummy),
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *tile_strides(tab), H, Hkv, *common,
            triton.cdiv(Tq, bm),
            BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=tab is not None, **flags, **launch_kwargs(config["dkdv"], q))
        return dq, dk, dv, None, None, None, None, None
