"""Linear-time attention modules: ``(B, T, E)`` in, ``(B, T, E)`` out.

Each module is q/k/v projections → an :mod:`attnkit.linear` op → output projection:

* :class:`LinearAttention` -- kernelized linear attention (Katharopoulos et al. 2020,
  https://arxiv.org/abs/2006.16236), non-causal or causal;
* :class:`PerformerAttention` -- FAVOR+ approximation of softmax attention (Choromanski et al.
  2021, https://arxiv.org/abs/2009.14794), non-causal or causal;
* :class:`LinformerAttention` -- softmax attention over sequence-projected keys/values (Wang et
  al. 2020, https://arxiv.org/abs/2006.04768), non-causal only.

``key_padding_mask`` follows ``torch.nn.MultiheadAttention``: a bool ``(B, Tk)`` tensor with
``True`` = padding (the opposite of attnkit's functional keep-masks). Linear and Performer
attention drop padded keys exactly; Linformer zeroes them before its projection (their content
has no influence, but the projection still has columns for those positions).

``forward(query, key=None, value=None, key_padding_mask=None)``: ``key`` defaults to ``query``
(self-attention) and ``value`` to ``key``. Weights are never materialized, so there is no
``need_weights``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import linear as L
from .._checks import check_positive, check_probability, check_tensor, shape_str

Tensor = torch.Tensor


class _ProjectedAttention(nn.Module):
    """Shared q/k/v/out projections and input checks."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        self.embed_dim = int(check_positive("embed_dim", embed_dim, integer=True))
        self.num_heads = int(check_positive("num_heads", num_heads, integer=True))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; got embed_dim = {embed_dim}, "
                             f"num_heads = {num_heads}")
        self.num_kv_heads = self.num_heads if num_kv_heads is None else int(
            check_positive("num_kv_heads", num_kv_heads, integer=True))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads; got num_heads = {num_heads}, "
                             f"num_kv_heads = {num_kv_heads}")
        self.head_dim = self.embed_dim // self.num_heads
        self.kdim = self.embed_dim if kdim is None else int(check_positive("kdim", kdim, integer=True))
        self.vdim = self.embed_dim if vdim is None else int(check_positive("vdim", vdim, integer=True))
        kv_out = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, kv_out, bias=bias)
        self.v_proj = nn.Linear(self.vdim, kv_out, bias=bias)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)

    def _inputs(self, query: Tensor, key: Tensor | None, value: Tensor | None, key_padding_mask: Tensor | None):
        check_tensor("query", query, 3, "(B, Tq, E)")
        key = query if key is None else key
        value = key if value is None else value
        check_tensor("key", key, 3, "(B, Tk, kdim)")
        check_tensor("value", value, 3, "(B, Tk, vdim)")
        for name, x, d in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != d:
                raise ValueError(f"{name} must have last dim {d}; got shape {shape_str(x)}")
        B, Tq, _ = query.shape
        if key.shape[0] != B or value.shape[0] != B or key.shape[1] != value.shape[1]:
            raise ValueError(f"query, key and value must share the batch size, and key and value the length; got "
                             f"query {shape_str(query)}, key {shape_str(key)}, value {shape_str(value)}")
        Tk = key.shape[1]
        keep = None
        if key_padding_mask is not None:
            check_tensor("key_padding_mask", key_padding_mask, 2, "(B, Tk), True = padding")
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = padding, as in "
                                f"torch.nn.MultiheadAttention); got dtype {key_padding_mask.dtype}")
            if tuple(key_padding_mask.shape) != (B, Tk):
                raise ValueError(f"key_padding_mask must have shape (B, Tk) = ({B}, {Tk}); "
                                 f"got {shape_str(key_padding_mask)}")
            keep = ~key_padding_mask.to(query.device)
        q = self.q_proj(query).view(B, Tq, self.num_heads, self.head_dim).transpose(1, 2)        # (B, H, Tq, hd)
        k = self.k_proj(key).view(B, Tk, self.num_kv_heads, self.head_dim).transpose(1, 2)       # (B, Hkv, Tk, hd)
        v = self.v_proj(value).view(B, Tk, self.num_kv_heads, self.head_dim).transpose(1, 2)     # (B, Hkv, Tk, hd)
        return q, k, v, keep

    def _output(self, out: Tensor) -> Tensor:
        B, H, T, hd = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * hd))                        # (B, T, E)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        q, k, v, keep = self._inputs(query, key, value, key_padding_mask)
        return self._output(self._attend(q, k, v, keep))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"


