r"""One (query shard × key/value shard) block of ring attention, in plain PyTorch.

A shard is made of chunks of consecutive global positions (one for the contiguous layout, two
for zigzag, see :mod:`attnkit.distributed.layout`), so a block is a small grid of *tiles*, one per
(query chunk, key chunk) pair. Every tile is evaluated at its **global** positions, exactly as
the single-process backends evaluate a tile of the full ``(Tq, Tk)`` grid::

    s   = tile(q_i, k_j) · scale                                 (B, H, tq, tk)
    s   = score_mod(s, b, h, q_idx, kv_idx, Tq, Tk)  for each bias   (q_idx, kv_idx global; Tq, Tk global)
    s   = s / temperature                                         (softmax only)
    keep = mask_mod(b, h, q_idx, kv_idx, Tq, Tk)                  (only for PARTIAL tiles)

Softmax tiles update an online softmax per query row (running max ``m``, sum ``l`` and
unnormalized output ``acc``; FlashAttention's recurrence), so the blocks a rank sees in any
order merge exactly into ``out = acc / l`` and ``lse = m + log l``. Sigmoid tiles simply add
``σ(s + b) v``. A tile whose class is EMPTY is never computed; a FULL one skips the mask.

The backward of a tile recomputes its probabilities from the saved global ``lse`` (softmax:
``p = exp(s - lse)``, ``ds = p ∘ (dO vᵀ - rowsum(dO ∘ O))``; sigmoid: ``ds = (dO vᵀ) ∘ p(1-p)``) and
returns the tile's contributions to ``dq``, ``dk``, ``dv`` and to the bias parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..kernels.dropout import keep_mask, row_hash
from ..kernels.tile import expand, reduce_groups
from ..masks.base import EMPTY, FULL
from ..normalizers.base import Sigmoid, Softmax
from ..spec import AttentionSpec
from .layout import Chunk

Tensor = torch.Tensor
NEG_INF = float("-inf")

#: a block's tile classes: ``status[i][j]`` for query chunk ``i`` and key chunk ``j``
Status = Sequence[Sequence[int]]


# query head h reads key head h // groups: the tiled kernels' expand / reduce_groups
expand_heads, reduce_heads = expand, reduce_groups


def tile_grid(B: int, H: int, q_start: int, tq: int, k_start: int, tk: int, device):
    """Broadcastable index tensors of one tile at global positions: ``b (B,1,1,1)``, ``h (1,H,1,1)``,
    ``q_idx (1,1,tq,1)`` = ``q_start …``, ``kv_idx (1,1,1,tk)`` = ``k_start …``."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(q_start, q_start + tq, device=device).view(1, 1, tq, 1)
    kv = torch.arange(k_start, k_start + tk, device=device).view(1, 1, 1, tk)
    return b, h, q, kv


def temperature(spec: AttentionSpec) -> float:
    return spec.normalizer.temperature if isinstance(spec.normalizer, Softmax) else 1.0


def is_sigmoid(spec: AttentionSpec) -> bool:
    return isinstance(spec.normalizer, Sigmoid)


def tile_scores(qp: Tensor, kp: Tensor, spec: AttentionSpec, grid) -> Tensor:
    """The scores of one tile, ``(B, H, tq, tk)``: ``qp (B, H, tq, D)`` against the head-expanded
    ``kp (B, H, tk, D)``, scaled, with every score mod applied at the tile's global positions
    ``grid`` (see :func:`tile_grid`) and global lengths ``spec.Tq``, ``spec.Tk``, divided by the
    softmax temperature."""
    s = spec.score.tile(qp, kp)
    if spec.scale != 1.0:
        s = s * spec.scale
    for mod in spec.score_mods:
        s = mod.score_mod(s, *grid, spec.Tq, spec.Tk)
    shape = (qp.shape[0], qp.shape[1], qp.shape[2], kp.shape[2])
    if tuple(s.shape) != shape:
        s = s.expand(shape)
    t = temperature(spec)
    if t != 1.0:
        s = s / t
    return s


def tile_allowed(spec: AttentionSpec, grid) -> Tensor:
    """The mask of one tile (``True`` = may attend), broadcastable to ``(B, H, tq, tk)``."""
    m = spec.mask.mask_mod(*grid, spec.Tq, spec.Tk)
    return torch.as_tensor(m, device=grid[2].device)


