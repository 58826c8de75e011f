"""Quality benchmark of the attention classifiers: digits, MNIST and SST-2 with fixed settings.

Each run is ``python -m attnkit train TASK ...`` in a subprocess; the script prints the command,
the evaluation split, the wall time, the epochs trained and the accuracy, and appends one JSON
line per run to ``--results`` (default ``OUT/results.jsonl``), with this script's command line,
the date and the machine. These are single runs (long trainings): the docs mark them "1 run".

    python benchmarks/classifiers.py                   # all three (MNIST and SST-2 need ../shared/data)
    python benchmarks/classifiers.py --task digits --threads 1 --results benchmarks/results/classifiers.jsonl

Wall times depend on the machine and on what else runs on it: the script records ``os.getloadavg()``
before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# task -> (settings after `attnkit train TASK`, the split the summary reports, its target)
RUNS = {
    "digits": ([], "test (360 of 1,797, stratified, --split-seed 0)", 0.97),
    "mnist": (["--data", str(DATA / "mnist")], "test (10,000; valid = last 5,000 train)", 0.985),
    "sst2": (["--data", str(DATA / "sst2" / "glue")], "GLUE dev (872 sentences)", 0.80),
}


def run(task: str, out: Path, threads: int | None, seed: int, extra: list[str]) -> dict:
    args, split, target = RUNS[task]
    cmd = [sys.executable, "-m", "attnkit", "train", task, "--out", str(out / task), "--seed", str(seed),
           "--no-progress", *args, *extra]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    shown = " ".join(["attnkit", "train", task] + cmd[5:])
    print(f"$ {shown}", flush=True)
    load0 = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        print("  " + line.rstrip(), flush=True)
        lines.append(line)
    rc = proc.wait()
    wall = time.perf_counter() - start
    epochs = sum(1 for line in lines if re.match(r"epoch \d+/\d+", line))
    m = next((re.search(r"accuracy: ([\d.]+)% \((\d+) examples\)", line) for line in reversed(lines)
              if "accuracy:" in line), None)
    result = {"task": task, "command": shown, "split": split, "rc": rc, "wall_s": round(wall, 1), "epochs": epochs,
              "accuracy": float(m.group(1)) / 100 if m else None, "examples": int(m.group(2)) if m else None,
              "target": target, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
              "curve": [float(x) for x in re.findall(r"(?:valid|dev) accuracy ([\d.]+)", "".join(lines))]}
    acc = f"{100 * result['accuracy']:.2f}%" if m else "n/a (failed)"
    print(f"{task}: split {split} | wall {wall:.0f} s | epochs {epochs} | accuracy {acc} "
          f"(target {100 * target:.1f}%) | load {load0[0]:.1f} -> {result['loadavg_after'][0]:.1f}", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(RUNS), action="append", help="run only this task (repeatable)")
    p.add_argument("--out", default="bench-classifiers", help="folder for checkpoints and results")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=None, help="JSON-lines results file (default OUT/results.jsonl)")
    p.add_argument("extra", nargs="*", help="extra options for attnkit train (after --), e.g. -- --epochs 3")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(a.results) if a.results else out / "results.jsonl"
    from attnkit.bench import header

    ok = True
    for task in a.task or list(RUNS):
        head = header("python benchmarks/classifiers.py " + shlex.join(sys.argv[1:]), a.threads)
        r = {**run(task, out, a.threads, a.seed, a.extra), "wrapper_command": head["command"],
             "date": head["date"], "machine": head["machine"]}
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
        ok &= r["rc"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
