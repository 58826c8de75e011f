"""Shared by the task benchmarks (captioning.py, vqa.py): run ``attnkit train TASK`` in a
subprocess, read what the checkpoint's ``config.json`` says (test metrics, per-epoch history), and
store every run with its command, date, machine and wall time (a rerun of some variants keeps the
stored runs of the others)."""

from __future__ import annotations

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


def write_record(path: str, command: str, threads: int | None, **fields) -> dict:
    """Write a benchmark's JSON: its command, the date, the machine, then ``fields``."""
    record = {"command": command, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(threads), **fields}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return record


def run(task: str, label: str, options: list[str], folder: Path, threads: int | None, seed: int,
        extra: list[str]) -> tuple[dict, dict]:
    """One training run; returns the stored record and the checkpoint's config (empty on failure)."""
    cmd = [sys.executable, "-m", "attnkit", "train", task, *options, "--out", str(folder), "--seed", str(seed),
           "--no-progress", *extra]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    shown = " ".join(["attnkit"] + cmd[3:])
    print(f"$ {shown}", flush=True)
    load0 = os.getloadavg()
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.perf_counter() - start
    cfg = json.loads((folder / "config.json").read_text()) if rc == 0 else {}
    record = {"label": label, "seed": seed, "command": shown, "rc": rc, "wall_s": round(wall, 1),
              "metrics": cfg.get("metrics"), "history": cfg.get("history"), "sizes": cfg.get("sizes"),
              "loadavg_before": load0, "loadavg_after": os.getloadavg(),
              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}
    return record, cfg


def reevaluate(record: dict, threads: int | None) -> dict:
    """``record`` with its test metrics recomputed by ``attnkit eval`` on its checkpoint (when decoding
    changed, not training): the metrics at training move to ``evaluated.metrics_at_training``; the
    wall time and history stay those of the training run."""
    folder = record["command"].split("--out ", 1)[1].split()[0]
    cmd = [sys.executable, "-m", "attnkit", "eval", folder, "--json"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    shown = " ".join(["attnkit"] + cmd[3:])
    print(f"$ {shown}", flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    metrics = json.loads(out.strip().splitlines()[-1])
    metrics = {k if k.startswith("test_") or k == "beam" else f"test_{k}": v for k, v in metrics.items()}
    previous = record.get("evaluated", {}).get("metrics_at_training", record.get("metrics"))
    return record | {"metrics": metrics, "evaluated": {
        "command": shown, "wall_s": round(time.perf_counter() - start, 1),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "metrics_at_training": previous}}


def save(path: str, command: str, threads: int | None, repeat: int, runs: list[dict], labels: list[str],
         order: list[str]) -> None:
    """Write ``runs`` to ``path``; stored runs (same thread count) are kept unless one of ``runs``
    has their label and seed (so seeds 1 and 2 can be added to a stored seed 0), and
    ``commands`` lists every command whose runs the file still holds."""
    previous = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    commands = [command]
    if previous.get("machine", {}).get("threads") == threads:
        new = {(r["label"], r["seed"]) for r in runs}
        runs = [r for r in previous.get("runs", []) if (r.get("label"), r.get("seed")) not in new] + runs
        kept = {r["label"] for r in runs}
        commands = [c for c in previous.get("commands", [previous.get("command")])
                    if c and c != command and any(f'"{k}"' in c for k in kept)] + [command]
    runs.sort(key=lambda r: (order.index(r["label"]) if r.get("label") in order else len(order), r["seed"]))
    record = {"command": command, "commands": commands, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(threads), "repeat": repeat, "runs": runs}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def main(task: str, doc: str, variants: dict[str, list[str]], run_one, argv: list[str] | None = None,
         default: list[str] | None = None) -> int:
    """The command line of a task benchmark: ``--json``, ``--out``, ``--threads``, ``--repeat``,
    ``--variants`` (default ``default``, else all); other options go to ``attnkit train``.
    ``run_one(label, out, threads, seed, extra)`` runs one (see :func:`run`)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", default=f"benchmarks/results/{task}.json", help="results file")
    p.add_argument("--out", default=f"runs/{task}", help="checkpoint folders")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="runs per variant (seeds 0, 1, ...)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed (--first-seed 1 --repeat 2 adds seeds 1 and 2 to a stored seed 0)")
    p.add_argument("--variants", nargs="+", default=default or list(variants), choices=list(variants))
    p.add_argument("--reevaluate", action="store_true",
                   help="train nothing: rerun the test of the stored runs' checkpoints (after a change to decoding)")
    args, extra = p.parse_known_args(argv)
    if args.reevaluate:
        stored = json.loads(Path(args.json).read_text())
        stored["runs"] = [reevaluate(r, args.threads) if r.get("label") in args.variants else r for r in stored["runs"]]
        stored["reevaluated"] = {"command": f"python benchmarks/{task}.py --threads {args.threads} --reevaluate "
                                            f"--json {args.json}",
                                 "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}
        Path(args.json).write_text(json.dumps(stored, indent=1) + "\n")
        print(f"wrote {args.json}")
        return 0
    seeds = range(args.first_seed, args.first_seed + args.repeat)
    runs = [run_one(v, Path(args.out), args.threads, seed, extra) for v in args.variants for seed in seeds]
    shown = " ".join(f'"{v}"' for v in args.variants)
    first = f" --first-seed {args.first_seed}" if args.first_seed else ""
    save(args.json, f"python benchmarks/{task}.py --threads {args.threads} --repeat {args.repeat}{first} "
                    f"--variants {shown} --json {args.json}", args.threads, args.repeat, runs, args.variants,
         list(variants))
    return 0 if all(r["rc"] == 0 for r in runs) else 1
