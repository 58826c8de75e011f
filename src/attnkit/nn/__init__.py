"""Attention modules: ``(batch, seq, embed)`` in and out, batch first -- except
``MultiheadAttention``, a drop-in for ``torch.nn.MultiheadAttention`` that keeps torch's
arguments, defaults (``batch_first=False``) and conventions (its ``key_padding_mask`` and
boolean ``attn_mask`` use ``True`` = *not allowed*, as torch does) and loads torch's state_dict.

Each module is projections → :func:`attnkit.attention` (or a documented op) → output projection.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it (imported on first use)
_EXPORTS = {
    "MultiheadAttention": "multihead",
    "KVCache": "cache",
    "AdditiveAttention": "additive",
    "LuongAttention": "luong",
    "LocationAwareAttention": "location_aware",
    "AttentionPooling": "pooling",
    "LocalAttention": "local",
    "SlidingWindowAttention": "local",
    "LinearAttention": "linear",
    "PerformerAttention": "linear",
    "LinformerAttention": "linear",
    "BidirectionalAttention": "bidaf",
    "HierarchicalAttention": "hierarchical",
    "GatedAttentionHeads": "gated",
    "AttentionMemory": "gated",
    "HardAttention": "hard",
    "StochasticHardAttention": "hard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnkit.nn' has no attribute {name!r}")


def __dir__():
    return __all__
