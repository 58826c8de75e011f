"""Run many distributed test cases inside ONE spawned gloo group per world size.

``results(R)`` spawns ``R`` processes (``multiprocessing`` "spawn"), each joins a gloo group on
127.0.0.1 (``init_process_group(timeout=60 s)``) and runs every case of
:data:`tests.distributed._cases.CASES` that applies to ``R``, reporting each case's outcome
through a queue. The parent waits at most :data:`DEADLINE` seconds, then kills what is left, so
a hang becomes a failed test, never a stuck suite. Results are cached per ``R`` for the session.
"""

from __future__ import annotations

import datetime
import functools
import os
import queue as queue_mod
import socket
import time
import traceback

import torch.multiprocessing as mp

#: seconds a whole group may take (its cases included) before it is killed
DEADLINE = float(os.environ.get("ATTNKIT_DIST_DEADLINE", "150"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, names: list[str], out) -> None:
    try:
        import torch
        import torch.distributed as dist

        from tests.distributed import _cases

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    except BaseException:  # noqa: BLE001
        out.put((rank, "__setup__", traceback.format_exc()))
        return
    for name in names:
        try:
            _cases.CASES[name](rank, world)
            out.put((rank, name, None))
        except BaseException:  # noqa: BLE001 -- reported to the parent
            out.put((rank, name, traceback.format_exc()))
    try:
        dist.destroy_process_group()
    finally:
        out.put((rank, "__done__", None))


@functools.lru_cache(maxsize=None)
def results(world: int) -> dict:
    """``{case name: {rank: None (passed) or the traceback}}`` plus ``"__setup__"``/``"__meta__"``."""
    from tests.distributed import _cases

    names = [n for n, fn in _cases.CASES.items() if world in getattr(fn, "worlds", _cases.DEFAULT_WORLDS)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, names, out), daemon=True) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    res: dict = {n: {} for n in names}
    done = set()
    while len(done) < world and time.monotonic() - t0 < DEADLINE:
        try:
            rank, name, err = out.get(timeout=1.0)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs):
                break
            continue
        if name == "__done__":
            done.add(rank)
        elif name == "__setup__":
            res.setdefault("__setup__", {})[rank] = err
            done.add(rank)
        else:
            res.setdefault(name, {})[rank] = err
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    res["__meta__"] = {"seconds": time.monotonic() - t0, "timed_out": len(done) < world}
    return res


def check(world: int, name: str) -> None:
    """Fail with every rank's traceback unless case ``name`` passed on every rank of the ``world`` group."""
    import pytest

    res = results(world)
    if res.get("__setup__"):
        pytest.fail(f"group of {world} failed to start:\n" + "\n".join(str(e) for e in res["__setup__"].values()))
    got = res.get(name, {})
    missing = [r for r in range(world) if r not in got]
    if missing:
        meta = res["__meta__"]
        pytest.fail(f"case {name!r}: no result from rank(s) {missing} (group ran {meta['seconds']:.0f} s, "
                    f"timed out: {meta['timed_out']}; a hang or a crash in this case or an earlier one)")
    errors = {r: e for r, e in got.items() if e is not None}
    if errors:
        pytest.fail(f"case {name!r} failed with R = {world}:\n" + "\n".join(f"--- rank {r}:\n{e}" for r, e in
                                                                          sorted(errors.items())))
