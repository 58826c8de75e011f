"""The ``attnkit`` command line: ``attnkit info``, ``demo``, ``train``, ``eval``, ``translate`` (and
``bench``, ``viz``, which parse their own options; ``viz`` of an image checkpoint -- digits, mnist --
is :func:`viz_image_main`, which draws the attention on the image).

``attnkit train`` ends with the files it wrote into ``--out`` and one result line, which
``attnkit eval`` prints the same way (:func:`attnkit.training.format_metrics`; ``eval --json``
prints the raw metrics).

Bad input -- an option value, a data file, a checkpoint, stdin -- ends the command with one line
on stderr, ``attnkit: error: ...`` naming the option or file (and the line), exit status 2, and no
traceback (``ATTNKIT_DEBUG=1`` shows it). Options are checked when they are parsed and data files
when they are read, before anything is written, so a failing run leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

from .tasks.args import positive_float, positive_int
from .tasks.io import decode_utf8, split_lines


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


def _common_train_options(p: argparse.ArgumentParser, task=None) -> None:
    g = p.add_argument_group("training")
    if task is None:
        out_help = "output folder (default ./attnkit-TASK); what each task writes there is in attnkit train TASK --help"
    else:
        out_help = f"output folder (default ./attnkit-{task.name}) for {task.writes}"
        if task.viz_args:
            out_help += f"; e.g. attnkit viz OUT {task.viz_args}"
    g.add_argument("--out", default=None, help=out_help.replace("%", "%%"))
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the task's)")
    g.add_argument("--max-seconds", type=positive_float, default=None,
                   help="stop training after this many seconds of wall time (it prints where it stopped)")
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


def _task_parser(task, prog: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog or f"attnkit train {task.name}", description=task.help)
    _common_train_options(p, task)
    task.add_arguments(p)
    return p


def train_help() -> str:
    """``attnkit train --help``: the tasks, the options they share, and each task's own options."""
    from . import tasks

    import textwrap

    shared = _Parser(prog="attnkit train TASK", add_help=False)
    _common_train_options(shared)
    head = shared.format_help().split("\n\n", 1)[1].strip("\n")  # without its usage lines
    parts = ["usage: attnkit train TASK [options]   (attnkit train TASK --help: that task's options alone)",
             "", "Train a task's model; the checkpoint goes to --out (default ./attnkit-TASK).", "", "tasks:"]
    for name in tasks.names():
        parts.append(textwrap.fill(tasks.get(name).help, 100, initial_indent=f"  {name:<10} ",
                                   subsequent_indent=" " * 13))
    parts += ["", head.replace("training:", "options every task takes:", 1)]
    for name in tasks.names():
        task = tasks.get(name)
        p = _Parser(prog=f"attnkit train {name}", add_help=False)
        task.add_arguments(p)
        own = p.format_help().split("\n\n", 1)[1].strip("\n")
        parts += ["", f"=== attnkit train {name} ===", textwrap.fill(f"--out gets {task.writes}", 100), own]
    return "\n".join(parts) + "\n"


def _files(folder: Path) -> dict[Path, tuple[int, int]]:
    """``{path: (mtime_ns, size)}`` of the files under ``folder`` (hidden names skipped: a
    checkpoint's temporary files)."""
    if not folder.is_dir():
        return {}
    found = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts):
            st = f.stat()
            found[f] = (st.st_mtime_ns, st.st_size)
    return found


def cmd_train(args: argparse.Namespace) -> int:
    from . import tasks

    task = tasks.get(args.task)
    targs = _task_parser(task).parse_args(args.rest)
    if targs.out is None:
        targs.out = f"attnkit-{args.task}"
    _prepare(targs)
    from .distributed import data_parallel as dp

    if dp.init_from_env(targs.device):  # under torchrun: rank 0 alone prints, writes and evaluates
        from .training import RankFinished, main_rank_finishes

        try:
            with main_rank_finishes():
                if not dp.is_main():
                    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                        try:
                            task.train(targs)
                        except RankFinished:
                            pass
                    return 0
                return _train_and_report(task, targs)
        finally:
            dp.dist.destroy_process_group()
    return _train_and_report(task, targs)


