"""The ``attnkit`` command line: ``attnkit info``, ``attnkit demo``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Sequence


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

    return DatesTask().demo(args)


def _common_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", default=None, help="output folder for the checkpoint and pictures")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default: the task's)")
    g.add_argument("--max-seconds", type=float, default=None, help="stop training after this much wall time")
    g.add_argument("--resume", action="store_true", help="resume from the checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _prepare(args: argparse.Namespace) -> None:
    from .training import seed_everything, set_threads

    set_threads(getattr(args, "threads", None))
    seed_everything(getattr(args, "seed", 0))
    device = getattr(args, "device", "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine")


def cmd_train(args: argparse.Namespace) -> int:
    from . import tasks

    task = tasks.get(args.task)
    p = argparse.ArgumentParser(prog=f"attnkit train {args.task}", description=task.help)
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


def cmd_translate(args: argparse.Namespace) -> int:
    _prepare(args)
    ckpt, task = _load(args.checkpoint)
    lines = args.text if args.text else [line.rstrip("\n") for line in sys.stdin]
    for out in task.translate(ckpt, lines, args):
        print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="Attention mechanisms: exact, tested, visible.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, backends and the available families").set_defaults(fn=cmd_info)

    d = sub.add_parser("demo", help="train an attention seq2seq on dates (~2.5 min on a laptop CPU) and draw "
                                     "its attention")
    d.add_argument("--out", default="attnkit-demo", help="output folder (default ./attnkit-demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: robust when the cores are shared)")
    d.add_argument("--max-seconds", type=float, default=150, help="training budget in seconds (default 150)")
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
    e.add_argument("--beam", type=int, default=1, help="beam size for sequence models (default 1: greedy)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(fn=cmd_eval)

    tr = sub.add_parser("translate", help="translate lines (arguments, or stdin) with a checkpoint")
    tr.add_argument("checkpoint", help="checkpoint folder of a translation model")
    tr.add_argument("text", nargs="*", help="sentences (default: read lines from stdin)")
    tr.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, default=None)
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
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("ATTNKIT_DEBUG"):
            raise
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
