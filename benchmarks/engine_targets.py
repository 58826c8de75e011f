"""Issue #4's engine targets, checked from ``attnkit bench --json`` results.

Runs the harness (or reads JSON files it wrote) and prints one markdown row per target: the
figures, the ratio and met / missed. Later files override earlier ones case by case, so a
re-run of a single case can be layered over a full run.

Usage (from the repository root)::

    python benchmarks/engine_targets.py --run --threads 2 --json benchmarks/results/engine_2threads.json
    python benchmarks/engine_targets.py benchmarks/results/engine_1thread_fused.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: the cases ``--run`` measures (``attnkit bench`` name prefixes)
CASES = ["window256_fwdbwd", "window256_fwd_", "window256_scaling", "alibi", "blocksparse",
         "additive_fwdbwd_T1024", "softmax"]


def load(paths: list[str]) -> dict[tuple[str, str], dict]:
    results: dict[tuple[str, str], dict] = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for r in report["results"]:
            results[(r["case"], r["variant"])] = r
    return results


def _get(res, case: str, variant: str, key: str) -> float | None:
    r = res.get((case, variant))
    return None if r is None or r.get("error") else r[key]


def rows(res) -> list[tuple[str, str, str, str, str, bool | None]]:
    """``(case, attnkit, anchor, ratio, target, met)`` for each target with data."""
    out = []

    def add(name, ours, anchor, ratio, target, ok):
        out.append((name, ours, anchor, ratio, target, ok))

    t = _get(res, "window256_fwdbwd_N16384", "attnkit tiled", "seconds")
    a = _get(res, "window256_fwdbwd_N16384", "sdpa dense mask", "seconds")
    if t and a:
        add("window w=256 causal N=16384 fwd+bwd: time", f"{t:.3f} s", f"SDPA dense mask {a:.1f} s",
            f"{a / t:.1f}× faster", "≥ 20×", a / t >= 20)
    m = _get(res, "window256_fwdbwd_N16384", "attnkit tiled", "peak_mib")
    a = _get(res, "window256_fwdbwd_N16384", "sdpa no mask", "peak_mib")
    if m and a:
        add("same: peak memory", f"+{m:.0f} MiB", f"SDPA no mask +{a:.0f} MiB", f"{m / a:.2f}×", "≤ 1.5×", m / a <= 1.5)
    t = _get(res, "window256_fwd_N8192", "attnkit tiled", "seconds")
    a = _get(res, "window256_fwd_N8192", "flex compiled", "seconds")
    if t and a:
        add("window forward only N=8192", f"{t:.3f} s", f"compiled flex {a:.3f} s", f"{a / t:.2f}× flex's speed",
            "≥ flex", t <= a)
    t = _get(res, "alibi_causal_fwdbwd_N8192", "attnkit tiled", "seconds")
    a = _get(res, "alibi_causal_fwdbwd_N8192", "sdpa dense bias", "seconds")
    c = _get(res, "alibi_causal_fwdbwd_N8192", "sdpa is_causal, no bias", "seconds")
    if t and a:
        bound = f"; SDPA is_causal, no bias {c:.2f} s" if c else ""
        add("ALiBi + causal N=8192 fwd+bwd: time", f"{t:.2f} s", f"SDPA dense bias {a:.2f} s{bound}",
            f"{a / t:.2f}× faster", "≥ 3×", a / t >= 3)
    m = _get(res, "alibi_causal_fwdbwd_N8192", "attnkit tiled", "peak_mib")
    a = _get(res, "alibi_causal_fwdbwd_N8192", "sdpa dense bias", "peak_mib")
    if m and a:
        add("same: peak memory", f"+{m:.0f} MiB", f"+{a:.0f} MiB", f"1/{a / m:.1f}", "≤ 1/4", m * 4 <= a)
    t = _get(res, "blocksparse_fwdbwd_N16384", "attnkit tiled 10%", "seconds")
    a = _get(res, "blocksparse_fwdbwd_N16384", "attnkit tiled 100%", "seconds")
    if t and a:
        add("block sparse 11% vs 100%, N=16384 fwd+bwd", f"{t:.2f} s", f"100%: {a:.1f} s", f"{t / a:.3f}", "≤ 0.2",
            t / a <= 0.2)
    t = _get(res, "additive_fwdbwd_T1024", "attnkit tiled", "seconds")
    a = _get(res, "additive_fwdbwd_T1024", "naive (B,T,T,d)", "seconds")
    m = _get(res, "additive_fwdbwd_T1024", "attnkit tiled", "peak_mib")
    am = _get(res, "additive_fwdbwd_T1024", "naive (B,T,T,d)", "peak_mib")
    if m and am:
        add("additive B=4 d=128 T=1024 fwd+bwd: peak memory", f"+{m:.0f} MiB", f"naive +{am:.0f} MiB",
            f"1/{am / m:.0f}", "≤ 1/20", m * 20 <= am)
    if t and a:
        add("same: time", f"{t:.2f} s", f"naive {a:.2f} s", f"{t / a:.2f}×", "≤ 0.7×", t / a <= 0.7)
    t = _get(res, "softmax_auto_fwd_N4096", "attnkit auto", "seconds")
    a = _get(res, "softmax_auto_fwd_N4096", "sdpa direct", "seconds")
    if t and a:
        add("plain softmax via auto, N=4096 forward", f"{t:.3f} s", f"SDPA direct {a:.3f} s", f"{t / a:.3f}",
            "≤ 1.05", t / a <= 1.05)
    return out


def scaling(paths: list[str]) -> tuple[float, float] | None:
    times = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                if r["case"].startswith("window256_scaling_N") and not r.get("error"):
                    times[int(r["case"].rsplit("N", 1)[1])] = r["seconds"]
    return (times[16384], times[65536]) if 16384 in times and 65536 in times else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json_files", nargs="*", help="results of `attnkit bench --json`, later ones override")
    p.add_argument("--run", action="store_true", help="run `attnkit bench` on the target cases first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", default="engine_targets.json", help="where --run writes its results")
    args = p.parse_args(argv)
    paths = list(args.json_files)
    if args.run:
        cmd = [sys.executable, "-c", "import sys, attnkit.cli; sys.exit(attnkit.cli.main(sys.argv[1:]))", "bench", *CASES, "--threads", str(args.threads),
               "--repeat", str(args.repeat), "--json", args.json]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        paths.append(args.json)
    if not paths:
        p.error("give JSON files or --run")
    res = load(paths)
    print("| case (issue #4 target) | attnkit | anchor (same run) | ratio | target | |")
    print("|---|---|---|---|---|---|")
    for name, ours, anchor, ratio, target, ok in rows(res):
        print(f"| {name} | {ours} | {anchor} | {ratio} | {target} | {'met' if ok else '**missed**'} |")
    s = scaling(paths)
    if s:
        print(f"| window cost linear: time(N=65536) / time(N=16384) | {s[1]:.2f} s / {s[0]:.3f} s | — | "
              f"{s[1] / s[0]:.2f} | ≤ 4.5 | {'met' if s[1] / s[0] <= 4.5 else '**missed**'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
