"""The dates task's command line: :class:`DatesTask` (``attnkit train dates``, ``eval``,
``translate`` with its marking of outputs that are not calendar dates, and ``attnkit demo``), and
the demo's printed examples and pictures (alignment heatmaps and an HTML page).
"""

from __future__ import annotations

import argparse
import sys
import time
import unicodedata
from pathlib import Path
from typing import Sequence

import torch

from ...checkpoint import Checkpoint
from ...models.seq2seq import ATTENTIONS
from ...training import seed_everything, set_threads
from ..args import fraction, positive_float, positive_int
from ..base import Task, TrainResult
from ..io import warn
from ..vocab import Vocab
from .data import DATA_DEFAULTS, TEMPLATES, Example, is_iso_date, load_splits, read_pairs, tokens
from .recipe import (MODEL_DEFAULTS, TRAIN_DEFAULTS, decode, exact_match, final_test, rebuild, run_training,
                     summary_line)

Tensor = torch.Tensor

# attnkit translate: longer lines are cut (the longest date in the embedded corpus has about 45
# characters); the cut keeps a pasted paragraph from running the encoder over thousands of steps.
MAX_SOURCE_CHARS = 256
NOT_A_DATE = "  [not a valid date]"  # appended to a translation that is not a calendar date

DEMO_KINDS = ("en:{d} {MMMM} {yyyy}", "zh:{yyyy}年{m}月{d}日", "num:{mm}/{dd}/{yy}", "fr:le {d1} {MMMM} {yyyy}")


def display_tokens(toks: Sequence[str]) -> list[str]:
    """Token labels for pictures: a space shows as ``␣``."""
    return ["␣" if t == " " else t for t in toks]


