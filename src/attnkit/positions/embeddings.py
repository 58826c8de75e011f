"""Absolute position embeddings added to ``(B, T, E)`` inputs: the fixed sinusoidal table of
Vaswani et al. 2017 (https://arxiv.org/abs/1706.03762) and a learned table (BERT, GPT-2).

Both modules take an ``offset`` so that a decoder fed one new token at a time (KV-cache
decoding) embeds it at its true position: ``emb(x_t, offset=t)`` equals row ``t`` of
``emb(x_0..x_t)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive, check_tensor, shape_str

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Angles for large positions lose digits in bfloat16/float16: compute in float32 (or float64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinusoidal(num_positions: int, dim: int, *, base: float = 10000.0, dtype: torch.dtype = torch.float32,
               device=None) -> Tensor:
    r"""The sinusoidal position table of Vaswani et al. 2017 (https://arxiv.org/abs/1706.03762), §3.5.

    .. math::
        PE_{(pos, 2i)} = \sin(pos / base^{2i/dim}),\qquad PE_{(pos, 2i+1)} = \cos(pos / base^{2i/dim})

    Sines and cosines are interleaved (even columns sin, odd columns cos), as in the paper. For an
    odd ``dim`` the last column is the sine of frequency ``i = (dim - 1) / 2``.

    Args:
        num_positions: number of rows ``T`` (positions ``0 .. T-1``), ``>= 0``.
        dim: embedding size ``E``, ``> 0``.
        base: wavelength base (10000 in the paper).

    Returns:
        ``(T, E)`` tensor of ``dtype``.

    Example::

        >>> import attnkit
        >>> pe = attnkit.positions.sinusoidal(3, 4)
        >>> pe[0].tolist()                     # sin(0), cos(0), sin(0), cos(0)
        [0.0, 1.0, 0.0, 1.0]
        >>> round(pe[1, 0].item(), 4), round(pe[1, 2].item(), 4)   # sin(1), sin(1/100)
        (0.8415, 0.01)
    """
    num_positions = int(check_positive("num_positions", num_positions, integer=True, allow_zero=True))
    dim = int(check_positive("dim", dim, integer=True))
    base = float(check_positive("base", base))
    cdt = _compute_dtype(dtype)
    pos = torch.arange(num_positions, dtype=cdt, device=device).unsqueeze(1)            # (T, 1)
    two_i = torch.arange(0, dim, 2, dtype=cdt, device=device)                           # (ceil(E/2),)
    angles = pos * torch.pow(torch.tensor(base, dtype=cdt, device=device), -two_i / dim)  # (T, ceil(E/2))
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)                  # sin, cos interleaved
    return pe[:, :dim].to(dtype)


def _check_input(x: Tensor, dim: int) -> None:
    check_tensor("x", x, 3, "(B, T, E)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
    if x.shape[-1] != dim:
        raise ValueError(f"x must have last dim E = dim = {dim}; got shape {shape_str(x)}")


def _check_offset(offset: int) -> int:
    return int(check_positive("offset", offset, integer=True, allow_zero=True))


def _check_positions(positions: Tensor, T: int) -> Tensor:
    check_tensor("positions", positions, 1, "(T,)")
    if positions.is_floating_point() or positions.dtype == torch.bool or positions.shape[0] != T:
        raise ValueError(f"positions must be an integer tensor (T,) = ({T},); got shape {shape_str(positions)} "
                         f"dtype {positions.dtype}")
    if T and int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0; got min {int(positions.min())}")
    return positions


class SinusoidalEmbedding(nn.Module):
    r"""Adds the fixed sinusoidal table (:func:`sinusoidal`) to ``(B, T, E)`` inputs:
    ``y[b, t] = x[b, t] + PE[offset + t]`` (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762).

    Has no parameters; the table is cached (not saved in ``state_dict``) and grows on demand, so
    any length works. Use ``offset`` when decoding token by token.

    Args:
        dim: embedding size ``E``.
        base: wavelength base (10000 in the paper).

    Shapes: ``x (B, T, E)`` → ``(B, T, E)``.

    Example::

        >>> import torch, attnkit
        >>> emb = attnkit.positions.SinusoidalEmbedding(8)
        >>> x = torch.zeros(2, 5, 8)
        >>> torch.equal(emb(x)[:, 3:4], emb(x[:, :1], offset=3))
        True
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = int(check_positive("dim", dim, integer=True))
        self.base = float(check_positive("base", base))
        self.register_buffer("_table", sinusoidal(0, self.dim, base=self.base), persistent=False)

    def table(self, num_positions: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """The first ``num_positions`` rows ``(T, E)``, from the cache (grown when needed)."""
        cdt = _compute_dtype(dtype)
        device = self._table.device if device is None else torch.device(device)
        t = self._table
        if t.shape[0] < num_positions or t.dtype != cdt or t.device != device:
            t = sinusoidal(max(num_positions, t.shape[0]), self.dim, base=self.base, dtype=cdt, device=device)
            self._table = t
        return t[:num_positions].to(dtype)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """``x + PE[offset:offset + T]``, or ``x + PE[positions]`` for explicit integer positions
        ``(T,)`` (e.g. the global positions of a context-parallel shard)."""
        _check_input(x, self.dim)
        offset = _check_offset(offset)
        T = x.shape[1]
        if positions is not None:
            positions = _check_positions(positions, T)
            return x + self.table(int(positions.max()) + 1 if T else 0, x.dtype, x.device)[positions.to(x.device)]
        return x + self.table(offset + T, x.dtype, x.device)[offset:]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


class LearnedPositionalEmbedding(nn.Module):
    """Adds a learned table ``P (max_positions, E)`` to ``(B, T, E)`` inputs:
    ``y[b, t] = x[b, t] + P[offset + t]`` (BERT, GPT-2).

    The table is initialized ``N(0, 0.02²)`` as GPT-2 does. Positions beyond ``max_positions``
    have no embedding: asking for them raises ``ValueError``.

    Args:
        max_positions: number of rows of the table (the longest ``offset + T`` supported).
        dim: embedding size ``E``.

    Shapes: ``x (B, T, E)`` → ``(B, T, E)``.

    Example::

        >>> import torch, attnkit
        >>> emb = attnkit.positions.LearnedPositionalEmbedding(16, 8)
        >>> x = torch.zeros(2, 5, 8)
        >>> torch.equal(emb(x)[0], emb.weight[:5].detach())
        True
    """

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.max_positions = int(check_positive("max_positions", max_positions, integer=True))
        self.dim = int(check_positive("dim", dim, integer=True))
        self.weight = nn.Parameter(torch.empty(self.max_positions, self.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """``x + P[offset:offset + T]``, or ``x + P[positions]`` for explicit integer positions ``(T,)``."""
        _check_input(x, self.dim)
        offset = _check_offset(offset)
        T = x.shape[1]
        if positions is not None:
            positions = _check_positions(positions, T)
            if T and int(positions.max()) >= self.max_positions:
                raise ValueError(f"LearnedPositionalEmbedding has max_positions = {self.max_positions} but position "
                                 f"{int(positions.max())} was asked for; build it with a larger max_positions")
            return x + self.weight[positions.to(self.weight.device)].to(x.dtype)
        if offset + T > self.max_positions:
            raise ValueError(
                f"LearnedPositionalEmbedding has max_positions = {self.max_positions} but positions up to "
                f"offset + T = {offset} + {T} = {offset + T} were asked for (x has shape {shape_str(x)}); "
                "build it with a larger max_positions")
        return x + self.weight[offset:offset + T].to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}, dim={self.dim}"
