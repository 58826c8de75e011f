r"""How a sequence is split across the ranks of a group (context parallelism).

Two layouts, for a sequence of ``N`` positions over ``R`` ranks (each rank holds ``n = N / R``):

* ``"contiguous"``: rank ``r`` holds positions ``[r·n, (r+1)·n)``.
* ``"zigzag"``: the sequence is cut into ``2R`` chunks of ``c = N / (2R)``; rank ``r`` holds
  chunks ``r`` and ``2R-1-r``, concatenated. With a causal mask every rank then has the same
  amount of work (an early chunk, which sees few keys, paired with a late one, which sees many).

For ``N = 8``, ``R = 2``::

    contiguous   rank 0: 0 1 2 3        rank 1: 4 5 6 7
    zigzag       rank 0: 0 1 | 6 7      rank 1: 2 3 | 4 5

:func:`shard_positions` gives a rank's global positions, :func:`shard` cuts a full tensor into
this rank's shard and :func:`gather` puts the shards back together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._group import agree, dtype_code, dtype_name, group_info

Tensor = torch.Tensor

#: the sequence layouts, the default first
LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: object, fn: str) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}; got {layout!r}")
    return layout


def _check_split(layout: str, seq_len: int, world_size: int, fn: str, what: str = "sequence") -> int:
    """The shard length ``n = seq_len / world_size``, or a ``ValueError`` saying why the split fails."""
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seq_len % parts:
        lo, hi = (seq_len // parts) * parts, -(-seq_len // parts) * parts
        cut = (f"cuts the {what} into 2·R = {parts} chunks" if layout == "zigzag"
               else f"cuts the {what} into R = {parts} equal shards")
        raise ValueError(
            f"{fn}: layout {layout!r} over R = {world_size} ranks {cut}, so its length must be a multiple of "
            f"{parts}; got {seq_len}. Pad it to {hi} (masking the padding with attnkit.masks.key_padding) or "
            f"cut it to {lo}" + ("; layout='contiguous' needs a multiple of R only" if layout == "zigzag" else ""))
    return seq_len // world_size


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive global positions held by one rank: ``length`` positions starting at
    ``start`` in the global sequence and at ``local`` in the rank's shard."""

    local: int
    length: int
    start: int


def shard_chunks(layout: str, shard_len: int, rank: int, world_size: int) -> tuple[Chunk, ...]:
    """The chunks of rank ``rank``'s shard of ``shard_len`` positions (one for ``"contiguous"``, two
    for ``"zigzag"``, which needs an even ``shard_len``)."""
    if layout == "contiguous":
        return (Chunk(0, shard_len, rank * shard_len),)
    c = shard_len // 2
    return Chunk(0, c, rank * c), Chunk(c, c, (2 * world_size - 1 - rank) * c)


def shard_positions(layout: str, seq_len: int, rank: int, world_size: int, device=None) -> Tensor:
    """Global positions held by ``rank`` of ``world_size`` when a sequence of ``seq_len`` positions
    is split in ``layout``: an int64 tensor ``(seq_len / world_size,)``, in the shard's order.

    Raises ``ValueError`` when ``seq_len`` cannot be split (``"contiguous"`` needs a multiple of
    ``world_size``, ``"zigzag"`` of ``2·world_size``) or ``rank`` is out of range.

    Example::

        >>> from attnkit.distributed import shard_positions
        >>> shard_positions("zigzag", 8, 0, 2).tolist(), shard_positions("zigzag", 8, 1, 2).tolist()
        ([0, 1, 6, 7], [2, 3, 4, 5])
        >>> shard_positions("contiguous", 6, 2, 3).tolist()
        [4, 5]
    """
    fn = "shard_positions"
    layout = check_layout(layout, fn)
    for name, x in (("seq_len", seq_len), ("rank", rank), ("world_size", world_size)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{fn}: {name} must be an int; got {type(x).__name__}")
    if world_size < 1:
        raise ValueError(f"{fn}: world_size must be >= 1; got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{fn}: rank must lie in [0, world_size = {world_size}); got {rank}")
    if seq_len < 0:
        raise ValueError(f"{fn}: seq_len must be >= 0; got {seq_len}")
    n = _check_split(layout, seq_len, world_size, fn)
    return torch.cat([torch.arange(c.start, c.start + c.length, device=device)
                      for c in shard_chunks(layout, n, rank, world_size)])


def _dim(x: Tensor, dim: int, fn: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int; got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}: dim must lie in [{-x.dim()}, {x.dim()}) for a tensor of shape "
                         f"{tuple(x.shape)}; got {dim}")
    return dim % x.dim()