class LinearAttention(_ProjectedAttention):
    r"""Multi-head kernelized linear attention (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236).

    ``out = W_o · linear_attention(W_q x, W_k y, W_v y)`` per head, with
    ``out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)`` (see
    :func:`attnkit.linear.linear_attention`): ``O(T)`` time and memory. Causal mode uses chunked
    prefix sums (the recurrent form of the paper).

    Args:
        embed_dim: model size ``E`` (``E % num_heads == 0``).
        num_heads: query heads ``H``.
        causal: query ``i`` sees keys ``j <= i + Tk - Tq`` only.
        feature_map: ``"elu+1"`` (default), ``"relu"`` or a callable ``φ`` (non-negative values).
        num_kv_heads: key/value heads (grouped-query attention); default ``num_heads``.
        bias: biases in the projections.
        eps: denominator epsilon.
        chunk_size: chunk length of the causal form.
        kdim, vdim: feature sizes of ``key`` / ``value`` inputs (default ``embed_dim``).

    Shapes: ``query (B, Tq, E)``, ``key (B, Tk, kdim)``, ``value (B, Tk, vdim)``,
    ``key_padding_mask (B, Tk)`` bool with ``True`` = padding → ``(B, Tq, E)``.

    Example::

        >>> import torch, attnkit
        >>> attn = attnkit.nn.LinearAttention(embed_dim=16, num_heads=4, causal=True)
        >>> x = torch.randn(2, 10, 16)
        >>> attn(x, key_padding_mask=torch.arange(10).expand(2, 10) >= 8).shape
        torch.Size([2, 10, 16])
    """

    def __init__(self, embed_dim: int, num_heads: int, causal: bool = False, feature_map: L.FeatureMap = "elu+1",
                 *, num_kv_heads: int | None = None, bias: bool = True, eps: float = 1e-6,
                 chunk_size: int | None = None, kdim: int | None = None, vdim: int | None = None):
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, kdim, vdim)
        self.causal = L._check_bool("causal", causal)
        L._feature_map(feature_map)          # fail early on a bad name
        self.feature_map = feature_map
        self.eps = L._check_eps(eps)
        self.chunk_size = L._check_chunk(chunk_size)

    def _attend(self, q, k, v, keep):
        return L.linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, key_padding=keep,
                                  eps=self.eps, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        fm = self.feature_map if isinstance(self.feature_map, str) else getattr(self.feature_map, "__name__", "callable")
        return super().extra_repr() + f", causal={self.causal}, feature_map={fm!r}"


