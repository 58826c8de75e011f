"""Causal, sliding-window, chunked and key-padding masks."""

from __future__ import annotations

import torch

from .._checks import check_positive, shape_str
from .base import Mask, check_align, classes_from, query_offset, tile_bounds

Tensor = torch.Tensor


class Causal(Mask):
    """Query at absolute position ``p`` sees keys ``<= p``.

    ``align="bottom_right"`` (default) places query ``i`` at ``i + Tk - Tq``, so the last
    query sees every key (KV-cache decoding); ``"top_left"`` places it at ``i`` (SDPA's
    ``is_causal``); an int ``n`` places it at ``i + n`` (``n`` keys precede the first query,
    whatever ``Tk``)::

        Tq = Tk = 4      Tq=2, Tk=4 bottom_right   top_left
        x . . .          x x x .                   x . . .
        x x . .          x x x x                   x x . .
        x x x .
        x x x x
    """

    is_causal = True
    translation_invariant = True

    def __init__(self, align: "str | int" = "bottom_right"):
        self.align = check_align(align)

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        return q_idx + query_offset(self.align, num_queries, num_keys) >= kv_idx

    def sees_every_key(self, num_queries, num_keys):
        # the first query reaches the last key (one query at the end of a decoding cache)
        return query_offset(self.align, num_queries, num_keys) >= num_keys - 1

    def key_range(self, num_queries, num_keys):
        hi = min(num_keys, query_offset(self.align, num_queries, num_keys) + 1)  # one query: keys before it
        return (0, hi) if num_queries == 1 and hi > 0 else None

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        o = query_offset(self.align, num_queries, num_keys)
        qs, qe = tile_bounds(num_queries, block_q, device)
        ks, ke = tile_bounds(num_keys, block_k, device)
        full = ke.view(1, -1) <= qs.view(-1, 1) + o   # every row already sees the tile's last key
        empty = ks.view(1, -1) > qe.view(-1, 1) + o   # not even the last row reaches its first key
        return classes_from(full, empty)


class SlidingWindow(Mask):
    """Query at position ``p`` sees keys ``p - left ... p + right`` (bounds included).

    Both bounds count: a query sees up to ``left + right + 1`` keys, itself included, so
    ``sliding_window(32)`` sees 33 keys (itself and the 32 before it; fewer near the start). The
    default ``right=0`` is a causal band: no key after the query.

    Alignment as for :class:`Causal`. ``sliding_window(2)`` on 5 tokens (3 keys per row)::

        x . . . .
        x x . . .
        x x x . .
        . x x x .
        . . x x x
    """

    translation_invariant = True

    def __init__(self, left: int, right: int = 0, align: "str | int" = "bottom_right"):
        self.left = int(check_positive("left", left, integer=True, allow_zero=True))
        self.right = int(check_positive("right", right, integer=True, allow_zero=True))
        self.align = check_align(align)

    @property
    def no_future(self) -> bool:
        """No key after the query's own position (a band, not the full causal mask)."""
        return self.right == 0

    @property
    def window(self) -> tuple[int, int]:
        return self.left, self.right

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        pos = q_idx + query_offset(self.align, num_queries, num_keys)
        return (kv_idx >= pos - self.left) & (kv_idx <= pos + self.right)

    def sees_every_key(self, num_queries, num_keys):
        # the first query reaches the last key and the last query the first
        o = query_offset(self.align, num_queries, num_keys)
        return o + self.right >= num_keys - 1 and num_queries - 1 + o - self.left <= 0

    def key_range(self, num_queries, num_keys):
        o = query_offset(self.align, num_queries, num_keys)
        lo, hi = max(0, o - self.left), min(num_keys, o + self.right + 1)  # one query's window
        return (lo, hi) if num_queries == 1 and lo < hi else None

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        o = query_offset(self.align, num_queries, num_keys)
        qs, qe = (t.view(-1, 1) + o for t in tile_bounds(num_queries, block_q, device))
        ks, ke = (t.view(1, -1) for t in tile_bounds(num_keys, block_k, device))
        # rows' windows [p - left, p + right] slide by one per row: their union is contiguous
        full = (ks >= qe - self.left) & (ke <= qs + self.right)
        empty = (ke < qs - self.left) | (ks > qe + self.right)
        return classes_from(full, empty)