def tile_class(spec: AttentionSpec, B: int, H: int, qc: Chunk, kc: Chunk, device) -> int:
    """EMPTY / PARTIAL / FULL for the tile (query chunk ``qc``, key chunk ``kc``), by evaluating
    the mask on it (the fallback when the mask has no closed-form ``classify_blocks``)."""
    if spec.mask is None:
        return FULL
    m = tile_allowed(spec, tile_grid(B, H, qc.start, qc.length, kc.start, kc.length, device))
    if not bool(m.any()):
        return EMPTY
    return FULL if bool(m.all()) else 1


@dataclass
class ForwardState:
    """Per-row accumulators of this rank's queries over every block seen so far.

    Softmax: running max ``m (B, H, n, 1)``, sum ``l`` and unnormalized output ``acc (B, H, n, Dv)``;
    sigmoid: ``acc`` only."""

    acc: Tensor
    m: Optional[Tensor] = None
    l: Optional[Tensor] = None

    @staticmethod
    def new(qp: Tensor, Dv: int, sigmoid: bool) -> "ForwardState":
        B, H, n = qp.shape[:3]
        acc = qp.new_zeros(B, H, n, Dv)
        if sigmoid:
            return ForwardState(acc)
        return ForwardState(acc, qp.new_full((B, H, n, 1), NEG_INF), qp.new_zeros(B, H, n, 1))

    def finish(self) -> tuple[Tensor, Optional[Tensor]]:
        """``out (B, H, n, Dv)`` and ``lse (B, H, n)`` (``-inf`` for rows with no key; None for sigmoid)."""
        if self.m is None:
            return self.acc, None
        out = self.acc / self.l.masked_fill(self.l == 0, 1.0)
        lse = torch.where(self.l > 0, self.m + torch.log(self.l.clamp_min(torch.finfo(self.l.dtype).tiny)),
                          torch.full_like(self.l, NEG_INF))
        return out, lse.squeeze(-1)


#: rows and columns of the sub-tiles a (query chunk, key chunk) tile is computed in: a rank's
#: memory stays O(sub-tile) whatever the shard length (a zigzag chunk of a long sequence is
#: thousands of positions)
SUB_Q, SUB_K = 256, 256


def sub_tiles(spec: AttentionSpec, qc: Chunk, kc: Chunk, cls: int, device):
    """The live sub-tiles of the tile (query chunk ``qc``, key chunk ``kc``) of class ``cls``:
    ``(rows, cols, grid, allowed)`` with local slices into the shard, the global index grid and the
    mask (None where every pair may attend). Sub-tiles of a PARTIAL tile that the mask hides
    entirely are skipped."""
    B, H = spec.B, spec.H
    for qo in range(0, qc.length, SUB_Q):
        tq = min(SUB_Q, qc.length - qo)
        for ko in range(0, kc.length, SUB_K):
            tk = min(SUB_K, kc.length - ko)
            grid = tile_grid(B, H, qc.start + qo, tq, kc.start + ko, tk, device)
            allowed = None
            if cls != FULL:
                allowed = tile_allowed(spec, grid)
                if not bool(allowed.any()):
                    continue
                if bool(allowed.all()):
                    allowed = None
            yield (slice(qc.local + qo, qc.local + qo + tq), slice(kc.local + ko, kc.local + ko + tk), grid, allowed)


def dropped(p: Tensor, grid, seed: Optional[int], dropout_p: float) -> Tensor:
    """``p`` with inverted dropout applied at the tile's global positions: the counter-based mask of
    :mod:`attnkit.kernels.dropout`, so a ring drops exactly the weights one process would for the
    same seed. ``seed`` None: no dropout."""
    if seed is None:
        return p
    keep = keep_mask(row_hash(seed, grid[0], grid[1], grid[2]), grid[3], dropout_p)
    return p * (keep.to(p.dtype) * (1.0 / (1.0 - dropout_p)))


