"""The tiled backend as one opaque operator for ``torch.compile`` and ``torch.export``.

The tile loop is Python that the compiler cannot (and should not) unroll. Inside a compiled
region the tiled backend therefore calls ``torch.ops.attnkit.tiled_attention(q, k, v, data, desc)``,
a custom operator whose ``desc`` string describes the request completely: the score, the
normalizer, the scale, the mask and the score mods, each by name and parameters, and, for a mask
that holds data, the index of its tensor in ``data``. The operator rebuilds the request from
``desc`` and ``data`` when it runs (so an exported program needs no Python state of the process
that traced it) and runs the tiled kernels; it returns the output and each row's log-sum-exp,
from which a second operator computes the gradients of ``q``, ``k`` and ``v`` tile by tile, as the
eager backward does.

Served this way: float32 or float64, dot-product scores, softmax; the masks
:class:`~attnkit.masks.Causal`, :class:`~attnkit.masks.SlidingWindow`,
:class:`~attnkit.masks.Chunked` (integer shift) and :class:`~attnkit.masks.KeyPadding` (its
lengths or keep-mask travel in ``data``), and their ``&``/``|``; ALiBi and soft-capping; no
dropout, no weights. Other data-bearing requests (a dense mask tensor, a bias tensor or a learned
bias, whose gradient the operator would have to return) keep the eager route (a graph break),
and ``auto`` never sends them here.

Example::

    >>> import torch, attnkit
    >>> f = lambda q, k, v: attnkit.attention(q, k, v, mask=attnkit.masks.sliding_window(8), backend="tiled")
    >>> q = k = v = torch.randn(1, 2, 64, 16)
    >>> torch.allclose(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), atol=1e-6)
    True
    >>> from attnkit.spec import canonicalize
    >>> describe(canonicalize(q, k, v, mask=attnkit.masks.causal() & attnkit.masks.key_padding(torch.tensor([50]))))
    ("('scaled_dot', 0.25, ('and', ('causal', 'bottom_right'), ('padding', 0)), ())", [tensor([50])])
"""

from __future__ import annotations

import ast
from typing import Optional

import torch

from ..masks.base import And, Mask, Or
from ..masks.basic import Causal, Chunked, KeyPadding, SlidingWindow
from ..normalizers.base import Softmax
from ..positions.alibi import ALiBi
from ..positions.base import SoftCap
from ..scores import Dot, ScaledDot
from ..spec import AttentionSpec

Tensor = torch.Tensor

_SCORES = {Dot: "dot", ScaledDot: "scaled_dot"}


def _mask_desc(m: Mask, data: list[Tensor]) -> Optional[str]:
    t = type(m)
    if t is Causal:
        return f"('causal', {m.align!r})"
    if t is SlidingWindow:
        return f"('window', {m.left}, {m.right}, {m.align!r})"
    if t is Chunked and isinstance(m.shift, int):
        return f"('chunked', {m.size}, {m.shift}, {m.align!r})"
    if t is KeyPadding:
        data.append(m.lengths if m.lengths is not None else m.keep)
        return f"('padding', {len(data) - 1})"
    if t is And or t is Or:
        a, b = _mask_desc(m.left, data), _mask_desc(m.right, data)
        if a is None or b is None:
            return None
        return f"('{'and' if t is And else 'or'}', {a}, {b})"
    return None


def _mod_desc(m) -> Optional[str]:
    t = type(m)
    if t is ALiBi:
        return f"('alibi', {m.num_heads}, {m.symmetric!r})"
    if t is SoftCap:
        return f"('softcap', {m.cap!r})"
    return None


def describe(spec: AttentionSpec) -> Optional[tuple[str, list[Tensor]]]:
    """``(desc, data)``: the request as a Python literal the operator rebuilds it from and the
    tensors its masks hold, or None when the operator cannot serve it (see the module's docstring)."""
    score = _SCORES.get(type(spec.score))
    if score is None or type(spec.normalizer) is not Softmax or spec.normalizer.temperature != 1.0:
        return None
    if spec.dropout_p > 0 or spec.return_weights or spec.dtype not in (torch.float32, torch.float64):
        return None
    data: list[Tensor] = []
    mask = "None"
    if spec.mask is not None:
        mask = _mask_desc(spec.mask, data)
        if mask is None:
            return None
    mods = []
    for m in spec.score_mods:
        d = _mod_desc(m)
        if d is None:
            return None
        mods.append(d)
    return f"({score!r}, {spec.scale!r}, {mask}, ({''.join(d + ', ' for d in mods)}))", data


