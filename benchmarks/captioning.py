"""Image captioning targets: soft and hard attention on the generated scenes, with default settings.

Each run is ``python -m attnkit train captioning --attention A ...`` in a subprocess (defaults:
6,000 training scenes, 12 epochs for soft attention and 20 for hard, beam 3 on the 1,000 held-out
test scenes); the script reads the
checkpoint's ``config.json`` (test metrics, the per-epoch loss and validation BLEU-4) and writes
every run to ``--json`` with its command, date, machine and wall time (``--variants`` reruns some
of them and keeps the others' stored runs). ``benchmarks/report.py``
renders the table and the curves into docs/benchmarks.md. These are long trainings: one run per
attention kind unless ``--repeat`` says otherwise.

    python benchmarks/captioning.py --threads 2 --json benchmarks/results/captioning.json

Targets (on the test split): soft BLEU-4 >= 0.6 and attention correctness >= 0.6; hard BLEU-4
within 10% of soft's. A third run shows what the doubly stochastic penalty does to the attention.
"""

from __future__ import annotations

from pathlib import Path

import train_runs

#: what is run: (label, options after ``attnkit train captioning``)
VARIANTS = {"soft": ["--attention", "soft"],
            "soft, doubly stochastic 0.005": ["--attention", "soft", "--doubly-stochastic", "0.005"],
            "hard": ["--attention", "hard"]}


def run(label: str, out: Path, threads: int | None, seed: int, extra: list[str]) -> dict:
    folder = out / f"{label.split(',')[0]}{'-ds' if ',' in label else ''}-{seed}"
    record, cfg = train_runs.run("captioning", label, VARIANTS[label], folder, threads, seed, extra)
    return {**record, "attention": cfg.get("attention"), "digits": (cfg.get("data") or {}).get("digits")}


def main(argv: list[str] | None = None) -> int:
    return train_runs.main("captioning", __doc__, VARIANTS, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
