"""Sparsemax and 1.5-entmax attention in Triton, forward and backward, under any mask, ALiBi and GQA.

``p_ij = [x_ij - τ_i]_+^(1/(α-1))`` with ``x = (α - 1) s`` over the keys the mask allows and each
row's threshold ``τ_i`` such that ``Σ_j p_ij = 1`` (Peters, Niculae & Martins 2019; sparsemax is
α = 2, 1.5-entmax α = 1.5). Nothing ``(Tq, Tk)``-sized is stored: the scores of a query block
are recomputed, tile by tile, on each pass over its live key tiles.

**Forward** (``_fwd``, one program per (query block, batch · head)):

1. one pass for each row's maximum ``m``: a weight is at most 1, so ``τ >= m - 1``;
2. passes that raise that lower bound to ``τ``: each sums, over the keys above the current ``τ``,
   their count ``c``, ``s1 = Σ (x - τ)`` and ``s2 = Σ (x - τ)²``, and takes Newton's step on
   ``f(τ) = Σ_j [x_j - τ]_+^(1/(α-1)) - 1`` (convex and decreasing for α <= 2, so Newton from the
   left climbs to the root without overshooting). For sparsemax the step is the closed form on the
   support ``{x > τ}`` (Michelot's ``τ = (Σ_S x - 1) / |S|``), exact as soon as a pass finds the
   support unchanged. For 1.5-entmax the closed form on the same support (the smaller root of
   ``Σ_S (x - τ)² = 1``) is an upper bound, and exact when that support is the row's: the passes
   stop when the bracket (Newton's lower bound, the closed form's upper) closes to float32
   resolution, and take the closed form;
3. one pass for the output, ``out = Σ_j p_ij v_j``, and ``out_g = Σ_j g_ij v_j / Σ_j g_ij`` with
   ``g = p^(2-α)`` (the support's indicator for sparsemax, ``[x - τ]_+`` for 1.5-entmax).

Each program stops its passes when all of its rows have converged (at most ``max_steps``).

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
#: at most this many threshold passes per query block (sparsemax's support and 1.5-entmax's
#: bracket settle in far fewer on every input tried; the tests count them)
MAX_STEPS = 64


@triton.jit
def _gates(d, ALPHA2: tl.constexpr):
    """From ``d = [x - τ]_+``: the weights ``p`` and the Jacobian's ``g = p^(2-α)``."""
    if ALPHA2:
        return d, tl.where(d > 0, 1.0, 0.0)
    else:
        return d * d, d


