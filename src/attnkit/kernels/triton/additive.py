"""Additive (Bahdanau) attention in Triton, forward and backward, under any mask and GQA.

``s_ij = scale · wᵀ tanh(a_i + b_j)`` with the projections ``a = W_q q (B, H, Tq, hidden)`` and
``b = W_k k + bias (B, Hkv, Tk, hidden)`` computed beforehand by torch (so their gradients reach
``W_q``, ``W_k``, the bias, q and k through autograd), then softmax over the keys the mask allows.
The ``(B, H, Tq, Tk, hidden)`` tensor of the plain formula never exists: each program holds one
``(block_m, block_n, hidden)`` tile of ``tanh`` at a time, so memory is the inputs, the output and
the log-sum-exp, ``O(T · hidden)``.

Three kernels, none atomic:

* ``_fwd``: one program per (query block, batch · head), over the block's live key tiles, with
  softmax's running maximum and sum (a flash forward whose scores are additive); saves ``lse``;
* ``_bwd_da``: the same walk, recomputing ``p = e^(s - lse)`` and ``dS = scale · p ∘ (dO Vᵀ - D)``
  (``D = rowsum(dO ∘ O)``), accumulating ``da_i = w ∘ Σ_j dS_ij (1 - t_ij²)`` and, per program,
  ``dw = Σ_ij dS_ij t_ij`` (summed over programs by torch);
* ``_bwd_dbdv``: one program per (key block, batch · key/value head), over the live query tiles of
  every query head of its group: ``dV = Pᵀ dO`` and ``db_j = w ∘ Σ_i dS_ij (1 - t_ij²)``.

``tanh(x) = 2σ(2x) - 1``. Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (_key_block, _live_range, _packed_tile, _rows, _tile_span, dense, launch_kwargs, pad, table_args,
                     tile_strides)

Tensor = torch.Tensor


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile(a, kb, w, TILES, MT, t, b, h, row_ok, col_ok, stp, stb, sth, stm, stn, scale,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Live tile ``t`` of projections ``a (BLOCK_M, hidden)`` and ``kb (BLOCK_N, hidden)`` (float32):
    ``tanh(a_i + b_j)`` ``(BLOCK_M, BLOCK_N, hidden)`` and the scores, ``-inf`` where the pair is not
    live."""
    th = _tanh(a[:, None, :] + kb[None, :, :])
    s = tl.sum(th * w[None, None, :], 2) * scale
    # the mask as 0 / -inf added to the scores, the partial tile's branch yielding floats: the scores'
    # layout (a reduction of the 3-D tile) differs from the mask's, and triton cannot move 1-bit
    # values through shared memory to convert them (compiling for sm_90 fails)
    neg = tl.where(row_ok[:, None] & col_ok[None, :], 0.0, float("-inf"))
    if HAS_MASK:
        tile = tl.load(TILES + t)
        if tile >= 0:
            mt = _packed_tile(MT, tile, b, h, stp, stb, sth, stm, stn, BLOCK_M, BLOCK_N, False)
            neg = tl.where(mt != 0, neg, float("-inf"))
    return th, s + neg


