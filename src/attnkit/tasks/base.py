"""What a task is: data + model + training recipe + metric, behind one small interface that the
command line drives (``attnkit train TASK``, ``attnkit eval CKPT``, ``attnkit translate CKPT``).

A task ships an embedded default that needs no download (generated data, or data an installed
package ships) and reads real data from user-given paths.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint


@dataclass
class TrainResult:
    """The outcome of ``Task.train``. ``summary`` is the one line the CLI prints last, e.g.
    ``test exact match: 97.4% (2000 examples)``."""

    metric: str
    value: float
    summary: str
    checkpoint: Path | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class. Subclasses set ``name`` and ``help`` and implement the methods they support."""

    name: str = "task"
    help: str = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task-specific options for ``attnkit train NAME`` (the CLI already adds --out, --seed,
        --device, --threads, --resume, --epochs, --max-seconds, --no-progress)."""

    def train(self, args: argparse.Namespace) -> TrainResult:
        raise NotImplementedError

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        raise NotImplementedError(f"task {self.name!r} has no evaluation")

    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        raise NotImplementedError(f"task {self.name!r} does not translate")


def check_path(name: str, path: str | Path, *, kind: str = "file") -> Path:
    """A data path that must exist, with an error naming the option and the path."""
    p = Path(path)
    if kind == "file" and not p.is_file():
        raise ValueError(f"{name}: no such file {str(p)!r}")
    if kind == "dir" and not p.is_dir():
        raise ValueError(f"{name}: no such folder {str(p)!r}")
    return p
