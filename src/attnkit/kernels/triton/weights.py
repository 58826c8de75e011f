"""Attention weights in Triton, for ``return_weights`` and :func:`attnkit.capture`: chosen heads
and query rows, recomputed from each row's statistic.

``W[b, h', r', j] = p(s_ij)`` for the query rows ``i = rows[r']`` of the heads ``heads[h']``, over
all ``Tk`` keys (0 where the mask hides a key), with ``s = scale · q·k (+ ALiBi)`` and

* softmax: ``p = e^(s - lse_i)``; ``lse`` is given (a forward saved it) or computed here in a first
  pass over the keys (running maximum and sum, as a flash forward does);
* sigmoid: ``p = σ(s + offset)`` (no statistic);
* sparsemax / 1.5-entmax / α-entmax: ``p = [(α - 1) s - τ_i]_+^(1/(α-1))`` from the forward's
  thresholds ``τ``.

One program per (block of chosen rows, batch · chosen head), or per (block, batch) when the heads
are averaged (``nn.MultiheadAttention``'s ``average_attn_weights``): the program then adds each
head's weights into its tile of the result, so the per-head tensor never exists. Cost
``O(len(heads) · len(rows) · Tk · D)``; memory the result, plus the mask evaluated on the chosen
rows (int8, ``(B', H', len(rows), Tk)`` with ``B'``/``H'`` 1 when the mask does not depend on
them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...masks.base import Mask
from .common import _rows, launch_kwargs, pad

Tensor = torch.Tensor

#: the normalizer a statistic belongs to (the kernel's ``KIND``)
KINDS = {"softmax": 0, "sigmoid": 1, "sparsemax": 2, "entmax15": 3, "entmax": 4}


@triton.jit
def _scores(q, K, b, hk, rows, r_ok, j0, skb, skh, skn, skd, MASK, mrow, smn, Tk, D, scale, shift, slope,
            offs_d, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, PREC: tl.constexpr):
    """The scores of the chosen rows against keys ``[j0, j0 + BLOCK_N)`` and which pairs are live
    (``mrow``: the offsets of the rows' mask)."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < Tk
    k = _rows(K, b * skb + hk * skh, offs_n, col_ok, skn, offs_d, skd, D)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if HAS_ALIBI:
        s += slope * (offs_n[None, :] - rows[:, None] - shift).to(tl.float32)
    keep = r_ok[:, None] & col_ok[None, :]
    if HAS_MASK:
        mt = tl.load(MASK + mrow + offs_n[None, :] * smn, mask=keep, other=0)
        keep = keep & (mt != 0)
    return s, keep, offs_n, col_ok


@triton.jit
def _live(LIVE, b, hs, i, j0, slb, slh, slr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Whether row block ``i`` has a live pair among keys ``[j0, j0 + BLOCK_N)`` (always without a mask)."""
    live = 1
    if HAS_MASK:
        live = tl.load(LIVE + b * slb + hs * slh + i * slr + j0 // BLOCK_N).to(tl.int32)
    return live != 0


@triton.jit
def _weights(Q, K, W, STAT, HEADS, ROWS, SLOPES, MASK, LIVE,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, swb, swh, swm, swn, ssb, ssh, ssm,
             smb, smh, smm, smn, slb, slh, slr,
             NH, G, R, Tk, D, scale, offset, shift, inv_heads, inv,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_STAT: tl.constexpr, KIND: tl.constexpr,
             AVERAGE: tl.constexpr, PREC: tl.constexpr):
    # W is (B, NH or 1, R, Tk), zero where the mask hides a key; STAT (B, NH, R) float32; MASK (B', H', R, Tk)
    # int8 over the chosen heads, LIVE (B', H', row blocks, key blocks) int8: whether a block has a live pair
    i = tl.program_id(0)
    bh = tl.program_id(1)
    if AVERAGE:
        b = bh
        h_lo = 0
        h_hi = NH
    else:
        b = bh // NH
        h_lo = bh % NH
        h_hi = h_lo + 1
    offs_r = i * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < R
    rows = tl.load(ROWS + offs_r, mask=r_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    for hs in range(h_lo, h_hi):
        h = tl.load(HEADS + hs)
        hk = h // G
        q = _rows(Q, b * sqb + h * sqh, rows, r_ok, sqm, offs_d, sqd, D)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h)
        mrow = b * smb + hs * smh + offs_r[:, None] * smm
        stat = tl.zeros([BLOCK_M], tl.float32)
        if HAS_STAT:
            stat = tl.load(STAT + b * ssb + hs * ssh + offs_r * ssm, mask=r_ok, other=float("inf"))
        elif KIND == 0:   # softmax without a saved lse: a first pass for it
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_sum = tl.zeros([BLOCK_M], tl.float32)
            for j0 in range(0, Tk, BLOCK_N):
                if _live(LIVE, b, hs, i, j0, slb, slh, slr, BLOCK_N, HAS_MASK):
                    s, keep, offs_n, col_ok = _scores(
                        q, K, b, hk, rows, r_ok, j0, skb, skh, skn, skd, MASK, mrow, smn, Tk, D, scale, shift,
                        slope, offs_d, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
                    s = tl.where(keep, s, float("-inf"))
                    m_new = tl.maximum(m, tl.max(s, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_sum = l_sum * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
                    m = m_new
            stat = tl.where(m == float("-inf"), float("inf"), m + tl.log(tl.where(l_sum == 0.0, 1.0, l_sum)))
        for j0 in range(0, Tk, BLOCK_N):
            if _live(LIVE, b, hs, i, j0, slb, slh, slr, BLOCK_N, HAS_MASK):   # else zeros already
                s, keep, offs_n, col_ok = _scores(
                    q, K, b, hk, rows, r_ok, j0, skb, skh, skn, skd, MASK, mrow, smn, Tk, D, scale, shift,
                    slope, offs_d, BLOCK_N, HAS_MASK, HAS_ALIBI, PREC)
                if KIND == 0:
                    p = tl.exp(s - stat[:, None])        # dead rows: stat = +inf, p = 0
                elif KIND == 1:
                    p = tl.sigmoid(s + offset)
                elif KIND == 2:
                    p = tl.maximum(s - stat[:, None], 0.0)
                elif KIND == 3:
                    d = tl.maximum(s - stat[:, None], 0.0)
                    p = d * d
                else:   # α-entmax: d^(1/(α-1))
                    d = tl.maximum(s - stat[:, None], 0.0)
                    # 2**-126: triton <= 3.6 types a smaller literal float64 (entmax._gates)
                    p = tl.where(d > 0, tl.exp(inv * tl.log(tl.maximum(d, 1.1754943508222875e-38))), 0.0)
                p = tl.where(keep, p, 0.0)
                at = W + b * swb + offs_r[:, None] * swm + offs_n[None, :] * swn
                ok = r_ok[:, None] & col_ok[None, :]
                if AVERAGE:
                    prev = tl.load(at, mask=ok, other=0.0).to(tl.float32)
                    tl.store(at, (prev + p * inv_heads).to(W.dtype.element_ty), mask=ok)
                else:
                    tl.store(at + hs * swh, p.to(W.dtype.element_ty), mask=ok)


def _mask_rows(mask: Mask, B: int, heads: Tensor, rows: Tensor, Tq: int, Tk: int) -> Tensor:
    """``mask`` on the chosen rows and heads: int8 ``(B', H', R, Tk)``, ``B'``/``H'`` 1 where it
    does not depend on them."""
    dev = rows.device
    m = mask.mask_mod(torch.arange(B, device=dev).view(-1, 1, 1, 1), heads.view(1, -1, 1, 1),
                      rows.view(1, 1, -1, 1), torch.arange(Tk, device=dev).view(1, 1, 1, -1), Tq, Tk)
    m = torch.as_tensor(m, device=dev)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.expand(m.shape[0], m.shape[1], len(rows), Tk).to(torch.int8).contiguous()


def _live_blocks(mt: Tensor, bm: int, bn: int) -> Tensor:
    """Whether each ``(bm, bn)`` block of the mask rows ``mt (B', H', R, Tk)`` has a live pair:
    int8 ``(B', H', ⌈R / bm⌉, ⌈Tk / bn⌉)``."""
    R, Tk = mt.shape[-2:]
    padded = torch.nn.functional.pad(mt, (0, -Tk % bn, 0, -R % bm))
    return padded.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm)).amax((-3, -1)).contiguous()


def triton_weights(q: Tensor, k: Tensor, kind: str, *, scale: float, heads: tuple[int, ...] | None = None,
                   rows: tuple[int, ...] | None = None, stat: Tensor | None = None, offset: float = 0.0,
                   slopes: Tensor | None = None, mask: Mask | None = None, average: bool = False,
                   config: dict | None = None, alpha: float = 1.5) -> Tensor:
    """Weights ``(B, len(heads), len(rows), Tk)`` (all heads / rows when None; ``(B, 1, ...)`` their
    mean with ``average``) of ``q (B, H, Tq, D)`` against ``k (B, Hkv, Tk, D)`` in ``q``'s dtype.

    ``kind``: ``"softmax"`` (``stat`` the rows' log-sum-exp ``(B, H, Tq)``, or None to compute it),
    ``"sigmoid"`` (``p = σ(s + offset)``), ``"sparsemax"`` / ``"entmax15"`` / ``"entmax"`` (with
    ``alpha``) (``stat`` the thresholds ``τ (B, H, Tq)``, ``+inf`` for rows with no key); ``scale`` multiplies ``q·k``
    (for entmax, ``(α - 1)`` times the score's scale; for softmax with a temperature, divided by
    it); ``slopes`` ALiBi's per query head, already so multiplied; ``mask`` an attnkit mask.

    Example (on a machine without a GPU set ``TRITON_INTERPRET=1`` first)::

        w = triton_weights(q, k, "softmax", scale=q.shape[-1] ** -0.5, heads=(0,), rows=(5, 100),
                           mask=attnkit.masks.causal())
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    if kind in ("sparsemax", "entmax15", "entmax") and stat is None:
        raise ValueError(f"kind {kind!r} needs stat: the thresholds the forward found")
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dev = q.device
    heads_t = torch.arange(H, device=dev) if heads is None else torch.tensor(heads, device=dev, dtype=torch.int64)
    rows_t = torch.arange(Tq, device=dev) if rows is None else torch.tensor(rows, device=dev, dtype=torch.int64)
    NH, R = len(heads_t), len(rows_t)
    if average:
        w = torch.zeros(B, 1, R, Tk, dtype=q.dtype, device=dev)
    else:   # zeros under a mask: the kernel skips blocks with no live pair
        w = (torch.empty if mask is None else torch.zeros)(B, NH, R, Tk, dtype=q.dtype, device=dev)
    if NH == 0 or R == 0 or Tk == 0:
        return w
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    st = (stat.float().index_select(1, heads_t).index_select(2, rows_t).contiguous() if stat is not None
          else None)
    mt = _mask_rows(mask, B, heads_t, rows_t, Tq, Tk) if mask is not None else None
    mstrides = [0, 0, 0, 0] if mt is None else [0 if mt.shape[i] == 1 else mt.stride(i) for i in range(4)]
    cfg = config or {"block": (16, 16)}
    bm, bn = cfg["block"]
    live = _live_blocks(mt, bm, bn) if mt is not None else None
    lstrides = [0, 0, 0] if live is None else [0 if live.shape[i] == 1 else live.stride(i) for i in range(3)]
    grid = (triton.cdiv(R, bm), B * (1 if average else NH))
    _weights[grid](
        q, k, w, st if st is not None else dummy, heads_t, rows_t,
        slopes.float().contiguous() if slopes is not None else dummy, mt if mt is not None else dummy,
        live if live is not None else dummy,
        *q.stride(), *k.stride(), *w.stride(), *(st.stride() if st is not None else (0, 0, 0)), *mstrides, *lstrides,
        NH, H // Hkv, R, Tk, D, scale, offset, Tk - Tq, 1.0 / NH, 1.0 / (alpha - 1.0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=pad(D), HAS_MASK=mt is not None, HAS_ALIBI=slopes is not None,
        HAS_STAT=st is not None, KIND=KINDS[kind], AVERAGE=average, **launch_kwargs(cfg, q))
    return w
