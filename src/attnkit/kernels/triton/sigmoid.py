"""Sigmoid attention in Triton, forward and backward, under any mask, ALiBi and GQA.

``out_i = Σ_j σ(scale · q_i·k_j + alibi_h(i, j) + b) v_j`` over the keys the mask allows
(Ramapuram et al. 2024). Sigmoid needs no normalization across keys, so unlike softmax there is
no running maximum, no log-sum-exp to save and no ``rowsum(dO ∘ O)`` term: the forward is one
pass over each query block's live key tiles, and the backward recomputes ``p = σ(s)`` per tile
with ``dS = p (1 - p) ∘ (dO Vᵀ)``.

Three kernels, none of them atomic:

* ``_fwd``: one program per (query block, batch · head), over the block's live key tiles;
* ``_bwd_dq``: the same walk, accumulating ``dQ = scale · dS K``;
* ``_bwd_dkdv``: one program per (key block, batch · key/value head), over the live query tiles
  of every query head of its group (GQA sums there), accumulating ``dV = Pᵀ dO`` and
  ``dK = scale · dSᵀ Q``.

Live tiles and partial-tile masks come from :mod:`attnkit.kernels.triton.blocks`. Scores and
accumulators are float32 whatever the input dtype; float32 inputs multiply with float32 accuracy
(IEEE in the interpreter, three TF32 products per product on CUDA; never plain TF32), so they
agree with the reference to float32 rounding.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors
through Triton's interpreter: that is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (_head_slope, _key_block, _key_tile_scores, _live_range, _query_block, _rows, _store_key_grads,
                     _tile_scores, dense, launch_kwargs, pad, table_args, tile_strides)

Tensor = torch.Tensor


@triton.jit
def _tile_probs(q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d,
                skb, skh, skn, skd, stp, stb, sth, stm, stn, Tk, D, scale, offset, shift, slope,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
                PREC: tl.constexpr):
    """Query-major live tile ``t``: ``σ(s)``, which pairs are live, its keys and key offsets."""
    s, keep, k, offs_n, col_ok = _tile_scores(
        q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
        Tk, D, scale, offset, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
    return tl.sigmoid(s), keep, k, offs_n, col_ok


@triton.jit
def _fwd(Q, K, V, O, SLOPES, PTR, COLS, TILES, MT,
         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
         stp, stb, sth, stm, stn,
         H, G, Tq, Tk, D, DV, scale, offset, shift, NBLK,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
         HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, PREC: tl.constexpr):
    i, b, h, hk, offs_m, offs_d, offs_dv, row_ok, q, slope = _query_block(
        Q, SLOPES, sqb, sqh, sqm, sqd, H, G, Tq, D, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_ALIBI)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    for t in range(start, end):
        p, keep, k, offs_n, col_ok = _tile_probs(
            q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
            Tk, D, scale, offset, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
        p = tl.where(keep, p, 0.0)
        v = _rows(V, b * svb + hk * svh, offs_n, col_ok, svn, offs_dv, svd, DV)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq(Q, K, V, DO, DQ, SLOPES, PTR, COLS, TILES, MT,
            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
            stp, stb, sth, stm, stn,
            H, G, Tq, Tk, D, DV, scale, offset, shift, NBLK,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, PREC: tl.constexpr):
    # DQ shares Q's strides and DO shares O's (both made contiguous like them)
    i, b, h, hk, offs_m, offs_d, offs_dv, row_ok, q, slope = _query_block(
        Q, SLOPES, sqb, sqh, sqm, sqd, H, G, Tq, D, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_ALIBI)
    do = _rows(DO, b * sob + h * soh, offs_m, row_ok, som, offs_dv, sod, DV)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    for t in range(start, end):
        p, keep, k, offs_n, col_ok = _tile_probs(
            q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d, skb, skh, skn, skd, stp, stb, sth, stm, stn,
            Tk, D, scale, offset, shift, slope, BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
        v = _rows(V, b * svb + hk * svh, offs_n, col_ok, svn, offs_dv, svd, DV)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = tl.where(keep, p * (1.0 - p) * dp, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv(Q, K, V, DO, DK, DV_, SLOPES, PTR, ROWS, TILES, MT,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              stp, stb, sth, stm, stn,
              Hkv, G, Tq, Tk, D, DV, scale, offset, shift, NBLK,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, PREC: tl.constexpr):
    # DK shares K's strides, DV_ V's; transposed tiles: rows are keys, columns queries
    j, b, hk, offs_n, offs_d, offs_dv, col_ok, k, v = _key_block(
        K, V, skb, skh, skn, skd, svb, svh, svn, svd, Hkv, Tk, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start, end = _live_range(PTR, j, NBLK, HAS_MASK)
    for g in range(0, G):
        h, slope = _head_slope(SLOPES, hk, G, g, HAS_ALIBI)
        for t in range(start, end):
            st, keep, q, do, offs_m, row_ok = _key_tile_scores(
                k, Q, DO, ROWS, TILES, MT, t, b, h, offs_n, col_ok, offs_d, offs_dv, sqb, sqh, sqm, sqd,
                sob, soh, som, sod, stp, stb, sth, stm, stn, Tq, D, DV, scale, offset, shift, slope,
                BLOCK_M, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
            pt = tl.sigmoid(st)
            pt = tl.where(keep, pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (1.0 - pt) * dpt
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    _store_key_grads(DK, DV_, dk, dv, b, hk, offs_n, offs_d, offs_dv, col_ok, skb, skh, skn, skd,
                     svb, svh, svn, svd, D, DV, scale)


class SigmoidAttentionFn(torch.autograd.Function):
    """``(q, k, v) -> out``; the backward returns ``dq, dk, dv``. See the module docstring."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, offset: float, slopes: Tensor | None,
                tables: dict, config: dict):
        q, k, v = (dense(x) for x in (q, k, v))
        B, H, Tq, D = q.shape
        Hkv, Tk, DV = k.shape[1], k.shape[2], v.shape[-1]
        out = torch.empty(B, H, Tq, DV, dtype=q.dtype, device=q.device)
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        tab = tables.get("fwd")
        bm, bn = config["fwd"]["block"]
        ptr, cols, tiles, mt = table_args(tab, "q", dummy)
        grid = (triton.cdiv(Tq, bm), B * H)
        _fwd[grid](q, k, v, out, slopes if slopes is not None else dummy, ptr, cols, tiles, mt,
                   *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tile_strides(tab),
                   H, H // Hkv, Tq, Tk, D, DV, scale, offset, Tk - Tq, triton.cdiv(Tk, bn),
                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pad(D), BLOCK_DV=pad(DV),
                   HAS_MASK=tab is not None, HAS_ALIBI=slopes is not None, **launch_kwargs(config["fwd"], q))
        ctx.save_for_backward(q, k, v, slopes)
        ctx.args = (scale, offset, tables, config)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, slopes = ctx.saved_tensors
        scale, offset, tables, config = ctx.args
        B, H, Tq, D = q.shape
        Hkv, Tk, DV = k.shape[1], k.shape[2], v.shape[-1]
        # DO shares O's layout in the kernels: contiguous (B, H, Tq, Dv)
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        sl = slopes if slopes is not None else dummy
        common = (H // Hkv, Tq, Tk, D, DV, scale, offset, Tk - Tq)
        tab = tables.get("dq")
        bm, bn = config["dq"]["block"]
        _bwd_dq[(triton.cdiv(Tq, bm), B * H)](
            q, k, v, dout, dq, sl, *table_args(tab, "q", dummy),
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *tile_strides(tab), H, *common, triton.cdiv(Tk, bn),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pad(D), BLOCK_DV=pad(DV),
            HAS_MASK=tab is not None, HAS_ALIBI=slopes is not None, **launch_kwargs(config["dq"], q))
        tab = tables.get("dkdv")
        bm, bn = config["dkdv"]["block"]
        _bwd_dkdv[(triton.cdiv(Tk, bn), B * Hkv)](
            q, k, v, dout, dk, dv, sl, *table_args(tab, "k", dummy),
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *tile_strides(tab), Hkv, *common, triton.cdiv(Tq, bm),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pad(D), BLOCK_DV=pad(DV),
            HAS_MASK=tab is not None, HAS_ALIBI=slopes is not None, **launch_kwargs(config["dkdv"], q))
        return dq, dk, dv, None, None, None, None, None
