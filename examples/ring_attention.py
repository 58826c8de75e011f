"""Context parallelism: one sequence split over 2 processes, attention exact across them.

Each rank holds a zigzag shard of q, k, v; ``ring_attention`` passes the K/V shards around the
ring and merges the blocks by log-sum-exp, with the mask and the bias at *global* positions; the
backward passes dK/dV around the ring. The result (and every gradient) equals one process's
``attnkit.attention`` on the whole sequence.

Run it with ``torchrun --nproc-per-node 2 examples/ring_attention.py`` (any number of ranks that
divides the sequence into 2·R chunks), or plainly with ``python examples/ring_attention.py``,
which starts 2 gloo processes itself.
"""

import os
import socket

import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import RingStats, gather, ring_attention, shard


def main() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                                   # the same full tensors on every rank
    q, k, v = torch.randn(3, 1, 4, 96, 16, dtype=torch.float64).unbind(0)
    kw = dict(mask=attnkit.masks.causal() & attnkit.masks.sliding_window(24), bias=attnkit.positions.ALiBi(4))

    mine = [shard(x, "zigzag").requires_grad_() for x in (q, k, v)]
    stats = RingStats()
    out = ring_attention(*mine, layout="zigzag", stats=stats, **kw)
    out.square().sum().backward()                          # this rank's part of the loss
    full = gather(out.detach(), "zigzag")
    grads = [gather(x.grad, "zigzag") for x in mine]

    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = attnkit.attention(*whole, **kw)
    ref.square().sum().backward()
    diff = max([(full - ref).abs().max().item()] + [(g - w.grad).abs().max().item() for g, w in zip(grads, whole)])
    print(f"rank {rank}/{world}: computed on the K/V shards of ranks {stats.shards_computed} "
          f"({stats.tiles_computed} of {stats.tiles_total} tiles)", flush=True)
    dist.barrier()
    if rank == 0:
        print(f"output and gradients vs one process: max |diff| = {diff:.1e}")
        print("ok: ring attention equals one process" if diff < 1e-10 else "MISMATCH")


def _spawned(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        main()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:                               # started by torchrun
        dist.init_process_group("gloo")
        main()
        dist.destroy_process_group()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        torch.multiprocessing.spawn(_spawned, args=(2, free), nprocs=2)
