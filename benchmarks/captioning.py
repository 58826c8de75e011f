"""Image captioning targets: soft and hard attention on the generated scenes, with default settings.

Each run is ``python -m attnkit train captioning --attention A ...`` in a subprocess (defaults:
6,000 training scenes, 12 epochs, beam 3 on the 1,000 held-out test scenes); the script reads the
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

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine(threads: int | None) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = " ".join(line.split(":", 1)[1].split()[:2])
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__}


#: what is run: (label, options after ``attnkit train captioning``)
VARIANTS = {"soft": ["--attention", "soft"],
            "soft, doubly stochastic 0.005": ["--attention", "soft", "--doubly-stochastic", "0.005"],
            "hard": ["--attention", "hard"]}


def run(label: str, out: Path, threads: int | None, seed: int, extra: list[str]) -> dict:
    folder = out / f"{label.split(',')[0]}{'-ds' if ',' in label else ''}-{seed}"
    cmd = [sys.executable, "-m", "attnkit", "train", "captioning", *VARIANTS[label], "--out",
           str(folder), "--seed", str(seed), "--no-progress", *extra]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    shown = " ".join(["attnkit"] + cmd[3:])
    print(f"$ {shown}", flush=True)
    load0 = os.getloadavg()
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.perf_counter() - start
    cfg = json.loads((folder / "config.json").read_text()) if rc == 0 else {}
    return {"label": label, "attention": cfg.get("attention"), "seed": seed, "command": shown, "rc": rc, "wall_s": round(wall, 1),
            "metrics": cfg.get("metrics"), "history": cfg.get("history"), "sizes": cfg.get("sizes"),
            "digits": (cfg.get("data") or {}).get("digits"), "loadavg_before": load0,
            "loadavg_after": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="benchmarks/results/captioning.json", help="results file")
    p.add_argument("--out", default="runs/captioning", help="checkpoint folders")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="runs per attention kind (seeds 0, 1, ...)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args, extra = p.parse_known_args(argv)
    runs = [run(v, Path(args.out), args.threads, seed, extra) for seed in range(args.repeat) for v in args.variants]
    for r in runs:
        r["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    if previous.get("machine", {}).get("threads") == args.threads:  # a rerun of some variants keeps the others
        runs = [r for r in previous.get("runs", []) if r.get("label") not in args.variants] + runs
    order = list(VARIANTS)
    runs.sort(key=lambda r: (order.index(r["label"]) if r.get("label") in order else len(order), r["seed"]))
    record = {"command": f"python benchmarks/captioning.py --threads {args.threads} --json {args.json}",
              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(args.threads),
              "repeat": args.repeat, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
