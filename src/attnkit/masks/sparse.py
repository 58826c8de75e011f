"""Structured sparse masks: block-sparse layouts, the Sparse Transformer's strided and fixed
patterns, Longformer (window + global tokens), BigBird (window + global + random blocks) and
dilated windows.

Every mask here is a pure function of ``(b, h, q_idx, kv_idx)`` evaluated on broadcastable index
tensors, so the reference backend can materialize it and a tiled backend can evaluate it tile by
tile. ``True`` = may attend.

Alignment: position-based patterns align *bottom-right* when ``Tq != Tk`` (as the rest of
:mod:`attnkit.masks`): query ``i`` sits at absolute position ``pos = i + Tk - Tq``; pass
``align="top_left"`` for ``pos = i``. :func:`block_sparse` is the exception: its layout is
indexed by the raw query index ``i`` (the layout is explicit, so there is nothing to align).
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch

from .._checks import check_positive, shape_str
from .base import EMPTY, FULL, Mask, check_align, classify_dense, query_offset

Tensor = torch.Tensor


# -- small helpers ---------------------------------------------------------------------------
def _check_bool(name: str, x: object) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool; got {type(x).__name__}")
    return x


def _block_pair(block_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    """``block_size`` as ``(block_q, block_k)``: an int ``> 0`` or a pair of them."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (block_q, block_k); got {block_size!r}")
        bq = check_positive("block_size[0]", block_size[0], integer=True)
        bk = check_positive("block_size[1]", block_size[1], integer=True)
        return int(bq), int(bk)
    b = int(check_positive("block_size", block_size, integer=True))
    return b, b


