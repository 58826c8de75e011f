"""Data parallelism for attnkit's training loop: every rank holds the whole model, each global
batch is split over the ranks by rows, and after each backward the ranks' gradients are summed
with one ``all_reduce`` (what ``DistributedDataParallel`` does; done here on the gradients that
:func:`attnkit.training.fit`'s step produced, so a task's step closure needs no wrapped model).

Each rank's loss is weighted by its share of the global batch (its rows, or the count the step
returns with its loss, e.g. its non-padding tokens) before the backward, so the summed gradient is
the gradient of the global batch's mean loss: R ranks train as one process on the same global
batch does, up to float rounding, and a checkpoint resumes with any number of ranks.

Under ``torchrun`` the command line calls :func:`init_from_env` (gloo on CPU, NCCL on CUDA).
Rank 0 alone logs, shows progress, evaluates and writes checkpoints.

Example (two gloo processes on one machine; ``torchrun --nproc-per-node 2 -m attnkit train dates``
does the same for a task)::

    >>> import torch
    >>> from attnkit.distributed.data_parallel import split_batch
    >>> x, y = torch.arange(10).view(5, 2), torch.arange(5)
    >>> part, rows = split_batch((x, y), rank=1, world_size=2)
    >>> part[1].tolist(), rows
    ([3, 4], 2)
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def active() -> bool:
    """Whether a process group of more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0, or no process group: the process that logs and writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...): gloo for CPU devices, NCCL for CUDA (each rank on
    ``cuda:LOCAL_RANK``). Returns whether a group of more than one rank is now active; without
    ``torchrun`` (no ``WORLD_SIZE``, or 1) it does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 asks for several processes, but this torch build has no torch.distributed")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return active()


def _rows(B: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous rows ``[start, stop)`` of ``B``: the first ``B mod R`` ranks get one more."""
    base, extra = divmod(B, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def split_batch(batch: Any, rank: int, world_size: int) -> tuple[Any, int]:
    """``(part, rows)``: rank ``rank``'s contiguous share of a batch's rows and how many rows it
    got (the first ``B mod R`` ranks get one more). Tensors (in tuples, lists and dicts, nested)
    are split along their first dimension, which must be the same batch size ``B`` for all of
    them; other values are kept whole. A flat list holding no tensor (e.g. the examples'
    indices) is itself split.

    Raises:
        ValueError: the batch's tensors disagree on their first dimension (e.g. questions and the
            images they point into): such a batch cannot be split by rows.
    """
    sizes: set[int] = set()

    def visit(x):
        if isinstance(x, Tensor) and x.dim() > 0:
            sizes.add(x.shape[0])
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(batch)
    if not sizes and isinstance(batch, (list, tuple)) and not any(isinstance(x, (list, tuple, dict)) for x in batch):
        start, stop = _rows(len(batch), rank, world_size)  # a flat list of examples (e.g. their indices)
        return batch[start:stop], stop - start
    if len(sizes) != 1:
        raise ValueError(f"cannot split this batch over {world_size} ranks by rows: its tensors have first "
                         f"dimensions {sorted(sizes) or 'none'} (one batch size expected)")
    start, stop = _rows(sizes.pop(), rank, world_size)

    def cut(x):
        if isinstance(x, Tensor) and x.dim() > 0:
            return x[start:stop]
        if isinstance(x, tuple):
            return tuple(cut(y) for y in x)
        if isinstance(x, list):
            return [cut(y) for y in x]
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return cut(batch), stop - start


def all_sum(values: Iterable[float], device=None) -> list[float]:
    """The sums over ranks of a few numbers (one ``all_reduce``)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if active():
        dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the ranks' gradients in place, flattened into one buffer per dtype (one ``all_reduce``
    each). A parameter some rank has a gradient for gets one on every rank (zeros where the rank
    had none, e.g. a rank whose share of the batch was empty); one no rank has one for keeps None."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    device = params[0].device if params else None
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(had)
    groups: dict[torch.dtype, list[Tensor]] = {}
    for p, h in zip(params, had.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the ranks start from the same model)."""
    if not active():
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


__all__ = ["active", "is_main", "init_from_env", "split_batch", "all_sum", "sum_gradients", "broadcast_parameters"]