@triton.jit
def _key_rows(COLS, t, Bp, V, b, hk, sbb, sbh, sbn, sbd, svb, svh, svn, svd, offs_h, offs_dv, Tk, HID, DV,
              BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """A query-major program's live tile ``t``: its keys' projections (float32) and values, and which
    keys are in range."""
    offs_n, col_ok = _tile_span(COLS, t, BLOCK_N, Tk, HAS_MASK)
    kb = _rows(Bp, b * sbb + hk * sbh, offs_n, col_ok, sbn, offs_h, sbd, HID).to(tl.float32)
    v = _rows(V, b * svb + hk * svh, offs_n, col_ok, svn, offs_dv, svd, DV)
    return kb, v, col_ok


@triton.jit
def _query_ids(H, G, Tq, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A query-major program's block, batch, head, key/value head, offsets and rows in range."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    return i, bh // H, bh % H, (bh % H) // G, offs_m, tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_DV), offs_m < Tq


@triton.jit
def _query_side(A, W, DO, LSE, DR, b, h, offs_m, row_ok, offs_h, offs_dv, sab, sah, sam, sad,
                sob, soh, som, sod, H, Tq, HID, DV, WITH_GRAD: tl.constexpr):
    """A query block's projections ``a`` (float32), ``w``, and for the backward its output
    gradients, log-sum-exp and ``D``."""
    a = _rows(A, b * sab + h * sah, offs_m, row_ok, sam, offs_h, sad, HID).to(tl.float32)
    w = tl.load(W + offs_h, mask=offs_h < HID, other=0.0)
    do = tl.zeros([1, 1], tl.float32)
    lse = tl.zeros([1], tl.float32)
    dr = tl.zeros([1], tl.float32)
    if WITH_GRAD:
        do = _rows(DO, b * sob + h * soh, offs_m, row_ok, som, offs_dv, sod, DV)
        lse = tl.load(LSE + (b * H + h) * Tq + offs_m, mask=row_ok, other=float("inf"))
        dr = tl.load(DR + (b * H + h) * Tq + offs_m, mask=row_ok, other=0.0)
    return a, w, do, lse, dr


@triton.jit
def _fwd(A, Bp, V, W, O, LSE, PTR, COLS, TILES, MT,
         sab, sah, sam, sad, sbb, sbh, sbn, sbd, svb, svh, svn, svd, sob, soh, som, sod,
         stp, stb, sth, stm, stn,
         H, G, Tq, Tk, HID, DV, scale, NBLK,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
         HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    i, b, h, hk, offs_m, offs_h, offs_dv, row_ok = _query_ids(H, G, Tq, BLOCK_M, BLOCK_H, BLOCK_DV)
    a, w, _, _, _ = _query_side(A, W, O, LSE, LSE, b, h, offs_m, row_ok, offs_h, offs_dv, sab, sah, sam, sad,
                                sob, soh, som, sod, H, Tq, HID, DV, False)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    for t in range(start, end):
        kb, v, col_ok = _key_rows(COLS, t, Bp, V, b, hk, sbb, sbh, sbn, sbd, svb, svh, svn, svd, offs_h, offs_dv,
                                  Tk, HID, DV, BLOCK_N, HAS_MASK)
        th, s = _tile(a, kb, w, TILES, MT, t, b, h, row_ok, col_ok, stp, stb, sth, stm, stn, scale,
                      BLOCK_M, BLOCK_N, HAS_MASK)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        corr = tl.exp(m - m_safe)
        l_sum = l_sum * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(m == float("-inf"), float("inf"), m + tl.log(tl.where(l_sum == 0.0, 1.0, l_sum)))
    tl.store(LSE + (b * H + h) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_da(A, Bp, V, W, DO, DA, DW, LSE, DR, PTR, COLS, TILES, MT,
            sab, sah, sam, sad, sbb, sbh, sbn, sbd, svb, svh, svn, svd, sob, soh, som, sod,
            stp, stb, sth, stm, stn,
            H, G, Tq, Tk, HID, DV, scale, NBLK,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
            HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    # DA shares A's strides; DW is (programs, HID) float32, one row per program
    i, b, h, hk, offs_m, offs_h, offs_dv, row_ok = _query_ids(H, G, Tq, BLOCK_M, BLOCK_H, BLOCK_DV)
    a, w, do, lse, dr = _query_side(A, W, DO, LSE, DR, b, h, offs_m, row_ok, offs_h, offs_dv, sab, sah, sam, sad,
                                    sob, soh, som, sod, H, Tq, HID, DV, True)
    da = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    start, end = _live_range(PTR, i, NBLK, HAS_MASK)
    for t in range(start, end):
        kb, v, col_ok = _key_rows(COLS, t, Bp, V, b, hk, sbb, sbh, sbn, sbd, svb, svh, svn, svd, offs_h, offs_dv,
                                  Tk, HID, DV, BLOCK_N, HAS_MASK)
        th, s = _tile(a, kb, w, TILES, MT, t, b, h, row_ok, col_ok, stp, stb, sth, stm, stn, scale,
                      BLOCK_M, BLOCK_N, HAS_MASK)
        p = tl.exp(s - lse[:, None])     # 0 where the pair is not live (s = -inf) or the row has no key
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - dr[:, None]) * scale
        da += w[None, :] * tl.sum(ds[:, :, None] * (1.0 - th * th), 1)
        dw += tl.sum(tl.sum(ds[:, :, None] * th, 1), 0)
    tl.store(DA + b * sab + h * sah + offs_m[:, None] * sam + offs_h[None, :] * sad, da.to(DA.dtype.element_ty),
             mask=row_ok[:, None] & (offs_h[None, :] < HID))
    tl.store(DW + (tl.program_id(1) * tl.num_programs(0) + i) * HID + offs_h, dw, mask=offs_h < HID)


@triton.jit
def _bwd_dbdv(A, Bp, V, W, DO, DB, DV_, LSE, DR, PTR, ROWS, TILES, MT,
              sab, sah, sam, sad, sbb, sbh, sbn, sbd, svb, svh, svn, svd, sob, soh, som, sod,
              stp, stb, sth, stm, stn,
              H, Hkv, G, Tq, Tk, HID, DV, scale, NBLK,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
              HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    # DB shares B's strides, DV_ V's
    j, b, hk, offs_n, offs_h, offs_dv, col_ok, kb, v = _key_block(
        Bp, V, sbb, sbh, sbn, sbd, svb, svh, svn, svd, Hkv, Tk, HID, DV, BLOCK_N, BLOCK_H, BLOCK_DV)
    kb = kb.to(tl.float32)
    db = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    start, end = _live_range(PTR, j, NBLK, HAS_MASK)
    for g in range(0, G):
        h = hk * G + g
        for t in range(start, end):
            offs_m, row_ok = _tile_span(ROWS, t, BLOCK_M, Tq, HAS_MASK)
            a, w, do, lse, dr = _query_side(A, W, DO, LSE, DR, b, h, offs_m, row_ok, offs_h, offs_dv, sab, sah, sam,
                                            sad, sob, soh, som, sod, H, Tq, HID, DV, True)
            th, s = _tile(a, kb, w, TILES, MT, t, b, h, row_ok, col_ok, stp, stb, sth, stm, stn, scale,
                          BLOCK_M, BLOCK_N, HAS_MASK)
            p = tl.exp(s - lse[:, None])
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - dr[:, None]) * scale
            db += w[None, :] * tl.sum(ds[:, :, None] * (1.0 - th * th), 0)
    tl.store(DB + b * sbb + hk * sbh + offs_n[:, None] * sbn + offs_h[None, :] * sbd, db.to(DB.dtype.element_ty),
             mask=col_ok[:, None] & (offs_h[None, :] < HID))
    tl.store(DV_ + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd, dv.to(DV_.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < DV))


class AdditiveAttentionFn(torch.autograd.Function):
    """``(a, b, v, w) -> out`` (softmax over ``scale · wᵀ tanh(a_i + b_j)``); the backward returns
    ``da, db, dv, dw``. ``a (B, H, Tq, hidden)``, ``b (B, Hkv, Tk, hidden)``, ``v (B, Hkv, Tk, Dv)``,
    ``w (hidden,)``. See the module docstring."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, v: Tensor, w: Tensor, scale: float, tables: dict, config: dict):
        a, b, v = (dense(x) for x in (a, b, v))
        w32 = w.detach().float().contiguous()
        B, H, Tq, HID = a.shape
        Hkv, Tk, DV = b.shape[1], b.shape[2], v.shape[-1]
        out = torch.empty(B, H, Tq, DV, dtype=v.dtype, device=v.device)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=v.device)
        dummy = torch.zeros(1, dtype=torch.int32, device=v.device)
        tab = tables.get("fwd")
        bm, bn = config["fwd"]["block"]
        _fwd[(triton.cdiv(Tq, bm), B * H)](
            a, b, v, w32, out, lse, *table_args(tab, "q", dummy),
            *a.stride(), *b.stride(), *v.stride(), *out.stride(), *tile_strides(tab),
            H, H // Hkv, Tq, Tk, HID, DV, scale, triton.cdiv(Tk, bn),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_H=pad(HID), BLOCK_DV=pad(DV), HAS_MASK=tab is not None,
            **launch_kwargs(config["fwd"], v))
        ctx.save_for_backward(a, b, v, w32, out, lse)
        ctx.args = (scale, tables, config, w.dtype)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        a, b, v, w32, out, lse = ctx.saved_tensors
        scale, tables, config, w_dtype = ctx.args
        B, H, Tq, HID = a.shape
        Hkv, Tk, DV = b.shape[1], b.shape[2], v.shape[-1]
        dout = dout.contiguous()   # DO shares O's layout in the kernels
        dr = (dout.float() * out.float()).sum(-1).contiguous()   # D_i = dO_i · O_i
        da, db, dv = torch.empty_like(a), torch.empty_like(b), torch.empty_like(v)
        dummy = torch.zeros(1, dtype=torch.int32, device=v.device)
        strides = (*a.stride(), *b.stride(), *v.stride(), *dout.stride())
        flags = dict(BLOCK_H=pad(HID), BLOCK_DV=pad(DV))
        tab = tables.get("dq")
        bm, bn = config["dq"]["block"]
        grid = (triton.cdiv(Tq, bm), B * H)
        dw = torch.zeros(grid[0] * grid[1], HID, dtype=torch.float32, device=v.device)
        _bwd_da[grid](
            a, b, v, w32, dout, da, dw, lse, dr, *table_args(tab, "q", dummy), *strides, *tile_strides(tab),
            H, H // Hkv, Tq, Tk, HID, DV, scale, triton.cdiv(Tk, bn),
            BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=tab is not None, **flags, **launch_kwargs(config["dq"], v))
        tab = tables.get("dkdv")
        bm, bn = config["dkdv"]["block"]
        _bwd_dbdv[(triton.cdiv(Tk, bn), B * Hkv)](
            a, b, v, w32, dout, db, dv, lse, dr, *table_args(tab, "k", dummy), *strides, *tile_strides(tab),
            H, Hkv, H // Hkv, Tq, Tk, HID, DV, scale, triton.cdiv(Tq, bm),
            BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=tab is not None, **flags, **launch_kwargs(config["dkdv"], v))
        return da, db, dv, dw.sum(0).to(w_dtype), None, None, None
