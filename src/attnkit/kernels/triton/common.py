"""What every attnkit Triton kernel shares: the walk over a block table's live tiles, tile loads,
and the scores of a tile, query-major (forward and dQ) and key-major (dK/dV); and, on the Python
side, the layouts, paddings and launch settings of a launch.

A tile's scores are ``scale · q·kᵀ + offset (+ slope · (j - i - shift) for ALiBi)``, in float32,
with ``keep`` the pairs that are in range and allowed by the mask (a partial tile's packed mask
from :mod:`.blocks`). Each kernel then applies its normalizer to them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import BlockTables

Tensor = torch.Tensor


@triton.jit
def _live_range(PTR, i, NBLK, HAS_MASK: tl.constexpr):
    """The live tiles ``[start, end)`` of block ``i`` in a compressed-rows table (every block when
    there is no mask)."""
    if HAS_MASK:
        start = tl.load(PTR + i)
        end = tl.load(PTR + i + 1)
    else:
        start = 0
        end = NBLK
    return start, end


@triton.jit
def _rows(X, base, offs, ok, s_row, offs_d, s_d, D):
    """Rows ``offs`` of a ``(rows, D)`` slice of ``X`` starting at ``base`` (row stride ``s_row``,
    feature stride ``s_d``), zero where ``ok`` is false or past ``D``: a tile of q, k, v or dout."""
    return tl.load(X + base + offs[:, None] * s_row + offs_d[None, :] * s_d,
                   mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _query_block(Q, SLOPES, sqb, sqh, sqm, sqd, H, G, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """A query-major program's block: its indices, offsets, queries and ALiBi slope."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    q = _rows(Q, b * sqb + h * sqh, offs_m, row_ok, sqm, offs_d, sqd, D)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    return i, b, h, h // G, offs_m, offs_d, tl.arange(0, BLOCK_DV), row_ok, q, slope


