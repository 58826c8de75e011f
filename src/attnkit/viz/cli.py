"""``attnkit viz CHECKPOINT --text "..." --out DIR``: run one input through a trained model inside
:func:`attnkit.capture` and write what its attention did.

Files written into ``--out`` (default ``./attnkit-viz``):

* ``attention.html`` -- the interactive view (:mod:`attnkit.viz.view`): every group, layer and
  head, the rollout, and (``--flow``) the attention flow; one file, opens offline;
* ``alignment.png`` -- for models with cross-attention: target × source, the last layer's head
  mean (``--align-layer``); and ``alignment.tsv``, the source token each target token attends to most;
* ``heads_<group>.png`` -- a head × layer grid for each group of layers (with the rollout
  column for self-attention);
* ``stats.tsv`` -- per-head entropy, mean attention distance and mean largest weight.

Checkpoints: those of ``attnkit train`` / ``attnkit demo`` for the tasks that read text --
``dates`` (the demo's :class:`~attnkit.models.Seq2Seq`), ``multi30k`` (Transformer or Seq2Seq
translation) and ``sst2`` (the attention classifier over tokens). The model is run greedily to get
its output, then once more with that output as the decoder input (teacher forcing), so that every
attention map covers the whole output. ``--backend`` forces the backend that computes the
model's attention (``sdpa``, ``tiled``, ...): the captured weights are the same whichever it is.

A task can support ``attnkit viz`` itself by defining ``viz_example(checkpoint, text, device) ->
attnkit.viz.cli.Example``.

Exit status: 0, or 2 with a one-line ``attnkit viz: error: ...`` for a bad checkpoint or input.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["main", "build_parser", "Example", "run", "report", "ADAPTERS"]


@dataclass
class Example:
    """One input ready to visualize.

    Attributes:
        src_tokens: labels of the input tokens (as the model sees them).
        tgt_tokens: labels of the output tokens, one per decoder position (None for encoders).
        output: the model's output, as text.
        forward: runs the model on the input (called inside ``attnkit.capture``).
        roles: ``{group name glob: (query role, key role)}`` for :func:`attnkit.viz.collect.assign_tokens`.
        description: the model, in a few words.
    """

    src_tokens: list[str]
    tgt_tokens: list[str] | None
    output: str
    forward: Callable[[], Any]
    roles: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    description: str = ""


def _model(ckpt, device: str) -> torch.nn.Module:
    from .. import models
    from ..checkpoint import load_weights

    cfg = ckpt.require(("model", "model_config"), "task")
    if not isinstance(cfg["model_config"], dict):
        raise ValueError(f"checkpoint {str(ckpt.path)!r}: config.json 'model_config' must be an object")
    try:
        model = models.get(cfg["model"])(**cfg["model_config"])
    except TypeError as e:
        raise ValueError(f"checkpoint {str(ckpt.path)!r}: model_config does not fit model {cfg['model']!r}: {e}") \
            from None
    return load_weights(model, ckpt).to(device).eval()


def _show(tok: str) -> str:
    return "␣" if tok == " " else tok


# -- adapters: one per task that reads text -----------------------------------------------------------
def _dates(ckpt, text: str, device: str) -> Example:
    from ..tasks.vocab import Vocab, pad_batch

    cfg = ckpt.require(("src_vocab", "tgt_vocab"), "dates")
    model = _model(ckpt, device)
    src_vocab, tgt_vocab = Vocab.from_json(cfg["src_vocab"]), Vocab.from_json(cfg["tgt_vocab"])
    chars = list(text)
    src, lengths = pad_batch([src_vocab.encode(chars)])
    src, lengths = src.to(device), lengths.to(device)
    max_len = int(cfg.get("train", {}).get("max_len", 32))
    with torch.no_grad():
        out_ids, _ = model.greedy(src, lengths, max_len)
    ids = out_ids[0]
    ended = len(ids) < max_len  # the model produced </s>: one more step, whose row is labelled </s>
    tgt_in = torch.tensor([[tgt_vocab.bos_id] + (ids if ended else ids[:-1])], device=device)
    output = "".join(tgt_vocab.decode(ids))
    unknown = sorted({c for c in chars if c not in src_vocab.stoi})
    desc = f"{cfg['model']} ({cfg['model_config'].get('attention', '?')} attention)"
    if unknown:
        desc += f"; characters unknown to the model: {' '.join(unknown)}"
    rows = [_show(t) for t in tgt_vocab.decode(ids, strip=False)] + (["</s>"] if ended else [])
    return Example([_show(c) for c in chars], rows,
                   output, lambda: model(src, lengths, tgt_in), roles={"*": ("tgt", "src")}, description=desc)


def _piece(tok, i: int) -> str:
    if hasattr(tok, "sp"):
        return tok.sp.id_to_piece(int(i))
    if hasattr(tok, "vocab"):
        return tok.vocab.itos[int(i)] if 0 <= int(i) < len(tok.vocab) else "<unk>"
    return str(int(i))


def _translation(ckpt, text: str, device: str) -> Example:
    from ..tasks.multi30k.recipe import forward, generate
    from ..tasks.subword import from_config
    from ..tasks.vocab import pad_batch

    cfg = ckpt.require(("src_tokenizer",), "translation")
    model = _model(ckpt, device)
    src_tok = from_config(cfg["src_tokenizer"])
    tgt_tok = src_tok if cfg.get("joint", False) else from_config(cfg["tgt_tokenizer"])
    ids = src_tok.encode(text) + [src_tok.eos_id]
    src, lengths = pad_batch([ids])
    src, lengths = src.to(device), lengths.to(device)
    dk = cfg.get("decode", {})
    max_len = int(dk.get("max_len_a", 1.5) * len(ids) + dk.get("max_len_b", 10))
    out = list(generate(model, src, lengths, beam=1, max_len=max_len)[0])
    ended = len(out) < max_len  # the model produced </s>: one more step, whose row is labelled </s>
    tgt_in = torch.tensor([[tgt_tok.bos_id] + (out if ended else out[:-1])], device=device)
    return Example([_piece(src_tok, i) for i in ids], [_piece(tgt_tok, i) for i in out] + (["</s>"] if ended else []),
                   tgt_tok.decode(out), lambda: forward(model, src, lengths, tgt_in),
                   description=f"{cfg['model']} translation")


def _sst2(ckpt, text: str, device: str) -> Example:
    from ..tasks.sst2.data import tokenize
    from ..tasks.vocab import Vocab

    cfg = ckpt.config
    if cfg.get("model") != "AttentionClassifier":
        raise ValueError(f"attnkit viz draws sst2 checkpoints of the AttentionClassifier; this one holds "
                         f"{cfg.get('model')!r}")
    ckpt.require(("vocab",), "sst2")
    model = _model(ckpt, device)
    vocab = Vocab.from_json(cfg["vocab"])
    words = tokenize(text)
    if not words:
        raise ValueError("--text must hold at least one word")
    x = torch.tensor([vocab.encode(words)], device=device)
    with torch.no_grad():
        logits = model(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    label = int(logits.argmax(-1)[0])
    probs = torch.softmax(logits.float(), -1)[0]
    names = {0: "negative", 1: "positive"}
    return Example([w if w in vocab.stoi else f"{w} (unk)" for w in words], None,
                   f"{names.get(label, label)} (p = {float(probs[label]):.3f})", lambda: model(x),
                   roles={"pool*": (["[pool]"], "src")}, description="AttentionClassifier (sentiment)")


#: task name -> adapter(checkpoint, text, device) -> Example
ADAPTERS: dict[str, Callable[[Any, str, str], Example]] = {"dates": _dates, "multi30k": _translation, "sst2": _sst2}


# -- the run ----------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", name.replace("*", "")).strip("_")
    return s or "attention"


@dataclass
class Result:
    """What :func:`run` produced."""

    example: Example
    groups: list
    records: list
    files: list[Path]


def run(checkpoint: str | os.PathLike, text: str, out: str | os.PathLike, *, backend: str = "auto",
        device: str = "cpu", flow: bool = False, pictures: bool = True, align_layer: int | str = -1) -> Result:
    """Load ``checkpoint``, run ``text`` through its model inside :func:`attnkit.capture` and write
    the page, pictures and tables into ``out`` (see the module docstring)."""
    from .. import recording, tasks
    from ..backends import registry
    from ..checkpoint import load_checkpoint
    from . import analysis
    from .collect import assign_tokens, group_records
    from .grid import head_grid_png
    from .heatmap import alignment_png
    from .view import attention_page, default_title

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--text must be a non-empty string; got {text!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    if backend != "auto" and backend not in registry.REGISTRY:
        raise ValueError(f"--backend must be 'auto' or one of {', '.join(repr(n) for n in registry.names())}; "
                         f"got {backend!r}")
    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist (expected a folder written by attnkit train or "
                         "attnkit demo)")
    ckpt = load_checkpoint(path)
    task_name = ckpt.config.get("task")
    if not isinstance(task_name, str):
        raise ValueError(f"checkpoint {str(path)!r}: config.json names no task")
    task = tasks.get(task_name)
    if hasattr(task, "viz_example"):
        adapter = task.viz_example
    elif task_name in ADAPTERS:
        adapter = ADAPTERS[task_name]
    else:
        raise ValueError(f"attnkit viz reads text into the models of tasks {', '.join(sorted(ADAPTERS))}; checkpoint "
                         f"{str(path)!r} is for task {task_name!r}")
    try:
        ex = adapter(ckpt, text, device)
    except KeyError as e:
        raise ValueError(f"checkpoint {str(path)!r}: config.json lacks {e}") from None
    with registry.use_backend(backend), torch.no_grad(), recording.capture() as rec:
        ex.forward()
    if not rec:
        raise ValueError(f"the {task_name} model made no attnkit attention call on this input")
    groups = group_records(rec)
    assign_tokens(groups, ex.src_tokens, ex.tgt_tokens, roles=ex.roles or None)
    for g in groups:
        g.title = default_title(g)
    used = sorted({r.backend for r in rec})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = [("checkpoint", str(path)), ("model", ex.description or str(ckpt.config.get("model"))),
            ("input", text), ("output", ex.output),
            ("backend", ", ".join(used) + (f" (forced with --backend {backend})" if backend != "auto" else ""))]
    files = [out_dir / "attention.html"]
    attention_page(groups, files[0], title=f"attnkit viz: {path.name or str(path)}", info=info, flow=flow)
    with open(out_dir / "stats.tsv", "w", encoding="utf-8") as f:
        f.write("group\tlayer\tname\thead\tentropy_nats\tmean_distance\tmean_max_weight\n")
        for g in groups:
            for s in analysis.head_stats({layer.name: layer.weights for layer in g.layers}):
                f.write(f"{g.name}\t{s.layer}\t{s.name}\t{s.head}\t{s.entropy:.4f}\t{s.distance:.4f}\t"
                        f"{s.max_weight:.4f}\n")
    files.append(out_dir / "stats.tsv")
    cross = [g for g in groups if not g.is_self and g.query_tokens is not None and g.key_tokens is not None
             and g.query_tokens != g.key_tokens]
    if cross:
        g = cross[-1]
        m = analysis.alignment_matrix([layer.weights for layer in g.layers], layer=align_layer)
        pairs = analysis.align(m, g.key_tokens, g.query_tokens)
        with open(out_dir / "alignment.tsv", "w", encoding="utf-8") as f:
            f.write("target_index\ttarget\tsource_index\tsource\tweight\n")
            for p in pairs:
                f.write(f"{p.target_index}\t{p.target}\t{p.source_index}\t{p.source}\t{p.weight:.4f}\n")
        files.append(out_dir / "alignment.tsv")
        if pictures:
            which = ("mean of the layers" if align_layer == "mean" else "last layer" if align_layer == -1 or
                     len(g.layers) == 1 else f"layer {align_layer}")
            files.append(alignment_png(m, g.key_tokens, g.query_tokens, out_dir / "alignment.png",
                                       title=f"{text} → {ex.output}  ({g.name}, {which}, heads averaged)"))
    if pictures:
        for g in groups:
            q, k = g.labels()
            roll = g.is_self
            files.append(head_grid_png(g, out_dir / f"heads_{_slug(g.name)}.png", query_tokens=q, key_tokens=k,
                                       title=f"{g.title}: every head", rollout=roll))
    return Result(ex, groups, list(rec), files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit viz", description=(
        "Run one input through a trained model and write its attention: an interactive HTML view (every "
        "layer and head, rollout, flow; opens offline), PNG pictures and per-head statistics."))
    p.add_argument("checkpoint", help="checkpoint folder (attnkit demo / attnkit train) of a task that reads text: "
                                      + ", ".join(sorted(ADAPTERS)))
    p.add_argument("--text", required=True, help="the input, e.g. \"14 juillet 1789\"")
    p.add_argument("--out", default="attnkit-viz", help="output folder (default ./attnkit-viz)")
    p.add_argument("--backend", default="auto",
                   help="backend that computes the model's attention: auto (default), reference, sdpa, tiled, flex")
    p.add_argument("--flow", action="store_true",
                   help="also compute attention flow for self-attention stacks (inputs up to 64 tokens)")
    p.add_argument("--align-layer", default="-1",
                   help="cross-attention layer for alignment.png/.tsv: an index (default -1, the last) or 'mean'")
    p.add_argument("--no-png", dest="pictures", action="store_false", help="write the HTML page and tables only")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def report(work: Callable[[], tuple[Sequence[str], Sequence[Path]]],
           errors: tuple[type[Exception], ...]) -> int:
    """Run ``work`` and end an ``attnkit viz`` command: its lines and a ``wrote FILE`` line for each
    file it wrote, exit status 0; or, when it raises one of ``errors``, one line
    ``attnkit viz: error: ...`` on stderr and exit status 2 (``ATTNKIT_DEBUG=1`` shows the traceback)."""
    try:
        lines, files = work()
    except errors as e:
        if os.environ.get("ATTNKIT_DEBUG"):
            raise
        print(f"attnkit viz: error: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    for f in files:
        print(f"wrote {f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``attnkit viz``'s entry point; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def work() -> tuple[list[str], list[Path]]:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1; got {args.threads}")
            torch.set_num_threads(args.threads)
        align: int | str = args.align_layer
        if align != "mean":
            try:
                align = int(align)
            except ValueError:
                raise ValueError(f"--align-layer must be an int or 'mean'; got {args.align_layer!r}") from None
        res = run(args.checkpoint, args.text, args.out, backend=args.backend, device=args.device, flow=args.flow,
                  pictures=args.pictures, align_layer=align)
        return [f"input:  {args.text}", f"output: {res.example.output}",
                *(f"  {g.title}: {len(g.layers[0].heads)} head(s), {g.num_queries} × {g.num_keys}"
                  for g in res.groups)], res.files

    return report(work, (ValueError, TypeError, FileNotFoundError, NotADirectoryError))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
