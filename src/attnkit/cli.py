"""The ``attnkit`` command line: ``attnkit info``, ``demo``, ``train``, ``eval``, ``translate`` (and
``bench``, ``viz``, which parse their own options).

Bad input -- an option value, a data file, a checkpoint, stdin -- ends the command with one line
on stderr, ``attnkit: error: ...`` naming the option or file (and the line), exit status 2, and no
traceback (``ATTNKIT_DEBUG=1`` shows it). Options are checked when they are parsed and data files
when they are read, before anything is written, so a failing run leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

from .tasks.base import decode_utf8, positive_float, positive_int, split_lines


class UsageError(ValueError):
    """A command line that does not parse (reported like every other bad input: see :func:`main`)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad option raises :class:`UsageError` instead of printing
    the whole usage and exiting, so that :func:`main` reports it like any other bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _families() -> dict[str, list[str]]:
    import attnkit
    from attnkit import masks, normalizers, positions, scores

    mask_factories = sorted(n for n in masks.__all__ if n[0].islower() and n not in ("as_mask", "classify_dense",
                                                                                         "index_grid"))
    return {
        "scores": sorted(scores.NAMED) + sorted(scores.NEEDS_OBJECT),
        "normalizers": sorted(normalizers.NAMED),
        "masks": mask_factories,
        "positions": sorted(n for n in positions.__all__ if n not in ("as_score_mod", "FromScoreMod", "TensorBias",
                                                                       "ScoreMod")),
        "linear": sorted(n for n in getattr(_optional("attnkit.linear"), "__all__", [])),
        "nn modules": list(attnkit.nn.__all__),
        "backends": attnkit.backends.names(),
    }


