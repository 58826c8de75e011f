"""Context parallelism on one machine: causal attention, forward and backward, over R gloo
processes (ring attention, zigzag layout) against one process (``attnkit.attention``, auto: the
tiled backend), B=1, H=8, D=64, float32, N=32,768 by default.

Per rank it records the peak memory (growth of the resident set over the process's size before the
inputs exist, after one small warm-up call, so the rank's shard of q, k, v and their gradients
count but not what the first call imports), the seconds of each
repeat, the bytes it sent (forward and backward, from :class:`attnkit.distributed.RingStats`)
against the analytic minimum of a ring ((R-1)/R of the full K and V forward; twice that
backward) and the share of its time spent waiting on communication. The one-process run has
all the threads (``--threads``); each of R ranks gets ``max(1, threads // R)``: on a machine with
fewer cores than ranks the ranks share them, so time here is bounded by the cores (the speed-up
a multi-GPU node gets is the compute divided over R, less the exchange the ring does not hide).

    python benchmarks/distributed.py --threads 2 --repeat 3 --json benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_runs  # noqa: E402


def _peak_since(base: int) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 - base
    return 0


def _reset_peak() -> int:
    """Restart the peak counter; the current resident set in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 8, n, 64, generator=g).requires_grad_() for _ in range(3)]


def _rank(rank: int, world: int, port: int, N: int, threads: int, repeat: int, out) -> None:
    import torch.distributed as dist

    import attnkit
    from attnkit.distributed import RingStats, ring_attention

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=3600))
    # one small call first: what the first call imports or caches is not the memory attention needs
    run_once = (lambda q, k, v: ring_attention(q, k, v, mask=attnkit.masks.causal(), layout="zigzag")) if world > 1 \
        else (lambda q, k, v: attnkit.attention(q, k, v, mask=attnkit.masks.causal()))
    small = _inputs(4 * world * 2, seed=rank)
    run_once(*small).sum().backward()
    del small
    base = _reset_peak()
    q, k, v = _inputs(N // world, seed=rank)
    seconds, stats = [], []
    for _ in range(repeat):
        st = RingStats()
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        if world > 1:
            o = ring_attention(q, k, v, mask=attnkit.masks.causal(), layout="zigzag", stats=st)
        else:
            o = attnkit.attention(q, k, v, mask=attnkit.masks.causal())
        o.backward(torch.ones_like(o))
        seconds.append(time.perf_counter() - t)
        for x in (q, k, v):
            x.grad = None
        del o
        stats.append(st)
    peak = _peak_since(base)
    last = stats[-1]
    waits = [s.wait_seconds + s.backward_wait_seconds for s in stats]
    out.put({"rank": rank, "seconds": seconds, "peak_mib": peak / 2 ** 20, "bytes_sent": last.bytes_sent,
             "backward_bytes_sent": last.backward_bytes_sent, "wait_s": waits,
             "wait_share": statistics.median(w / s for w, s in zip(waits, seconds)), "steps": last.steps})
    if world > 1:
        dist.destroy_process_group()


def run(world: int, N: int, threads: int, repeat: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    each = threads if world == 1 else max(1, threads // world)
    procs = [ctx.Process(target=_rank, args=(r, world, port, N, each, repeat, out)) for r in range(world)]
    for p in procs:
        p.start()
    ranks = sorted((out.get() for _ in range(world)), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    kv_bytes = 2 * 1 * 8 * N * 64 * 4  # the full K and V, float32
    minimum = (world - 1) / world * kv_bytes
    per_repeat = [max(r["seconds"][i] for r in ranks) for i in range(repeat)]  # a step ends with its slowest rank
    return {"world_size": world, "threads_per_rank": each, "ranks": ranks, "seconds": per_repeat,
            "peak_mib_max": max(r["peak_mib"] for r in ranks),
            "forward_bytes_over_minimum": (max(r["bytes_sent"] for r in ranks) / minimum) if world > 1 else None,
            "backward_bytes_over_minimum": (max(r["backward_bytes_sent"] for r in ranks) / (2 * minimum))
            if world > 1 else None,
            "wait_share_median": statistics.median(r["wait_share"] for r in ranks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--json", default="benchmarks/results/distributed.json")
    args = p.parse_args(argv)
    results = []
    for world in args.worlds:
        r = run(world, args.seq, args.threads, args.repeat)
        results.append(r)
        print(f"R={world}: {statistics.median(r['seconds']):.1f} s (fwd+bwd), peak per rank {r['peak_mib_max']:.0f} MiB"
              + (f", bytes/minimum fwd {r['forward_bytes_over_minimum']:.3f} bwd {r['backward_bytes_over_minimum']:.3f}, "
                 f"waiting {100 * r['wait_share_median']:.0f}% of the time" if world > 1 else ""), flush=True)
    one = next((r for r in results if r["world_size"] == 1), None)
    for r in results:
        if one is not None and r is not one:
            r["peak_over_one_process"] = r["peak_mib_max"] / one["peak_mib_max"]
            r["speedup"] = statistics.median(one["seconds"]) / statistics.median(r["seconds"])
    train_runs.write_record(args.json, f"python benchmarks/distributed.py --threads {args.threads} --repeat "
                            f"{args.repeat} --seq {args.seq} --json {args.json}", args.threads, repeat=args.repeat,
                            shape={"B": 1, "H": 8, "N": args.seq, "D": 64, "dtype": "float32", "mask": "causal"},
                            results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
