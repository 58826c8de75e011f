r"""Rotary position embedding, RoPE (Su et al. 2021, RoFormer, https://arxiv.org/abs/2104.09864).

RoPE rotates queries and keys, not the scores: feature pair ``(x_i, x_{i + D/2})`` of the vector
at position ``m`` is rotated by the angle ``m θ_i`` with ``θ_i = base^{-2i/D}``. Then
``<R_m q, R_n k>`` depends on ``q``, ``k`` and ``n - m`` only, which is what makes the position
*relative*. Rotate ``q`` and ``k`` before calling :func:`attnkit.attention`; rotations preserve
norms.

Pairing convention: this module uses the **half-split** ("rotate_half") convention of GPT-NeoX
and Llama, which pairs feature ``i`` with feature ``i + D/2``::

    rotate_half([x1, x2]) = [-x2, x1]            x1 = x[..., :D/2], x2 = x[..., D/2:]
    rope(x, m)            = x * cos(m θ) + rotate_half(x) * sin(m θ),   θ repeated twice

The paper (and GPT-J / the original RoFormer code) pairs *adjacent* features ``(x_{2i}, x_{2i+1})``
instead. The two conventions differ by a fixed permutation of the features; they are equivalent
for training from scratch but not interchangeable for pretrained weights.

In complex form, with ``z_i = x_i + 1j * x_{i + D/2}``: ``rope(x, m)`` is ``z_i * exp(1j m θ_i)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive, check_tensor, shape_str

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (split in two halves).

    Example::

        >>> import torch, attnkit
        >>> attnkit.positions.rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
        [-3.0, -4.0, 1.0, 2.0]
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The ``D/2`` rotation frequencies ``θ_i = base^{-2i/D}``, ``i = 0 .. D/2 - 1``."""
    return 1.0 / torch.pow(torch.tensor(float(base), dtype=dtype, device=device),
                           torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)


