"""Counter-based dropout masks: ``keep(b, h, i, j)`` is a hash of the seed and the position, so a
kernel can regenerate the mask of any tile on the fly (forward and backward) without storing the
``(B, H, Tq, Tk)`` mask, and the reference and tiled backends drop exactly the same weights when
given the same seed (as Philox offsets do in FlashAttention).

The hash is the 32-bit integer finalizer ``x ^= x >> 16; x *= 0x45d9f3b`` applied after mixing in
each coordinate; keys are kept when ``hash >= p * 2**32``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
_M = 0xFFFFFFFF
_C = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64


def _mix(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = (x * _C) & _M
    x = x ^ (x >> 16)
    x = (x * _C) & _M
    return x ^ (x >> 16)


def draw_seed(generator: torch.Generator | None) -> int:
    """A 32-bit seed from ``generator`` (or torch's global generator)."""
    return int(torch.randint(0, 2 ** 32, (1,), generator=generator, dtype=torch.int64).item())


def row_hash(seed: int, b: Tensor, h: Tensor, q_idx: Tensor) -> Tensor:
    """The part of the hash that depends on (b, h, i): computed once per query block."""
    x = _mix((b.to(torch.int64) + seed) & _M)
    x = _mix(x ^ h.to(torch.int64))
    return _mix(x ^ q_idx.to(torch.int64))


def keep_mask(row: Tensor, kv_idx: Tensor, p: float) -> Tensor:
    """Boolean keep mask from a :func:`row_hash` and key indices (broadcast)."""
    return _mix(row ^ kv_idx.to(torch.int64)) >= int(p * 2 ** 32)