def block_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, q_chunks: Sequence[Chunk],
                  kv_chunks: Sequence[Chunk], status: Status, state: ForwardState, seed: Optional[int] = None) -> int:
    """Add the block (this rank's queries ``qp (B, H, n_q, D)`` × one shard ``kp (B, Hkv, n_k, D)``,
    ``v (B, Hkv, n_k, Dv)``) to ``state``, sub-tile by sub-tile; returns the number of tiles computed.
    With a dropout ``seed``, the weights that reach ``v`` are dropped (the normalizer is not)."""
    G = spec.groups
    sigmoid = is_sigmoid(spec)
    offset = spec.normalizer.offset(spec.Tk) if sigmoid else 0.0
    computed = 0
    for qc, row in zip(q_chunks, status):
        for kc, cls in zip(kv_chunks, row):
            if cls == EMPTY:
                continue
            computed += 1
            for rows, cols, grid, allowed in sub_tiles(spec, qc, kc, cls, qp.device):
                s = tile_scores(qp[:, :, rows], expand_heads(kp[:, :, cols], G), spec, grid)
                vj = expand_heads(v[:, :, cols], G)
                if sigmoid:
                    p = torch.sigmoid(s + offset)
                    if allowed is not None:
                        p = p.masked_fill(~allowed, 0.0)
                    state.acc[:, :, rows] += dropped(p, grid, seed, spec.dropout_p) @ vj
                    continue
                if allowed is not None:
                    s = s.masked_fill(~allowed, NEG_INF)
                m_old = state.m[:, :, rows]
                m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
                m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)  # rows with no live key yet
                p = torch.exp(s - m_safe)
                corr = torch.exp(m_old - m_safe)
                state.l[:, :, rows] = state.l[:, :, rows] * corr + p.sum(-1, keepdim=True)
                state.acc[:, :, rows] = state.acc[:, :, rows] * corr + dropped(p, grid, seed, spec.dropout_p) @ vj
                state.m[:, :, rows] = m_new
    return computed


def block_backward(qp: Tensor, kp: Tensor, v: Tensor, dout: Tensor, lse: Optional[Tensor], delta: Optional[Tensor],
                   spec: AttentionSpec, q_chunks: Sequence[Chunk], kv_chunks: Sequence[Chunk], status: Status,
                   params: Sequence[Tensor], dq: Tensor, dk: Tensor, dv: Tensor,
                   dparams: list[Tensor], seed: Optional[int] = None) -> int:
    """Accumulate the block's gradients, sub-tile by sub-tile: ``dq`` (this rank's queries),
    ``dk``/``dv`` (the shard's keys and values, ``Hkv`` heads) and ``dparams`` (the bias parameters
    ``params``, this block's share). ``lse (B, H, n_q)`` is the saved global log-sum-exp,
    ``delta = rowsum(dout ∘ out)``. With dropout (mask ``Z``, scale ``1/(1-p)``): ``dV = (P∘Z)ᵀ dO``,
    ``dP = (dO Vᵀ)∘Z``. Returns the number of tiles computed."""
    G = spec.groups
    sigmoid = is_sigmoid(spec)
    offset = spec.normalizer.offset(spec.Tk) if sigmoid else 0.0
    # closed-form score gradient: a dot tile whose mods only add a constant bias
    fast = not params and all(m.additive for m in spec.score_mods)
    c = spec.scale / temperature(spec)
    computed = 0
    for qc, row in zip(q_chunks, status):
        for kc, cls in zip(kv_chunks, row):
            if cls == EMPTY:
                continue
            computed += 1
            for rows, cols, grid, allowed in sub_tiles(spec, qc, kc, cls, qp.device):
                qi, doi = qp[:, :, rows], dout[:, :, rows]
                vj = expand_heads(v[:, :, cols], G)
                if fast:
                    kj = expand_heads(kp[:, :, cols], G)
                    s = tile_scores(qi, kj, spec, grid)
                else:
                    with torch.enable_grad():
                        qi_ = qi.detach().requires_grad_()
                        kj_ = kp[:, :, cols].detach().requires_grad_()
                        s = tile_scores(qi_, expand_heads(kj_, G), spec, grid)
                sd = s.detach()
                if sigmoid:
                    p = torch.sigmoid(sd + offset)
                else:
                    lse_i = lse[:, :, rows].unsqueeze(-1)
                    p = torch.exp(sd - lse_i.masked_fill(lse_i == NEG_INF, float("inf")))
                if allowed is not None:
                    p = p.masked_fill(~allowed, 0.0)
                dv[:, :, cols] += reduce_heads(dropped(p, grid, seed, spec.dropout_p).transpose(-2, -1) @ doi, G)
                dp = dropped(doi @ vj.transpose(-2, -1), grid, seed, spec.dropout_p)
                ds = dp * p * (1.0 - p) if sigmoid else p * (dp - delta[:, :, rows])
                if fast:
                    ds = ds * c if c != 1.0 else ds
                    dq[:, :, rows] += ds @ kj
                    dk[:, :, cols] += reduce_heads(ds.transpose(-2, -1) @ qi, G)
                else:
                    grads = torch.autograd.grad(s, (qi_, kj_, *params), ds, allow_unused=True)
                    dq[:, :, rows] += grads[0]
                    dk[:, :, cols] += grads[1]
                    for acc, g in zip(dparams, grads[2:]):
                        if g is not None:
                            acc += g
    return computed
