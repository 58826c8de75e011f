"""What a task is: data + model + training recipe + metric, behind one small interface that the
command line drives (``attnkit train TASK``, ``attnkit eval CKPT``, ``attnkit translate CKPT``).

A task ships an embedded default that needs no download (generated data, or data an installed
package ships) and reads real data from user-given paths.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where it is used (load_resume), so that a task's data module does not load it
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
    """Base class. Subclasses set ``name`` and ``help`` and implement the methods they support;
    ``translates`` says whether ``translate`` is one of them (``attnkit translate`` checks it)."""

    name: str = "task"
    help: str = ""
    translates: bool = False
    #: what ``attnkit train NAME`` writes into ``--out`` (the ``--out`` help says it)
    writes: str = ("the checkpoint: model.safetensors (weights), config.json (model, data, history, test metric), "
                   "trainer.json + trainer.safetensors (for --resume) and checkpoint.json (manifest); no pictures "
                   "(attnkit viz draws them)")
    #: the options after ``attnkit viz CHECKPOINT`` that draw one example ("" if viz does not read the task)
    viz_args: str = ""

    def viz_command(self, checkpoint: Path, config: dict[str, Any]) -> str | None:
        """The ``attnkit viz`` command line that draws the trained model's attention (printed after
        training), or None when ``attnkit viz`` cannot read this model."""
        return f"attnkit viz {checkpoint} {self.viz_args}" if self.viz_args else None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task-specific options for ``attnkit train NAME`` (the CLI already adds --out, --seed,
        --device, --threads, --resume, --epochs, --max-seconds, --no-progress)."""

    def train(self, args: argparse.Namespace) -> TrainResult:
        raise NotImplementedError

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        raise NotImplementedError(f"task {self.name!r} has no evaluation")

    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        raise NotImplementedError(f"task {self.name!r} does not translate")


def load_resume(task: Task, args: argparse.Namespace, out: str | Path | None = None) -> Checkpoint | None:
    """The checkpoint in ``out`` (default ``args.out``) with its trainer state when ``--resume`` is
    given, else None; a checkpoint of another task is refused."""
    if not getattr(args, "resume", False):
        return None
    from ..checkpoint import load_checkpoint

    out = args.out if out is None else out
    ckpt = load_checkpoint(out, with_trainer=True)
    if ckpt.config.get("task") != task.name:
        raise ValueError(f"--resume: checkpoint {str(out)!r} is for task {ckpt.config.get('task')!r}, "
                         f"not {task.name!r}")
    return ckpt