@triton.jit
def _fwd(Q, K, V, O, OG, TAU, STEPS, SLOPES, PTR, COLS, TILES, MT,
         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
         stp, stb, sth, stm, stn,
         H, G, Tq, Tk, D, DV, xscale, shift, NBLK, max_steps,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
         HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, ALPHA2: tl.constexpr, PREC: tl.constexpr):
    # O and OG (float32) share strides; TAU is contiguous (B, H, Tq)
    i, b, h, hk, offs_m, offs_d, offs_dv, row_ok, q, slope = _query_block(
        Q, SLOPES, sqb, sqh, sqm, sqd, H, G, Tq, D, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_ALIBI)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    # 1. each row's maximum
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for t in range(start, end):
        x, keep, k, offs_n, col_ok = _tile_scores(
            q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
            Tk, D, xscale, 0.0, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
        m = tl.maximum(m, tl.max(tl.where(keep, x, float("-inf")), 1))
    dead = m == float("-inf")
    tau = tl.where(dead, 0.0, m - 1.0)      # a lower bound: no weight exceeds 1
    hi = tl.where(dead, 0.0, m)             # an upper bound (the closed form's, once it applies)
    prev = tl.full([BLOCK_M], -1.0, tl.float32)
    last = tl.full([BLOCK_M], float("inf"), tl.float32)
    done = dead
    steps = 0
    left = tl.sum((~done).to(tl.int32), 0)
    # 2. raise τ to the root, a pass over the live tiles per step
    while (left > 0) & (steps < max_steps):
        c = tl.zeros([BLOCK_M], tl.float32)
        s1 = tl.zeros([BLOCK_M], tl.float32)
        s2 = tl.zeros([BLOCK_M], tl.float32)
        for t in range(start, end):
            x, keep, k, offs_n, col_ok = _tile_scores(
                q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm,
                stn, Tk, D, xscale, 0.0, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
            d = tl.maximum(tl.where(keep, x - tau[:, None], 0.0), 0.0)
            c += tl.sum(tl.where(d > 0, 1.0, 0.0), 1)
            s1 += tl.sum(d, 1)
            s2 += tl.sum(d * d, 1)
        cc = tl.maximum(c, 1.0)
        tol = 4.0 * 1.1920928955078125e-07 * (1.0 + tl.abs(tau))
        if ALPHA2:
            new = tl.maximum(tau + (s1 - 1.0) / cc, tau)    # the closed form on {x > τ}
            exact = c == prev                                # τ's support is the last one's: τ is exact
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
        done = done | exact | stalled
        prev = c
        last = step
        steps += 1
        left = tl.sum((~done).to(tl.int32), 0)
    # 3. the output and the backward's row term
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_M], tl.float32)
    for t in range(start, end):
        x, keep, k, offs_n, col_ok = _tile_scores(
            q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
            Tk, D, xscale, 0.0, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
        p, g = _gates(tl.maximum(tl.where(keep, x - tau[:, None], 0.0), 0.0), ALPHA2)
        v = _rows(V, b * svb + hk * svh, offs_n, col_ok, svn, offs_dv, svd, DV)
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
            H, G, Tq, Tk, D, DV, xscale, scale, shift, NBLK,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, ALPHA2: tl.constexpr, PREC: tl.constexpr):
    # DQ shares Q's strides and DO shares O's; TAU and R are contiguous (B, H, Tq)
    i, b, h, hk, offs_m, offs_d, offs_dv, row_ok, q, slope = _query_block(
        Q, SLOPES, sqb, sqh, sqm, sqd, H, G, Tq, D, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_ALIBI)
    do = _rows(DO, b * sob + h * soh, offs_m, row_ok, som, offs_dv, sod, DV)
    tau = tl.load(TAU + (b * H + h) * Tq + offs_m, mask=row_ok, other=float("inf"))
    r = tl.load(R + (b * H + h) * Tq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    for t in range(start, end):
        x, keep, k, offs_n, col_ok = _tile_scores(
            q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
            Tk, D, xscale, 0.0, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
        p, g = _gates(tl.maximum(tl.where(keep, x - tau[:, None], 0.0), 0.0), ALPHA2)
        v = _rows(V, b * svb + hk * svh, offs_n, col_ok, svn, offs_dv, svd, DV)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = g * (dp - r[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv(Q, K, V, DO, DK, DV_, TAU, R, SLOPES, PTR, ROWS, TILES, MT,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              stp, stb, sth, stm, stn,
              H, Hkv, G, Tq, Tk, D, DV, xscale, scale, shift, NBLK,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, ALPHA2: tl.constexpr, PREC: tl.constexpr):
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
            tau = tl.load(TAU + (b * H + h) * Tq + offs_m, mask=row_ok, other=float("inf"))
            r = tl.load(R + (b * H + h) * Tq + offs_m, mask=row_ok, other=0.0)
            pt, gt = _gates(tl.maximum(tl.where(keep, xt - tau[None, :], 0.0), 0.0), ALPHA2)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = gt * (dpt - r[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    _store_key_grads(DK, DV_, dk, dv, b, hk, offs_n, offs_d, offs_dv, col_ok, skb, skh, skn, skd,
                     svb, svh, svn, svd, D, DV, scale)


def entmax_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, alpha: float, slopes: Tensor | None,
                   tab: BlockTables | None, config: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel's results: ``out (B, H, Tq, Dv)`` in ``q``'s dtype, ``τ (B, H, Tq)``
    (``+inf`` for rows with no key), ``out_g (B, H, Tq, Dv)`` (float32) and the number of
    threshold passes each program took (``(B · H, query blocks)``). ``q (B, H, Tq, D)``,
    ``k (B, Hkv, Tk, D)``, ``v (B, Hkv, Tk, Dv)`` with the layout :func:`.common.dense` gives;
    ``tab`` the mask's block tables at ``config["fwd"]["block"]`` (None: no mask)."""
    if alpha not in (1.5, 2.0):
        raise ValueError(f"alpha must be 1.5 (1.5-entmax) or 2 (sparsemax); got {alpha}")
    B, H, Tq, D = q.shape
    Hkv, Tk, DV = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, H, Tq, DV, dtype=q.dtype, device=q.device)
    out_g = torch.empty(B, H, Tq, DV, dtype=torch.float32, device=q.device)
    tau = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    bm, bn = config["fwd"]["block"]
    grid = (triton.cdiv(Tq, bm), B * H)
    steps = torch.empty(B * H, grid[0], dtype=torch.int32, device=q.device)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    _fwd[grid](
        q, k, v, out, out_g, tau, steps, slopes * (alpha - 1.0) if slopes is not None else dummy,
        *table_args(tab, "q", dummy), *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tile_strides(tab),
        H, H // Hkv, Tq, Tk, D, DV, (alpha - 1.0) * scale, Tk - Tq, triton.cdiv(Tk, bn),
        config.get("max_steps", MAX_STEPS),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pad(D), BLOCK_DV=pad(DV), HAS_MASK=tab is not None,
        HAS_ALIBI=slopes is not None, ALPHA2=alpha == 2.0, **launch_kwargs(config["fwd"], q))
    return out, tau, out_g, steps


class EntmaxAttentionFn(torch.autograd.Function):
    """``(q, k, v) -> (out, τ)`` for sparsemax (``alpha = 2``) or 1.5-entmax (``alpha = 1.5``);
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
        common = (H // Hkv, Tq, Tk, D, DV, (alpha - 1.0) * scale, scale, Tk - Tq)
        flags = dict(BLOCK_D=pad(D), BLOCK_DV=pad(DV), HAS_ALIBI=xslopes is not None, ALPHA2=alpha == 2.0)
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
