"""attnkit.distributed: ring and Ulysses attention over spawned gloo groups (float64, exact to
1e-10 against the single-process reference), skipping, and bad use.

The cases live in ``_cases.py``; all cases of one world size run inside ONE spawned group
(``_harness.results``), so the whole folder costs a few process start-ups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from attnkit.distributed import LAYOUTS, gather, ring_attention, shard, shard_positions, ulysses_attention
from tests.distributed import _cases
from tests.distributed._harness import check

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


CASES = [pytest.param(world, name, id=f"R{world}-{name}")
         for world in (2, 3, 4) for name, fn in _cases.CASES.items()
         if world in getattr(fn, "worlds", _cases.DEFAULT_WORLDS)]


@pytest.mark.parametrize("world,name", CASES)
def test_case_in_a_group(world, name):
    """Every case of _cases.py: ring[...] and ulysses[...] equal the single process; skip[...] checks
    the shards and bytes a rank handles; bad[...] raises on every rank; cp[...] runs the modules with
    a process group; ddp[...] trains data-parallel."""
    check(world, name)


# -- without a process group (this pytest process never initializes one) --------------------------
@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group is initialized here")
@pytest.mark.parametrize("call", [
    lambda x: ring_attention(x, x, x),
    lambda x: ulysses_attention(x, x, x),
    lambda x: shard(x, "zigzag"),
    lambda x: gather(x, "zigzag"),
], ids=["ring_attention", "ulysses_attention", "shard", "gather"])
def test_missing_process_group(call):
    with pytest.raises(RuntimeError, match="init_process_group"):
        call(torch.zeros(1, 2, 4, 4))


def test_shard_positions():
    assert shard_positions("zigzag", 12, 0, 3).tolist() == [0, 1, 10, 11]
    assert shard_positions("zigzag", 12, 2, 3).tolist() == [4, 5, 6, 7]
    assert shard_positions("contiguous", 12, 1, 3).tolist() == [4, 5, 6, 7]
    for layout in LAYOUTS:  # the shards partition the sequence
        allpos = torch.cat([shard_positions(layout, 24, r, 4) for r in range(4)])
        assert sorted(allpos.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="multiple of 6"):
        shard_positions("zigzag", 9, 0, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_positions("contiguous", 9, 0, 4)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size = 2\)"):
        shard_positions("contiguous", 8, 2, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_positions("ring", 8, 0, 2)