class Chunked(Mask):
    """Chunked (block-diagonal) attention: the sequence is cut into chunks of ``size`` positions
    and a query sees only the keys of its own chunk (Llama 4's local layers; combine with
    :func:`causal` for the causal version). ``shift`` moves the chunk boundaries: key ``k`` is in
    chunk ``(k - shift) // size``, so a batch of left-padded sequences passes its padding
    lengths ``(B,)`` and chunks start at each sequence's first real token.

    Alignment as for :class:`Causal`. ``chunked(2) & causal()`` on 5 tokens::

        x . . . .
        x x . . .
        . . x . .
        . . x x .
        . . . . x
    """

    def __init__(self, size: int, shift: "int | Tensor" = 0, align: "str | int" = "bottom_right"):
        self.size = int(check_positive("size", size, integer=True))
        if isinstance(shift, torch.Tensor):
            if shift.dim() != 1 or shift.is_floating_point() or shift.dtype == torch.bool:
                raise ValueError(f"chunked shift must be an int or an integer tensor of shape (B,); "
                                 f"got {shift.dtype} of shape {shape_str(shift)}")
        else:
            shift = int(shift)
        self.shift = shift
        self.align = check_align(align)

    def check(self, batch, heads, num_queries, num_keys):
        if isinstance(self.shift, torch.Tensor) and self.shift.shape[0] not in (1, batch):
            raise ValueError(f"chunked shift was built for batch {self.shift.shape[0]} but the inputs have batch {batch}")

    def _shift(self, b, device):
        if isinstance(self.shift, torch.Tensor):
            return self.shift.to(device)[b] if self.shift.shape[0] > 1 else self.shift.to(device)[0]
        return self.shift

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        s = self._shift(b, q_idx.device)
        pos = q_idx + query_offset(self.align, num_queries, num_keys)
        return torch.div(kv_idx - s, self.size, rounding_mode="floor") == torch.div(pos - s, self.size,
                                                                                     rounding_mode="floor")

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        self.check(batch, heads, num_queries, num_keys)
        o = query_offset(self.align, num_queries, num_keys)
        s = self.shift.to(device).view(-1, 1, 1) if isinstance(self.shift, torch.Tensor) else self.shift
        qs, qe = (t.view(1, -1, 1) + o for t in tile_bounds(num_queries, block_q, device))
        ks, ke = (t.view(1, 1, -1) for t in tile_bounds(num_keys, block_k, device))

        def chunk(x):
            return torch.div(x - s, self.size, rounding_mode="floor")

        cq0, cq1, ck0, ck1 = chunk(qs), chunk(qe), chunk(ks), chunk(ke)
        full = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)   # one chunk holds every row and every key
        empty = (cq1 < ck0) | (ck1 < cq0)                   # the rows' chunks and the keys' never meet
        full, empty = torch.broadcast_tensors(full, empty)
        return classes_from(full, empty)[0].unsqueeze(1)    # (B', 1, nq, nk)

    def __repr__(self):
        shift = f"shift={shape_str(self.shift)}" if isinstance(self.shift, torch.Tensor) else f"shift={self.shift}"
        return f"chunked({self.size}, {shift}, align={self.align!r})"


