"""Checkpoints: a folder with ``model.safetensors`` (weights), ``config.json`` (everything needed
to rebuild the model and its task: model name and config, vocabularies, metrics) and, for
resuming, ``trainer.pt`` (optimizer/scheduler state, epoch, RNG states).

Every file is written to a temporary name and renamed into place, so an interrupted save never
leaves a half-written checkpoint and never damages the previous one. Loading checks that the
files exist and are readable and raises ``ValueError`` naming the file otherwise.

Example::

    >>> import tempfile, torch, attnkit.checkpoint as ck
    >>> m = torch.nn.Linear(2, 3)
    >>> d = tempfile.mkdtemp()
    >>> ck.save_checkpoint(d, model=m, config={"model": "linear"})
    >>> c = ck.load_checkpoint(d)
    >>> torch.equal(c.state_dict["weight"], m.weight.detach())
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_FILE = "trainer.pt"


_atomic_write = atomic_write


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    trainer_state: dict[str, Any] | None = field(default=None)


def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, config: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None) -> None:
    """Save ``model``'s weights, a JSON-serializable ``config`` and optionally a trainer state."""
    from safetensors.torch import save_file

    d = Path(directory)
    try:
        text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)
    except TypeError as e:
        raise TypeError(f"config must be JSON-serializable: {e}") from None
    # safetensors refuses shared storage (tied embeddings): save each distinct tensor once.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(d / MODEL_FILE, lambda p: save_file(state, p))
    _atomic_write(d / CONFIG_FILE, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))
    if trainer_state is not None:
        _atomic_write(d / TRAINER_FILE, lambda p: torch.save(trainer_state, p))


def load_checkpoint(directory: str | os.PathLike, *, with_trainer: bool = False) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"checkpoint {str(d)!r} is not a folder (expected {MODEL_FILE} and {CONFIG_FILE} in it)")
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (d / name).is_file():
            raise ValueError(f"checkpoint {str(d)!r} has no {name}")
    try:
        config = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint config {str(d / CONFIG_FILE)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint config {str(d / CONFIG_FILE)!r} must hold a JSON object")
    try:
        state = load_file(str(d / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint weights {str(d / MODEL_FILE)!r} are not a readable safetensors file: {e}") from None
    trainer = None
    if with_trainer:
        if not (d / TRAINER_FILE).is_file():
            raise ValueError(f"checkpoint {str(d)!r} has no {TRAINER_FILE}: it cannot be resumed")
        try:
            trainer = torch.load(d / TRAINER_FILE, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
            raise ValueError(f"trainer state {str(d / TRAINER_FILE)!r} is not readable: {e}") from None
    return Checkpoint(d, config, state, trainer)


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> torch.nn.Module:
    """Load a checkpoint's weights into ``model``, with a clear error on a mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(checkpoint.state_dict))
    unexpected = sorted(set(checkpoint.state_dict) - set(own))
    bad = sorted(k for k in set(own) & set(checkpoint.state_dict) if own[k].shape != checkpoint.state_dict[k].shape)
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if bad:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(checkpoint.state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:5]))
        raise ValueError(f"checkpoint {str(checkpoint.path)!r} does not match the model: " + "; ".join(parts))
    model.load_state_dict(checkpoint.state_dict)
    return model
