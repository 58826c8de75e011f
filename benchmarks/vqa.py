"""Visual question answering targets: the stacked attention network on easy-VQA and on generated
Sort-of-CLEVR, the relational attention network on Sort-of-CLEVR (and the Transformer), with
default settings.

Each run is ``python -m attnkit train vqa --data D --model M ...`` in a subprocess (defaults:
easy-VQA's 3,600 training images (400 more for validation) and its 1,000 test images, 20 epochs;
Sort-of-CLEVR's 10,000 generated training images with 20 questions each, 30 epochs, tested on
1,000 held-out images); the script reads the checkpoint's ``config.json`` (test metrics, the
per-epoch loss and validation accuracy) and writes every run to ``--json`` with its command,
date, machine and wall time (``--variants`` reruns some of them and keeps the others' stored
runs). ``benchmarks/report.py`` renders the table and the curves into docs/benchmarks.md.

    python benchmarks/vqa.py --threads 2 --repeat 3 --json benchmarks/results/vqa.json

Targets (on the test split): easy-VQA accuracy >= 98%; Sort-of-CLEVR relational questions
>= 90% and non-relational >= 98%.
"""

from __future__ import annotations

from pathlib import Path

import train_runs

#: what is run: (label, options after ``attnkit train vqa``)
VARIANTS = {"easy-VQA, SAN": ["--data", "easy-vqa", "--model", "san"],
            "Sort-of-CLEVR, SAN": ["--data", "sort-of-clevr", "--model", "san"],
            "Sort-of-CLEVR, SAN, curriculum 5": ["--data", "sort-of-clevr", "--model", "san", "--curriculum", "5"],
            "Sort-of-CLEVR, relational, curriculum 6": ["--data", "sort-of-clevr", "--model", "relational",
                                                        "--curriculum", "6"],
            "Sort-of-CLEVR, Transformer": ["--data", "sort-of-clevr", "--model", "transformer", "--epochs", "6"]}
#: the default runs (the Transformer's is a comparison, run with --variants)
DEFAULT = ["easy-VQA, SAN", "Sort-of-CLEVR, SAN", "Sort-of-CLEVR, relational, curriculum 6"]


def run(label: str, out: Path, threads: int | None, seed: int, extra: list[str]) -> dict:
    folder = out / f"{label.replace(', ', '-').replace(' ', '').lower()}-{seed}"
    record, cfg = train_runs.run("vqa", label, VARIANTS[label], folder, threads, seed, extra)
    return {**record, "data": (cfg.get("data") or {}).get("data"), "model": cfg.get("model_name")}


def main(argv: list[str] | None = None) -> int:
    return train_runs.main("vqa", __doc__, VARIANTS, run, argv, default=DEFAULT)


if __name__ == "__main__":
    raise SystemExit(main())