def _optional(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def cmd_info(args: argparse.Namespace) -> int:
    import numpy
    import torch

    import attnkit

    print(f"attnkit {attnkit.__version__}")
    print(f"python  {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch   {torch.__version__}  threads={torch.get_num_threads()}  "
          f"cuda={'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    print(f"numpy   {numpy.__version__}")
    for name, items in _families().items():
        print(f"{name + ':':<13} {', '.join(items)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train an attention seq2seq on the embedded date corpus and draw its attention."""
    from .tasks.dates import DatesTask

    _check_out(args)
    return DatesTask().demo(args)


def _common_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", default=None, help="output folder for the checkpoint and pictures")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the task's)")
    g.add_argument("--max-seconds", type=positive_float, default=None, help="stop training after this much wall time")
    g.add_argument("--resume", action="store_true", help="resume from the checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r} is not a device attnkit runs on (expected cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available on this machine")


def _check_out(args: argparse.Namespace) -> None:
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder (for the checkpoint)")


def _prepare(args: argparse.Namespace) -> None:
    """Check the options every command shares (before any work), then set threads and seed."""
    from .training import seed_everything, set_threads

    _check_device(getattr(args, "device", "cpu"))
    _check_out(args)
    set_threads(getattr(args, "threads", None))
    seed_everything(getattr(args, "seed", 0))


def cmd_train(args: argparse.Namespace) -> int:
    from . import tasks

    task = tasks.get(args.task)
    p = _Parser(prog=f"attnkit train {args.task}", description=task.help)
    _common_train_options(p)
    task.add_arguments(p)
    targs = p.parse_args(args.rest)
    if targs.out is None:
        targs.out = f"attnkit-{args.task}"
    _prepare(targs)
    result = task.train(targs)
    print(result.summary)
    return 0


def _load(path: str):
    from .checkpoint import load_checkpoint
    from . import tasks

    ckpt = load_checkpoint(path)
    name = ckpt.config.get("task")
    if not isinstance(name, str):
        raise ValueError(f"checkpoint {path!r}: config.json names no task")
    return ckpt, tasks.get(name)


def cmd_eval(args: argparse.Namespace) -> int:
    _prepare(args)
    ckpt, task = _load(args.checkpoint)
    metrics = task.evaluate(ckpt, args)
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def _input_lines(text: Sequence[str]) -> list[str]:
    """The sentences to translate: the arguments, else the lines of stdin (UTF-8; an error names
    the line of any other bytes). Empty lines stay, so that output line i answers input line i."""
    if text:
        for i, t in enumerate(text, 1):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
                got = t.encode("utf-8", "surrogateescape")[:60]
                raise ValueError(f"text argument {i} is not UTF-8 text: {got!r}") from None
        return list(text)
    if sys.stdin is None:  # started with stdin closed
        raise ValueError("no text to translate: give sentences as arguments or lines on stdin")
    if sys.stdin.isatty():
        print("attnkit translate: reading lines from stdin (end with Ctrl-D)", file=sys.stderr)
    binary = getattr(sys.stdin, "buffer", None)
    return split_lines(decode_utf8(binary.read(), "stdin") if binary is not None else sys.stdin.read())


def cmd_translate(args: argparse.Namespace) -> int:
    from . import tasks

    _prepare(args)
    ckpt, task = _load(args.checkpoint)
    if not task.translates:
        able = ", ".join(n for n in tasks.names() if tasks.get(n).translates)
        raise ValueError(f"checkpoint {args.checkpoint!r} is a {task.name} model; translate needs a translation "
                         f"model ({able})")
    lines = _input_lines(args.text)  # all of stdin is read and checked before anything is printed
    for out in task.translate(ckpt, lines, args):
        print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnkit", description="Attention mechanisms: exact, tested, visible.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, backends and the available families").set_defaults(fn=cmd_info)

    d = sub.add_parser("demo", help="train an attention seq2seq on dates (~2.5 min on a laptop CPU) and draw "
                                     "its attention")
    d.add_argument("--out", default="attnkit-demo", help="output folder (default ./attnkit-demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1: robust when the cores are shared)")
    d.add_argument("--max-seconds", type=positive_float, default=150, help="training budget in seconds (default 150)")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    d.set_defaults(fn=cmd_demo)

    from .tasks import names as task_names

    t = sub.add_parser("train", help="train a task's model (attnkit train TASK --help for its options)",
                       add_help=False)
    t.add_argument("task", choices=task_names(), help="task name")
    t.add_argument("rest", nargs=argparse.REMAINDER, help="task options")
    t.set_defaults(fn=cmd_train)

    b = sub.add_parser("bench", help="benchmark attnkit against SDPA, flex, naive and nn.MultiheadAttention",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options (attnkit bench --help)")
    b.set_defaults(fn=lambda a: __import__("attnkit.bench", fromlist=["main"]).main(a.rest))

    v = sub.add_parser("viz", help="draw a checkpoint's attention for one input: interactive HTML, PNGs, "
                                   "statistics (attnkit viz --help)", add_help=False)
    v.add_argument("rest", nargs=argparse.REMAINDER, help="options (attnkit viz --help)")

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("checkpoint", help="checkpoint folder written by attnkit train")
    e.add_argument("--data", default=None, help="data path (default: the task's own test split)")
    e.add_argument("--split", default="test", help="split to evaluate (default test)")
    e.add_argument("--beam", type=positive_int, default=1, help="beam size for sequence models (default 1: greedy)")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    e.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    e.set_defaults(fn=cmd_eval)

    tr = sub.add_parser("translate", help="translate lines (arguments, or stdin) with a checkpoint",
                        description="Translate each argument, or each line of stdin (UTF-8), with a dates or "
                                    "multi30k checkpoint: output line i answers input line i (an empty line gives "
                                    "an empty line; a line longer than the model reads is cut, with a warning on "
                                    "stderr). A date that is not a calendar date is marked '[not a valid date]'.")
    tr.add_argument("checkpoint", help="checkpoint folder of a translation model (dates, multi30k)")
    tr.add_argument("text", nargs="*", help="sentences (default: read lines from stdin)")
    tr.add_argument("--beam", type=positive_int, default=1, help="beam size (default 1: greedy)")
    tr.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    tr.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    tr.set_defaults(fn=cmd_translate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the harness parses its own options (argparse's REMAINDER drops leading ones)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["viz"]:  # parses its own options and reports its own errors
        from .viz.cli import main as viz_main

        return viz_main(argv[1:])
    parser = build_parser()
    try:  # the one error path: bad options, data files, checkpoints and stdin all end here
        args = parser.parse_args(argv)
        if not getattr(args, "fn", None):
            parser.print_help()
            return 2
        return args.fn(args)
    except BrokenPipeError:  # stdout closed early (attnkit translate ... | head): stop quietly, as cat does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the closed pipe
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        if os.environ.get("ATTNKIT_DEBUG"):
            raise
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
