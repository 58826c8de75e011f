"""Quality of the date-normalization model behind ``attnkit demo``: test exact match after the
demo's time budget and after a longer ``attnkit train dates --epochs N`` run.

Each run is a fresh subprocess (so the wall time includes Python and torch start-up), on the
embedded corpus's test split (2,000 examples, corpus seed 1234), repeated ``--repeat`` times
(demo, train, demo, train, ...). The script prints, for each run, the command, the split, the
wall time, the epochs and the accuracy, with the machine load (``os.getloadavg``) before and
after, and writes every run to ``--out`` with the command line, the date and the machine.

    python benchmarks/demo_quality.py --threads 1 --repeat 3 --out benchmarks/results/demo_quality.json
    python benchmarks/demo_quality.py --repeat 1 --max-seconds 5 --epochs 1 --out /tmp/dq.json   # smoke run

Targets: ≥ 95% for the demo within 3 minutes of wall time on 2 CPU cores, ≥ 99.5% for the
longer run. Other processes on the machine make the wall times pessimistic; the load is
recorded so that the figures can be judged.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = re.compile(r"test exact match: (\d+\.\d)% \((\d+) examples\)")
EPOCH = re.compile(r"^epoch (\d+)/\d+", re.M)


def _demo_command(out: str, threads: int, max_seconds: float) -> list[str]:
    return [sys.executable, "-m", "attnkit", "demo", "--out", out, "--threads", str(threads),
            "--max-seconds", f"{max_seconds:g}", "--no-progress"]


def _run(name: str, cmd: list[str]) -> dict:
    shown = " ".join(["python"] + [a if " " not in a else repr(a) for a in cmd[1:]])  # cmd[0] is sys.executable
    print(f"[{name}] $ {shown}", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    lines = proc.stdout.strip().splitlines()
    m = RESULT.fullmatch(lines[-1]) if lines else None
    if proc.returncode != 0 or m is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"[{name}] failed (exit {proc.returncode})")
    epochs = [int(e) for e in EPOCH.findall(proc.stdout)]
    res = {"run": name, "command": shown, "split": f"test ({m.group(2)} examples, embedded corpus, seed 1234)",
           "test_exact_match_percent": float(m.group(1)), "examples": int(m.group(2)),
           "wall_seconds": round(wall, 1), "epochs": max(epochs) if epochs else None,
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
           "last_line": lines[-1]}
    print(f"[{name}] split: {res['split']}; wall time {wall:.0f} s; epochs {res['epochs']}; "
          f"test exact match {res['test_exact_match_percent']:.1f}%; load {load_before[0]:.2f} -> {load_after[0]:.2f}",
          flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", choices=["demo", "train", "both"], default="both")
    p.add_argument("--threads", type=int, default=1, help="torch threads for each run (default 1)")
    p.add_argument("--max-seconds", type=float, default=150, help="the demo's training budget (default 150)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the longer run (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind, each a fresh process (default 3)")
    p.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary folder)")
    p.add_argument("--out", "--report", dest="out",
                   default=str(Path(__file__).with_name("results") / "demo_quality.json"),
                   help="JSON file for every run's figures (default benchmarks/results/demo_quality.json)")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="attnkit-demo-quality-"))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from attnkit.bench import header, write_json

    head, runs = header("python benchmarks/demo_quality.py " + shlex.join(argv), a.threads), []

    def run(name: str, cmd: list[str], i: int) -> None:  # the file is rewritten after every run
        runs.append({"repeat": i + 1, **_run(name, cmd)})
        write_json(str(out), head, {"threads": a.threads, "repeat": a.repeat, "max_seconds": a.max_seconds,
                                    "epochs": a.epochs, "runs": runs})

    for i in range(a.repeat):
        if a.runs in ("demo", "both"):
            run("demo", _demo_command(str(work / f"demo{i}"), a.threads, a.max_seconds), i)
        if a.runs in ("train", "both"):
            run("train", [sys.executable, "-m", "attnkit", "train", "dates", "--epochs", str(a.epochs), "--out",
                          str(work / f"train{i}"), "--threads", str(a.threads), "--no-progress"], i)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