def _train_and_report(task, targs: argparse.Namespace) -> int:
    out = Path(targs.out)
    before = _files(out)
    result = task.train(targs)
    written = [f for f, stamp in _files(out).items() if before.get(f) != stamp]
    print(f"wrote {len(written)} file(s) in {out}: " + ", ".join(str(f.relative_to(out)) for f in written))
    if result.checkpoint is not None:
        import json

        try:
            config = json.loads((Path(result.checkpoint) / "config.json").read_text(encoding="utf-8"))
            command = task.viz_command(result.checkpoint, config)
        except (OSError, ValueError, AttributeError):
            command = None
        if command:
            print(f"draw its attention: {command}")
    print(result.summary)  # last: the result line, as attnkit eval prints it
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
    from .training import format_metrics

    _prepare(args)
    ckpt, task = _load(args.checkpoint)
    metrics = task.evaluate(ckpt, args)
    if getattr(args, "json", False):  # data for scripts: raw values, keys with underscores
        import json

        nan = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731  (strict JSON has no NaN)
        print(json.dumps({str(k).replace(" ", "_"): nan(v) for k, v in metrics.items()}))
    else:
        print(format_metrics(metrics))  # the line attnkit train ends with
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
        raise ValueError(f"checkpoint {args.checkpoint!r} is a {task.name} model; translate needs a model of a "
                         f"task that turns lines into lines ({able})")
    lines = _input_lines(args.text)  # all of stdin is read and checked before anything is printed
    for out in task.translate(ckpt, lines, args):
        print(out)
    return 0


# -- attnkit viz for image checkpoints ---------------------------------------------------------------
VIZ_IMAGE_USAGE = ("attnkit viz CHECKPOINT [--index N] [--split test] [--data DIR] [--out DIR] [--device cpu] "
                   "[--threads N] writes image_attention.png (the image beside the model's attention over its "
                   "patches or rows) and image_attention.tsv")


_VIZ_VALUE_OPTIONS = ("--text", "--out", "--backend", "--align-layer", "--device", "--threads", "--index", "--split",
                      "--data")


def _image_task(rest: Sequence[str]):
    """The task of the checkpoint named in ``attnkit viz`` options when it draws on images (it has
    ``viz_image``), else None (the checkpoint is checked and reported by the viz command itself)."""
    import json

    from . import tasks

    folder, value = None, False
    for a in rest:  # the first word that is neither an option nor an option's value
        if value or a in _VIZ_VALUE_OPTIONS:
            value = not value
        elif not a.startswith("-"):
            folder = a
            break
    if folder is None:
        return None
    try:
        name = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("task")
        task = tasks.get(name)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return task if hasattr(task, "viz_image") or hasattr(task, "viz_files") else None


def viz_image_main(argv: Sequence[str]) -> int:
    """``attnkit viz CHECKPOINT --index N`` for image tasks: writes ``image_attention.png`` (via
    :func:`attnkit.viz.image.image_attention_png`) and ``image_attention.tsv`` into ``--out``; for
    captioning, the caption with one map per word (``caption_attention.png`` and ``.html``)."""
    from .tasks.args import nonnegative_int
    from .viz.cli import report

    p = _Parser(prog="attnkit viz", description="Draw where an image model looks: one image of a split, beside "
                                                "the model's attention over its patches (or rows) laid on it.")
    p.add_argument("checkpoint", help="checkpoint folder of an image task (digits, mnist, captioning, vqa) or of speech")
    p.add_argument("--index", type=nonnegative_int, default=0, help="which image of the split (default 0)")
    p.add_argument("--split", default="test", help="split the image comes from: train, valid, test (default test)")
    p.add_argument("--data", default=None, help="mnist: folder with the idx files (default: the one trained on)")
    p.add_argument("--text", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="attnkit-viz", help="output folder (default ./attnkit-viz)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")

    def work() -> tuple[list[str], list[Path]]:
        args = p.parse_args(list(argv))
        if args.text is not None:
            raise ValueError("--text: an image checkpoint draws one of its images, not text: choose it with "
                             "--index N (and --split)")
        _check_device(args.device)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} is a file; expected a folder")
        from .training import set_threads

        set_threads(args.threads)
        task = _image_task([args.checkpoint])
        if task is not None and hasattr(task, "viz_files"):  # the task draws its own pictures (captioning)
            from .checkpoint import load_checkpoint

            files, lines = task.viz_files(load_checkpoint(args.checkpoint), split=args.split, index=args.index,
                                          out=args.out)
            return lines, files
        files, r = _viz_image(args)
        return [f"input:  {args.split} image {args.index} (label {r.label})",
                f"output: {r.prediction} (p = {r.probability:.3f})", f"  {r.description}: {', '.join(r.maps)}"], files

    return report(work, (ValueError, TypeError, OSError))


