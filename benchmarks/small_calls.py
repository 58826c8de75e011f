"""Small calls: one decoding step (one query against a cache of keys), where the per-call cost of
``attnkit.attention`` (checks, the NaN policy, the backend choice, the mask) is what counts, not
the arithmetic. attnkit and SDPA in the same run, B=1, H=8, D=64, Tk=512, float32, no grad.

Each case: the median over ``--repeat`` repeats of the mean time of ``--calls`` calls, in
microseconds, with the spread; the ratio is against SDPA without a mask in the same run.

    python benchmarks/small_calls.py --threads 2 --repeat 5 --json benchmarks/results/small_calls.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_runs  # noqa: E402

import attnkit  # noqa: E402
from attnkit import masks  # noqa: E402


def cases(q, k, v):
    Tk = k.shape[2]
    window = masks.sliding_window(256)
    dense_window = window.materialize(1, Tk)
    return {
        "SDPA, no mask": lambda: F.scaled_dot_product_attention(q, k, v),
        "SDPA, window 256 as a dense mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window),
        "attnkit, no mask": lambda: attnkit.attention(q, k, v),
        "attnkit, masks.causal()": lambda: attnkit.attention(q, k, v, mask=masks.causal()),
        # new view objects of the same keys every call: the NaN policy cannot know them clean and
        # sums them (a loop that re-slices its own cache; attnkit.nn.KVCache's views are known)
        "attnkit, masks.causal(), new K/V views each call":
            lambda: attnkit.attention(q, k[:, :, :], v[:, :, :], mask=masks.causal()),
        "attnkit, masks.sliding_window(256)": lambda: attnkit.attention(q, k, v, mask=window),
    }


def timed(fn, calls: int, repeat: int) -> list[float]:
    for _ in range(calls // 10):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", default="benchmarks/results/small_calls.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 64, generator=g)
    k, v = (torch.randn(1, 8, 512, 64, generator=g) for _ in range(2))
    results = []
    with torch.no_grad():
        for name, fn in cases(q, k, v).items():
            us = timed(fn, a.calls, a.repeat)
            results.append({"case": name, "us": us})
            print(f"{name}: {statistics.median(us):.1f} us", flush=True)
    base = statistics.median(results[0]["us"])
    for r in results:
        r["ratio_to_sdpa"] = statistics.median(r["us"]) / base
    train_runs.write_record(a.json, f"python benchmarks/small_calls.py --threads {a.threads} --repeat {a.repeat} "
                            f"--json {a.json}", a.threads, repeat=a.repeat, calls=a.calls,
                            shape={"B": 1, "H": 8, "Tq": 1, "Tk": 512, "D": 64}, loadavg=os.getloadavg(),
                            results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