def _cos_sin(positions: Tensor, dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape ``positions.shape + (dim,)`` (each frequency repeated for both halves)."""
    inv_freq = rope_inv_freq(dim, base, dtype, positions.device)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq            # (..., T, D/2)
    angles = torch.cat((angles, angles), dim=-1)                      # (..., T, D)
    return angles.cos(), angles.sin()


def _check_even(name: str, d: int) -> None:
    if d % 2 != 0:
        raise ValueError(f"RoPE rotates feature pairs, so {name} must be even; got {d}")


def _check_positions(positions, B: int, T: int, device) -> Tensor:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a tensor of shape (T,) or (B, T) or None; got {type(positions).__name__}")
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer or float tensor; got dtype {positions.dtype}")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(f"positions must have shape (T,) = ({T},) or (B, T) = ({B}, {T}); "
                         f"got {shape_str(positions)}")
    return positions.to(device)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xc = x.to(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


def apply_rope(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
    r"""Rotate ``x`` by its positions (RoPE, https://arxiv.org/abs/2104.09864), half-split convention.

    .. math::
        \mathrm{rope}(x, m) = x \odot \cos(m\theta) + \mathrm{rotate\_half}(x) \odot \sin(m\theta),
        \qquad \theta_i = base^{-2i/D}

    Angles are computed in float32 (float64 for float64 inputs) and the result is cast back to
    ``x.dtype``.

    Args:
        x: ``(B, H, T, D)`` queries or keys; ``D`` must be even.
        positions: ``None`` (positions ``0 .. T-1``), or an integer/float tensor ``(T,)`` shared by
            the batch, or ``(B, T)`` per sequence (e.g. left-padded batches, KV-cache offsets).
        base: frequency base (10000 in the paper; Llama 3 uses 500000).

    Returns:
        ``(B, H, T, D)``, same dtype as ``x``.

    Example::

        >>> import torch, attnkit
        >>> q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
        >>> rq, rk = attnkit.positions.apply_rope(q), attnkit.positions.apply_rope(k)
        >>> torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)   # rotations keep norms
        True
    """
    check_tensor("x", x, 4, "(B, H, T, D)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
    B, H, T, D = x.shape
    _check_even("the last dim D of x", D)
    base = float(check_positive("base", base))
    cdt = _compute_dtype(x.dtype)
    if positions is None:
        positions = torch.arange(T, device=x.device)
    else:
        positions = _check_positions(positions, B, T, x.device)
    cos, sin = _cos_sin(positions, D, base, cdt)                     # (T, D) or (B, T, D)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                # (B, 1, T, D)
    return _rotate(x, cos, sin)


class RotaryEmbedding(nn.Module):
    """RoPE as a module with a cos/sin cache (https://arxiv.org/abs/2104.09864).

    ``rope(x, offset=0, positions=None)`` rotates ``x (B, H, T, D)`` exactly as
    :func:`apply_rope` does, reading ``cos``/``sin`` from a cache that grows on demand (it is not
    saved in ``state_dict``). Positions default to ``offset .. offset + T - 1``: pass the number of
    cached tokens as ``offset`` when decoding with a KV cache, and rotate the new keys before
    appending them to the cache.

    ``dim`` may be smaller than the head size ``D`` ("partial rotary", GPT-NeoX ``rotary_pct``):
    then only the first ``dim`` features are rotated and the rest pass through unchanged.

    Args:
        dim: number of rotated features, even.
        base: frequency base.

    Example::

        >>> import torch, attnkit
        >>> rope = attnkit.positions.RotaryEmbedding(8)
        >>> q = torch.randn(1, 2, 6, 8)
        >>> torch.allclose(rope(q), attnkit.positions.apply_rope(q))
        True
        >>> torch.allclose(rope(q[:, :, 4:], offset=4), rope(q)[:, :, 4:])   # decode step
        True
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = int(check_positive("dim", dim, integer=True))
        _check_even("dim", self.dim)
        self.base = float(check_positive("base", base))
        self.register_buffer("_cos", torch.empty(0, self.dim), persistent=False)
        self.register_buffer("_sin", torch.empty(0, self.dim), persistent=False)

    def cos_sin(self, length: int, dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
        """Cached ``cos, sin`` for positions ``0 .. length - 1``, each ``(length, dim)``."""
        cdt = _compute_dtype(dtype)
        device = self._cos.device if device is None else torch.device(device)
        if self._cos.shape[0] < length or self._cos.dtype != cdt or self._cos.device != device:
            n = max(length, self._cos.shape[0] if self._cos.dtype == cdt else 0)
            self._cos, self._sin = _cos_sin(torch.arange(n, device=device), self.dim, self.base, cdt)
        return self._cos[:length], self._sin[:length]

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        check_tensor("x", x, 4, "(B, H, T, D)")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        B, H, T, D = x.shape
        if D < self.dim:
            raise ValueError(f"RotaryEmbedding(dim={self.dim}) rotates {self.dim} features but x has only "
                             f"D = {D} (shape {shape_str(x)})")
        offset = int(check_positive("offset", offset, integer=True, allow_zero=True))
        cdt = _compute_dtype(x.dtype)
        if positions is None:
            cos, sin = self.cos_sin(offset + T, x.dtype, x.device)
            cos, sin = cos[offset:], sin[offset:]                          # (T, dim)
        else:
            if offset:
                raise ValueError(f"pass either offset or positions, not both; got offset = {offset}")
            positions = _check_positions(positions, B, T, x.device)
            if positions.is_floating_point() or positions.numel() == 0 or int(positions.min()) < 0:
                cos, sin = _cos_sin(positions, self.dim, self.base, cdt)  # not cacheable
            else:
                cc, ss = self.cos_sin(int(positions.max()) + 1, x.dtype, x.device)
                cos, sin = cc[positions], ss[positions]                    # (T, dim) or (B, T, dim)
            if cos.dim() == 3:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)              # (B, 1, T, dim)
        if D == self.dim:
            return _rotate(x, cos, sin)
        return torch.cat((_rotate(x[..., :self.dim], cos, sin), x[..., self.dim:]), dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"