def _viz_image(args: argparse.Namespace):
    from .checkpoint import load_checkpoint
    from .viz.image import image_attention_png

    ckpt = load_checkpoint(args.checkpoint)
    task = _image_task([args.checkpoint])
    if task is None:  # config.json changed under us
        raise ValueError(f"checkpoint {args.checkpoint!r} is not an image task's")
    r = task.viz_image(ckpt, split=args.split, index=args.index, device=args.device, data=args.data)
    out = Path(args.out)
    title = (f"{task.name} {args.split} image {args.index}: label {r.label}, predicted {r.prediction} "
             f"(p = {r.probability:.2f})")
    png = image_attention_png(r.image, r.maps, r.grid, out / "image_attention.png", title=title)
    tsv = out / "image_attention.tsv"
    with open(tsv, "w", encoding="utf-8") as f:
        f.write("map\ttoken\trow\tcol\tweight\n")
        for name, w in r.maps.items():
            for t, v in enumerate(w.tolist()):
                f.write(f"{name}\t{t}\t{t // r.grid[1]}\t{t % r.grid[1]}\t{v:.6f}\n")
    return [png, tsv], r


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

    t = sub.add_parser("train", help="train a task's model (attnkit train --help: the tasks and their options)",
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
    e.add_argument("--beam", type=positive_int, default=None,
                   help="beam size for sequence models (default: the beam of the run's final test, so eval prints "
                        "the line train ended with; 1, greedy, for models trained without one)")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    e.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object (raw values)")
    e.set_defaults(fn=cmd_eval)

    tr = sub.add_parser("translate", help="translate lines (arguments, or stdin) with a checkpoint",
                        description="Translate each argument, or each line of stdin (UTF-8), with a dates or "
                                    "multi30k checkpoint: output line i answers input line i (an empty line gives "
                                    "an empty line; a line longer than the model reads is cut, with a warning on "
                                    "stderr). A date that is not a calendar date is marked '[not a valid date]'. "
                                    "With a vqa checkpoint each line is IMAGE<TAB>QUESTION (an image file, or test:N "
                                    "for image N of the run's test split) and the output is the answer. With a speech "
                                    "checkpoint each line is an audio file (.wav, .flac) or test:N and the output is "
                                    "TRANSCRIPT<TAB>NORMALIZED.")
    tr.add_argument("checkpoint", help="checkpoint folder of a dates, multi30k, vqa or speech model")
    tr.add_argument("text", nargs="*", help="sentences (default: read lines from stdin)")
    tr.add_argument("--beam", type=positive_int, default=None,
                    help="beam size (default: the beam of the run's final test; 1, greedy, for models trained "
                         "without one)")
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
        if "--hf" in argv[1:] or any(a.startswith("--hf=") for a in argv[1:]):  # a Hugging Face model folder
            try:
                from .integrations.hf import viz_main as hf_viz_main
            except ImportError as e:
                print(f"attnkit viz: error: --hf needs the [hf] extra: {e}".splitlines()[0], file=sys.stderr)
                return 2
            return hf_viz_main(argv[1:])
        if _image_task(argv[1:]) is not None:  # digits, mnist: attention drawn on the image
            return viz_image_main(argv[1:])
        from .viz.cli import main as viz_main

        try:
            return viz_main(argv[1:])
        except SystemExit as e:
            if e.code == 0 and {"-h", "--help"} & set(argv[1:]):
                print(f"\nImage checkpoints (digits, mnist) take other options: {VIZ_IMAGE_USAGE}")
                print("Hugging Face models saved in a local folder: attnkit viz --hf MODEL_DIR --text TEXT [--out DIR] "
                      "(the [hf] extra)")
            raise
    if argv[:1] == ["train"] and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print(train_help(), end="", file=sys.stdout if len(argv) > 1 else sys.stderr)
        return 0 if len(argv) > 1 else 2
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
