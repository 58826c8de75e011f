"""Multi-head attention with torch's interface and attnkit's mechanisms.

:class:`MultiheadAttention` is a drop-in look-alike of ``torch.nn.MultiheadAttention``
(Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762) that adds
grouped-/multi-query attention (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245; Shazeer
2019, https://arxiv.org/abs/1911.02150), a KV cache, any attnkit score / normalizer / score mod /
mask, and fast backends that still return exact weights on request.
"""

from __future__ import annotations

from functools import reduce
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import normalizers as _normalizers
from .. import scores as _scores
from .._checks import check_positive, check_probability, shape_str
from ..backends import registry
from ..functional import attention
from ..masks.base import FromTensor, Mask, as_mask
from ..masks.basic import Causal, KeyPadding
from ..positions.base import ScoreMod, as_score_mod
from ..spec import WeightsRequest, canonicalize
from . import _learnable
from .cache import KVCache

Tensor = torch.Tensor

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    r"""Multi-head attention mirroring ``torch.nn.MultiheadAttention``, with GQA/MQA and a KV cache.

    .. math::
        \mathrm{head}_h = \mathrm{attention}(Q W^Q_h,\ K W^K_{g(h)},\ V W^V_{g(h)}),\qquad
        \mathrm{out} = [\mathrm{head}_1; \dots; \mathrm{head}_H]\, W^O

    where ``g(h) = h // (num_heads // num_kv_heads)`` is the key/value head that query head ``h``
    reads, and ``attention`` is :func:`attnkit.attention` with this module's ``score``,
    ``normalizer``, ``score_mod`` and masks (default: ``softmax(q·k/√d)``, as torch).

    **A drop-in for torch's.** The arguments torch also has come in torch's order, with torch's
    defaults (``batch_first=False``: inputs ``(T, B, E)``) and torch's meaning, and
    ``load_state_dict`` accepts a ``torch.nn.MultiheadAttention`` state dict (the packed
    ``in_proj_weight``/``in_proj_bias`` are split into ``q_proj``/``k_proj``/``v_proj``), so
    replacing the class in code written for torch changes nothing but what you add. The
    differences: weights are returned before dropout (torch: after), and a query row that may
    attend to no key gives zeros (torch: NaN). attnkit's own extras are keyword-only.

    **Two mask conventions -- read this.** The arguments that torch also has keep *torch's*
    meaning:

    * ``key_padding_mask`` ``(B, Tk)``: bool ``True`` = *padding, may NOT be attended*; or a
      float tensor *added* to the scores.
    * ``attn_mask`` as a tensor ``(Tq, Tk)`` or ``(B*num_heads, Tq, Tk)``: bool ``True`` = *NOT
      allowed*; or a float tensor *added* to the scores.

    Everything that is attnkit's own uses attnkit's convention, ``True`` = *may attend*: an
    :mod:`attnkit.masks` object passed as ``attn_mask`` (e.g. ``attnkit.masks.sliding_window(4)``)
    and the constructor's default ``mask``. All masks given are combined with AND.

    Args:
        embed_dim: ``E``, features of the query and of the output.
        num_heads: ``H`` query heads; ``E % H == 0`` and ``head_dim = E // H``.
        dropout: dropout probability on the attention weights, applied in training mode only.
        bias: add biases to the four projections.
        add_bias_kv: as torch, append a learned key and value (``bias_k``, ``bias_v``) that every
            query sees (not with a cache or a score mod).
        add_zero_attn: as torch, append a key and a value of zeros that every query sees.
        kdim: features of ``key`` (default ``E``).
        vdim: features of ``value`` (default ``E``).
        batch_first: inputs are ``(B, T, E)``; default ``False``, as torch: ``(T, B, E)``.
            Unbatched ``(T, E)`` inputs work either way.
        device, dtype: of the parameters, as for ``torch.nn.Linear``.

    Keyword Args:
        num_kv_heads: ``Hkv`` key/value heads (default ``H``); ``H % Hkv == 0``. ``Hkv < H`` is
            grouped-query attention, ``Hkv = 1`` multi-query attention: ``k_proj``/``v_proj``
            then have ``Hkv * head_dim`` outputs.
        score: a name (``"scaled_dot"``, ``"dot"``, ``"cosine"``) or an :mod:`attnkit.scores`
            object working on ``head_dim`` features.
        normalizer: a name (``"softmax"``, ``"sigmoid"``, ...) or an :mod:`attnkit.normalizers` object.
        score_mod: position-dependent score modifier(s) applied on every call -- ALiBi, T5
            buckets, soft-capping (:mod:`attnkit.positions`), a ``score_mod(score, b, h, q_idx,
            kv_idx)`` callable, or a list of these. (Named ``score_mod`` because ``bias`` is
            torch's flag for the projection biases.) Learned ones (``T5RelativeBias``, an
            ``nn.Module`` or a function closing over ``nn.Parameter`` s) become part of this module:
            they are in ``parameters()`` and ``state_dict()`` (under ``score_mod.<i>``), so an
            optimizer built from the model trains them.
        mask: an :mod:`attnkit.masks` object (``True`` = may attend) applied on every call, e.g.
            ``attnkit.masks.sliding_window(128)``.
        rope: rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864) of the
            per-head queries and keys, for self-attention: ``True`` for
            ``attnkit.positions.RotaryEmbedding(head_dim)``, or a module called as
            ``rope(x (B, H, T, D), offset=int)``. Queries and new keys are rotated at positions
            ``offset ..`` with ``offset`` = the cache length (0 without a cache); cached keys are
            stored rotated.
        backend: ``"auto"`` (default) or a backend name, passed to :func:`attnkit.attention`.
        context_parallel: a ``torch.distributed`` process group (``True``: the default group) over
            which every sequence is split: each rank passes its shard of the query, key and value
            sequences (and of ``key_padding_mask``) in the ``cp_layout`` of
            :mod:`attnkit.distributed` and gets its shard of the output, equal to the module's
            output on the whole sequence (:func:`attnkit.distributed.ring_attention`; masks, score
            mods, rotary positions and attention dropout at global positions). Not with a cache,
            ``need_weights=True``, a tensor ``attn_mask``, ``add_bias_kv`` or ``add_zero_attn``.
        cp_layout: ``"zigzag"`` (default; balances causal work) or ``"contiguous"``.

    Forward:
        ``forward(query, key=None, value=None, key_padding_mask=None, need_weights=True,
        attn_mask=None, average_attn_weights=True, is_causal=False, cache=None)``

        * ``query (Tq, B, E)``, ``key (Tk, B, kdim)``, ``value (Tk, B, vdim)`` (``(B, T, ...)`` with
          ``batch_first=True``); ``key`` defaults to
          ``query`` and ``value`` to ``key`` (self-attention).
        * ``key_padding_mask (B, Tk)``, ``attn_mask``: see the conventions above. With a cache,
          ``Tk`` counts the cached keys plus the new ones.
        * ``need_weights``: also return the weights, exact for every backend. ``auto`` picks the
          reference for short sequences and the tiled backend for long ones; ``False`` is still
          the fastest. ``average_attn_weights``: weights ``(B, Tq, Tk)`` averaged over heads (summed
          tile by tile on the tiled backend: the per-head weights are never built), else
          ``(B, H, Tq, Tk)``. Weights are taken before dropout (torch returns them after).
        * ``is_causal``: apply a causal mask, aligned bottom-right (the last query sees the last
          key). Unlike torch it needs no ``attn_mask``; one given too is ANDed with it.
        * ``cache``: a :class:`~attnkit.nn.KVCache`; the new keys/values are appended to it and
          the queries attend over everything cached. With ``is_causal=True`` the new queries see
          every cached key (incremental decoding).

        Returns ``(attn_output (Tq, B, E), attn_weights or None)``; ``(B, Tq, E)`` when
        ``batch_first=True``; weights are batch first in either case, as in torch.

    Fully masked query rows give a zero output and zero weights (torch gives NaN).

    Example::

        >>> import torch, attnkit
        >>> mha = attnkit.nn.MultiheadAttention(32, num_heads=8, batch_first=True, num_kv_heads=2)
        >>> x = torch.randn(2, 5, 32)
        >>> out, w = mha(x, is_causal=True)
        >>> out.shape, w.shape
        (torch.Size([2, 5, 32]), torch.Size([2, 5, 5]))

    In place of torch's, with torch's weights::

        >>> t = torch.nn.MultiheadAttention(32, 8)
        >>> m = attnkit.nn.MultiheadAttention(32, 8)
        >>> m.load_state_dict(t.state_dict())
        <All keys matched successfully>
        >>> x = torch.randn(5, 2, 32)  # (T, B, E), torch's default layout
        >>> torch.allclose(m(x, x, x)[0], t(x, x, x)[0], atol=1e-6)
        True
    """

    #: torch's fast paths (``nn.TransformerEncoderLayer`` in eval mode) read these and step aside:
    #: the projections are separate ``q_proj``/``k_proj``/``v_proj`` layers, never one packed matrix
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 num_kv_heads: Optional[int] = None, score: Union[str, _scores.Score] = "scaled_dot",
                 normalizer: Union[str, _normalizers.Normalizer] = "softmax",
                 score_mod: Union[None, ScoreMod, Sequence] = None, mask: Optional[Mask] = None,
                 rope: Union[bool, nn.Module] = False, backend: str = "auto", context_parallel=None,
                 cp_layout: str = "zigzag"):
        super().__init__()
        embed_dim = int(check_positive("embed_dim", embed_dim, integer=True))
        num_heads = int(check_positive("num_heads", num_heads, integer=True))
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads; got embed_dim = {embed_dim} and "
                             f"num_heads = {num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else int(
            check_positive("num_kv_heads", num_kv_heads, integer=True))
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads (grouped-query attention); got "
                             f"num_heads = {num_heads} and num_kv_heads = {num_kv_heads}")
        kdim = embed_dim if kdim is None else int(check_positive("kdim", kdim, integer=True))
        vdim = embed_dim if vdim is None else int(check_positive("vdim", vdim, integer=True))
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool (projection biases); got {type(bias).__name__}. "
                            "Position biases such as ALiBi go in score_mod=")
        for name, flag in (("batch_first", batch_first), ("add_bias_kv", add_bias_kv),
                           ("add_zero_attn", add_zero_attn)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string; got {type(backend).__name__}")

        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = check_probability("dropout", dropout)
        self.batch_first = batch_first
        self.backend = backend
        if context_parallel is not None and context_parallel is not False:
            from ..distributed.layout import check_layout

            cp_layout = check_layout(cp_layout, "MultiheadAttention")
        self.context_parallel = None if context_parallel is False else context_parallel
        self.cp_layout = cp_layout
        # Resolve named options once, so bad names fail here rather than on the first call.
        self.score = _scores.get(score)  # an nn.Module: General/Additive parameters train with us
        self.normalizer = _normalizers.get(normalizer)
        if score_mod is None:
            self.score_mods: tuple[ScoreMod, ...] = ()
        elif isinstance(score_mod, (list, tuple)):
            self.score_mods = tuple(as_score_mod(m) for m in score_mod)
        else:
            self.score_mods = (as_score_mod(score_mod),)
        self.mask = None if mask is None else as_mask(mask)
        # learned parts of the score mods / mask / normalizer train and save with this module
        _learnable.register(self, "score_mod", self.score_mods)
        _learnable.register(self, "mask_parameters", [self.mask])
        _learnable.register(self, "normalizer_parameters", [self.normalizer])
        self.add_zero_attn = add_zero_attn
        if rope is True:
            from ..positions.rope import RotaryEmbedding

            rope = RotaryEmbedding(self.head_dim)
        elif rope is False or rope is None:
            rope = None
        elif not callable(rope):
            raise TypeError(f"rope must be a bool or a module called as rope(x, offset=...); got {type(rope).__name__}")
        self.rope = rope

        kw = {"device": device, "dtype": dtype}
        kv_out = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim, kv_out, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim, kv_out, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if add_bias_kv:  # torch's learned extra key and value, appended after the projections
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv_out, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv_out, **kw))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # As torch.nn.MultiheadAttention with separate q/k/v weights: Xavier-uniform input
        # projections, zero biases; out_proj keeps nn.Linear's default weight init.
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Union[None, Tensor, Mask] = None, average_attn_weights: bool = True,
                is_causal: bool = False, cache: Optional[KVCache] = None) -> tuple[Tensor, Optional[Tensor]]:
        """See the class docstring."""
        if not isinstance(need_weights, bool):
            raise TypeError(f"need_weights must be a bool; got {type(need_weights).__name__}")
        if not isinstance(average_attn_weights, bool):
            raise TypeError(f"average_attn_weights must be a bool; got {type(average_attn_weights).__name__}")
        if self.context_parallel is not None:
            return self._context_parallel(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal,
                                          cache)
        q, k, v, kw, layout = self._prepare(query, key, value, key_padding_mask, attn_mask, is_causal, cache,
                                            commit=True)
        B, Tq, unbatched = layout
        if need_weights:  # averaged: summed over heads tile by tile where the backend can
            out, w = attention(q, k, v, return_weights=WeightsRequest(average=average_attn_weights),
                               backend=self.backend, **kw)
            w = w.squeeze(1) if average_attn_weights else w  # (B, Tq, Tk) or (B, H, Tq, Tk)
        else:
            out, w = attention(q, k, v, backend=self.backend, **kw), None
        out = out.transpose(1, 2).reshape(B, Tq, self.embed_dim)  # (B, H, Tq, D) -> (B, Tq, E)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
            w = None if w is None else w.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (B, Tq, E) -> (Tq, B, E)
        return out, w

    def _context_parallel(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, cache):
        """``forward`` on this rank's shards of the sequences (see ``context_parallel``)."""
        import torch.distributed as dist

        from ..distributed import gather, ring_attention

        refused = [(cache is not None, "a cache (decoding runs on one process)"),
                   (need_weights, "need_weights=True (the weights of a split sequence are not gathered): pass "
                                  "need_weights=False"),
                   (attn_mask is not None and not isinstance(attn_mask, Mask),
                    "a tensor attn_mask (give an attnkit.masks object: it sees global positions)"),
                   (self.bias_k is not None or self.add_zero_attn, "add_bias_kv or add_zero_attn"),
                   (key_padding_mask is not None and (not isinstance(key_padding_mask, torch.Tensor)
                                                      or key_padding_mask.dtype != torch.bool),
                    "a float key_padding_mask (give a bool one, True = padding)")]
        for bad, what in refused:
            if bad:
                raise ValueError(f"MultiheadAttention(context_parallel=...) cannot take {what}")
        group = None if self.context_parallel is True else self.context_parallel
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        q, k, v, kw, (B, Tq, unbatched) = self._prepare(query, key, value, None, None, False, None, commit=True,
                                                         global_positions=(self.cp_layout, rank, world))
        masks = [] if kw["mask"] is None else [kw["mask"]]
        if is_causal:
            masks.append(Causal("bottom_right"))
        if attn_mask is not None:
            masks.append(attn_mask)
        if key_padding_mask is not None:
            local = key_padding_mask.unsqueeze(0) if unbatched else key_padding_mask
            keep = gather((~local).to(torch.uint8), self.cp_layout, group, dim=-1).bool()  # (B, Tk) global
            masks.append(KeyPadding(keep))
        kw["mask"] = reduce(lambda a, b: a & b, masks) if masks else None
        out = ring_attention(q, k, v, group=group, layout=self.cp_layout, **kw)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Tq, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def explain(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Union[None, Tensor, Mask] = None, is_causal: bool = False,
                cache: Optional[KVCache] = None) -> registry.Choice:
        """Which backend ``forward`` with these arguments would use, and why the others refused.
        The cache is left unchanged.

        Example::

            >>> import torch, attnkit
            >>> mha = attnkit.nn.MultiheadAttention(16, 4)
            >>> x = torch.randn(1, 3, 16)
            >>> mha.explain(x, need_weights=False).backend, mha.explain(x).backend
            ('sdpa', 'reference')
        """
        q, k, v, kw, _ = self._prepare(query, key, value, key_padding_mask, attn_mask, is_causal, cache,
                                       commit=False)
        spec = canonicalize(q, k, v, return_weights=need_weights, **kw)
        return registry.choose(spec, self.backend, strict=False)

    def _prepare(self, query, key, value, key_padding_mask, attn_mask, is_causal, cache, commit,
                 global_positions=None):
        """Check the inputs, project them to heads and turn every mask into attnkit's form.
        ``global_positions = (layout, rank, world)``: the inputs are a context-parallel shard (rotary
        positions are then the shard's global ones)."""
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be an attnkit.nn.KVCache or None; got {type(cache).__name__}")
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if extra and cache is not None:
            raise ValueError("cache cannot be used with add_bias_kv or add_zero_attn (their extra key would be "
                             "appended again at every step); build the module without them to decode with a cache")
        if extra and self.score_mods:
            raise ValueError("score_mod cannot be combined with add_bias_kv or add_zero_attn: the appended key has "
                             "no position for the score mod to use")
        layout = "(B, T, E)" if self.batch_first else "(T, B, E)"
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"query must be a torch.Tensor {layout}; got {type(query).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be a 3-D tensor {layout} or an unbatched 2-D tensor (T, E); "
                             f"got shape {shape_str(query)}")
        if key is None:
            if value is not None:
                raise ValueError("value was given without key; pass key too (or neither, for self-attention)")
            key = query
        if value is None:
            value = key
        unbatched = query.dim() == 2
        for name, x in (("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
            if x.dim() != query.dim():
                lay = "(T, E)" if unbatched else layout
                raise ValueError(f"{name} must have as many dims as query ({query.dim()}-D, {lay}); "
                                 f"got query {shape_str(query)} and {name} {shape_str(x)}")
        # Normalize every input to batch-first (B, T, features).
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        for name, x, want in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != want:
                what = "embed_dim" if name == "query" else ("kdim" if name == "key" else "vdim")
                raise ValueError(f"{name} must have {want} features ({what}) in its last dim; got shape {shape_str(x)}")
        B, Tq, _ = query.shape
        if key.shape[0] != B or value.shape[0] != B:
            raise ValueError(f"query, key and value must have the same batch size; got query {shape_str(query)}, "
                             f"key {shape_str(key)} and value {shape_str(value)} (batch first)")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have the same sequence length; got key {shape_str(key)} and "
                             f"value {shape_str(value)} (batch first)")
        pdtype = self.q_proj.weight.dtype
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dtype != pdtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {pdtype}; "
                                f"convert one of them (e.g. module.to({x.dtype}))")
        if cache is not None and cache.batch_size is not None and cache.batch_size != B:
            raise ValueError(f"cache holds a batch of {cache.batch_size} sequences but query has batch {B}; "
                             "use a fresh KVCache (or cache.reset()) for a new batch")
        Tk = key.shape[1] + (cache.length if cache is not None else 0)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim

        masks: list[Mask] = [] if self.mask is None else [self.mask]
        biases: list = list(self.score_mods)
        if is_causal:
            masks.append(Causal("bottom_right"))
        if isinstance(attn_mask, Mask):
            masks.append(attn_mask)
        elif attn_mask is not None:
            keep, add = _torch_attn_mask(attn_mask, B, H, Tq, Tk, unbatched, cache is not None)
            masks += [] if keep is None else [FromTensor(keep)]
            biases += [] if add is None else [add.to(query.dtype)]
        if key_padding_mask is not None:
            keep, add = _torch_key_padding_mask(key_padding_mask, B, Tk, unbatched, cache is not None)
            masks += [] if keep is None else [KeyPadding(keep)]
            biases += [] if add is None else [add.to(query.dtype)]

        q = self.q_proj(query).view(B, Tq, H, D).transpose(1, 2)  # (B, Tq, E) -> (B, H, Tq, D)
        k = self.k_proj(key).view(B, key.shape[1], Hkv, D).transpose(1, 2)  # (B, Tk', Hkv*D) -> (B, Hkv, Tk', D)
        v = self.v_proj(value).view(B, value.shape[1], Hkv, D).transpose(1, 2)  # (B, Hkv, Tk', D)
        if self.rope is not None and global_positions is not None:
            from ..distributed import shard_positions

            layout, rank, world = global_positions
            q = self.rope(q, positions=shard_positions(layout, Tq * world, rank, world, device=q.device))
            k = self.rope(k, positions=shard_positions(layout, k.shape[2] * world, rank, world, device=k.device))
        elif self.rope is not None:  # rotate at absolute positions: the new tokens follow the cached ones
            offset = cache.length if cache is not None else 0
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.append(k, v) if commit else cache.concat(k, v)  # (B, Hkv, Tk, D)
        mask = reduce(lambda a, b: a & b, masks) if masks else None
        if extra:  # as torch: the learned key/value, then a zero one, visible to every query
            k, v, mask, biases = self._append_extra_keys(k, v, mask, biases, Tq, Tk)

        kw = dict(score=self.score, normalizer=self.normalizer, mask=mask,
                  bias=biases or None, dropout_p=self.dropout if self.training else 0.0)
        return q, k, v, kw, (B, Tq, unbatched)

    def _append_extra_keys(self, k, v, mask, biases, Tq, Tk):
        """``add_bias_kv`` / ``add_zero_attn``: append keys ``Tk, Tk + 1`` that every query sees
        (the masks of the ``Tk`` real keys are materialized and padded, as torch pads its own)."""
        B, Hkv, _, D = k.shape
        new_k, new_v = [k], [v]
        if self.bias_k is not None:
            new_k.append(self.bias_k.view(1, Hkv, 1, D).expand(B, Hkv, 1, D).to(k.dtype))
            new_v.append(self.bias_v.view(1, Hkv, 1, D).expand(B, Hkv, 1, D).to(v.dtype))
        if self.add_zero_attn:
            new_k.append(k.new_zeros(B, Hkv, 1, D))
            new_v.append(v.new_zeros(B, Hkv, 1, D))
        n = len(new_k) - 1
        if mask is not None:
            keep = mask.materialize(Tq, Tk, B, self.num_heads, device=k.device)
            mask = FromTensor(torch.nn.functional.pad(keep, (0, n), value=True))
        biases = [torch.nn.functional.pad(b, (0, n)) for b in biases]  # only tensors here (no score_mod)
        return torch.cat(new_k, dim=2), torch.cat(new_v, dim=2), mask, biases

    # -- loading torch's layout ------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Also accept ``torch.nn.MultiheadAttention``'s parameter names: the packed ``in_proj_weight``
        / ``in_proj_bias`` (split into ``q_proj``/``k_proj``/``v_proj``) and the separate
        ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` of a module with ``kdim``/``vdim``."""
        kv_out = self.num_kv_heads * self.head_dim
        sizes = [self.embed_dim, kv_out, kv_out]
        for packed, part in ((prefix + "in_proj_weight", "weight"), (prefix + "in_proj_bias", "bias")):
            if packed not in state_dict:
                continue
            t = state_dict.pop(packed)
            if t.shape[0] != sum(sizes):
                hint = (f" (torch's layout has num_kv_heads = num_heads = {self.num_heads}; this module has "
                        f"num_kv_heads = {self.num_kv_heads})" if self.num_kv_heads != self.num_heads else "")
                error_msgs.append(f"{packed}: expected {sum(sizes)} rows (q, k, v = {sizes}); got shape "
                                  f"{tuple(t.shape)}{hint}")
                continue
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), t.split(sizes)):
                state_dict[f"{prefix}{name}.{part}"] = chunk
        for name in ("q_proj", "k_proj", "v_proj"):
            if prefix + name + "_weight" in state_dict:
                state_dict[f"{prefix}{name}.weight"] = state_dict.pop(prefix + name + "_weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- conversion from / to torch ------------------------------------------------------------
    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, **kwargs) -> "MultiheadAttention":
        """Copy a ``torch.nn.MultiheadAttention`` (its ``in_proj_weight`` is split into
        ``q_proj``/``k_proj``/``v_proj``; separate ``kdim``/``vdim`` weights are copied as they
        are). ``batch_first``, ``dropout``, dtype, device and train/eval mode are copied too;
        ``kwargs`` (``score_mod``, ``mask``, ``backend``, ...) go to the constructor.

        Example::

            >>> import torch, attnkit
            >>> t = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            >>> m = attnkit.nn.MultiheadAttention.from_torch(t)
            >>> x = torch.randn(1, 3, 8)
            >>> torch.allclose(m(x, x, x)[0], t(x, x, x)[0], atol=1e-6)
            True
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention; got {type(mha).__name__}")
        for name in ("embed_dim", "num_heads", "kdim", "vdim", "dropout", "bias", "batch_first", "num_kv_heads",
                     "add_bias_kv", "add_zero_attn"):
            if name in kwargs:
                raise TypeError(f"from_torch takes {name} from mha; do not pass it")
        w = mha.out_proj.weight
        m = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.out_proj.bias is not None,
                add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                batch_first=mha.batch_first, device=w.device, dtype=w.dtype, **kwargs)
        missing, unexpected = m.load_state_dict(mha.state_dict(), strict=False)
        own = {n for n in m.state_dict() if n.split(".")[0] in ("q_proj", "k_proj", "v_proj", "out_proj", "bias_k",
                                                               "bias_v")}
        if unexpected or set(missing) & own:
            raise ValueError(f"mha's state_dict does not match: missing {sorted(set(missing) & own)}, "
                             f"unexpected {sorted(unexpected)}")
        return m.train(mha.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """An equivalent ``torch.nn.MultiheadAttention`` (same weights, ``batch_first``, dropout and
        mode). Grouped-query key/value weights are repeated per head group, which is exact.
        Raises ``ValueError`` when the module uses something torch cannot express (another score
        or normalizer, a score mod, a default mask).

        Example::

            >>> import torch, attnkit
            >>> m = attnkit.nn.MultiheadAttention(8, 4, num_kv_heads=2).eval()
            >>> x = torch.randn(1, 3, 8)
            >>> torch.allclose(m(x)[0], m.to_torch()(x, x, x)[0], atol=1e-6)
            True
        """
        why = []
        if type(self.score) is not _scores.ScaledDot:
            why.append(f"score is {self.score.name!r}, not 'scaled_dot'")
        if type(self.normalizer) is not _normalizers.Softmax or self.normalizer.temperature != 1.0:
            why.append(f"normalizer is {self.normalizer!r}, not a plain softmax")
        if self.score_mods:
            why.append("score_mod is set")
        if self.mask is not None:
            why.append("a default mask is set (pass it to torch's forward as attn_mask instead)")
        if self.rope is not None:
            why.append("rope is set")
        if why:
            raise ValueError("torch.nn.MultiheadAttention cannot express this module: " + "; ".join(why))
        w = self.q_proj.weight
        bias = self.q_proj.bias is not None
        t = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=bias,
                                  add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                                  kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                  device=w.device, dtype=w.dtype)
        g, D = self.num_heads // self.num_kv_heads, self.head_dim

        def expand(x: Tensor) -> Tensor:  # (Hkv*D, ...) -> (H*D, ...): kv head h//g serves query head h
            return x.reshape(self.num_kv_heads, D, *x.shape[1:]).repeat_interleave(g, dim=0).reshape(
                self.num_heads * D, *x.shape[1:])

        with torch.no_grad():
            wq, wk, wv = self.q_proj.weight, expand(self.k_proj.weight), expand(self.v_proj.weight)
            if t._qkv_same_embed_dim:
                t.in_proj_weight.copy_(torch.cat([wq, wk, wv], dim=0))
            else:
                t.q_proj_weight.copy_(wq)
                t.k_proj_weight.copy_(wk)
                t.v_proj_weight.copy_(wv)
            t.out_proj.weight.copy_(self.out_proj.weight)
            if self.bias_k is not None:
                t.bias_k.copy_(expand(self.bias_k.view(-1, 1)).view(1, 1, -1))
                t.bias_v.copy_(expand(self.bias_v.view(-1, 1)).view(1, 1, -1))
            if bias:
                t.in_proj_bias.copy_(torch.cat([self.q_proj.bias, expand(self.k_proj.bias),
                                                expand(self.v_proj.bias)]))
                t.out_proj.bias.copy_(self.out_proj.bias)
        return t.train(self.training)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        s += f", dropout={self.dropout}, batch_first={self.batch_first}, normalizer={self.normalizer!r}"
        if self.score_mods:
            s += f", score_mod={self.score_mods!r}"
        if self.mask is not None:
            s += f", mask={self.mask!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


# -- torch-convention masks -> attnkit (keep: True = may attend; add: float bias) ---------------
def _split_float(m: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A float mask becomes a bias; its ``-inf`` entries become a boolean mask instead, so that
    fully masked rows give zeros (not NaN) and fast backends see a plain mask."""
    hidden = torch.isneginf(m)
    if not bool(hidden.any()):
        return None, m
    add = m.masked_fill(hidden, 0.0)
    return ~hidden, (add if bool(add.any()) else None)


def _torch_attn_mask(m, B, H, Tq, Tk, unbatched, cached):
    if not isinstance(m, torch.Tensor):
        raise TypeError("attn_mask must be a tensor (torch convention: bool True = NOT allowed, or float added) "
                        f"or an attnkit.masks.Mask (True = may attend); got {type(m).__name__}")
    note = " (Tk counts the cached keys plus the new ones)" if cached else ""
    lead = H if unbatched else B * H
    if m.dim() == 2 and tuple(m.shape) == (Tq, Tk):
        m = m.view(1, 1, Tq, Tk)
    elif m.dim() == 3 and tuple(m.shape) == (lead, Tq, Tk):
        m = m.view(B, H, Tq, Tk)  # torch's (B*H, ...) layout is batch-major
    else:
        want = f"({'num_heads' if unbatched else 'B*num_heads'}, Tq, Tk) = ({lead}, {Tq}, {Tk})"
        raise ValueError(f"attn_mask must have shape (Tq, Tk) = ({Tq}, {Tk}) or {want}{note}; "
                         f"got {shape_str(m)}")
    if m.dtype == torch.bool:
        return ~m, None
    if m.is_floating_point():
        return _split_float(m)
    raise TypeError(f"attn_mask must be bool (True = NOT allowed) or floating point (added); got dtype {m.dtype}")


def _torch_key_padding_mask(m, B, Tk, unbatched, cached):
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a tensor (B, Tk); got {type(m).__name__}")
    note = " (Tk counts the cached keys plus the new ones)" if cached else ""
    want = (Tk,) if unbatched else (B, Tk)
    if tuple(m.shape) != want:
        raise ValueError(f"key_padding_mask must have shape {'(Tk,)' if unbatched else '(B, Tk)'} = "
                         f"{want}{note}; got {shape_str(m)}")
    m = m.reshape(B, Tk)
    if m.dtype == torch.bool:
        return ~m, None  # torch: True = padding
    if m.is_floating_point():
        keep, add = _split_float(m)
        return keep, None if add is None else add.view(B, 1, 1, Tk)
    raise TypeError(f"key_padding_mask must be bool (True = padding) or floating point (added); got dtype {m.dtype}")
