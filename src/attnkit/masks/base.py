"""Masks as position predicates.

A mask says which (query, key) pairs may interact. Every mask has three views:

* ``mask_mod(b, h, q_idx, kv_idx, num_queries, num_keys) -> bool tensor``: the predicate,
  evaluated on broadcastable integer index tensors (``True`` = may attend, the SDPA convention);
* ``materialize(num_queries, num_keys, batch, heads)``: a dense boolean tensor for the reference
  backend and for tests;
* ``classify_blocks(...)``: EMPTY / PARTIAL / FULL per (query block, key block) tile, for tiled
  kernels that skip empty tiles and skip mask evaluation on full ones.

``bind(num_queries, num_keys)`` returns a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)``.
Masks combine with ``&``, ``|`` and ``~``.

Alignment: when ``num_queries != num_keys`` position-based masks align *bottom-right* by
default -- query ``i`` sits at absolute position ``i + num_keys - num_queries`` so the last query
sees the last key, as KV-cache decoding needs. ``align="top_left"`` puts query ``i`` at ``i``::

    causal, Tq=2, Tk=4     bottom_right      top_left
                           q0: x x x .       q0: x . . .
                           q1: x x x x       q1: x x . .
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._checks import broadcastable, check_arity, shape_str

Tensor = torch.Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
_PLAIN = (int, float, str, bool)  # attribute types a mask's cache_key takes as they are
ALIGNMENTS = ("bottom_right", "top_left")


def index_grid(batch: int, heads: int, num_queries: int, num_keys: int, device=None):
    """Broadcastable index tensors ``b (B,1,1,1), h (1,H,1,1), q (1,1,Tq,1), kv (1,1,1,Tk)``."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    q = torch.arange(num_queries, device=device).view(1, 1, num_queries, 1)
    kv = torch.arange(num_keys, device=device).view(1, 1, 1, num_keys)
    return b, h, q, kv


def check_align(align: "str | int") -> "str | int":
    """``"bottom_right"``, ``"top_left"`` or an int: the position of query 0 among the keys
    (``0`` is top-left; a cache holding ``n`` keys before ``Tq`` new ones is ``n``)."""
    if isinstance(align, int) and not isinstance(align, bool):
        return align
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS} or an int (the position of query 0 among the keys); "
                         f"got {align!r}")
    return align


def query_offset(align: "str | int", num_queries: int, num_keys: int) -> int:
    """Absolute position of query 0 (``num_keys - num_queries`` when aligned bottom-right, the
    int itself for an explicit offset)."""
    if isinstance(align, int):
        return align
    return num_keys - num_queries if align == "bottom_right" else 0


