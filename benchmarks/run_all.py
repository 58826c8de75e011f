"""Run every repeated benchmark in sequence, then regenerate the docs (``benchmarks/report.py``).

The figures are wall times, so this belongs on a quiet machine (nothing else running); say so
with ``--quiet-machine``. Without the flag it only prints the plan: one command per results
file (``report.COMMANDS``), with a rough duration on the project's 2-core machine.

    python benchmarks/run_all.py                                   # the plan
    python benchmarks/run_all.py --quiet-machine                   # all of it, then report.py
    python benchmarks/run_all.py --quiet-machine --only causal_64k.json demo_quality.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import COMMANDS  # noqa: E402

#: rough minutes on the 2-core machine, estimated from the archived single runs (every repeat
#: pays a process start and a warm-up call)
ESTIMATE_MIN = {"engine_2threads.json": "13-20", "causal_64k.json": "7-12", "demo_quality.json": "13-17",
                "engine_1thread.json": "22-30", "hf_2threads.json": "10-20",
                "compile.json": "4-8", "small_calls.json": "1", "engine_round2.json": "12-15",
                "engine_round2_1thread.json": "4-6", "engine_round2_65k.json": "15-25", "engine_window_scaling_recheck.json": "3"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quiet-machine", action="store_true",
                   help="nothing else runs on this machine: measure (without it: print the plan)")
    p.add_argument("--only", nargs="+", choices=list(COMMANDS), metavar="FILE", help="only these results files")
    a = p.parse_args(argv)
    plan = [name for name in COMMANDS if not a.only or name in a.only]
    for name in plan:
        print(f"~{ESTIMATE_MIN.get(name, '?'):>5} min  {COMMANDS[name]}")
    if not a.quiet_machine:
        print("(the plan only: run with --quiet-machine on an otherwise idle machine)")
        return 0
    failed = []
    for name in plan:
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: load average {load:.2f} before {name}: the machine is not quiet", flush=True)
        cmd = shlex.split(COMMANDS[name])
        print(f"\n$ {COMMANDS[name]}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, *cmd[1:]], cwd=ROOT)  # cmd[0] is "python"
        print(f"{name}: exit code {rc} after {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        if rc:
            failed.append(name)
    rc = subprocess.call([sys.executable, "benchmarks/report.py"], cwd=ROOT)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or rc else 0


if __name__ == "__main__":
    raise SystemExit(main())
