"""What a task is: data + model + training recipe + metric, behind one small interface that the
command line drives (``attnkit train TASK``, ``attnkit eval CKPT``, ``attnkit translate CKPT``).

A task ships an embedded default that needs no download (generated data, or data an installed
package ships) and reads real data from user-given paths.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import math
import sys
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


def check_path(name: str, path: str | Path, *, kind: str = "file") -> Path:
    """A data path that must exist, with an error naming the option and the path."""
    p = Path(path)
    if kind == "file" and p.is_dir():
        raise ValueError(f"{name}: {str(p)!r} is a folder; expected a file")
    if kind == "file" and not p.is_file():
        raise ValueError(f"{name}: no such file {str(p)!r}")
    if kind == "dir" and not p.is_dir():
        raise ValueError(f"{name}: no such folder {str(p)!r}")
    return p


# ---------------------------------------------------------------------------------------------
# Reading user files, and messages for the person at the command line
# ---------------------------------------------------------------------------------------------

def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped). Invalid bytes raise
    ``ValueError`` naming ``where`` (e.g. ``"--data: 'x.tsv'"`` or ``"stdin"``), the line, the
    column and the byte.

    Example::

        >>> decode_utf8(b"ok\\nb\\xffd", "stdin")
        Traceback (most recent call last):
        ...
        ValueError: stdin line 2 is not UTF-8 text (byte 0xff at column 2)
    """
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1  # in bytes, from 1
        raise ValueError(f"{where} line {line} is not UTF-8 text (byte 0x{data[at]:02x} at column {column})") from None


def split_lines(text: str) -> list[str]:
    """Lines split at ``\\n`` only (so they number as editors and ``wc -l`` count them), without
    their ``\\r\\n`` / ``\\n`` ends; a final line end does not start another line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_text_lines(path: str | Path, where: str) -> list[str]:
    """The lines of a UTF-8 text file, plain or gzipped (see :func:`split_lines`). ``where`` starts
    every error message (e.g. ``"--data: 'x.tsv'"``): an unreadable file, a corrupt gzip stream,
    or bytes that are not UTF-8 (with the line and column)."""
    try:
        data = Path(path).read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{where}: cannot read it ({e})") from None
    return split_lines(decode_utf8(data, where))


def warn(message: str) -> None:
    """Tell the person at the command line (one line on stderr, like the CLI's errors)."""
    print(f"attnkit: warning: {message}", file=sys.stderr, flush=True)


# argparse ``type=`` functions: an option's bad value is refused when the command line is parsed,
# with a message that names the option (argparse adds "argument --NAME: ").
def _number(text: str, kind: type, test, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or not test(value):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: v > 0, "a number > 0")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (dropout, label smoothing)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")