class DatesTask(Task):
    """``attnkit train dates``: date normalization with an attention seq2seq; metric: exact match."""

    name = "dates"
    help = ("Normalize dates written in many forms and languages to ISO YYYY-MM-DD with an attention "
            "encoder-decoder (character level). Embedded generated corpus, or --data FILE of 'source<TAB>target' "
            "lines. "
            f"attnkit translate marks an output that is not a calendar date with '{NOT_A_DATE.strip()}'.")
    translates = True
    viz_args = '--text "14 juillet 1789"'

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("data")
        g.add_argument("--data", default=None, help="tab-separated 'source<TAB>target' file (default: the embedded "
                                                     "generated corpus); split 85/5/10 into train/valid/test")
        g.add_argument("--data-seed", type=int, default=None, help=f"corpus/split seed (default {DATA_DEFAULTS['seed']})")
        g.add_argument("--train-size", type=positive_int, default=None,
                       help="embedded corpus: training examples (default 20000)")
        g.add_argument("--valid-size", type=positive_int, default=None,
                       help="embedded corpus: validation examples (default 1000)")
        g.add_argument("--test-size", type=positive_int, default=None,
                       help="embedded corpus: test examples (default 2000)")
        m = parser.add_argument_group("model")
        m.add_argument("--attention", default=None, choices=list(ATTENTIONS),
                       help=f"attention (default {MODEL_DEFAULTS['attention']})")
        m.add_argument("--rnn", default=None, choices=["gru", "lstm"], help="recurrent cell (default gru)")
        m.add_argument("--no-input-feeding", action="store_true", help="Luong attention without input feeding")
        m.add_argument("--emb-dim", type=positive_int, default=None,
                       help=f"embedding size (default {MODEL_DEFAULTS['emb_dim']})")
        m.add_argument("--hidden-dim", type=positive_int, default=None,
                       help=f"hidden size (default {MODEL_DEFAULTS['hidden_dim']})")
        m.add_argument("--num-layers", type=positive_int, default=None, help="RNN layers (default 1)")
        m.add_argument("--dropout", type=fraction, default=None, help="dropout (default 0)")
        t = parser.add_argument_group("optimization")
        t.add_argument("--batch-size", type=positive_int, default=None,
                       help=f"batch size (default {TRAIN_DEFAULTS['batch_size']})")
        t.add_argument("--lr", type=positive_float, default=None,
                       help=f"peak Adam learning rate (default {TRAIN_DEFAULTS['lr']})")
        t.add_argument("--schedule", default=None, choices=["cosine", "constant"],
                       help="learning-rate schedule after warmup (default cosine)")
        t.add_argument("--beam", type=positive_int, default=1,
                       help="beam size for the final test evaluation (default 1)")

    # -- attnkit train dates ----------------------------------------------------------------
    def train(self, args: argparse.Namespace) -> TrainResult:
        run = run_training(self, args, epochs_default=TRAIN_DEFAULTS["epochs"])
        beam = int(getattr(args, "beam", 1) or 1)
        em, n, _, _ = final_test(run, beam, getattr(args, "device", "cpu"))
        return TrainResult(metric="test exact match", value=em, summary=summary_line(em, n, beam=beam),
                           checkpoint=run.out,
                           seconds=run.seconds, extra={"epochs": run.epochs, "stopped": run.stopped})

    # -- attnkit eval CKPT ------------------------------------------------------------------
    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        model, src_vocab, tgt_vocab, cfg = rebuild(checkpoint)
        device = getattr(args, "device", "cpu")
        model.to(device)
        if getattr(args, "data", None):
            examples, split = read_pairs(args.data), "data"
        else:
            split = getattr(args, "split", "test") or "test"
            if split not in ("train", "valid", "test"):
                raise ValueError(f"--split must be one of 'test', 'train', 'valid'; got {split!r}")
            examples = load_splits(cfg["data"])[split]
        beam = int(getattr(args, "beam", 1) or 1)
        max_len = cfg.get("train", {}).get("max_len", 32)
        preds, _ = decode(model, [e.source for e in examples], src_vocab, tgt_vocab, beam=beam, max_len=max_len,
                          device=device)
        return {f"{split}_exact_match": exact_match(preds, [e.target for e in examples]), "examples": len(examples),
                "beam": beam}

    # -- attnkit translate CKPT ---------------------------------------------------------------
    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        """One output per input line, in order: the model's ``YYYY-MM-DD``, followed by
        :data:`NOT_A_DATE` when it is not a calendar date (e.g. ``2020-31-31  [not a valid date]``).
        An empty line gives an empty output; a line longer than :data:`MAX_SOURCE_CHARS` is cut to
        that length, with a warning on stderr naming the line."""
        model, src_vocab, tgt_vocab, cfg = rebuild(checkpoint)
        model.to(getattr(args, "device", "cpu"))
        sources = [line.strip() for line in lines]
        for i, src in enumerate(sources):
            if len(src) > MAX_SOURCE_CHARS:
                warn(f"input line {i + 1} has {len(src)} characters; the date model reads only the first "
                     f"{MAX_SOURCE_CHARS}")
                sources[i] = src[:MAX_SOURCE_CHARS]
        preds, _ = decode(model, sources, src_vocab, tgt_vocab,
                          beam=int(getattr(args, "beam", 1) or 1), max_len=cfg.get("train", {}).get("max_len", 32),
                          device=getattr(args, "device", "cpu"))
        return [p if not src or is_iso_date(p) else f"{p}{NOT_A_DATE}" for src, p in zip(sources, preds)]

    # -- attnkit demo -------------------------------------------------------------------------
    def demo(self, args: argparse.Namespace) -> int:
        """Train on the embedded corpus within ``--max-seconds`` (default 150) of training, then
        print the test exact match and examples, and write the checkpoint, PNG heatmaps and an
        HTML page of attention alignments into ``--out`` (default ``./attnkit-demo``). The last
        printed line is ``test exact match: XX.XX% (N examples, greedy)``. Returns the exit code (0)."""
        t0 = time.perf_counter()
        out = Path(getattr(args, "out", None) or "attnkit-demo")
        # One thread unless asked: the model is small (GRU 128), so a second thread gains little,
        # and when the cores are shared OpenMP threads spin against each other and the run loses
        # most of its time budget (measured: 1 epoch in 150 s with 2 threads at load 4, against 8
        # epochs and 100% exact match with 1 thread at load 5).
        threads = getattr(args, "threads", None)
        set_threads(1 if threads is None else threads)
        seed_everything(int(getattr(args, "seed", 0) or 0))
        budget = getattr(args, "max_seconds", None)
        budget = 150.0 if budget is None else float(budget)
        targs = argparse.Namespace(
            out=str(out), seed=int(getattr(args, "seed", 0) or 0), device=getattr(args, "device", "cpu"),
            epochs=getattr(args, "epochs", None) or 1000, max_seconds=budget, resume=False,
            progress=getattr(args, "progress", True), data=None,
            train_size=getattr(args, "train_size", None), valid_size=getattr(args, "valid_size", None),
            test_size=getattr(args, "test_size", None), data_seed=getattr(args, "data_seed", None),
            valid_limit=getattr(args, "valid_limit", 500), templates=getattr(args, "templates", None))
        for k, v in DEMO_MODEL.items():
            setattr(targs, k, getattr(args, k, None) or v)
        langs = sorted({t.split(":")[0] for t in TEMPLATES} - {"num"})
        print(f"attnkit demo: an attention encoder-decoder ({targs.attention} attention, GRU, hidden {targs.hidden_dim}) "
              f"learns to normalize dates written in {len(TEMPLATES)} forms ({', '.join(langs)} and numeric) "
              "to YYYY-MM-DD")
        print(f"training for up to {budget:.0f} s on {torch.get_num_threads()} CPU thread(s); "
              f"checkpoint and pictures go to {str(out)!r}")
        sys.stdout.flush()
        run = run_training(self, targs, epochs_default=1000)
        print(f"trained {run.epochs} epoch(s) in {run.seconds:.0f} s; decoding the test split…")
        em, n, preds, weights = final_test(run, 1, targs.device)
        test = run.splits["test"]
        print("examples (source → prediction):")
        for i in _pick_examples(test, 8):
            ok = "✓" if preds[i] == test[i].target else f"✗ (expected {test[i].target})"
            print(f"  {_ljust(test[i].source, 38)} → {preds[i]}  {ok}")
        written = _write_pictures(out, test, preds, weights, run.tgt_vocab)
        for p in written:
            print(f"wrote {p}")
        print(f"checkpoint: {out}  (try: attnkit translate {out} \"14 juillet 1789\")")
        print(f"total time {time.perf_counter() - t0:.0f} s")
        print(summary_line(em, n, beam=1))
        return 0