def _lookup(flags: Tensor, idx: Tensor) -> Tensor:
    """``flags[idx]`` where ``idx`` is in range, ``False`` elsewhere (any broadcastable ``idx``)."""
    n = flags.shape[0]
    if n == 0:
        return torch.zeros_like(idx, dtype=torch.bool)
    inside = (idx >= 0) & (idx < n)
    return flags.to(idx.device)[idx.clamp(0, n - 1)] & inside


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# -- block-sparse ----------------------------------------------------------------------------
class BlockSparse(Mask):
    """A block-level layout: position ``(q, kv)`` may attend iff ``layout[q // bq, kv // bk]``.

    Args:
        layout: bool ``(nQb, nKb)`` shared by all heads, or ``(H, nQb, nKb)`` per head
            (``True`` = the tile may attend). It must cover the inputs:
            ``nQb * bq >= Tq`` and ``nKb * bk >= Tk``; a larger layout is cropped.
        block_size: ``bq = bk = block_size``, or a pair ``(bq, bk)``.

    The layout is indexed by the raw query index (no alignment). Layout ``[[1, 0], [1, 1]]``
    with ``block_size=2`` on 4 x 4 positions::

        layout      mask
        x .         x x . .
        x x         x x . .
                    x x x x
                    x x x x

    :meth:`classify_blocks` with tiles that are multiples of the layout's blocks reads the
    layout directly (no mask is materialized): a tiled kernel that uses the layout's own block
    size gets exactly ``FULL`` where the layout is ``True`` and ``EMPTY`` elsewhere.
    """

    def __init__(self, layout: Tensor, block_size: Union[int, Sequence[int]]):
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"block_sparse layout must be a bool torch.Tensor (nQb, nKb) or (H, nQb, nKb); "
                            f"got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"block_sparse layout must be a bool tensor (True = the tile may attend); "
                            f"got dtype {layout.dtype}")
        if layout.dim() not in (2, 3):
            raise ValueError(f"block_sparse layout must have shape (nQb, nKb) or (H, nQb, nKb); "
                             f"got shape {shape_str(layout)}")
        self.block_size = _block_pair(block_size)
        self._given_shape = tuple(layout.shape)
        #: the layout as ``(H_l, nQb, nKb)`` (``H_l = 1`` when shared by all heads)
        self.layout = layout if layout.dim() == 3 else layout.unsqueeze(0)

    def check(self, batch, heads, num_queries, num_keys):
        hl, nqb, nkb = self.layout.shape
        bq, bk = self.block_size
        if nqb * bq < num_queries:
            raise ValueError(f"block_sparse layout has {nqb} query blocks of {bq} ({nqb * bq} positions) but "
                             f"Tq = {num_queries}; it needs at least {_ceil_div(num_queries, bq)} query blocks")
        if nkb * bk < num_keys:
            raise ValueError(f"block_sparse layout has {nkb} key blocks of {bk} ({nkb * bk} positions) but "
                             f"Tk = {num_keys}; it needs at least {_ceil_div(num_keys, bk)} key blocks")
        if hl != 1 and hl != heads:
            raise ValueError(f"block_sparse layout has {hl} heads (shape {shape_str(self.layout)}) but the "
                             f"inputs have H = {heads}; use a (nQb, nKb) layout to share it across heads")

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        bq, bk = self.block_size
        lay = self.layout.to(q_idx.device)
        if lay.shape[0] == 1:
            return lay[0][q_idx // bq, kv_idx // bk]
        return lay[h, q_idx // bq, kv_idx // bk]

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        bq, bk = self.block_size
        if block_q % bq or block_k % bk:
            return super().classify_blocks(num_queries, num_keys, block_q, block_k, batch, heads, device)
        self.check(batch, heads, num_queries, num_keys)
        # Every layout cell inside the crop holds at least one in-range position, and all of its
        # positions share the cell's value, so classifying the layout itself is exact.
        lay = self.layout[:, :_ceil_div(num_queries, bq), :_ceil_div(num_keys, bk)].unsqueeze(0)
        lay = lay if device is None else lay.to(device)
        if (block_q, block_k) == (bq, bk):
            return torch.where(lay, FULL, EMPTY).to(torch.int8)
        return classify_dense(lay, block_q // bq, block_k // bk)

    def __repr__(self):
        return f"block_sparse(layout={self._given_shape}, block_size={self.block_size})"


def block_sparse(layout: Tensor, block_size: Union[int, Sequence[int]]) -> BlockSparse:
    """Block-sparse mask from a bool layout ``(nQb, nKb)`` or ``(H, nQb, nKb)`` (see :class:`BlockSparse`).

    ``allowed(q, kv) = layout[q // bq, kv // bk]``. Example::

        >>> import torch, attnkit
        >>> layout = torch.tensor([[True, False], [True, True]])
        >>> attnkit.masks.block_sparse(layout, 2).materialize(3, 4)[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    """
    return BlockSparse(layout, block_size)


# -- Sparse Transformer (Child et al. 2019, https://arxiv.org/abs/1904.10509) -----------------
class Strided(Mask):
    """The Sparse Transformer's *strided* pattern (https://arxiv.org/abs/1904.10509, §4.2).

    With ``d = pos - kv`` (``pos`` the aligned query position), query ``pos`` sees key ``kv`` iff
    ``|d| < stride`` (the local part, the previous ``stride`` positions) or ``d % stride == 0``
    (every ``stride``-th position), restricted to ``kv <= pos`` when ``causal``. Without
    ``causal`` both parts are symmetric. ``strided(3)`` on 8 tokens::

        x . . . . . . .
        x x . . . . . .
        x x x . . . . .
        x x x x . . . .
        . x x x x . . .
        . . x x x x . .
        x . . x x x x .
        . x . . x x x x
    """

    translation_invariant = True

    def __init__(self, stride: int, causal: bool = True, align: str = "bottom_right"):
        self.stride = int(check_positive("stride", stride, integer=True))
        self.causal = _check_bool("causal", causal)
        self.align = check_align(align)

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        d = q_idx + query_offset(self.align, num_queries, num_keys) - kv_idx
        m = (d.abs() < self.stride) | (d % self.stride == 0)
        return m & (d >= 0) if self.causal else m


def strided(stride: int, causal: bool = True, align: str = "bottom_right") -> Strided:
    """Sparse Transformer strided pattern (see :class:`Strided`).

    Example::

        >>> import attnkit
        >>> attnkit.masks.strided(2).materialize(5, 5)[0, 0].int().tolist()
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 0, 1, 1, 1]]
    """
    return Strided(stride, causal, align)


class Fixed(Mask):
    """The Sparse Transformer's *fixed* pattern (https://arxiv.org/abs/1904.10509, §4.2).

    Query ``pos`` sees key ``kv`` iff they are in the same block of ``stride`` positions
    (``kv // stride == pos // stride``) or ``kv`` is one of the last ``summary`` positions of its
    block (``kv % stride >= stride - summary``, the "summary" cells every later query reads),
    restricted to ``kv <= pos`` when ``causal``. ``fixed(3)`` on 8 tokens::

        x . . . . . . .
        x x . . . . . .
        x x x . . . . .
        . . x x . . . .
        . . x x x . . .
        . . x x x x . .
        . . x . . x x .
        . . x . . x x x
    """

    def __init__(self, stride: int, summary: int = 1, causal: bool = True, align: str = "bottom_right"):
        self.stride = int(check_positive("stride", stride, integer=True))
        summary = int(check_positive("summary", summary, integer=True))
        if summary > self.stride:
            raise ValueError(f"summary must be between 1 and stride = {self.stride}; got {summary}")
        self.summary = summary
        self.causal = _check_bool("causal", causal)
        self.align = check_align(align)

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        pos = q_idx + query_offset(self.align, num_queries, num_keys)
        m = (kv_idx // self.stride == pos // self.stride) | (kv_idx % self.stride >= self.stride - self.summary)
        return m & (kv_idx <= pos) if self.causal else m


def fixed(stride: int, summary: int = 1, causal: bool = True, align: str = "bottom_right") -> Fixed:
    """Sparse Transformer fixed pattern (see :class:`Fixed`).

    Example::

        >>> import attnkit
        >>> attnkit.masks.fixed(2).materialize(5, 5)[0, 0].int().tolist()
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 0, 1, 1]]
    """
    return Fixed(stride, summary, causal, align)


# -- Longformer (Beltagy et al. 2020, https://arxiv.org/abs/2004.05150) ----------------------
class Longformer(Mask):
    """Longformer's sliding window plus global tokens (https://arxiv.org/abs/2004.05150, §3.1).

    Query ``pos`` sees key ``kv`` iff ``|pos - kv| <= window`` (symmetric window, ``2·window + 1``
    keys), or ``kv`` is a global token (every query attends to it), or ``pos`` is a global token
    (it attends to every key). Global tokens are key positions: a list of indices, or a bool
    ``(Tk,)`` tensor. ``longformer(1, [0])`` on 6 tokens::

        x x x x x x      <- token 0 is global: it sees everything
        x x x . . .
        x x x x . .      column 0: everybody sees token 0
        x . x x x .
        x . . x x x
        x . . . x x
    """

    def __init__(self, window: int, global_tokens: Union[Iterable[int], Tensor] = (),
                 align: str = "bottom_right"):
        self.window = int(check_positive("window", window, integer=True))
        self.align = check_align(align)
        g = global_tokens
        if isinstance(g, torch.Tensor) and g.dtype == torch.bool:
            if g.dim() != 1:
                raise ValueError(f"longformer global_tokens as a bool tensor must have shape (Tk,); "
                                 f"got shape {shape_str(g)}")
            self._num_keys = g.shape[0]
            self._flags = g.clone()
        else:
            if isinstance(g, torch.Tensor):
                if g.is_floating_point() or g.is_complex() or g.dim() != 1:
                    raise TypeError(f"longformer global_tokens must be a list of int indices or a bool (Tk,) "
                                    f"tensor; got a {g.dtype} tensor of shape {shape_str(g)}")
                g = g.tolist()
            try:
                idx = list(g)
            except TypeError:
                raise TypeError(f"longformer global_tokens must be a list of int indices or a bool (Tk,) "
                                f"tensor; got {type(global_tokens).__name__}") from None
            for i in idx:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise TypeError(f"longformer global_tokens must hold ints; got {i!r} in {idx!r}")
                if i < 0:
                    raise ValueError(f"longformer global_tokens must be >= 0; got {i} in {idx!r}")
            self._num_keys = None
            self._flags = torch.zeros(max(idx) + 1 if idx else 0, dtype=torch.bool)
            self._flags[idx] = True
        #: the sorted global token indices
        self.global_tokens = torch.nonzero(self._flags).flatten().tolist()

    def check(self, batch, heads, num_queries, num_keys):
        if self._num_keys is not None and self._num_keys != num_keys:
            raise ValueError(f"longformer global_tokens mask has {self._num_keys} entries but the inputs have "
                             f"Tk = {num_keys}")
        if self._num_keys is None and self._flags.shape[0] > num_keys:
            raise ValueError(f"longformer global_tokens must be < Tk = {num_keys}; got {self.global_tokens}")

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        pos = q_idx + query_offset(self.align, num_queries, num_keys)
        return ((pos - kv_idx).abs() <= self.window) | _lookup(self._flags, kv_idx) | _lookup(self._flags, pos)


def longformer(window: int, global_tokens: Union[Iterable[int], Tensor] = (),
               align: str = "bottom_right") -> Longformer:
    """Longformer window + global tokens (see :class:`Longformer`).

    Example::

        >>> import attnkit
        >>> attnkit.masks.longformer(1, [0]).materialize(4, 4)[0, 0].int().tolist()
        [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]]
    """
    return Longformer(window, global_tokens, align)


# -- BigBird (Zaheer et al. 2020, https://arxiv.org/abs/2007.14062) ---------------------------
class BigBird(Mask):
    """BigBird's block-sparse pattern (https://arxiv.org/abs/2007.14062, §2 and App. D).

    Positions are grouped into blocks of ``block_size``; with ``qb = pos // block_size`` (``pos``
    the aligned query position) and ``kb = kv // block_size``, query block ``qb`` sees key block
    ``kb`` iff

    * ``|qb - kb| <= window_blocks`` (sliding blocks), or
    * ``kb < global_blocks`` (global blocks are seen by all) or ``qb < global_blocks`` (and see all), or
    * ``kb`` is one of the ``random_blocks`` random key blocks drawn for ``qb`` among the blocks it
      does not already see.

    Random blocks come from a ``torch.Generator`` seeded with ``seed``; the draw depends only on
    ``seed`` and the number of key blocks ``ceil(Tk / block_size)``, so the same ``(Tq, Tk)`` and
    seed always give the same mask, in every call and every process, whatever the global RNG
    state. Another ``Tk`` may draw other random blocks. Because queries align bottom-right, the
    rows of a ``(Tq, Tk)`` mask are the last ``Tq`` rows of the ``(Tk, Tk)`` one (KV-cache decoding
    sees the same pattern as the full pass). Query blocks outside ``0 .. nKb - 1`` (only when
    ``Tq > Tk``) get the window and global blocks but no random ones. :meth:`layout` returns the
    block layout.

    ``bigbird(2, random_blocks=1)`` on 12 tokens (blocks of 2; ``G`` global, ``W`` window,
    ``R`` random)::

        block   0 1 2 3 4 5
          0     G G G G G G
          1     G W W . . R
          2     G W W W . R
          3     G . W W W R
          4     G R . W W W
          5     G . . R W W
    """

    def __init__(self, block_size: int, window_blocks: int = 1, global_blocks: int = 1, random_blocks: int = 1,
                 seed: int = 0, align: str = "bottom_right"):
        self.block_size = int(check_positive("block_size", block_size, integer=True))
        self.window_blocks = int(check_positive("window_blocks", window_blocks, integer=True, allow_zero=True))
        self.global_blocks = int(check_positive("global_blocks", global_blocks, integer=True, allow_zero=True))
        self.random_blocks = int(check_positive("random_blocks", random_blocks, integer=True, allow_zero=True))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}")
        self.seed = seed
        self.align = check_align(align)
        self._random: dict[int, Tensor] = {}

    def check(self, batch, heads, num_queries, num_keys):
        # Draw the random blocks now, outside any vmap/compile trace that later evaluates
        # mask_mod (FlexAttention's create_block_mask refuses random ops under vmap).
        self.random_layout(num_keys)

    def bind(self, num_queries, num_keys):
        self.random_layout(num_keys)
        return super().bind(num_queries, num_keys)

    def _fixed_part(self, qb: Tensor, kb: Tensor) -> Tensor:
        g = self.global_blocks
        return ((qb - kb).abs() <= self.window_blocks) | (kb < g) | ((qb >= 0) & (qb < g))

    def random_layout(self, num_keys: int) -> Tensor:
        """The random key blocks, bool ``(nKb, nKb)`` over absolute query blocks (``nKb = ceil(Tk/bs)``):
        ``random_blocks`` per row among the blocks the row does not already see."""
        nkb = _ceil_div(num_keys, self.block_size)
        if nkb not in self._random:
            blocks = torch.arange(nkb)
            fixed_part = self._fixed_part(blocks[:, None], blocks[None, :])
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            # One draw per cell whatever is already allowed, so rows never shift each other's draws.
            u = torch.rand(nkb, nkb, generator=gen, dtype=torch.float64).masked_fill(fixed_part, float("inf"))
            r = min(self.random_blocks, nkb)
            pick = torch.zeros(nkb, nkb, dtype=torch.bool)
            if r > 0 and nkb > 0:
                pick.scatter_(1, u.topk(r, dim=1, largest=False).indices, True)
            self._random[nkb] = pick & ~fixed_part
        return self._random[nkb]

    def layout(self, num_keys: int) -> Tensor:
        """The full block layout, bool ``(nKb, nKb)``: row ``qb`` is the key blocks that query block
        ``qb`` (absolute positions ``qb·bs ... qb·bs + bs - 1``) may attend."""
        nkb = _ceil_div(num_keys, self.block_size)
        blocks = torch.arange(nkb)
        return self._fixed_part(blocks[:, None], blocks[None, :]) | self.random_layout(num_keys)

    def _block_mod(self, qb: Tensor, kb: Tensor, num_keys: int) -> Tensor:
        rnd = self.random_layout(num_keys).to(qb.device)
        nkb = rnd.shape[0]
        # Query blocks before 0 exist only when Tq > Tk (bottom-right): no random blocks there.
        inside = (qb >= 0) & (qb < nkb)
        return self._fixed_part(qb, kb) | (rnd[qb.clamp(0, max(nkb - 1, 0)), kb] & inside)

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        pos = q_idx + query_offset(self.align, num_queries, num_keys)
        return self._block_mod(pos // self.block_size, kv_idx // self.block_size, num_keys)

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        bs = self.block_size
        off = query_offset(self.align, num_queries, num_keys)
        if block_q % bs or block_k % bs or off % bs:
            return super().classify_blocks(num_queries, num_keys, block_q, block_k, batch, heads, device)
        # Query tiles line up with absolute blocks: classify the block layout itself.
        qb = torch.arange(_ceil_div(num_queries, bs), device=device) + off // bs
        kb = torch.arange(_ceil_div(num_keys, bs), device=device)
        lay = self._block_mod(qb[:, None], kb[None, :], num_keys)[None, None]
        return classify_dense(lay, block_q // bs, block_k // bs)


def bigbird(block_size: int, window_blocks: int = 1, global_blocks: int = 1, random_blocks: int = 1,
            seed: int = 0, align: str = "bottom_right") -> BigBird:
    """BigBird window + global + random blocks (see :class:`BigBird`).

    Example::

        >>> import attnkit
        >>> m = attnkit.masks.bigbird(block_size=2, random_blocks=0)
        >>> m.layout(8).int().tolist()
        [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]]
        >>> m.materialize(8, 8)[0, 0, 2].int().tolist()  # position 2 is in block 1
        [1, 1, 1, 1, 1, 1, 0, 0]
    """
    return BigBird(block_size, window_blocks, global_blocks, random_blocks, seed, align)


# -- dilated window --------------------------------------------------------------------------
class DilatedWindow(Mask):
    """A sliding window with holes: query ``pos`` sees ``kv = pos - dilation·m`` for
    ``m = 0..left`` and ``kv = pos + dilation·m`` for ``m = 0..right`` (Longformer's dilated
    window, https://arxiv.org/abs/2004.05150, §3.1). ``dilated_window(2, dilation=2)`` on 7 tokens::

        x . . . . . .
        . x . . . . .
        x . x . . . .
        . x . x . . .
        x . x . x . .
        . x . x . x .
        . . x . x . x
    """

    translation_invariant = True

    def __init__(self, left: int, right: int = 0, dilation: int = 2, align: str = "bottom_right"):
        self.left = int(check_positive("left", left, integer=True, allow_zero=True))
        self.right = int(check_positive("right", right, integer=True, allow_zero=True))
        if isinstance(dilation, bool) or not isinstance(dilation, int):
            raise TypeError(f"dilation must be an int; got {type(dilation).__name__}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1; got {dilation}")
        self.dilation = dilation
        self.align = check_align(align)

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        d = q_idx + query_offset(self.align, num_queries, num_keys) - kv_idx
        on_grid = d % self.dilation == 0
        return on_grid & (d <= self.dilation * self.left) & (-d <= self.dilation * self.right)


def dilated_window(left: int, right: int = 0, dilation: int = 2, align: str = "bottom_right") -> DilatedWindow:
    """Dilated sliding window (see :class:`DilatedWindow`).

    Example::

        >>> import attnkit
        >>> attnkit.masks.dilated_window(1, 1, dilation=2).materialize(5, 5)[0, 0].int().tolist()
        [[1, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 1]]
    """
    return DilatedWindow(left, right, dilation, align)


__all__ = ["BlockSparse", "Strided", "Fixed", "Longformer", "BigBird", "DilatedWindow", "block_sparse",
           "strided", "fixed", "longformer", "bigbird", "dilated_window"]