class KeyPadding(Mask):
    """Keys past each sequence's length (or flagged ``False``) are hidden.

    Built from ``lengths (B,)`` integers, or from a boolean ``keep (B, Tk)`` tensor where
    ``True`` = a real token that may be attended (attnkit's functional convention; note that
    ``torch.nn.MultiheadAttention``'s ``key_padding_mask`` uses the opposite, ``True`` = pad).
    """

    query_invariant = True

    def __init__(self, lengths_or_keep: Tensor):
        x = lengths_or_keep
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.dtype == torch.bool:
            if x.dim() != 2:
                raise ValueError(f"key_padding(keep) needs a bool tensor of shape (B, Tk); got shape {shape_str(x)}")
            self.keep, self.lengths = x, None
        elif not x.is_floating_point() and not x.is_complex():
            if x.dim() != 1:
                raise ValueError(f"key_padding(lengths) needs an integer tensor of shape (B,); got shape {shape_str(x)}")
            self.keep, self.lengths = None, x
            if torch.compiler.is_compiling():  # checking the values would break a compiled graph
                self._max_length = None
            else:
                if (x < 0).any():
                    raise ValueError(f"key_padding lengths must be >= 0; got {x.tolist()}")
                self._max_length = int(x.max()) if x.numel() else 0  # checked on every call: compute once
        else:
            raise TypeError(
                f"key_padding takes integer lengths (B,) or a bool keep-mask (B, Tk); got dtype {x.dtype}"
            )

    def check(self, batch, heads, num_queries, num_keys):
        t = self.lengths if self.lengths is not None else self.keep
        if t.shape[0] != batch:
            raise ValueError(f"key_padding was built for batch {t.shape[0]} but the inputs have batch {batch}")
        if self.keep is not None and self.keep.shape[1] != num_keys:
            raise ValueError(
                f"key_padding keep-mask has {self.keep.shape[1]} keys but the inputs have Tk = {num_keys}"
            )
        if self.lengths is not None and self._max_length is not None and self._max_length > num_keys:
            raise ValueError(f"key_padding lengths must be <= Tk = {num_keys}; got max {self._max_length}")

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        if self.lengths is not None:
            return kv_idx < self.lengths.to(kv_idx.device)[b]
        return self.keep.to(kv_idx.device)[b, kv_idx]

    def classify_blocks(self, num_queries, num_keys, block_q, block_k, batch=1, heads=1, device=None):
        self.check(batch, heads, num_queries, num_keys)
        nq = -(-num_queries // block_q)
        ks, ke = tile_bounds(num_keys, block_k, device)
        if self.lengths is not None:
            L = self.lengths.to(device).view(-1, 1)           # (B, 1)
            full, empty = ke.view(1, -1) < L, ks.view(1, -1) >= L  # (B, nk)
        else:
            keep = self.keep.to(device)
            pad = -(-num_keys // block_k) * block_k - num_keys
            anyp = torch.nn.functional.pad(keep, (0, pad), value=False).view(keep.shape[0], -1, block_k).any(-1)
            allp = torch.nn.functional.pad(keep, (0, pad), value=True).view(keep.shape[0], -1, block_k).all(-1)
            full, empty = allp, ~anyp
        cls = classes_from(full, empty)[0]                     # (1, B, nk) -> (B, nk)
        return cls[0].view(-1, 1, 1, cls.shape[-1]).expand(-1, 1, nq, -1).contiguous()

    def __repr__(self):
        t = self.lengths if self.lengths is not None else self.keep
        return f"key_padding({'lengths' if self.lengths is not None else 'keep'}, shape={shape_str(t)})"


def causal(align: "str | int" = "bottom_right") -> Causal:
    """Causal mask (see :class:`Causal`).

    Example::

        >>> import attnkit
        >>> attnkit.masks.causal().materialize(2, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    return Causal(align)


def sliding_window(left: int, right: int = 0, align: "str | int" = "bottom_right") -> SlidingWindow:
    """Query ``i`` sees keys ``i-left ... i+right``, both bounds included: ``left + right + 1``
    keys at most, itself among them (see :class:`SlidingWindow`). Example::

        >>> import attnkit
        >>> attnkit.masks.sliding_window(1).materialize(3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]

    ``sliding_window(32)`` sees 33 keys: itself and the 32 before it (query 40 sees keys 8 to 40)::

        >>> allowed = attnkit.masks.sliding_window(32).materialize(64, 64)[0, 0]
        >>> allowed[40].sum().item(), allowed[40].nonzero().flatten()[[0, -1]].tolist()
        (33, [8, 40])
        >>> allowed.sum(-1)[[0, 31, 32, 63]].tolist()   # fewer at the start: query i sees min(i + 1, 33)
        [1, 32, 33, 33]
    """
    return SlidingWindow(left, right, align)


def chunked(size: int, shift: "int | Tensor" = 0, align: "str | int" = "bottom_right") -> Chunked:
    """Each query sees only the keys of its own chunk of ``size`` positions (see :class:`Chunked`).

    Example::

        >>> import attnkit
        >>> (attnkit.masks.chunked(2) & attnkit.masks.causal()).materialize(4, 4)[0, 0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    return Chunked(size, shift, align)


def key_padding(lengths_or_keep) -> KeyPadding:
    """Hide padded keys, from lengths ``(B,)`` or a keep-mask ``(B, Tk)`` (True = real token).

    Example::

        >>> import attnkit, torch
        >>> attnkit.masks.key_padding(torch.tensor([2, 3])).materialize(1, 3, batch=2)[:, 0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    return KeyPadding(lengths_or_keep)
