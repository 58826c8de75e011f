r"""Ulysses attention (Jacobs et al. 2023, "DeepSpeed Ulysses"): all-to-all over heads.

Each of the ``R`` ranks holds a sequence shard of all ``H`` heads. One all-to-all turns that into
the *whole* sequence of ``H / R`` heads per rank; any local :func:`attnkit.attention` then runs
on complete rows (so every normalizer works, sparsemax and entmax included, and every mask and
bias, since positions are the global ones), and a second all-to-all brings the output back to
sequence shards of all heads. Both all-to-alls are autograd functions whose backward is the
inverse exchange, so the whole call is differentiable.

Head-dependent pieces are shifted to the rank's heads: ALiBi slopes, T5 tables, per-head bias
tensors and block-sparse layouts, ``score_mod``/``mask_mod`` callables (which receive the
*global* head index ``h``), per-head score weights.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .. import scores as _scores
from ..functional import attention
from ..masks.base import And, FromMod, FromTensor, Mask, Not, Or, as_mask
from ..masks.basic import Causal, Chunked, KeyPadding, SlidingWindow
from ..masks.sparse import BigBird, DilatedWindow, Fixed, Longformer, Strided
from ..positions.alibi import ALiBi
from ..positions.base import FromBias, FromScoreMod, ScoreMod, SoftCap, TensorBias, as_score_mod
from ..backends import registry
from ..spec import WeightsRequest, canonicalize
from ._group import check_4d, GroupInfo, agree, dtype_code, dtype_name, group_info
from .layout import LAYOUTS, check_layout, shard_positions

Tensor = torch.Tensor
_FN = "ulysses_attention"


class _AllToAll(torch.autograd.Function):
    """``out[i] = x_i[me]`` for ``x (R, ...)`` on every rank ``i``: chunk ``j`` of each rank goes to
    rank ``j``. The exchange is its own inverse (a transpose of the rank × chunk grid), so the
    backward is the same all-to-all applied to the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, info: GroupInfo) -> Tensor:
        ctx.info = info
        return _all_to_all(x, info)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _all_to_all(g, ctx.info), None


def _all_to_all(x: Tensor, info: GroupInfo) -> Tensor:
    import torch.distributed as dist

    x = x.contiguous()
    if info.world_size == 1:
        return x.clone()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=info.group)
    return out


