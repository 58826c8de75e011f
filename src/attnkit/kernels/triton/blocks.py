"""Block tables: how attnkit's analytic tile classification reaches a Triton kernel.

A mask is classified per ``(block_m, block_n)`` tile (:meth:`attnkit.masks.Mask.classify_blocks`:
EMPTY / PARTIAL / FULL). A kernel walks only the live tiles, listed twice in compressed sparse
rows: query-major (for the forward and dQ, one program per query block) and key-major (for
dK/dV, one program per key block). Each listed tile carries the index of its packed mask, or -1
when every pair in it may attend; partial tiles are packed once, ``(P, B', H', block_m,
block_n)`` int8, evaluated with the mask's own predicate on those tiles only. So memory is
``O(live tiles + partial tiles · block²)``, never ``Tq · Tk``, for any mask: a causal mask at
N = 8,192 with 128 x 64 tiles packs 64 diagonal tiles (512 KiB).

Tables are cached per mask object and sizes (a weak reference: a mask that is dropped takes its
tables with it), so a training loop that reuses one mask builds them once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ...masks.base import EMPTY, FULL, Mask, tensor_versions

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlockTables:
    """Live tiles of one mask at one tile size, for one (batch, heads, Tq, Tk).

    ``q_ptr[i]:q_ptr[i+1]`` index ``q_cols`` (key blocks) and ``q_tile`` (packed tile or -1) of
    query block ``i``; ``k_ptr``/``k_rows``/``k_tile`` the same per key block. ``partial`` holds
    the packed partial tiles ``(P, B', H', block_m, block_n)`` (``B'``/``H'`` are 1 when the mask
    does not depend on the batch / head; at least one tile so that it has an address)."""

    block_m: int
    block_n: int
    q_ptr: Tensor
    q_cols: Tensor
    q_tile: Tensor
    k_ptr: Tensor
    k_rows: Tensor
    k_tile: Tensor
    partial: Tensor
    live_tiles: int
    total_tiles: int

    @property
    def partial_tiles(self) -> int:
        return int(self.partial.shape[0]) if bool(self.q_tile.numel()) and int(self.q_tile.max()) >= 0 else 0


_CACHE: "weakref.WeakKeyDictionary[Mask, dict]" = weakref.WeakKeyDictionary()


def block_tables(mask: Mask, Tq: int, Tk: int, B: int, H: int, block_m: int, block_n: int,
                 device: torch.device) -> BlockTables:
    """The :class:`BlockTables` of ``mask`` (cached per mask object, sizes, tile size and device)."""
    key = (Tq, Tk, B, H, block_m, block_n, str(device), tensor_versions(mask))
    try:
        per_mask = _CACHE.setdefault(mask, {})
    except TypeError:  # an unhashable or non-weakref-able mask: build every time
        per_mask = {}
    if key not in per_mask:
        if len(per_mask) >= 16:  # a mask called at many lengths (decoding): keep the latest few
            per_mask.pop(next(iter(per_mask)))
        per_mask[key] = _build(mask, Tq, Tk, B, H, block_m, block_n, device)
    return per_mask[key]


def _csr(pairs: Tensor, n: int, tile_id: Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
    """Row pointers, columns and tile ids of ``pairs`` ((L, 2), sorted by row)."""
    rows, cols = pairs[:, 0], pairs[:, 1]
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return (ptr.to(device=device, dtype=torch.int32), cols.to(device=device, dtype=torch.int32),
            tile_id[rows, cols].to(device=device, dtype=torch.int32))


def _build(mask: Mask, Tq: int, Tk: int, B: int, H: int, bm: int, bn: int, device) -> BlockTables:
    cls = mask.classify_blocks(Tq, Tk, bm, bn, B, H, device=device)
    Bm, Hm, nq, nk = cls.shape
    live = (cls != EMPTY).flatten(0, 1).any(0).cpu()
    full = (cls == FULL).flatten(0, 1).all(0).cpu()
    part = torch.nonzero(live & ~full)                       # (P, 2), row-major
    tile_id = torch.full((nq, nk), -1, dtype=torch.int64)
    tile_id[part[:, 0], part[:, 1]] = torch.arange(part.shape[0])
    if part.shape[0]:
        pi, pj = part[:, 0].to(device), part[:, 1].to(device)
        q_idx = (pi.view(-1, 1) * bm + torch.arange(bm, device=device)).clamp(max=Tq - 1).view(-1, 1, 1, bm, 1)
        kv_idx = (pj.view(-1, 1) * bn + torch.arange(bn, device=device)).clamp(max=Tk - 1).view(-1, 1, 1, 1, bn)
        b = torch.arange(Bm, device=device).view(1, Bm, 1, 1, 1)
        h = torch.arange(Hm, device=device).view(1, 1, Hm, 1, 1)
        m = torch.as_tensor(mask.mask_mod(b, h, q_idx, kv_idx, Tq, Tk), device=device)
        packed = m.expand(part.shape[0], Bm, Hm, bm, bn).to(torch.int8).contiguous()
    else:
        packed = torch.zeros(1, 1, 1, bm, bn, dtype=torch.int8, device=device)
    q_ptr, q_cols, q_tile = _csr(torch.nonzero(live), nq, tile_id, device)
    k_ptr, k_rows, k_tile = _csr(torch.nonzero(live.t()), nk, tile_id.t(), device)
    return BlockTables(bm, bn, q_ptr, q_cols, q_tile, k_ptr, k_rows, k_tile, packed,
                       int(live.sum()), nq * nk)