@triton.jit
def _key_block(K, V, skb, skh, skn, skd, svb, svh, svn, svd, Hkv, Tk, D, DV, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A key-major program's block: its indices, offsets, keys and values."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < Tk
    k = _rows(K, b * skb + hk * skh, offs_n, col_ok, skn, offs_d, skd, D)
    v = _rows(V, b * svb + hk * svh, offs_n, col_ok, svn, offs_dv, svd, DV)
    return j, b, hk, offs_n, offs_d, offs_dv, col_ok, k, v


@triton.jit
def _head_slope(SLOPES, hk, G, g, HAS_ALIBI: tl.constexpr):
    """Query head ``g`` of key/value head ``hk``'s group, and its ALiBi slope (0 without ALiBi)."""
    h = hk * G + g
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    return h, slope


@triton.jit
def _store_key_grads(DK, DV_, dk, dv, b, hk, offs_n, offs_d, offs_dv, col_ok, skb, skh, skn, skd,
                     svb, svh, svn, svd, D, DV, scale):
    """A key-major program's results: ``dK = scale · dk`` (K's strides) and ``dV`` (V's)."""
    tl.store(DK + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
             dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _packed_tile(MT, tile, b, h, stp, stb, sth, stm, stn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 KEY_MAJOR: tl.constexpr):
    """Partial tile ``tile``'s packed mask (int8, nonzero where allowed) for batch ``b``, head ``h``:
    ``(BLOCK_M, BLOCK_N)``, or its transpose ``(BLOCK_N, BLOCK_M)`` when ``KEY_MAJOR``."""
    base = MT + tile * stp + b * stb + h * sth
    if KEY_MAJOR:
        return tl.load(base + tl.arange(0, BLOCK_M)[None, :] * stm + tl.arange(0, BLOCK_N)[:, None] * stn)
    return tl.load(base + tl.arange(0, BLOCK_M)[:, None] * stm + tl.arange(0, BLOCK_N)[None, :] * stn)


@triton.jit
def _tile_keep(keep, TILES, MT, t, b, h, stp, stb, sth, stm, stn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_MASK: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """``keep`` and, for a partial live tile ``t``, its packed mask (query-major ``(BLOCK_M, BLOCK_N)``,
    or key-major, transposed)."""
    if HAS_MASK:
        tile = tl.load(TILES + t)
        if tile >= 0:
            keep = keep & (_packed_tile(MT, tile, b, h, stp, stb, sth, stm, stn, BLOCK_M, BLOCK_N, KEY_MAJOR) != 0)
    return keep


@triton.jit
def _tile_span(IDX, t, BLOCK: tl.constexpr, T, HAS_MASK: tl.constexpr):
    """Live tile ``t``'s positions along the walked axis and which are in range: its key block's
    (query-major walk, ``IDX`` the table's columns) or query block's (key-major, its rows); block
    ``t`` itself without a mask."""
    if HAS_MASK:
        blk = tl.load(IDX + t)
    else:
        blk = t
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < T


@triton.jit
def _tile_scores(q, K, COLS, TILES, MT, t, b, h, hk, offs_m, row_ok, offs_d,
                 skb, skh, skn, skd, stp, stb, sth, stm, stn, Tk, D, scale, offset, shift, slope,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 PREC: tl.constexpr):
    """Query-major live tile ``t`` of a query block: its scores ``(BLOCK_M, BLOCK_N)``, which pairs
    are live (in range and allowed by the mask), its keys, key offsets and which keys are in range."""
    offs_n, col_ok = _tile_span(COLS, t, BLOCK_N, Tk, HAS_MASK)
    k = _rows(K, b * skb + hk * skh, offs_n, col_ok, skn, offs_d, skd, D)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + offset
    if HAS_ALIBI:
        s += slope * (offs_n[None, :] - offs_m[:, None] - shift).to(tl.float32)
    keep = _tile_keep(row_ok[:, None] & col_ok[None, :], TILES, MT, t, b, h, stp, stb, sth, stm, stn,
                      BLOCK_M, BLOCK_N, HAS_MASK, False)
    return s, keep, k, offs_n, col_ok


@triton.jit
def _key_tile_scores(k, Q, DO, ROWS, TILES, MT, t, b, h, offs_n, col_ok, offs_d, offs_dv,
                     sqb, sqh, sqm, sqd, sob, soh, som, sod, stp, stb, sth, stm, stn,
                     Tq, D, DV, scale, offset, shift, slope,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     PREC: tl.constexpr):
    """Key-major live tile ``t`` of a key block (query head ``h``): the transposed scores
    ``(BLOCK_N, BLOCK_M)`` (rows are keys, columns queries), which pairs are live, the tile's
    queries and output gradients, query offsets and which queries are in range."""
    offs_m, row_ok = _tile_span(ROWS, t, BLOCK_M, Tq, HAS_MASK)
    q = _rows(Q, b * sqb + h * sqh, offs_m, row_ok, sqm, offs_d, sqd, D)
    do = _rows(DO, b * sob + h * soh, offs_m, row_ok, som, offs_dv, sod, DV)
    st = tl.dot(k, tl.trans(q), input_precision=PREC) * scale + offset
    if HAS_ALIBI:
        st += slope * (offs_n[:, None] - offs_m[None, :] - shift).to(tl.float32)
    keep = _tile_keep(col_ok[:, None] & row_ok[None, :], TILES, MT, t, b, h, stp, stb, sth, stm, stn,
                      BLOCK_M, BLOCK_N, HAS_MASK, True)
    return st, keep, q, do, offs_m, row_ok


def dense(x: Tensor) -> Tensor:
    """``x`` itself when its gradient, allocated with ``empty_like``, has its strides (a
    permutation of a contiguous tensor: heads-major views of (B, T, H, D) stay as they are), else a
    contiguous copy: the backward's gradients share the inputs' strides."""
    if x.stride(-1) == 1 and torch.empty_like(x, device="meta").stride() == x.stride():
        return x
    return x.contiguous()


def pad(n: int) -> int:
    """A head dimension rounded up to a power of two (at least 16, what ``tl.dot`` takes)."""
    return max(16, triton.next_power_of_2(n))


def tile_strides(tab: BlockTables | None) -> tuple[int, ...]:
    """Strides of the packed partial tiles, 0 over a batch or head axis the mask does not have."""
    if tab is None:
        return (0, 0, 0, 0, 0)
    p = tab.partial
    st = list(p.stride())
    if p.shape[1] == 1:
        st[1] = 0
    if p.shape[2] == 1:
        st[2] = 0
    return tuple(st)


def table_args(tab: BlockTables | None, major: str, dummy: Tensor):
    """The pointers, columns (or rows), tile ids and packed tiles of ``tab``, query-major (``"q"``)
    or key-major (``"k"``); ``dummy`` addresses when there is no mask."""
    if tab is None:
        return dummy, dummy, dummy, dummy
    if major == "q":
        return tab.q_ptr, tab.q_cols, tab.q_tile, tab.partial
    return tab.k_ptr, tab.k_rows, tab.k_tile, tab.partial


def launch_kwargs(cfg: dict, x: Tensor) -> dict:
    """Precision and launch settings. float32: IEEE products in the interpreter; on CUDA three TF32
    products per product ("tf32x3", float32 accuracy on tensor cores: triton 3.6 fails to compile
    the IEEE FMA path of these kernels on Hopper); half types ignore it."""
    out = {"PREC": ("tf32x3" if x.is_cuda else "ieee") if x.dtype == torch.float32 else None}
    if x.is_cuda:
        out.update(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    return out
