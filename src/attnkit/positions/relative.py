r"""Learned relative-position biases: T5's bucketed bias (a score mod) and Shaw et al.'s relative
key/value embeddings (which depend on the query, so they are not a score mod).

Relative position ``r = j - i'`` is the key position minus the query position, where query ``i``
sits at ``i' = i + Tk - Tq`` (bottom-right alignment, as attnkit's causal mask and KV-cache
decoding: the last query is at the last key).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_positive, check_probability, check_tensor, shape_str
from .base import ScoreMod

Tensor = torch.Tensor


def relative_positions(num_queries: int, num_keys: int, device=None) -> Tensor:
    """``r[i, j] = j - (i + Tk - Tq)``, shape ``(Tq, Tk)`` (int64).

    Example::

        >>> import attnkit
        >>> attnkit.positions.relative_positions(2, 3).tolist()
        [[-1, 0, 1], [-2, -1, 0]]
    """
    q = torch.arange(num_queries, device=device).unsqueeze(1) + (num_keys - num_queries)
    return torch.arange(num_keys, device=device).unsqueeze(0) - q


# ----------------------------------------------------------------------------------------------
# T5
# ----------------------------------------------------------------------------------------------

def t5_bucket(relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32,
              max_distance: int = 128) -> Tensor:
    r"""T5's relative-position bucket (Raffel et al. 2020, https://arxiv.org/abs/1910.10683, §2.1;
    the function ``_relative_position_bucket`` of Mesh TensorFlow / Hugging Face T5).

    ``relative_position = key_pos - query_pos``. With ``bidirectional`` half of the buckets hold
    keys after the query (``r > 0``) and half the others; otherwise (decoders) keys after the query
    all share bucket 0 and only ``n = max(-r, 0)`` matters. Within each half of ``N`` buckets,
    distances ``n < N/2`` get their own bucket; larger ones are spaced logarithmically up to
    ``max_distance`` and everything beyond lands in the last bucket::

        bucket(n) = n                                                          if n < N/2
                  = min(N - 1, N/2 + floor(log(n / (N/2)) / log(max_distance / (N/2)) * (N - N/2)))

    The logarithm is taken in float32, as T5 does, so buckets match pretrained checkpoints.

    Args:
        relative_position: integer tensor of any shape.
        bidirectional: encoder-style (True) or causal decoder-style (False) buckets.
        num_buckets: total number of buckets.
        max_distance: distance from which every position shares the last bucket.

    Returns:
        int64 tensor of the same shape, values in ``[0, num_buckets)``.

    Example::

        >>> import torch, attnkit
        >>> r = torch.tensor([-200, -20, -3, 0, 3, 20, 200])
        >>> attnkit.positions.t5_bucket(r).tolist()
        [15, 10, 3, 0, 19, 26, 31]
        >>> attnkit.positions.t5_bucket(r, bidirectional=False).tolist()
        [31, 17, 3, 0, 0, 0, 0]
    """
    if not isinstance(relative_position, torch.Tensor) or relative_position.is_floating_point() \
            or relative_position.dtype == torch.bool or relative_position.is_complex():
        raise TypeError("relative_position must be an integer tensor; got "
                        f"{getattr(relative_position, 'dtype', type(relative_position).__name__)}")
    _check_t5_args(num_buckets, max_distance, bidirectional)
    rel = relative_position.long()
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp_min(0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # clamp only avoids log(0) on entries that is_small sends to the other branch anyway
    n_large = n.clamp_min(max_exact).float()
    large = max_exact + (torch.log(n_large / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp_max(num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


def _check_t5_args(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool; got {type(bidirectional).__name__}")
    check_positive("num_buckets", num_buckets, integer=True)
    check_positive("max_distance", max_distance, integer=True)
    half = num_buckets // 2 if bidirectional else num_buckets
    if half < 2:
        raise ValueError(f"num_buckets must be >= {4 if bidirectional else 2} "
                         f"({'bidirectional' if bidirectional else 'unidirectional'}); got {num_buckets}")
    if max_distance <= half // 2:
        raise ValueError(f"max_distance must exceed the exact-bucket range {half // 2} "
                         f"(num_buckets = {num_buckets}); got {max_distance}")


class T5RelativeBias(ScoreMod, nn.Module):
    r"""T5's learned relative-position bias (Raffel et al. 2020, https://arxiv.org/abs/1910.10683):
    ``s_hij += E[bucket(j - i'), h]`` with an embedding ``E (num_buckets, H)`` and :func:`t5_bucket`.

    Both a score mod (``additive = True``: pass it as ``bias=``; SDPA and tiled backends can use
    it) and an ``nn.Module`` holding the embedding, so it trains with the model that owns it. Calling
    the module, ``bias = t5(Tq, Tk)``, returns the materialized bias ``(1, H, Tq, Tk)``.

    T5 itself uses unscaled dot products (``score="dot"``); the ``1/sqrt(d)`` is folded into its
    initialization.

    Args:
        num_heads: number of query heads ``H``.
        num_buckets: buckets (32 in T5).
        max_distance: distance mapped to the last bucket (128 in T5).
        bidirectional: encoder (True) or decoder (False) bucketing.

    Example::

        >>> import torch, attnkit
        >>> t5 = attnkit.positions.T5RelativeBias(num_heads=2)
        >>> t5(3, 4).shape
        torch.Size([1, 2, 3, 4])
        >>> q = k = v = torch.randn(1, 2, 4, 8)
        >>> out = attnkit.attention(q, k, v, score="dot", bias=t5)
    """

    additive = True
    translation_invariant = True
    finite = True

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        nn.Module.__init__(self)
        self.num_heads = int(check_positive("num_heads", num_heads, integer=True))
        _check_t5_args(num_buckets, max_distance, bidirectional)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, self.num_heads)

    def buckets(self, num_queries: int, num_keys: int, device=None) -> Tensor:
        """Bucket of every (query, key) pair, ``(Tq, Tk)`` int64."""
        return t5_bucket(relative_positions(num_queries, num_keys, device), self.bidirectional,
                         self.num_buckets, self.max_distance)

    def check(self, batch, heads, num_queries, num_keys):
        if heads != self.num_heads:
            raise ValueError(f"T5RelativeBias was built for num_heads = {self.num_heads} but the queries "
                             f"have H = {heads}")

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        rel = kv_idx - (q_idx + (num_keys - num_queries))
        bucket = t5_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        w = self.embedding.weight
        if w.device != h.device:
            w = w.to(h.device)
        return score + w[bucket, h].to(score.dtype)

    def forward(self, num_queries: int, num_keys: int) -> Tensor:
        """The bias ``(1, H, Tq, Tk)`` in the embedding's dtype (differentiable)."""
        w = self.embedding.weight
        return self.materialize_bias(num_queries, num_keys, heads=self.num_heads, device=w.device, dtype=w.dtype)


    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")


# ----------------------------------------------------------------------------------------------
# Shaw et al. 2018
# ----------------------------------------------------------------------------------------------

class ShawRelative(nn.Module):
    r"""Relative position representations (Shaw et al. 2018, https://arxiv.org/abs/1803.02155).

    Learned key-side and value-side embeddings ``a^K_r``, ``a^V_r`` of the clipped relative position
    ``r = clip(j - i', -k, k)`` (``k = max_relative_position``; ``i' = i + Tk - Tq``) change
    attention to

    .. math::
        e_{ij} = \frac{q_i (k_j + a^K_{ij})^\top}{\sqrt{d}},\qquad
        \alpha_{ij} = \mathrm{softmax}_j(e_{ij}),\qquad
        z_i = \sum_j \alpha_{ij} (v_j + a^V_{ij})

    Since ``q_i a^K_{ij}`` depends on the query, this is not a score mod. It is split into two
    pieces that wrap any :func:`attnkit.attention` call:

    * :meth:`key_bias` returns ``q_i · a^K_{ij} * scale`` ``(B, H, Tq, Tk)``; passed as ``bias=`` it is
      added *after* attnkit scales ``q·k``. With the default ``scale = 1/sqrt(D)`` and
      ``score="scaled_dot"`` (whose own scale is ``1/sqrt(D)``) the scores are exactly Shaw's
      ``e_ij``. If you pass ``scale=s`` to ``attention``, pass the same ``scale=s`` here.
    * :meth:`value_term` returns ``Σ_j w_ij a^V_{ij}`` ``(B, H, Tq, Dv)`` for weights ``w``; add it to the
      attention output.

    :meth:`attention` does both (``z = attention(...) + value_term(weights)``).

    Both cost ``O(Tq (2k+1) D + Tq Tk)`` rather than materializing the ``(Tq, Tk, D)`` embeddings.

    Args:
        head_dim: query/key features per head ``D``.
        max_relative_position: clipping distance ``k`` (the tables have ``2k+1`` rows).
        num_heads: ``None`` (default, as in the paper) shares the tables across heads; an int
            gives each head its own tables ``(H, 2k+1, D)``.
        value_dim: value features per head ``Dv`` (default ``head_dim``).

    Example::

        >>> import torch, attnkit
        >>> shaw = attnkit.positions.ShawRelative(head_dim=8, max_relative_position=2)
        >>> q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
        >>> out = shaw.attention(q, k, v, mask=attnkit.masks.causal())
        >>> out.shape
        torch.Size([1, 2, 5, 8])
    """

    def __init__(self, head_dim: int, max_relative_position: int, num_heads: int | None = None,
                 value_dim: int | None = None):
        super().__init__()
        self.head_dim = int(check_positive("head_dim", head_dim, integer=True))
        self.max_relative_position = int(check_positive("max_relative_position", max_relative_position,
                                                        integer=True, allow_zero=True))
        self.num_heads = None if num_heads is None else int(check_positive("num_heads", num_heads, integer=True))
        self.value_dim = self.head_dim if value_dim is None else int(check_positive("value_dim", value_dim,
                                                                                    integer=True))
        rows = 2 * self.max_relative_position + 1
        lead = () if self.num_heads is None else (self.num_heads,)
        self.key_table = nn.Parameter(torch.empty(*lead, rows, self.head_dim))
        self.value_table = nn.Parameter(torch.empty(*lead, rows, self.value_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for t in (self.key_table, self.value_table):
            nn.init.xavier_uniform_(t.view(-1, t.shape[-1]))

    def relative_index(self, num_queries: int, num_keys: int, device=None) -> Tensor:
        """Table row of every pair: ``clip(j - i', -k, k) + k``, ``(Tq, Tk)`` int64."""
        k = self.max_relative_position
        return relative_positions(num_queries, num_keys, device).clamp(-k, k) + k

    def _check_heads(self, name: str, x: Tensor) -> None:
        if self.num_heads is not None and x.shape[1] != self.num_heads:
            raise ValueError(f"ShawRelative was built with num_heads = {self.num_heads} but {name} has "
                             f"H = {x.shape[1]} (shape {shape_str(x)})")

    def key_bias(self, q: Tensor, num_keys: int, scale: float | None = None) -> Tensor:
        """``bias[b, h, i, j] = q[b, h, i] · a^K[clip(j - i', -k, k)] * scale``, ``(B, H, Tq, Tk)``.

        ``scale`` defaults to ``1/sqrt(D)``, matching ``attnkit.attention(score="scaled_dot")``.
        """
        check_tensor("q", q, 4, "(B, H, Tq, D)")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q must have head_dim D = {self.head_dim}; got shape {shape_str(q)}")
        self._check_heads("q", q)
        num_keys = int(check_positive("num_keys", num_keys, integer=True, allow_zero=True))
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else float(check_positive("scale", scale))
        B, H, Tq, _ = q.shape
        table = self.key_table.to(q.dtype)
        if table.dim() == 2:
            r = q @ table.t()                                        # (B, H, Tq, 2k+1)
        else:
            r = torch.einsum("bhqd,hrd->bhqr", q, table)             # (B, H, Tq, 2k+1)
        idx = self.relative_index(Tq, num_keys, q.device).expand(B, H, Tq, num_keys)
        return torch.gather(r, -1, idx) * scale

    def value_term(self, weights: Tensor) -> Tensor:
        """``out[b, h, i] = Σ_j weights[b, h, i, j] a^V[clip(j - i', -k, k)]``, ``(B, H, Tq, Dv)``."""
        check_tensor("weights", weights, 4, "(B, H, Tq, Tk)")
        self._check_heads("weights", weights)
        B, H, Tq, Tk = weights.shape
        idx = self.relative_index(Tq, Tk, weights.device).expand(B, H, Tq, Tk)
        rows = 2 * self.max_relative_position + 1
        # sum the weights of the keys that share a table row, then one small matmul
        wb = weights.new_zeros(B, H, Tq, rows).scatter_add(-1, idx, weights)   # (B, H, Tq, 2k+1)
        table = self.value_table.to(weights.dtype)
        if table.dim() == 2:
            return wb @ table
        return torch.einsum("bhqr,hrd->bhqd", wb, table)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask=None, **kw):
        """Shaw et al.'s full attention: ``attnkit.attention`` with :meth:`key_bias` added to the scores
        and :meth:`value_term` added to the output.

        ``kw`` are passed to :func:`attnkit.attention` (``score``, ``normalizer``, ``bias``, ``scale``,
        ``dropout_p``, ``return_weights``, ``backend``, ``generator``). With dropout the value term
        uses the same dropped weights as the values. Returns ``out (B, H, Tq, Dv)``, or
        ``(out, weights)`` when ``return_weights=True`` (pre-dropout weights).
        """
        from .. import scores as _scores
        from ..backends.reference import dropout_weights, expand_kv
        from ..functional import attention

        check_tensor("q", q, 4, "(B, H, Tq, D)")
        check_tensor("k", k, 4, "(B, Hkv, Tk, D)")
        check_tensor("v", v, 4, "(B, Hkv, Tk, Dv)")
        if v.shape[-1] != self.value_dim:
            raise ValueError(f"v must have value_dim Dv = {self.value_dim}; got shape {shape_str(v)}")
        want_weights = kw.pop("return_weights", False)
        dropout_p = check_probability("dropout_p", kw.pop("dropout_p", 0.0))
        generator = kw.get("generator")
        scale = kw.get("scale")
        if scale is None:
            scale = _scores.get(kw.get("score", "scaled_dot")).default_scale(q.shape[-1])
        user_bias = kw.pop("bias", None)
        biases = [] if user_bias is None else (list(user_bias) if isinstance(user_bias, (list, tuple)) else [user_bias])
        bias = [self.key_bias(q, k.shape[-2], scale), *biases]
        out, w = attention(q, k, v, mask=mask, bias=bias, return_weights=True, **kw)
        if dropout_p:
            wd = dropout_weights(w, float(dropout_p), generator)
            out = wd @ expand_kv(v, q.shape[1] // k.shape[1])
        else:
            wd = w
        out = out + self.value_term(wd)
        return (out, w) if want_weights else out

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, max_relative_position={self.max_relative_position}, "
                f"num_heads={self.num_heads}, value_dim={self.value_dim}")
