"""Models built from :mod:`attnkit.nn` modules (no private copies of attention math), one
readable file each. Each keeps a JSON-able ``config`` dict so a checkpoint can rebuild it:
``MODELS[name](**config)``.
"""

from __future__ import annotations

import importlib

from .._checks import lookup

# name -> "module:Class"
_MODELS = {
    "AttentionClassifier": "classifier:AttentionClassifier",
    "Seq2Seq": "seq2seq:Seq2Seq",
    "Transformer": "transformer:Transformer",
    "AttentionMemoryClassifier": "memory:AttentionMemoryClassifier",
    "HierarchicalAttentionNetwork": "han:HierarchicalAttentionNetwork",
    "ShowAttendTell": "captioner:ShowAttendTell",
    "StackedAttentionNetwork": "vqa:StackedAttentionNetwork",
    "RelationalAttentionNetwork": "vqa:RelationalAttentionNetwork",
    "VqaTransformer": "vqa:VqaTransformer",
    "ListenAttendSpell": "las:ListenAttendSpell",
}

__all__ = sorted(_MODELS) + ["get"]


def get(name: str):
    """The model class called ``name`` (unknown names list the valid ones)."""
    module, cls = lookup("model", name, _MODELS).split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def __getattr__(name: str):
    if name in _MODELS:
        value = get(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnkit.models' has no attribute {name!r}")
