"""Process-group plumbing shared by the context-parallel functions: which rank this is, the
global ranks of its ring neighbours, and one small ``all_gather`` that makes every rank agree on
the request (shapes, dtype, layout) before any point-to-point traffic, so that a rank with bad
arguments makes *every* rank raise instead of leaving the others waiting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

Tensor = torch.Tensor

#: dtypes as small integers for the metadata exchange
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the metadata row every rank contributes (padded with zeros; the first entry is the ok flag)
_META_LEN = 24


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def dtype_name(code: int) -> str:
    return str(_DTYPES[code - 1]).replace("torch.", "") if 0 < code <= len(_DTYPES) else "other"


@dataclass(frozen=True)
class GroupInfo:
    """This rank's place in ``group``: ``rank`` and ``world_size`` inside the group, and the global
    rank of every member (point-to-point calls take global ranks)."""

    group: object
    rank: int
    world_size: int
    global_ranks: tuple[int, ...]
    backend: str

    def peer(self, group_rank: int) -> int:
        """Global rank of the member ``group_rank`` (taken modulo the world size)."""
        return self.global_ranks[group_rank % self.world_size]


def group_info(group, fn: str) -> GroupInfo:
    """Resolve ``group`` (None = the default group) or raise a clear error: torch.distributed
    missing or not initialized (``RuntimeError``), ``group`` not a process group (``TypeError``), this
    process not a member of it (``ValueError``)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{fn} needs torch.distributed, which this build of torch does not have "
                           "(torch.distributed.is_available() is False)")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{fn} needs an initialized torch.distributed process group; none is: call "
            "torch.distributed.init_process_group(backend='gloo' (CPU) or 'nccl' (CUDA), ...) on every rank "
            "first (torchrun sets the rank and world size), then pass group=None for the default group or "
            "group=<a torch.distributed.ProcessGroup>")
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a member of the group "
                         "it was given; call it only on the group's ranks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{fn}: group must be None (the default group) or a torch.distributed.ProcessGroup; "
                        f"got {type(group).__name__}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a member of the group "
                         "it was given; call it only on the group's ranks")
    if group is dist.group.WORLD:
        ranks = tuple(range(world))
    else:
        ranks = tuple(dist.get_global_rank(group, r) for r in range(world))
    return GroupInfo(group, rank, world, ranks, str(dist.get_backend(group)))


def _meta_device(info: GroupInfo) -> torch.device:
    if info.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(info: GroupInfo, fn: str, shared: Sequence[int], own: Sequence[int] = (),
          error: Optional[BaseException] = None,
          describe: Optional[Callable[[Sequence[int]], str]] = None,
          what: str = "the same shapes") -> list[list[int]]:
    """One ``all_gather`` of every rank's metadata, then the same verdict on every rank.

    ``shared`` must be equal on every rank (shapes, dtype, layout); ``own`` may differ (returned
    for the caller, one list per rank). A rank that hit ``error`` while checking its arguments
    re-raises it after the exchange; the others raise a ``ValueError`` naming it. Ranks whose
    ``shared`` rows differ all raise a ``ValueError`` listing every rank's row (through
    ``describe``). Never hangs on a mismatch: the exchange has a fixed size."""
    import torch.distributed as dist

    shared, own = [int(x) for x in shared], [int(x) for x in own]
    if error is not None:
        shared, own = [0] * len(shared), [0] * len(own)
    row = [0 if error is not None else 1, len(shared), *shared, *own]
    if len(row) > _META_LEN:
        raise AssertionError("metadata row too long")  # pragma: no cover -- a programming error
    row += [0] * (_META_LEN - len(row))
    if info.world_size == 1:
        rows = [row]
    else:
        mine = torch.tensor(row, dtype=torch.int64, device=_meta_device(info))
        bufs = [torch.empty_like(mine) for _ in range(info.world_size)]
        dist.all_gather(bufs, mine, group=info.group)
        rows = [b.tolist() for b in bufs]
    bad = [r for r, x in enumerate(rows) if x[0] == 0]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"{fn}: rank(s) {bad} of the group rejected their arguments (see the error raised "
                         f"there); this rank ({info.rank}) stops too rather than wait for them")
    n = len(shared)
    shared_rows = [x[2:2 + n] for x in rows]
    if any(s != shared_rows[0] for s in shared_rows[1:]):
        text = "; ".join(f"rank {r}: {describe(s) if describe else s}" for r, s in enumerate(shared_rows))
        raise ValueError(f"{fn}: every rank must pass {what}; the ranks disagree: {text}")
    return [x[2 + n:2 + n + len(own)] for x in rows]


def check_4d(fn: str, **tensors) -> None:
    """Each of ``tensors`` (q, k, v) is a 4-D tensor ``(B, heads, shard length, dim)``."""
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            what = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{fn}: {name} must be a 4-D tensor (B, heads, shard length, dim); got {what}")
