"""Masks: position predicates ``mask_mod(b, h, q_idx, kv_idx)`` that any backend can
materialize or evaluate block by block. ``True`` = may attend. Combine with ``&``, ``|``, ``~``.

See :mod:`attnkit.masks.base` for the protocol and the alignment rule (bottom-right by default).
"""

from .base import (EMPTY, FULL, PARTIAL, And, FromMod, FromTensor, Mask, Not, Or, as_mask,
                   classify_dense, index_grid)
from .basic import Causal, Chunked, KeyPadding, SlidingWindow, causal, chunked, key_padding, sliding_window
from .local import LocalP, local_m, local_p
from .sparse import (BigBird, BlockSparse, DilatedWindow, Fixed, Longformer, Strided, bigbird, block_sparse,
                     dilated_window, fixed, longformer, strided)


def from_mod(fn) -> Mask:
    """Wrap a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``."""
    return FromMod(fn)


def from_tensor(tensor) -> Mask:
    """Wrap a dense bool tensor broadcastable to ``(B, H, Tq, Tk)`` (True = may attend)."""
    return FromTensor(tensor)


__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "And", "Or", "Not", "FromMod", "FromTensor", "as_mask",
    "classify_dense", "index_grid", "Causal", "SlidingWindow", "Chunked", "KeyPadding", "causal", "chunked",
    "sliding_window", "key_padding", "from_mod", "from_tensor", "LocalP", "local_m", "local_p",
    "BlockSparse", "Strided", "Fixed", "Longformer", "BigBird", "DilatedWindow", "block_sparse", "strided",
    "fixed", "longformer", "bigbird", "dilated_window",
]
