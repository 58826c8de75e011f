"""Speech recognition targets: Listen, Attend and Spell on the generated corpus (dates and numbers in
English, French, German and Spanish, synthesized with espeak-ng; the test speakers are never heard
in training), with default settings.

Each run is ``python -m attnkit train speech ...`` in a subprocess (defaults: 6,000 training
utterances, 300 for validation, 1,000 for the test, 16 epochs, beam 4 at the test); the script
reads the checkpoint's ``config.json`` (test metrics, the per-epoch loss, validation CER and exact
match) and writes every run to ``--json`` with its command, date, machine and wall time (the wall
time includes synthesizing the corpus). ``benchmarks/report.py`` renders the table and the curves
into docs/benchmarks.md.

    python benchmarks/speech.py --threads 2 --repeat 3 --json benchmarks/results/speech.json

Targets (on the held-out speakers): dates written as ``YYYY-MM-DD`` exactly right >= 95%,
transcript CER <= 5%, and >= 95% of the transcript's steps whose attention peak does not move
backwards.
"""

from __future__ import annotations

from pathlib import Path

import train_runs

#: what is run: (label, options after ``attnkit train speech``)
VARIANTS = {"LAS, location-aware": []}


def run(label: str, out: Path, threads: int | None, seed: int, extra: list[str]) -> dict:
    folder = out / f"{label.replace(', ', '-').replace(' ', '').lower()}-{seed}"
    record, _ = train_runs.run("speech", label, VARIANTS[label], folder, threads, seed, extra)
    return record


def main(argv: list[str] | None = None) -> int:
    return train_runs.main("speech", __doc__, VARIANTS, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
