"""A key/value cache for incremental (token-by-token) decoding.

An autoregressive decoder recomputes nothing for the tokens it has already seen: each step
projects only the new tokens' keys and values, appends them to the cache, and lets the new
queries attend to everything cached. With ``is_causal=True`` the causal mask aligns
bottom-right, so the ``Tq`` new queries sit at the last ``Tq`` positions of the ``Tk`` cached
keys and see all the keys before them::

    cache holds 3 keys, 2 new tokens arrive (Tq = 2, Tk = 5)
                 k0 k1 k2 k3 k4
           q3:   x  x  x  x  .
           q4:   x  x  x  x  x

Shape legend: ``B`` batch, ``Hkv`` key/value heads, ``T`` cached positions, ``D`` key
features, ``Dv`` value features.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_positive, check_tensor, shape_str
from ..nonfinite import mark_finite, sum_finite

Tensor = torch.Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys ``(B, Hkv, T, D)`` and values ``(B, Hkv, T, Dv)`` of the positions decoded so far.

    Pass one cache per attention layer to :class:`attnkit.nn.MultiheadAttention`'s ``forward``
    (``cache=``): the layer appends the new tokens' keys/values and attends over the whole
    cache. The cache is plain state, not an ``nn.Module``: make a fresh one (or :meth:`reset`)
    for each new sequence.

    Args:
        max_length: optional capacity ``T_max``. When given, storage for ``T_max`` positions is
            allocated once on the first :meth:`append` (no re-copying per step, except when
            autograd records the appends, which then concatenate), and an append that would
            exceed it raises ``ValueError``.

    Beam search: :meth:`reorder` selects (and may repeat) batch rows, e.g. the parent beam of
    each surviving hypothesis.

    Example::

        >>> import torch, attnkit
        >>> cache = attnkit.nn.KVCache(max_length=8)
        >>> k, v = cache.append(torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16))
        >>> k, v = cache.append(torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16))
        >>> cache.length, tuple(k.shape)
        (4, (2, 4, 4, 16))
    """

    def __init__(self, max_length: Optional[int] = None):
        if max_length is not None:
            max_length = int(check_positive("max_length", max_length, integer=True))
        self.max_length = max_length
        self.reset()

    # -- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached position (the capacity, ``max_length``, is kept)."""
        self._k: Optional[Tensor] = None  # (B, Hkv, capacity >= length, D)
        self._v: Optional[Tensor] = None  # (B, Hkv, capacity >= length, Dv)
        self._length = 0
        self._finite = True  # every cached position holds finite values (checked as appended)

    @property
    def length(self) -> int:
        """Number of cached positions ``T``."""
        return self._length

    def __len__(self) -> int:
        return self._length

    @property
    def batch_size(self) -> Optional[int]:
        """``B`` of the cached tensors, or None while the cache is empty."""
        return None if self._k is None else self._k.shape[0]

    @property
    def keys(self) -> Optional[Tensor]:
        """Cached keys ``(B, Hkv, T, D)`` (None while empty)."""
        return None if self._k is None else self._k[:, :, : self._length]

    @property
    def values(self) -> Optional[Tensor]:
        """Cached values ``(B, Hkv, T, Dv)`` (None while empty)."""
        return None if self._v is None else self._v[:, :, : self._length]

    # -- updates ---------------------------------------------------------------------------
    def check(self, k: Tensor, v: Tensor) -> None:
        """Raise ``ValueError``/``TypeError`` unless ``k``/``v`` can be appended (nothing changes)."""
        check_tensor("k", k, 4, "(B, Hkv, T, D)")
        check_tensor("v", v, 4, "(B, Hkv, T, Dv)")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v must agree on (B, Hkv, T); got k {shape_str(k)} and v {shape_str(v)}")
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"k and v must have the same dtype and device; got {k.dtype}/{k.device} "
                             f"and {v.dtype}/{v.device}")
        if self._k is not None:
            ck, cv = self._k, self._v
            if k.shape[0] != ck.shape[0]:
                raise ValueError(f"cache holds a batch of {ck.shape[0]} sequences but the new keys have batch "
                                 f"{k.shape[0]} (k {shape_str(k)}); call cache.reset() for a new batch or "
                                 "cache.reorder(indices) for beam search")
            if k.shape[1] != ck.shape[1] or k.shape[3] != ck.shape[3] or v.shape[3] != cv.shape[3]:
                raise ValueError(f"cache holds keys (B, Hkv, T, D) = {shape_str(self.keys)} and values "
                                 f"{shape_str(self.values)}; got k {shape_str(k)} and v {shape_str(v)} "
                                 "(the number of heads and the feature sizes must match)")
            if k.dtype != ck.dtype or k.device != ck.device:
                raise ValueError(f"cache holds {ck.dtype} tensors on {ck.device}; got k {k.dtype} on {k.device}")
        if self.max_length is not None and self._length + k.shape[2] > self.max_length:
            raise ValueError(f"KVCache max_length = {self.max_length} exceeded: it holds {self._length} positions "
                             f"and {k.shape[2]} more were appended")

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k (B, Hkv, Tnew, D)``, ``v (B, Hkv, Tnew, Dv)``; return all cached keys and values
        ``(B, Hkv, T + Tnew, D)``, ``(B, Hkv, T + Tnew, Dv)``. Invalid input leaves the cache unchanged."""
        self.check(k, v)
        new_len = self._length + k.shape[2]
        records_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or
                                                    (self._k is not None and (self._k.requires_grad
                                                                              or self._v.requires_grad)))
        if self.max_length is not None and not records_grad:
            # Preallocated storage: write the new positions in place; O(Tnew) per step.
            if self._k is None or self._k.shape[2] < self.max_length:
                self._k, self._v = self._grow(self._k, k), self._grow(self._v, v)
            self._k[:, :, self._length: new_len] = k
            self._v[:, :, self._length: new_len] = v
        elif self._k is None:
            self._k, self._v = k, v
        else:
            # Concatenation keeps autograd's history of every appended step intact.
            self._k = torch.cat([self.keys, k], dim=2)
            self._v = torch.cat([self.values, v], dim=2)
        self._length = new_len
        keys, values = self.keys, self.values
        # the new positions are checked as they come (O(Tnew)), so attention's NaN policy need
        # not sum the whole cache again at every step (attnkit.nonfinite.known_finite)
        if torch.compiler.is_compiling():  # compiled attention skips the NaN check (and asking is a graph break)
            return keys, values
        self._finite = self._finite and sum_finite(k, v)
        if self._finite:
            mark_finite(keys)
            mark_finite(values)
        return keys, values

    def _grow(self, old: Optional[Tensor], new: Tensor) -> Tensor:
        B, H, _, D = new.shape
        buf = new.new_empty(B, H, self.max_length, D)
        if old is not None:
            buf[:, :, : self._length] = old[:, :, : self._length]
        return buf

    def concat(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """What :meth:`append` would return, without changing the cache."""
        self.check(k, v)
        if self._k is None:
            return k, v
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (an integer tensor ``(B_new,)``, repeats allowed), in that
        order: beam search calls it with each surviving hypothesis's parent beam.

        Example::

            >>> import torch, attnkit
            >>> cache = attnkit.nn.KVCache()
            >>> _ = cache.append(torch.arange(3.0).view(3, 1, 1, 1), torch.zeros(3, 1, 1, 1))
            >>> cache.reorder(torch.tensor([2, 2, 0]))
            >>> cache.keys.flatten().tolist()
            [2.0, 2.0, 0.0]
        """
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be a 1-D integer tensor of batch rows; got dtype {indices.dtype} "
                             f"and shape {shape_str(indices)}")
        if self._k is None:
            return
        B = self._k.shape[0]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= B):
            raise ValueError(f"indices must lie in [0, {B}) (the cached batch size); got {indices.tolist()}")
        idx = indices.to(device=self._k.device, dtype=torch.long)
        self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)

    def __repr__(self) -> str:
        shape = "empty" if self._k is None else f"keys={shape_str(self.keys)}, values={shape_str(self.values)}"
        return f"KVCache(length={self._length}, max_length={self.max_length}, {shape})"