def _to_heads(x: Tensor, info: GroupInfo, order: Optional[Tensor]) -> Tensor:
    """``(B, Hx, n, D)`` sequence shard of all heads -> ``(B, Hx / R, R·n, D)`` whole sequence of
    this rank's heads, in global position order."""
    R = info.world_size
    B, Hx, n, D = x.shape
    y = _AllToAll.apply(x.reshape(B, R, Hx // R, n, D).transpose(0, 1), info)  # (R, B, Hx/R, n, D), by source rank
    y = y.permute(1, 2, 0, 3, 4).reshape(B, Hx // R, R * n, D)                 # shards in rank order
    return y if order is None else y.index_select(2, order)


def _to_shards(y: Tensor, info: GroupInfo, inverse: Optional[Tensor]) -> Tensor:
    """The inverse of :func:`_to_heads`: ``(B, H / R, N, Dv)`` -> ``(B, H, N / R, Dv)``."""
    R = info.world_size
    B, Hl, N, Dv = y.shape
    if inverse is not None:
        y = y.index_select(2, inverse)  # back to rank order
    x = _AllToAll.apply(y.reshape(B, Hl, R, N // R, Dv).permute(2, 0, 1, 3, 4), info)  # (R, B, H/R, n, Dv)
    return x.transpose(0, 1).reshape(B, R * Hl, N // R, Dv)


def _orders(layout: str, n: int, info: GroupInfo, device) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Index that sorts the rank-ordered concatenation of shards into global order, and its inverse."""
    if layout == "contiguous" or info.world_size == 1:
        return None, None
    pos = torch.cat([shard_positions(layout, n * info.world_size, r, info.world_size) for r in range(info.world_size)])
    order = torch.argsort(pos).to(device)
    return order, pos.to(device)


# -- head-dependent masks and biases, shifted to this rank's heads -----------------------------------
_HEAD_FREE_MASKS = (Causal, SlidingWindow, Chunked, KeyPadding, Longformer, BigBird, Strided, Fixed, DilatedWindow)


class _HeadShiftedMask(Mask):
    """``inner`` evaluated at global head ``h + offset`` of ``heads`` (this rank sees ``H / R`` of them)."""

    def __init__(self, inner: Mask, offset: int, heads: int):
        self.inner, self.offset, self.heads = inner, offset, heads
        self.has_weight_factor = inner.has_weight_factor
        self.query_invariant = inner.query_invariant

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        return self.inner.mask_mod(b, h + self.offset, q_idx, kv_idx, num_queries, num_keys)

    def weight_factor(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        return self.inner.weight_factor(b, h + self.offset, q_idx, kv_idx, num_queries, num_keys)

    def check(self, batch, heads, num_queries, num_keys):
        self.inner.check(batch, self.heads, num_queries, num_keys)

    def sees_every_key(self, num_queries, num_keys):
        return self.inner.sees_every_key(num_queries, num_keys)

    def __repr__(self):
        return f"heads[{self.offset}:]({self.inner!r})"


def _shift_mask(mask: Mask, offset: int, H: int, Hl: int) -> Mask:
    if isinstance(mask, _HEAD_FREE_MASKS):
        return mask
    if isinstance(mask, And):
        return And(_shift_mask(mask.left, offset, H, Hl), _shift_mask(mask.right, offset, H, Hl))
    if isinstance(mask, Or):
        return Or(_shift_mask(mask.left, offset, H, Hl), _shift_mask(mask.right, offset, H, Hl))
    if isinstance(mask, Not):
        return Not(_shift_mask(mask.inner, offset, H, Hl))
    if isinstance(mask, FromTensor):
        mask.check(mask.tensor.shape[0], H, mask.tensor.shape[2], mask.tensor.shape[3])
        t = mask.tensor
        return FromTensor(t[:, offset:offset + Hl] if t.shape[1] > 1 else t)
    if isinstance(mask, FromMod):
        return FromMod(_at_global_head(mask.fn, offset, "mask_mod"))
    return _HeadShiftedMask(mask, offset, H)


def _at_global_head(fn, offset: int, default_name: str):
    """``fn(b, h, q_idx, kv_idx)`` (a mask or bias callable) evaluated at global head ``h + offset``."""

    def shifted(b, h, q_idx, kv_idx):
        return fn(b, h + offset, q_idx, kv_idx)

    shifted.__name__ = getattr(fn, "__name__", default_name)
    return shifted


class _HeadShiftedMod(ScoreMod):
    """``inner`` evaluated at global head ``h + offset`` of ``heads``."""

    def __init__(self, inner: ScoreMod, offset: int, heads: int):
        self.inner, self.offset, self.heads = inner, offset, heads
        self.additive = inner.additive

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        return self.inner.score_mod(score, b, h + self.offset, q_idx, kv_idx, num_queries, num_keys)

    def check(self, batch, heads, num_queries, num_keys):
        self.inner.check(batch, self.heads, num_queries, num_keys)

    def key_bias(self, h, kv_idx, q_ref, num_queries, num_keys):
        return self.inner.key_bias(h + self.offset, kv_idx, q_ref, num_queries, num_keys)

    def __repr__(self):
        return f"heads[{self.offset}:]({self.inner!r})"


class _HeadShiftedModule(_HeadShiftedMod, nn.Module):
    """A shifted score mod whose inner mod has parameters (a T5 table): registered as a submodule,
    so backends find and differentiate them."""

    def __init__(self, inner: ScoreMod, offset: int, heads: int):
        nn.Module.__init__(self)
        _HeadShiftedMod.__init__(self, inner, offset, heads)

    __repr__ = _HeadShiftedMod.__repr__


def _shift_mod(mod: ScoreMod, offset: int, H: int, Hl: int) -> ScoreMod:
    if isinstance(mod, SoftCap):
        return mod
    if type(mod) is ALiBi:
        mod.check(1, H, 1, 1)
        shifted = copy.copy(mod)
        shifted.num_heads, shifted.slopes = Hl, mod.slopes[offset:offset + Hl]
        return shifted
    if isinstance(mod, TensorBias):
        mod.check(mod.tensor.shape[0], H, mod.tensor.shape[2], mod.tensor.shape[3])
        t = mod.tensor
        return TensorBias(t[:, offset:offset + Hl] if t.shape[1] > 1 else t)
    if isinstance(mod, FromScoreMod):
        fn = mod.fn

        def shifted_fn(score, b, h, q_idx, kv_idx):
            return fn(score, b, h + offset, q_idx, kv_idx)

        shifted_fn.__name__ = getattr(fn, "__name__", "score_mod")
        return FromScoreMod(shifted_fn)
    if isinstance(mod, FromBias):
        return FromBias(_at_global_head(mod.fn, offset, "bias_mod"))
    if isinstance(mod, nn.Module):
        return _HeadShiftedModule(mod, offset, H)
    return _HeadShiftedMod(mod, offset, H)


_ATTENTION_KWARGS = ("score", "normalizer", "mask", "bias", "scale", "dropout_p", "return_weights", "backend",
                     "generator")


def _stand_in(x: Tensor, heads: int, length: int) -> Tensor:
    """A memory-free stand-in of ``x`` for validation: ``(B, heads, length, dim)``, same dtype,
    device and ``requires_grad``."""
    t = torch.zeros((), dtype=x.dtype, device=x.device)
    if x.requires_grad:
        t = t.requires_grad_()
    return t.expand(x.shape[0], heads, length, x.shape[3])


def _describe(s) -> str:
    B, H, Hkv, nq, nk, D, Dv, dt, lay = s
    return (f"q ({B}, {H}, {nq}, {D}), k ({B}, {Hkv}, {nk}, {D}), v ({B}, {Hkv}, {nk}, {Dv}), {dtype_name(dt)}, "
            f"layout {LAYOUTS[lay] if 0 <= lay < len(LAYOUTS) else '?'!r}")


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, layout: str = "zigzag", **attention_kwargs):
    r"""Exact attention over a sequence sharded across ``group``, by an all-to-all over heads.

    Rank ``r`` holds the positions ``P_r`` (``layout``) of all heads. After the all-to-all it holds
    heads ``[r·H/R, (r+1)·H/R)`` (and key/value heads ``[r·Hkv/R, (r+1)·Hkv/R)``) over the whole
    sequence and computes, with any :func:`attnkit.attention` request,

    .. math::
        \mathrm{out}_{h,i} = \sum_j \mathrm{normalizer}\big(\mathrm{mod}(\mathrm{scale}\cdot
        \mathrm{score}(q_{h,i}, k_{h,j}))\big)_{j}\, v_{h,j},\qquad h \in \text{its heads},

    then a second all-to-all returns ``out`` for its positions and all heads.

    Args:
        q: this rank's queries ``(B, H, n_q, D)``.
        k: keys ``(B, Hkv, n_k, D)``; ``H`` and ``Hkv`` must be multiples of ``R`` (and ``H % Hkv == 0``).
        v: values ``(B, Hkv, n_k, Dv)``.
        group: a ``torch.distributed`` process group (None: the default group).
        layout: how the shards were cut, ``"zigzag"`` (default) or ``"contiguous"`` (see :func:`shard`).
        **attention_kwargs: anything :func:`attnkit.attention` takes (``score``, ``normalizer``
            incl. ``"sparsemax"``/``"entmax15"``, ``mask``, ``bias``, ``scale``, ``backend``); masks
            and biases are written for the global sequence and all ``H`` heads (tensors broadcastable
            to the global ``(B, H, Tq, Tk)``). ``return_weights=True`` also returns this rank's heads'
            weights ``(B, H / R, Tq, Tk)``. Not supported: ``dropout_p > 0`` and a ``WeightsRequest``.

    Returns:
        ``out (B, H, n_q, Dv)`` for this rank's positions, equal to the single-process
        :func:`attnkit.attention` on the gathered tensors; or ``(out, weights)``.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: on every rank, when ``H`` or ``Hkv`` is not a multiple of ``R``, when the ranks'
            shapes, dtypes or layouts differ, or when a rank's arguments are invalid.

    Gradients flow to ``q``, ``k``, ``v`` (the all-to-alls' backward is the inverse exchange);
    learnable parameters (a T5 table) get this rank's heads' share: sum them over the group.

    Example (``torchrun --nproc-per-node 2 script.py``)::

        import torch, torch.distributed as dist, attnkit
        from attnkit.distributed import ulysses_attention, shard
        dist.init_process_group("gloo")
        torch.manual_seed(0)
        q, k, v = torch.randn(3, 1, 4, 64, 16, dtype=torch.float64).unbind(0)
        out = ulysses_attention(*(shard(x, "zigzag") for x in (q, k, v)), normalizer="entmax15",
                                mask=attnkit.masks.causal())   # (1, 4, 32, 16): this rank's rows
    """
    info = group_info(group, _FN)
    R = info.world_size
    error: Optional[BaseException] = None
    shared: list[int] = []
    try:
        layout = check_layout(layout, _FN)
        check_4d(_FN, q=q, k=k, v=v)
        H, Hkv = q.shape[1], k.shape[1]
        for name, h in (("H", H), ("Hkv", Hkv)):
            if h % R:
                raise ValueError(f"{_FN}: each of the R = {R} ranks gets {name} / R heads, so {name} must be a "
                                 f"multiple of {R}; got {name} = {h} (q {tuple(q.shape)}, k {tuple(k.shape)}). Use "
                                 "attnkit.distributed.ring_attention, or a group whose size divides the heads")
        for name in ("dropout_p",):
            if attention_kwargs.get(name, 0.0):
                raise ValueError(f"{_FN}: {name} must be 0 (dropout is not supported by Ulysses attention yet); "
                                 f"got {attention_kwargs[name]}")
        if isinstance(attention_kwargs.get("return_weights"), WeightsRequest):
            raise ValueError(f"{_FN}: return_weights must be a bool (this rank's heads' weights are returned); "
                             "a WeightsRequest is not supported")
        for name, n in (("q", q.shape[2]), ("k", k.shape[2])):
            if layout == "zigzag" and n % 2:
                raise ValueError(f"{_FN}: layout 'zigzag' gives each rank two chunks of equal length, so the shard "
                                 f"length must be even; {name} has shard length {n}")
        shared = [q.shape[0], H, Hkv, q.shape[2], k.shape[2], q.shape[3], v.shape[3], dtype_code(q.dtype),
                  LAYOUTS.index(layout)]
        unknown = sorted(set(attention_kwargs) - set(_ATTENTION_KWARGS))
        if unknown:
            raise TypeError(f"{_FN}: unexpected keyword argument(s) {unknown}; it takes group, layout and the "
                            f"keyword arguments of attnkit.attention: {', '.join(_ATTENTION_KWARGS)}")
        kwargs = _localize(dict(attention_kwargs), q, info)
        score = kwargs.pop("_prepared_score", None)
        if score is not None:
            q, k = score.prepare(q, k)
        # the local request, validated now (with this rank's heads and the global lengths), so that a
        # bad argument raises on every rank before any exchange
        spec = canonicalize(_stand_in(q, H // R, R * q.shape[2]), _stand_in(k, Hkv // R, R * k.shape[2]),
                            _stand_in(v, Hkv // R, R * k.shape[2]),
                            **{n: x for n, x in kwargs.items() if n != "backend"})
        registry.choose(spec, kwargs.get("backend", "auto"))
    except Exception as e:  # noqa: BLE001 -- re-raised after every rank has heard of it
        error = e
    agree(info, _FN, shared or [0] * 9, error=error, describe=_describe,
          what="shards of the same shapes and dtype, in the same layout")
    q_order, q_inv = _orders(layout, q.shape[2], info, q.device)
    k_order, k_inv = _orders(layout, k.shape[2], info, q.device)
    qh = _to_heads(q, info, q_order)
    kh = _to_heads(k, info, k_order)
    vh = _to_heads(v, info, k_order)
    res = attention(qh, kh, vh, **kwargs)
    out, w = (res if isinstance(res, tuple) else (res, None))
    out = _to_shards(out, info, q_inv)
    return (out, w) if w is not None else out


def _localize(kw: dict, q: Tensor, info: GroupInfo) -> dict:
    """The ``attention`` arguments for this rank's heads: masks and biases shifted to them; a
    dot-product score with parameters (``General`` per head, ``Cosine``) prepared on the shards first."""
    H = q.shape[1]
    Hl = H // info.world_size
    off = info.rank * Hl
    if kw.get("mask") is not None:
        kw["mask"] = _shift_mask(as_mask(kw["mask"]), off, H, Hl)
    bias = kw.get("bias")
    if bias is not None:
        mods = [as_score_mod(b) for b in (bias if isinstance(bias, (list, tuple)) else [bias])]
        kw["bias"] = [_shift_mod(m, off, H, Hl) for m in mods]
    score = _scores.get(kw.get("score", "scaled_dot"))
    if isinstance(score, _scores.Score) and type(score) not in (_scores.Dot, _scores.ScaledDot) \
            and score.tile_is_dot and score.tileable:
        # per-token work (normalization, q·W) before the exchange; then a plain dot product
        if kw.get("scale") is None:
            kw["scale"] = score.default_scale(q.shape[-1])
        kw["score"] = "dot"
        kw["_prepared_score"] = score
    return kw