class Mask:
    """Base class of every mask. Subclasses implement :meth:`mask_mod`.

    Subclasses may also override :meth:`classify_blocks` with an analytic version (so the tiled
    backend skips empty tiles without evaluating them), set ``query_invariant`` when the
    predicate ignores ``q_idx``, and implement :meth:`weight_factor` when the mask also rescales
    the normalized weights (Luong local-p). (SDPA's native ``is_causal`` is used for
    :func:`attnkit.masks.causal` itself only, not for subclasses that say they are causal.)
    """

    #: True when the mask multiplies the normalized weights by :meth:`weight_factor`.
    has_weight_factor: bool = False
    #: True when the predicate ignores ``q_idx`` (key padding): materialized, it is one row per
    #: (batch, head) broadcast over the queries, not a dense (Tq, Tk) tensor.
    query_invariant: bool = False
    #: True when, for given sizes, the predicate depends on ``q_idx`` and ``kv_idx`` only through
    #: ``q_idx - kv_idx`` (causal, windows): every tile on one diagonal has the same mask, so the
    #: tiled engine builds it once for all of them.
    translation_invariant: bool = False

    # -- the predicate -------------------------------------------------------------------
    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
                 num_queries: int, num_keys: int) -> Tensor:
        raise NotImplementedError

    def weight_factor(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
                      num_queries: int, num_keys: int) -> Optional[Tensor]:
        """Multiplier applied to the weights *after* normalization (None: no reweighting)."""
        return None

    def check(self, batch: int, heads: int, num_queries: int, num_keys: int) -> None:
        """Raise ``ValueError`` when the mask cannot apply to inputs of these sizes."""

    def sees_every_key(self, num_queries: int, num_keys: int) -> bool:
        """True when, from its parameters alone, every query sees every key at these sizes (a
        causal mask for one query at the end of a decoding cache): ``attnkit.attention`` then drops
        the mask. False when unsure (the default)."""
        return False

    def key_range(self, num_queries: int, num_keys: int) -> tuple[int, int] | None:
        """``(lo, hi)`` when, from its parameters alone, every query sees exactly the keys
        ``lo <= j < hi`` at these sizes (a window for one query at the end of a decoding cache):
        a dense kernel then reads that slice of the keys without a mask. None when unsure (the
        default) or when a query would see no key."""
        return None

    def cache_key(self) -> Optional[tuple]:
        """A hashable value equal for two masks with the same predicate: the class and every
        attribute, when each is a plain value (int, float, str, bool, None) or a mask with a key
        itself. None when the mask holds anything else (a tensor, a callable): such a mask is
        never served from a cache keyed by parameters (``attnkit.attention``'s request cache)."""
        items = []
        for name, value in vars(self).items():
            if isinstance(value, Mask):
                value = value.cache_key()
                if value is None:
                    return None
            elif not (value is None or type(value) in _PLAIN):
                return None
            items.append((name, value))
        return (type(self), tuple(items))

    # -- views -----------------------------------------------------------------------------
    def bind(self, num_queries: int, num_keys: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` for these sequence lengths."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.mask_mod(b, h, q_idx, kv_idx, num_queries, num_keys)

        return mask_mod

    def materialize(self, num_queries: int, num_keys: int, batch: int = 1, heads: int = 1,
                    device=None) -> Tensor:
        """Dense boolean mask of shape ``(B', H', Tq, Tk)``; ``B'``/``H'`` are 1 when the mask
        does not depend on the batch/head index. ``True`` = may attend."""
        self.check(batch, heads, num_queries, num_keys)
        grid = index_grid(batch, heads, num_queries, num_keys, device)
        m = torch.as_tensor(self.mask_mod(*grid, num_queries, num_keys), device=device)
        if m.dtype != torch.bool:
            raise TypeError(f"{type(self).__name__}.mask_mod must return a bool tensor; got {m.dtype}")
        return _to_4d(m, num_queries, num_keys)

    def materialize_factor(self, num_queries: int, num_keys: int, batch: int = 1, heads: int = 1,
                           device=None, dtype=None) -> Optional[Tensor]:
        """Dense post-normalization multiplier ``(B', H', Tq, Tk)``, or None."""
        if not self.has_weight_factor:
            return None
        grid = index_grid(batch, heads, num_queries, num_keys, device)
        f = self.weight_factor(*grid, num_queries, num_keys)
        return None if f is None else _to_4d(f.to(device=device, dtype=dtype), num_queries, num_keys)

    def classify_blocks(self, num_queries: int, num_keys: int, block_q: int, block_k: int,
                        batch: int = 1, heads: int = 1, device=None) -> Tensor:
        """Per-tile class ``(B', H', ceil(Tq/block_q), ceil(Tk/block_k))`` int8 tensor with values
        :data:`EMPTY` (no pair may attend), :data:`PARTIAL` or :data:`FULL` (every pair may).

        The default evaluates the predicate one stripe of ``block_q`` queries at a time, so memory
        stays ``O(block_q * Tk)`` whatever the sequence length; subclasses may override it with
        closed forms. Out-of-range positions of the last, ragged tiles are ignored.
        """
        self.check(batch, heads, num_queries, num_keys)
        b, h, _, kv = index_grid(batch, heads, num_queries, num_keys, device)
        stripes = []
        for start in range(0, num_queries, block_q):
            q = torch.arange(start, min(start + block_q, num_queries), device=device).view(1, 1, -1, 1)
            m = torch.as_tensor(self.mask_mod(b, h, q, kv, num_queries, num_keys), device=device)
            stripes.append(classify_dense(_to_4d(m, q.shape[2], num_keys), block_q, block_k))
        lead = (max(s.shape[0] for s in stripes), max(s.shape[1] for s in stripes))
        return torch.cat([s.expand(*lead, *s.shape[2:]) for s in stripes], dim=2)

    # -- combinators -------------------------------------------------------------------------
    def __and__(self, other) -> "Mask":
        return And(self, as_mask(other))

    def __rand__(self, other) -> "Mask":
        return And(as_mask(other), self)

    def __or__(self, other) -> "Mask":
        return Or(self, as_mask(other))

    def __ror__(self, other) -> "Mask":
        return Or(as_mask(other), self)

    def __invert__(self) -> "Mask":
        return Not(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_")
                           and not isinstance(v, torch.Tensor))
        return f"{type(self).__name__}({fields})"


def tensor_versions(mask: "Mask") -> tuple:
    """``(id, version)`` of every tensor a mask holds (through ``And``/``Or``/``Not`` too): part of
    the key of caches built from a mask (block tables, flex's block masks), so that a tensor
    changed in place (a ``lengths`` tensor refilled for the next batch) is never served stale."""
    out = []
    for value in vars(mask).values():
        if isinstance(value, Tensor):
            out.append((id(value), value._version))
        elif isinstance(value, Mask):
            out.extend(tensor_versions(value))
    return tuple(out)


def _to_4d(m: Tensor, num_queries: int, num_keys: int) -> Tensor:
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.expand(m.shape[0], m.shape[1], num_queries, num_keys)


def classify_dense(m: Tensor, block_q: int, block_k: int) -> Tensor:
    """Classify a dense boolean mask ``(..., Tq, Tk)`` into tiles (see :meth:`Mask.classify_blocks`)."""
    *lead, tq, tk = m.shape
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    pad_q, pad_k = nq * block_q - tq, nk * block_k - tk
    # Padding counts as "may attend" for FULL and as "may not" for EMPTY: ragged edges never
    # decide a tile's class.
    anyp = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=False)
    allp = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=True)
    anyp = anyp.reshape(*lead, nq, block_q, nk, block_k).any(-1).any(-2)
    allp = allp.reshape(*lead, nq, block_q, nk, block_k).all(-1).all(-2)
    out = torch.full(anyp.shape, PARTIAL, dtype=torch.int8, device=m.device)
    out[~anyp] = EMPTY
    out[allp] = FULL
    return out


def tile_bounds(num: int, block: int, device=None) -> tuple[Tensor, Tensor]:
    """First and last (inclusive, clipped to ``num``) index of each tile: ``(n,)``, ``(n,)``."""
    start = torch.arange(0, num, block, device=device)
    return start, torch.clamp(start + block, max=num) - 1


def classes_from(full: Tensor, empty: Tensor) -> Tensor:
    """Tile classes from boolean FULL / EMPTY tensors of one shape."""
    out = torch.full(full.shape, PARTIAL, dtype=torch.int8, device=full.device)
    out[empty] = EMPTY
    out[full] = FULL
    return _lead4(out)


def _lead4(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def refine_tiles(mask: "Mask", cls: Tensor, ambiguous: Tensor, num_queries: int, num_keys: int, block_q: int,
                 block_k: int, batch: int, heads: int, device=None) -> Tensor:
    """Evaluate ``mask`` exactly on the tiles flagged ``ambiguous`` (same shape as ``cls``) and write
    their true class into ``cls``. Cost follows the number of ambiguous tiles, not ``Tq * Tk``."""
    B_, H_ = cls.shape[:2]
    for i, j in torch.nonzero(ambiguous.any(1).any(0)).tolist():
        qs, ks = i * block_q, j * block_k
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        q = torch.arange(qs, min(qs + block_q, num_queries), device=device).view(1, 1, -1, 1)
        kv = torch.arange(ks, min(ks + block_k, num_keys), device=device).view(1, 1, 1, -1)
        m = torch.as_tensor(mask.mask_mod(b, h, q, kv, num_queries, num_keys), device=device)
        m = _lead4(m).expand(-1, -1, q.shape[2], kv.shape[3])
        anyp, allp = m.any(-1).any(-1), m.all(-1).all(-1)  # (B'', H'')
        true = torch.where(allp, FULL, torch.where(anyp, PARTIAL, EMPTY)).to(torch.int8)
        true = true.expand(B_, H_) if true.shape != (B_, H_) else true
        sel = ambiguous[:, :, i, j]
        cls[:, :, i, j] = torch.where(sel, true, cls[:, :, i, j])
    return cls


def _broadcast_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]), *a.shape[2:])
    return a.expand(shape).clone(), b.expand(shape)


class And(Mask):
    """Both masks allow the pair. Weight factors (local-p) multiply."""

    def __init__(self, left: Mask, right: Mask):
        self.left, self.right = left, right
        self.has_weight_factor = left.has_weight_factor or right.has_weight_factor
        self.query_invariant = left.query_invariant and right.query_invariant
        self.translation_invariant = left.translation_invariant and right.translation_invariant

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        return (self.left.mask_mod(b, h, q_idx, kv_idx, num_queries, num_keys)
                & self.right.mask_mod(b, h, q_idx, kv_idx, num_queries, num_keys))

    def weight_factor(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        fs = [m.weight_factor(b, h, q_idx, kv_idx, num_queries, num_keys) for m in (self.left, self.right)]
        fs = [f for f in fs if f is not None]
        if not fs:
            return None
        return fs[0] if len(fs) == 1 else fs[0] * fs[1]

    def check(self, batch, heads, num_queries, num_keys):
        self.left.check(batch, heads, num_queries, num_keys)
        self.right.check(batch, heads, num_queries, num_keys)

    def sees_every_key(self, num_queries, num_keys):
        return self.left.sees_every_key(num_queries, num_keys) and self.right.sees_every_key(num_queries, num_keys)

    def key_range(self, num_queries, num_keys):
        spans = [m.key_range(num_queries, num_keys) if not m.sees_every_key(num_queries, num_keys) else (0, num_keys)
                 for m in (self.left, self.right)]
        if any(s is None for s in spans):
            return None
        lo, hi = max(spans[0][0], spans[1][0]), min(spans[0][1], spans[1][1])
        return (lo, hi) if lo < hi else None

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        args = (num_queries, num_keys, block_q, block_k, batch, heads, device)
        a, b = _broadcast_pair(self.left.classify_blocks(*args), self.right.classify_blocks(*args))
        cls = torch.where((a == EMPTY) | (b == EMPTY), EMPTY, torch.where((a == FULL) & (b == FULL), FULL, PARTIAL))
        cls = cls.to(torch.int8)
        # FULL & PARTIAL is the PARTIAL side, exactly; PARTIAL & PARTIAL may be anything
        return refine_tiles(self, cls, (a == PARTIAL) & (b == PARTIAL), *args)

    def __repr__(self):
        return f"({self.left!r} & {self.right!r})"


class Or(Mask):
    """Either mask allows the pair."""

    def __init__(self, left: Mask, right: Mask):
        if left.has_weight_factor or right.has_weight_factor:
            raise ValueError("masks with a weight factor (local_p) can only be combined with '&'")
        self.left, self.right = left, right
        self.query_invariant = left.query_invariant and right.query_invariant
        self.translation_invariant = left.translation_invariant and right.translation_invariant

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        return (self.left.mask_mod(b, h, q_idx, kv_idx, num_queries, num_keys)
                | self.right.mask_mod(b, h, q_idx, kv_idx, num_queries, num_keys))

    def check(self, batch, heads, num_queries, num_keys):
        self.left.check(batch, heads, num_queries, num_keys)
        self.right.check(batch, heads, num_queries, num_keys)

    def sees_every_key(self, num_queries, num_keys):
        return self.left.sees_every_key(num_queries, num_keys) or self.right.sees_every_key(num_queries, num_keys)

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        args = (num_queries, num_keys, block_q, block_k, batch, heads, device)
        a, b = _broadcast_pair(self.left.classify_blocks(*args), self.right.classify_blocks(*args))
        cls = torch.where((a == FULL) | (b == FULL), FULL, torch.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL))
        return refine_tiles(self, cls.to(torch.int8), (a == PARTIAL) & (b == PARTIAL), *args)

    def __repr__(self):
        return f"({self.left!r} | {self.right!r})"


class Not(Mask):
    """The pairs the inner mask forbids."""

    def __init__(self, inner: Mask):
        if inner.has_weight_factor:
            raise ValueError("masks with a weight factor (local_p) cannot be inverted with '~'")
        self.inner = inner
        self.query_invariant = inner.query_invariant
        self.translation_invariant = inner.translation_invariant

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        return ~self.inner.mask_mod(b, h, q_idx, kv_idx, num_queries, num_keys)

    def check(self, batch, heads, num_queries, num_keys):
        self.inner.check(batch, heads, num_queries, num_keys)

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        c = self.inner.classify_blocks(num_queries, num_keys, block_q, block_k, batch, heads, device)
        return torch.where(c == FULL, EMPTY, torch.where(c == EMPTY, FULL, PARTIAL)).to(torch.int8)

    def __repr__(self):
        return f"~{self.inner!r}"


class FromMod(Mask):
    """Wrap a user predicate ``fn(b, h, q_idx, kv_idx) -> bool tensor`` (FlexAttention style)."""

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]):
        if not callable(fn):
            raise TypeError(f"mask_mod must be callable; got {type(fn).__name__}")
        check_arity("mask_mod", fn, 4, "mask_mod(b, h, q_idx, kv_idx) -> bool tensor (True = may attend)",
                    "A function of the positions only can ignore the first two: lambda b, h, q_idx, kv_idx: ...")
        self.fn = fn

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        out = self.fn(b, h, q_idx, kv_idx)
        name = f"mask_mod {getattr(self.fn, '__name__', self.fn)!r}"
        if isinstance(out, bool):
            out = torch.tensor(out, device=q_idx.device)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{name} must return a bool tensor (True = may attend); got {type(out).__name__}")
        if out.dtype != torch.bool:
            raise TypeError(f"{name} must return a bool tensor (True = may attend); got dtype {out.dtype}")
        target = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
        if not broadcastable(tuple(out.shape), tuple(target)):
            raise ValueError(f"{name} returned shape {shape_str(out)}, which does not broadcast to "
                             f"{shape_str(torch.empty(target))} (b, h, q_idx, kv_idx broadcast together)")
        return out

    def __repr__(self):
        return f"from_mod({getattr(self.fn, '__name__', self.fn)!r})"


class FromTensor(Mask):
    """A dense boolean mask broadcastable to ``(B, H, Tq, Tk)`` (``True`` = may attend)."""

    def __init__(self, tensor: Tensor):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor; got {type(tensor).__name__}")
        if tensor.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor (True = may attend); got dtype {tensor.dtype}. "
                "Pass additive float masks as bias=..."
            )
        if tensor.dim() > 4 or tensor.dim() < 2:
            raise ValueError(
                f"mask tensor must have 2 to 4 dims broadcastable to (B, H, Tq, Tk); got shape {shape_str(tensor)}"
            )
        t = tensor
        while t.dim() < 4:
            t = t.unsqueeze(0)
        self.tensor = t

    def check(self, batch, heads, num_queries, num_keys):
        if not broadcastable(tuple(self.tensor.shape), (batch, heads, num_queries, num_keys)):
            raise ValueError(
                f"mask of shape {shape_str(self.tensor)} is not broadcastable to "
                f"(B, H, Tq, Tk) = ({batch}, {heads}, {num_queries}, {num_keys})"
            )

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        t = self.tensor.to(q_idx.device)
        # Index each broadcast dim of size 1 with 0 so any grid (or a block of it) works.
        idx = [i if s != 1 else torch.zeros_like(i) for i, s in zip((b, h, q_idx, kv_idx), t.shape)]
        return t[idx[0], idx[1], idx[2], idx[3]]

    def materialize(self, num_queries, num_keys, batch=1, heads=1, device=None):
        self.check(batch, heads, num_queries, num_keys)
        t = self.tensor if device is None else self.tensor.to(device)
        return t.expand(t.shape[0], t.shape[1], num_queries, num_keys)

    def __repr__(self):
        return f"from_tensor(shape={shape_str(self.tensor)})"


def as_mask(mask) -> Mask:
    """Coerce a Mask, a bool tensor or a 4-argument ``mask_mod`` callable into a :class:`Mask`."""
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, torch.Tensor):
        return FromTensor(mask)
    if callable(mask):
        return FromMod(mask)
    raise TypeError(
        "mask must be an attnkit.masks.Mask, a bool tensor broadcastable to (B, H, Tq, Tk) "
        f"(True = may attend) or a mask_mod(b, h, q_idx, kv_idx) callable; got {type(mask).__name__}"
    )