DEMO_MODEL = dict(attention="luong-general", hidden_dim=128, emb_dim=64, batch_size=128, lr=3e-3)


def _ljust(text: str, width: int) -> str:
    """Left-justify for a terminal, counting East Asian wide characters as two columns."""
    cols = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - cols)


def _pick_examples(test: Sequence[Example], k: int) -> list[int]:
    """Up to ``k`` test indices with distinct languages/forms first."""
    seen, picked = set(), []
    for i, ex in enumerate(test):
        lang = ex.kind.split(":")[0]
        if lang not in seen:
            seen.add(lang)
            picked.append(i)
        if len(picked) == k:
            break
    for i in range(len(test)):
        if len(picked) >= k:
            break
        if i not in picked:
            picked.append(i)
    return picked


def _write_pictures(out: Path, test: Sequence[Example], preds: Sequence[str], weights: Sequence[Tensor],
                    tgt_vocab: Vocab) -> list[Path]:
    from ...viz.heatmap import alignment_png
    from ...viz.html import Alignment, alignment_page

    chosen: list[int] = []
    for kind in DEMO_KINDS:
        i = next((j for j, e in enumerate(test) if e.kind == kind), None)
        if i is not None:
            chosen.append(i)
    for i in range(len(test)):
        if len(chosen) >= len(DEMO_KINDS):
            break
        if i not in chosen:
            chosen.append(i)
    written, items = [], []
    for n, i in enumerate(chosen, 1):
        src = display_tokens(tokens(test[i].source))
        w = weights[i]
        tgt = tokens(preds[i])
        if w.shape[0] == len(tgt) + 1:
            tgt = tgt + ["</s>"]
        w = w[: len(tgt)]
        mark = "✓" if preds[i] == test[i].target else f"✗ expected {test[i].target}"
        title = f"{test[i].source} → {preds[i]} {mark}"
        written.append(alignment_png(w, src, tgt, out / f"alignment_{n}.png", title=title))
        items.append(Alignment(w, src, tgt, caption=title))
    alignment_page(items, out / "alignment.html", title="attnkit demo: date normalization attention")
    written.append(out / "alignment.html")
    return written