def shard(x: Tensor, layout: str, group=None, dim: int = -2) -> Tensor:
    """This rank's shard of the full-sequence tensor ``x`` (every rank passes the same ``x``).

    No communication: the group only says which rank this is and how many there are. The result
    is a new tensor (not a view) with ``x.shape[dim] / R`` positions along ``dim``, in the order of
    :func:`shard_positions`; it is differentiable with respect to ``x``.

    Args:
        x: the full tensor, e.g. ``(B, H, N, D)`` with the sequence at ``dim = -2``.
        layout: ``"zigzag"`` or ``"contiguous"`` (see :mod:`attnkit.distributed.layout`).
        group: a ``torch.distributed`` process group; None for the default one.
        dim: the sequence dimension.

    Raises:
        ValueError: ``x.shape[dim]`` is not a multiple of ``R`` (contiguous) or ``2R`` (zigzag).
        RuntimeError: torch.distributed is not initialized.

    Example (on every rank of an initialized group of 2)::

        x = torch.arange(8.0).view(1, 1, 8, 1)
        shard(x, "zigzag").flatten().tolist()      # rank 0: [0, 1, 6, 7]; rank 1: [2, 3, 4, 5]
    """
    fn = "shard"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor; got {type(x).__name__}")
    layout = check_layout(layout, fn)
    d = _dim(x, dim, fn)
    info = group_info(group, fn)
    n = _check_split(layout, x.shape[d], info.world_size, fn)
    return torch.cat([x.narrow(d, c.start, c.length) for c in shard_chunks(layout, n, info.rank, info.world_size)],
                     dim=d)


def gather(x: Tensor, layout: str, group=None, dim: int = -2) -> Tensor:
    """The full sequence from every rank's shard ``x`` (the inverse of :func:`shard`): one
    ``all_gather``, then the shards put back in global order along ``dim``. Every rank gets the
    whole tensor, ``R`` times ``x.shape[dim]`` long.

    Every rank must pass a shard of the same shape and dtype: otherwise every rank raises a
    ``ValueError`` listing the shapes (no rank is left waiting). The result is differentiable:
    the backward sums the ranks' gradients of the full tensor (one ``all_reduce``) and returns
    each rank its own positions, so a loss every rank computes on the gathered tensor trains the
    shards (every rank must then call backward).

    Example (on every rank of an initialized group)::

        full = gather(shard(x, "zigzag"), "zigzag")   # == x
    """
    fn = "gather"
    info = group_info(group, fn)
    error, shape = None, ()
    try:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: x must be a torch.Tensor; got {type(x).__name__}")
        layout = check_layout(layout, fn)
        d = _dim(x, dim, fn)
        if x.dim() > 8:
            raise ValueError(f"{fn}: x may have at most 8 dims; got shape {tuple(x.shape)}")
        if layout == "zigzag" and x.shape[d] % 2:
            raise ValueError(f"{fn}: a zigzag shard holds two chunks of equal length, so its length along dim "
                             f"{dim} must be even; got shape {tuple(x.shape)}")
        shape = tuple(x.shape)
    except (TypeError, ValueError) as e:
        error = e
    agree(info, fn, [len(shape), *shape, *([0] * (8 - len(shape))), dim_code(x, dim, error),
                     dtype_code(x.dtype) if error is None else 0], error=error,
          describe=lambda s: f"shape {tuple(s[1:1 + s[0]])}, dim {s[9]}, dtype {dtype_name(s[10])}",
          what="shards of the same shape and dtype along the same dim")
    return _Gather.apply(x, layout, info, d)


def _assemble(x: Tensor, layout: str, info, d: int) -> Tensor:
    """All shards of ``x`` (one ``all_gather``) put back in global order along ``d``."""
    import torch.distributed as dist

    x = x.contiguous()
    if info.world_size == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x, group=info.group)
    n = x.shape[d]
    out_shape = list(x.shape)
    out_shape[d] = n * info.world_size
    out = x.new_empty(out_shape)
    for r, part in enumerate(parts):
        for c in shard_chunks(layout, n, r, info.world_size):
            out.narrow(d, c.start, c.length).copy_(part.narrow(d, c.local, c.length))
    return out


class _Gather(torch.autograd.Function):
    """:func:`gather` with a backward: every rank's gradient of the full tensor is summed over the
    ranks (one ``all_reduce``) and each rank keeps its own shard's positions, as
    ``torch.distributed.nn.functional.all_gather`` does: a loss that every rank computes on the
    gathered tensor sends each shard the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x, layout, info, d):
        ctx.layout, ctx.info, ctx.d, ctx.n = layout, info, d, x.shape[d]
        return _assemble(x.detach(), layout, info, d)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        g = grad.contiguous().clone()
        info = ctx.info
        if info.world_size > 1:
            dist.all_reduce(g, group=info.group)
        parts = [g.narrow(ctx.d, c.start, c.length)
                 for c in shard_chunks(ctx.layout, ctx.n, info.rank, info.world_size)]
        return torch.cat(parts, dim=ctx.d), None, None, None


def dim_code(x, dim, error) -> int:
    if error is not None:
        return 0
    return dim % x.dim()
