"""Small calls: one decoding step (one query against a cache of keys), where the per-call cost of
``attnkit.attention`` (checks, the NaN policy, the backend choice, the mask) is what counts, not
the arithmetic. attnkit and SDPA in the same run, B=1, H=8, D=64, Tk=512, float32, no grad.

Each case: the median over ``--repeat`` repeats of the mean time of ``--calls`` calls, in
microseconds, with the spread; the ratio is against SDPA without a mask in the same run (for the
growing cases, SDPA over the same calls). The growing cases are a decoding loop's: a call per
layer at each step, one key more at the next step, so the request is new at each step's first
call (``attnkit.request_cache`` plans it) and the other layers reuse its plan.

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
from attnkit import masks, nonfinite  # noqa: E402


#: the growing-cache case: one step is LAYERS calls at one length, the next step one key longer;
#: LENGTHS distinct lengths in turn, more than attnkit.request_cache.MAX_ENTRIES, so that every
#: step's first call plans its request afresh (as a decoding loop whose cache grows does)
LAYERS, LENGTHS = 12, 300


def growing(q, k, v, call):
    """A call per layer at each step, the length growing by one key per step (the keys of each
    length kept as their own tensors, as a model's per-layer caches are, not re-sliced)."""
    Tk = k.shape[2]
    caches = [(k[:, :, :n].clone(), v[:, :, :n].clone()) for n in range(Tk - LENGTHS + 1, Tk + 1)]
    for kk, vv in caches:  # checked once, as attnkit.nn.KVCache checks each piece it appends
        nonfinite.inputs_finite(q, kk, vv)
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = i + 1
        kk, vv = caches[(i // LAYERS) % LENGTHS]
        return call(q, kk, vv)

    return step


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
        GROWING_SDPA: growing(q, k, v, F.scaled_dot_product_attention),
        f"attnkit, masks.causal(), {LAYERS} layers per step, a new length each step":
            growing(q, k, v, lambda q, k, v: attnkit.attention(q, k, v, mask=masks.causal())),
    }


GROWING_SDPA = f"SDPA, no mask, {LAYERS} layers per step, a new length each step (Tk {512 - LENGTHS + 1}-512)"


def anchor(case: str) -> str:
    """The SDPA case a case is compared with: the growing one for the growing cases."""
    return GROWING_SDPA if "a new length each step" in case else "SDPA, no mask"


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
    by_case = {r["case"]: statistics.median(r["us"]) for r in results}
    for r in results:
        r["anchor"] = anchor(r["case"])
        r["ratio_to_sdpa"] = by_case[r["case"]] / by_case[r["anchor"]]
    train_runs.write_record(a.json, f"python benchmarks/small_calls.py --threads {a.threads} --repeat {a.repeat} "
                            f"--json {a.json}", a.threads, repeat=a.repeat, calls=a.calls,
                            shape={"B": 1, "H": 8, "Tq": 1, "Tk": 512, "D": 64}, loadavg=os.getloadavg(),
                            results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