class PerformerAttention(_ProjectedAttention):
    r"""Multi-head Performer attention, FAVOR+ (Choromanski et al. 2021, https://arxiv.org/abs/2009.14794).

    Approximates ``softmax(q kᵀ/√d) v`` per head with ``num_features`` positive orthogonal random
    features (see :func:`attnkit.linear.performer_attention` for the measured error). The projection
    ``(num_features, head_dim)`` is a buffer (saved in ``state_dict``), shared by all heads and drawn
    from ``torch.Generator().manual_seed(seed)`` (or the global RNG when ``seed`` is None). With
    ``redraw=True`` a fresh projection is drawn at every training-mode forward (the paper's feature
    redrawing); in eval mode the current one is kept, so inference is deterministic.

    Args:
        embed_dim: model size ``E`` (``E % num_heads == 0``).
        num_heads: query heads ``H``.
        num_features: random features ``m > 0``.
        causal: query ``i`` sees keys ``j <= i + Tk - Tq`` only.
        redraw: redraw the projection at each training forward.
        seed: seed of the projection draws (default None: the global RNG, so that ``torch.manual_seed``
            controls it and layers get different projections).
        num_kv_heads, bias, eps, chunk_size, kdim, vdim: as :class:`LinearAttention`.

    Shapes: as :class:`LinearAttention`.

    Example::

        >>> import torch, attnkit
        >>> attn = attnkit.nn.PerformerAttention(embed_dim=16, num_heads=2, num_features=32, seed=0)
        >>> attn.projection.shape
        torch.Size([32, 8])
        >>> attn(torch.randn(2, 10, 16)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(self, embed_dim: int, num_heads: int, num_features: int = 256, causal: bool = False,
                 redraw: bool = False, seed: int | None = None, *, num_kv_heads: int | None = None, bias: bool = True,
                 eps: float = 1e-6, chunk_size: int | None = None, kdim: int | None = None, vdim: int | None = None):
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, kdim, vdim)
        self.num_features = int(check_positive("num_features", num_features, integer=True))
        self.causal = L._check_bool("causal", causal)
        self.redraw = L._check_bool("redraw", redraw)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None; got {type(seed).__name__}")
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.eps = L._check_eps(eps)
        self.chunk_size = L._check_chunk(chunk_size)
        self.register_buffer("projection", self._draw())

    def _draw(self) -> Tensor:
        return L.orthogonal_random_matrix(self.num_features, self.head_dim, self._generator)

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw a new random projection (in place, keeping the buffer's device and dtype)."""
        self.projection.copy_(self._draw().to(self.projection))

    def _attend(self, q, k, v, keep):
        if self.redraw and self.training:
            self.redraw_projection()
        return L.performer_attention(q, k, v, causal=self.causal, projection=self.projection, key_padding=keep,
                                     eps=self.eps, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_features={self.num_features}, causal={self.causal}, redraw={self.redraw}"


class LinformerAttention(_ProjectedAttention):
    r"""Multi-head Linformer attention (Wang et al. 2020, https://arxiv.org/abs/2006.04768).

    Keys and values are projected along the sequence by learned ``E, F (proj_len, seq_len)``
    (shared by all heads, "headwise sharing" in the paper; ``share_kv=True`` also ties ``F = E``)
    and softmax attention runs over the ``proj_len`` projected rows:
    ``out = softmax(q (E k)ᵀ / √d) (F v)`` -- ``O(T · proj_len)`` instead of ``O(T²)``.
    ``E`` and ``F`` start as ``N(0, 1/proj_len)`` (the paper's Johnson-Lindenstrauss argument).

    Inputs shorter than ``seq_len`` use the first ``Tk`` columns of ``E`` and ``F``; longer inputs
    are an error. There is no causal form. Padded keys (``key_padding_mask``) are zeroed before
    the projection: changing them does not change the output, but unlike exact attention the
    result is not the same as for the unpadded sequence.

    Args:
        embed_dim: model size ``E`` (``E % num_heads == 0``).
        num_heads: query heads ``H``.
        seq_len: the longest key sequence ``Tk``.
        proj_len: projected length ``P`` (``k`` in the paper).
        share_kv: use one projection for keys and values.
        dropout: dropout on the attention weights (training mode only).
        num_kv_heads, bias, kdim, vdim: as :class:`LinearAttention`.

    Shapes: as :class:`LinearAttention`, with ``Tk <= seq_len``.

    Example::

        >>> import torch, attnkit
        >>> attn = attnkit.nn.LinformerAttention(embed_dim=16, num_heads=2, seq_len=32, proj_len=8)
        >>> attn(torch.randn(2, 20, 16)).shape
        torch.Size([2, 20, 16])
    """

    def __init__(self, embed_dim: int, num_heads: int, seq_len: int, proj_len: int, share_kv: bool = False,
                 dropout: float = 0.0, *, num_kv_heads: int | None = None, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None):
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, kdim, vdim)
        self.seq_len = int(check_positive("seq_len", seq_len, integer=True))
        self.proj_len = int(check_positive("proj_len", proj_len, integer=True))
        self.share_kv = L._check_bool("share_kv", share_kv)
        self.dropout = check_probability("dropout", dropout)
        self.E = nn.Parameter(torch.empty(self.proj_len, self.seq_len))
        self.F = None if self.share_kv else nn.Parameter(torch.empty(self.proj_len, self.seq_len))
        self.reset_projections()

    def reset_projections(self) -> None:
        for p in (self.E, self.F):
            if p is not None:
                nn.init.normal_(p, std=1.0 / math.sqrt(self.proj_len))

    def _attend(self, q, k, v, keep):
        Tk = k.shape[2]
        if Tk > self.seq_len:
            raise ValueError(f"LinformerAttention was built for seq_len = {self.seq_len} keys but got Tk = {Tk}; "
                             "build it with a larger seq_len")
        E = self.E[:, :Tk]
        F = E if self.F is None else self.F[:, :Tk]
        return L.linformer_attention(q, k, v, E, F, key_padding=keep,
                                     dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", seq_len={self.seq_len}, proj_len={self.proj_len}, share_kv={self.share_kv}"


__all__ = ["LinearAttention", "PerformerAttention", "LinformerAttention"]