def _mask(d, data: list[Tensor]) -> Optional[Mask]:
    if d is None:
        return None
    kind = d[0]
    if kind == "causal":
        return Causal(d[1])
    if kind == "window":
        return SlidingWindow(d[1], d[2], d[3])
    if kind == "chunked":
        return Chunked(d[1], d[2], d[3])
    if kind == "padding":
        return KeyPadding(data[d[1]])
    if kind == "and":
        return _mask(d[1], data) & _mask(d[2], data)
    if kind == "or":
        return _mask(d[1], data) | _mask(d[2], data)
    raise ValueError(f"tiled_attention: unknown mask description {d!r}")


def _mod(d):
    if d[0] == "alibi":
        return ALiBi(d[1], symmetric=d[2])
    if d[0] == "softcap":
        return SoftCap(d[1])
    raise ValueError(f"tiled_attention: unknown bias description {d!r}")


def _setup(q: Tensor, k: Tensor, v: Tensor, data: list[Tensor], desc: str):
    """The request ``desc`` describes, set up by the tiled backend: ``(spec, qp, kp, v, plan)``."""
    from ..spec import canonicalize
    from .registry import REGISTRY

    score, scale, mask, mods = ast.literal_eval(desc)
    spec = canonicalize(q, k, v, score=score, normalizer="softmax", mask=_mask(mask, data),
                        bias=[_mod(m) for m in mods] or None, scale=scale)
    qp, kp, v, plan, _, _ = REGISTRY["tiled"].setup(q, k, v, spec)
    return spec, qp, kp, v, plan


@torch.library.custom_op("attnkit::tiled_attention", mutates_args=())
def tiled_attention(q: Tensor, k: Tensor, v: Tensor, data: list[Tensor], desc: str) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Tq, Dv), lse (B, H, Tq))``: attention of the request ``desc`` describes
    (``data``: the tensors its masks hold), by the tiled backend's kernels, and the log-sum-exp of
    each row that its backward reads."""
    from ..kernels.tiled import run_forward

    spec, qp, kp, v, plan = _setup(q, k, v, data, desc)
    out, lse, _ = run_forward(qp, kp, v, spec, plan)
    return out.contiguous(), lse.contiguous()


@tiled_attention.register_fake
def _(q, k, v, data, desc):
    return q.new_empty(*q.shape[:3], v.shape[-1], dtype=v.dtype), q.new_empty(q.shape[:3])


@torch.library.custom_op("attnkit::tiled_attention_backward", mutates_args=())
def tiled_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                             data: list[Tensor], desc: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``q``, ``k``, ``v`` for the output gradient ``dout``, by the tiled backward
    (tile by tile, from ``out`` and ``lse``; no (Tq, Tk) tensor)."""
    from ..kernels.plan import query_scale
    from ..kernels.tiled import run_backward

    spec, qp, kp, v, plan = _setup(q, k, v, data, desc)
    dq, dk, dv, _ = run_backward(qp, kp, v, out, lse, dout, spec, plan)
    if plan.prescaled:  # the kernels saw q * scale
        dq = dq * query_scale(spec)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@tiled_attention_backward.register_fake
def _(q, k, v, out, lse, dout, data, desc):  # contiguous, as the kernel returns them (not q's strides)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, data, desc = inputs
    ctx.save_for_backward(q, k, v, *output, *data)
    ctx.desc = desc
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *data = ctx.saved_tensors
    dq, dk, dv = tiled_attention_backward(q, k, v, out, lse, dout.contiguous(), data, ctx.desc)
    return dq, dk, dv, [None] * len(data), None


tiled_attention.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["describe", "tiled_attention", "tiled_attention_backward"]
