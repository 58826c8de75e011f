"""Multi30k En→De benchmark: train a Transformer or an attention RNN, print the learning curve and
the test2016 BLEU/chrF (sacreBLEU on detokenized, cased output; the ``raw/`` files).

Usage (from the repository root; the data folder defaults to ``../shared/data/multi30k``)::

    python benchmarks/multi30k.py --model transformer --threads 1 --out runs/m30k-transformer
    python benchmarks/multi30k.py --model seq2seq --threads 1 --out runs/m30k-seq2seq
    python benchmarks/multi30k.py --model transformer --out runs/m30k-transformer --resume   # continue

Any option of ``attnkit train multi30k`` can be added (``--epochs``, ``--max-seconds``, ``--beam``,
``--d-model``...); the recipes below are the defaults. The run writes its checkpoint (resumable),
the best-valid-BLEU weights in ``OUT/best`` and ``OUT/benchmark.json`` (the curve and the results,
with the command line, the date and the machine); ``--results PATH`` writes the same file to PATH
too (``benchmarks/results/multi30k_MODEL.json`` is what the docs read). A run takes hours, so it is
a single run: the docs mark its figures "1 run".

Recipes (chosen to be efficient on a CPU; targets of the issue: Transformer ≥ 35 BLEU,
Seq2Seq with Bahdanau attention ≥ 30 BLEU on test2016):

* transformer: pre-norm, d = 256, 4 heads, 3 + 3 layers, FFN 1024, dropout 0.1, sinusoidal
  positions, all embeddings tied; joint SentencePiece BPE 8k; batches of 2048 padded tokens;
  Adam (0.9, 0.98), peak lr 7e-4 after 300 warm-up updates then inverse-sqrt decay; label
  smoothing 0.1; clip 1.0; 30 epochs; test with beam 4, length penalty 0.6.
* seq2seq: bidirectional GRU encoder (2 × 256) and GRU decoder (512) with Bahdanau (additive)
  attention, embeddings 256, dropout 0.3; same data, tokens, optimizer (lr 1e-3, 300 warm-up
  updates), label smoothing 0.1; 20 epochs; beam 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from attnkit.cli import _common_train_options
from attnkit.tasks import get as get_task
from attnkit.training import seed_everything, set_threads

RECIPES = {
    "transformer": ["--raw", "--tokenizer", "bpe", "--vocab-size", "8000", "--d-model", "256", "--heads", "4",
                    "--encoder-layers", "3", "--decoder-layers", "3", "--ff", "1024", "--dropout", "0.1",
                    "--norm", "pre", "--positions", "sinusoidal", "--batch-tokens", "2048", "--lr", "7e-4",
                    "--warmup", "300", "--label-smoothing", "0.1", "--grad-clip", "1.0", "--epochs", "30",
                    "--beam", "4", "--length-penalty", "0.6"],
    "seq2seq": ["--raw", "--tokenizer", "bpe", "--vocab-size", "8000", "--emb-dim", "256", "--hidden-dim", "512",
                "--rnn", "gru", "--attention", "bahdanau", "--dropout", "0.3", "--batch-tokens", "2048",
                "--lr", "1e-3", "--warmup", "300", "--label-smoothing", "0.1", "--grad-clip", "1.0",
                "--epochs", "20", "--beam", "4", "--length-penalty", "0.6"],
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="transformer", choices=sorted(RECIPES))
    known, _ = pre.parse_known_args(argv)
    task = get_task("multi30k")
    p = argparse.ArgumentParser(prog="benchmarks/multi30k.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_train_options(p)
    task.add_arguments(p)
    p.add_argument("--results", default=None, help="also write OUT/benchmark.json to this path")
    # the recipe first, the user's options after it (argparse keeps the last value)
    args = p.parse_args(RECIPES[known.model] + argv)
    from attnkit.bench import header

    head = header("python benchmarks/multi30k.py " + shlex.join(argv), args.threads)
    if args.out is None:
        args.out = f"runs/multi30k-{args.model}"
    set_threads(args.threads)
    seed_everything(args.seed)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# Multi30k En->De benchmark: --model {args.model}")
    print(f"# recipe: {' '.join(RECIPES[args.model])}  overrides: {' '.join(argv) or '-'}")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at start")
    t0 = time.perf_counter()
    result = task.train(args)
    wall = time.perf_counter() - t0
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3

    # greedy too, for comparison with the beam result of train()
    from attnkit.checkpoint import load_checkpoint

    greedy = task.evaluate(load_checkpoint(result.checkpoint), argparse.Namespace(
        split="test", beam=1, device=args.device, data=None))

    print("\n| epoch | wall s | train loss | valid loss | valid BLEU | valid chrF | updates |")
    print("|---|---|---|---|---|---|---|")
    for r in result.extra["history"]:
        print(f"| {r['epoch']}{' (partial)' if r.get('partial') else ''} | {r['seconds']:.0f} | {r['loss']:.3f} | "
              f"{r.get('valid_loss', float('nan')):.3f} | {r.get('valid_bleu', float('nan')):.2f} | "
              f"{r.get('valid_chrf', float('nan')):.2f} | {r.get('updates', 0)} |")
    m = result.extra["metrics"]
    beam = m.get("beam", 1)
    print(f"\ntest2016 ({'greedy' if beam == 1 else f'beam {beam}'}): {result.summary}")
    print(f"test2016 (greedy): BLEU {greedy['bleu']:.2f}  chrF {greedy['chrf']:.2f}")
    print(f"sacreBLEU signature: {m.get('bleu_signature')}")
    print(f"wall time {wall:.0f}s this invocation; load average at end {load_end[0]:.2f} {load_end[1]:.2f} "
          f"{load_end[2]:.2f}")
    out = Path(args.out)
    report = {**head, "model": args.model, "recipe": RECIPES[args.model], "overrides": argv, "history": result.extra["history"],
              "test": m, "test_greedy": {k: greedy[k] for k in ("bleu", "chrf")}, "wall_s": wall,
              "load_start": load, "load_end": load_end, "threads": torch.get_num_threads()}
    for path in [out / "benchmark.json"] + ([Path(args.results)] if args.results else []):
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
