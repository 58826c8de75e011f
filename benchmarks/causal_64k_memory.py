"""Exact causal attention at N = 65536 (B=1, H=8, D=64, float32), forward + backward, through the
tiled backend: time and the process's peak memory (issue #4's target: < 4 GiB).

Every repeat is a fresh process that runs the call once (no warm-up: one call is minutes); the
file stores every repeat's figures with the command line, the date and the machine.

    python benchmarks/causal_64k_memory.py --threads 2 --repeat 3 --out benchmarks/results/causal_64k.json
    python benchmarks/causal_64k_memory.py --n 2048 --repeat 3 --out /tmp/causal.json   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time


def one(n: int, threads: int) -> dict:
    """One repeat, in this process: the call's time and this process's peak memory."""
    import torch

    import attnkit
    from attnkit.bench import _peak_bytes, _rss_bytes, attention_flops

    torch.set_num_threads(threads)
    q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
    base = _rss_bytes()
    t = time.perf_counter()
    out = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), backend="tiled")
    t_fwd = time.perf_counter() - t
    out.backward(torch.ones_like(out))
    t_all = time.perf_counter() - t
    peak = _peak_bytes()
    return {"forward_s": t_fwd, "total_s": t_all, "peak_gib": peak / 2 ** 30, "growth_gib": (peak - base) / 2 ** 30,
            "gflops": attention_flops(1, 8, n * (n + 1) // 2, 64, True) / t_all / 1e9}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536, help="sequence length (default 65536)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="fresh processes (default 3)")
    p.add_argument("--out", default=None, help="JSON file for every repeat's figures")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a repeat's own process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.n, a.threads)))
        return 0
    from attnkit.bench import header, write_json

    head, runs = header("python benchmarks/causal_64k_memory.py " + shlex.join(argv), a.threads), []
    for i in range(a.repeat):
        proc = subprocess.run([sys.executable, __file__, "--one", "--n", str(a.n), "--threads", str(a.threads)],
                              capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        r = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": (proc.stderr or "no output")[-500:]}
        runs.append(r)
        print(f"[{i + 1}/{a.repeat}] causal N={a.n}: " + (f"failed: {r['error']}" if "error" in r else
              f"fwd {r['forward_s']:.1f} s, fwd+bwd {r['total_s']:.1f} s, {r['gflops']:.1f} GFLOP/s, process peak "
              f"{r['peak_gib']:.2f} GiB (growth over the inputs {r['growth_gib']:.2f} GiB)"), flush=True)
    if a.out:
        write_json(a.out, head, {"n": a.n, "threads": a.threads, "repeat": a.repeat, "runs": runs})
        print(f"wrote {a.out}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
