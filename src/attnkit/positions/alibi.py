r"""ALiBi, attention with linear biases (Press et al. 2022, "Train Short, Test Long",
https://arxiv.org/abs/2108.12409).

No position embeddings: each head ``h`` adds ``-m_h * distance`` to its scores, with a fixed
geometric slope ``m_h``. Nearby keys are preferred, and models extrapolate to sequences longer
than those seen in training.

Query ``i`` sits at absolute position ``i + Tk - Tq`` (bottom-right alignment, as attnkit's
causal mask: the last query is the last key), so the bias of pair ``(i, j)`` is::

    bias[h, i, j] = -m_h * ((i + Tk - Tq) - j)            (symmetric=False, causal models)
    bias[h, i, j] = -m_h * |(i + Tk - Tq) - j|            (symmetric=True, bidirectional)

With ``symmetric=False`` keys *after* the query get a positive bias: pair ALiBi with a causal
mask (as the paper does), or use ``symmetric=True`` for encoders.
"""

from __future__ import annotations

import copy
import math

import torch

from .._checks import check_positive
from .base import ScoreMod

Tensor = torch.Tensor


def alibi_slopes(num_heads: int) -> Tensor:
    r"""The paper's per-head slopes ``(H,)`` (float64).

    For ``H`` a power of two the slopes are the geometric sequence ``2^{-8k/H}``, ``k = 1..H``
    (``1/2, 1/4, ..., 1/256`` for 8 heads). Otherwise, with ``n = 2^{floor(log2 H)}``, the slopes are
    those of ``n`` heads followed by every other slope of ``2n`` heads (the odd ones:
    ``2^{-8(2j+1)/(2n)}``), taking the first ``H - n`` of them -- the rule of the authors' code.

    Example::

        >>> import attnkit
        >>> attnkit.positions.alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
        >>> attnkit.positions.alibi_slopes(6).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    """
    num_heads = int(check_positive("num_heads", num_heads, integer=True))

    def power_of_2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_2(n)
    if n != num_heads:
        slopes += power_of_2(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float64)


class ALiBi(ScoreMod):
    r"""ALiBi score mod (https://arxiv.org/abs/2108.12409): ``s_hij += -m_h (i + Tk - Tq - j)``.

    An additive score mod (``additive = True``): pass it as ``bias=`` to :func:`attnkit.attention`
    with any backend, including ``"sdpa"`` (the bias is materialized) and tiled backends (it is
    evaluated per tile from the position indices). Use it with query heads ``H = num_heads``.

    Args:
        num_heads: number of query heads; slopes from :func:`alibi_slopes`.
        symmetric: use ``-m_h |i' - j|`` (bidirectional encoders) instead of ``-m_h (i' - j)``.

    Example::

        >>> import torch, attnkit
        >>> alibi = attnkit.positions.ALiBi(2)
        >>> alibi.materialize_bias(3, 3, heads=2)[0, 0].tolist()     # head 0, slope 1/16
        [[0.0, 0.0625, 0.125], [-0.0625, 0.0, 0.0625], [-0.125, -0.0625, 0.0]]
        >>> q = k = v = torch.randn(1, 2, 3, 4)
        >>> out = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), bias=alibi)
    """

    additive = True
    translation_invariant = True
    finite = True

    def __init__(self, num_heads: int, symmetric: bool = False):
        self.num_heads = int(check_positive("num_heads", num_heads, integer=True))
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool; got {type(symmetric).__name__}")
        self.symmetric = symmetric
        self.slopes = alibi_slopes(self.num_heads)

    def on_device(self, device):
        if self.slopes.device == torch.device(device):
            return self
        cache = self.__dict__.setdefault("_twins", {})
        if str(device) not in cache:
            twin = copy.copy(self)
            twin.slopes, twin._twins = self.slopes.to(device), {}
            cache[str(device)] = twin
        return cache[str(device)]

    def check(self, batch, heads, num_queries, num_keys):
        if heads != self.num_heads:
            raise ValueError(f"ALiBi was built for num_heads = {self.num_heads} but the queries have H = {heads}")

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        dt = torch.float64 if score.dtype == torch.float64 else torch.float32
        slope = self.slopes.to(device=h.device, dtype=dt)[h]
        rel = kv_idx - (q_idx + (num_keys - num_queries))       # -(distance), integer
        if self.symmetric:
            rel = -rel.abs()
        return score + (slope * rel.to(dt)).to(score.dtype)

    def key_bias(self, h, kv_idx, q_ref, num_queries, num_keys):
        """``-m_h (q_ref' - j)``: ALiBi is row-separable unless symmetric (see ``ScoreMod.key_bias``)."""
        if self.symmetric:
            return None
        # float64, as score_mod's slopes: the caller casts to its working dtype (a float32 slope
        # would put float64 requests ~1e-7 off the reference for slopes that are not powers of 2)
        slope = self.slopes.to(device=h.device)[h]
        return slope * (kv_idx - (q_ref + (num_keys - num_queries))).to(torch.float64)

    def __repr__(self) -> str:
        return f"ALiBi(num_heads={self.num_heads}, symmetric={self.symmetric})"
