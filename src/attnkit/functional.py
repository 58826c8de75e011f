"""The functional entry point: ``attnkit.attention``."""

from __future__ import annotations

import torch

import dataclasses

from . import nonfinite
from . import recording as _capture
from . import request_cache
from .backends import registry
from .spec import WeightsRequest, canonicalize

Tensor = torch.Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, score="scaled_dot", normalizer="softmax", mask=None,
              bias=None, scale: float | None = None, dropout_p: float = 0.0, return_weights: bool | WeightsRequest = False,
              backend: str = "auto", generator: torch.Generator | None = None):
    r"""Attention = score → (bias, mask) → normalize → aggregate.

    .. math::
        s_{ij} = \mathrm{mod}(\mathrm{scale}\cdot\mathrm{score}(q_i, k_j)),\quad
        w_{i\cdot} = \mathrm{normalizer}(s_{i\cdot}\ \text{over keys } j \text{ the mask allows}),\quad
        \mathrm{out}_i = \textstyle\sum_j w_{ij} v_j

    Args:
        q: queries ``(B, H, Tq, D)``.
        k: keys ``(B, Hkv, Tk, D)``; ``H % Hkv == 0`` (grouped-/multi-query attention: query head
            ``h`` reads key head ``h // (H // Hkv)``).
        v: values ``(B, Hkv, Tk, Dv)``.
        score: ``"dot"``, ``"scaled_dot"`` (default), ``"cosine"``, or a
            :class:`attnkit.scores.Score` object (``General``, ``Additive``, ``Location``, ``Cosine(tau)``).
        normalizer: ``"softmax"`` (default), ``"sparsemax"``, ``"entmax15"``, ``"sigmoid"``,
            ``"hardmax"``, ``"topk"``, ``"gumbel"``, ... or a :class:`attnkit.normalizers.Normalizer`.
        mask: which pairs may attend (``True`` = may attend): an :mod:`attnkit.masks` object, a bool
            tensor broadcastable to ``(B, H, Tq, Tk)``, or a ``mask_mod(b, h, q_idx, kv_idx)`` callable.
        bias: added to / rewriting the scores: a float tensor broadcastable to ``(B, H, Tq, Tk)``, an
            :mod:`attnkit.positions` score mod (ALiBi, T5 buckets, softcap), a
            ``score_mod(score, b, h, q_idx, kv_idx)`` callable, or a list of these applied in order.
        scale: multiplies the raw score; default ``1/sqrt(D)`` for ``scaled_dot`` and 1 otherwise.
        dropout_p: dropout on the weights, in ``[0, 1)``. Applied whenever > 0 (pass 0 at eval time).
        return_weights: also return the (pre-dropout) weights ``(B, H, Tq, Tk)``; or a
            :class:`attnkit.WeightsRequest` for a subset of heads and query rows only
            (``(B, len(heads), len(rows), Tk)``). Weights never change which kernel computes ``out``.
        backend: ``"auto"`` (default), ``"reference"``, ``"sdpa"``, ... (see :func:`explain`).
        generator: a ``torch.Generator`` making dropout reproducible.

    Returns:
        ``out (B, H, Tq, Dv)``, or ``(out, weights)`` when ``return_weights``. Query rows whose keys
        are all masked give zero output and zero weights.

    A call whose options are plain values (score and normalizer by name, a mask given by its
    parameters such as ``masks.causal()``, no bias, dropout or weights) is planned once for its
    shapes and options: later calls like it (the layers of a model at one decoding step, a training
    loop's steps) skip the checks and the backend choice (:mod:`attnkit.request_cache`).

    Equivalent PyTorch (plain softmax)::

        w = torch.softmax(q @ k.transpose(-2, -1) * scale + bias, dim=-1)  # masked -> -inf
        out = w @ v

    Example::

        >>> import torch, attnkit
        >>> q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 3)
        >>> out, w = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), return_weights=True)
        >>> out.shape, w.shape
        (torch.Size([2, 4, 5, 3]), torch.Size([2, 4, 5, 7]))
    """
    # a request with plain options is planned once per shapes (attnkit.request_cache)
    request = request_cache.key(q, k, v, score, normalizer, mask, bias, scale, dropout_p, return_weights, backend,
                                generator)
    planned = request_cache.get(request, mask)
    if planned is None:
        spec = canonicalize(q, k, v, score=score, normalizer=normalizer, mask=mask, bias=bias, scale=scale,
                            dropout_p=dropout_p, return_weights=return_weights, generator=generator)
        name = registry.choose(spec, backend).backend
        run = request_cache.plan(request, spec, name)
    else:
        spec, name, run = planned
        if not q.is_cuda and _capture.none_open() and nonfinite.inputs_finite(q, k, v):
            # a small call's whole path (a remembered request has no bias, no weights, no dropout)
            return run.direct(q, k, v) if type(run) is registry.Prepared else run(q, k, v, spec)[0]
    recs = _capture.recorders() if _capture.active() is not None else ()
    if not recs:
        # on CUDA the finiteness check runs beside the kernels: queued first, read after them
        finite = nonfinite.pending_check(q, k, v, spec)
        if finite is not None:
            out, weights = run(q, k, v, spec)
            if finite():
                return (out, weights) if spec.return_weights else out
            # rare: a NaN or inf somewhere; the result is discarded and the policy below applies
    # one NaN/inf policy for every backend (attnkit.nonfinite): non-finite inputs are zeroed
    # here and the NaN is written back into exactly the rows that read them
    q, k, v, planned_spec, guard = nonfinite.quarantine(q, k, v, spec)
    if planned_spec is not spec:  # a bias tensor cleaned: the backend plans the new request itself
        spec, run = planned_spec, registry.REGISTRY[name]
    if recs and not spec.normalizer.deterministic:
        # a sampling normalizer must not be run twice: take the weights from this very call
        full = dataclasses.replace(spec, return_weights=True, weights=WeightsRequest())
        out, weights = registry.REGISTRY[name](q, k, v, full)
        if guard is not None:
            out, weights = guard.apply(out, weights, full)
        for rec in recs:
            _capture.record_given(rec, weights, spec, name)
        return (out, spec.weights.select(weights)) if spec.return_weights else out
    out, weights = run(q, k, v, spec)
    if guard is not None:
        out, weights = guard.apply(out, weights, spec)
    for rec in recs:
        if spec.return_weights and spec.weights == WeightsRequest():
            _capture.record_given(rec, weights, spec, name)  # the call computed them already
        else:
            _capture.record(rec, q, k, v, spec, name, guard)
    return (out, weights) if spec.return_weights else out


def explain(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto", **kwargs) -> registry.Choice:
    """Which backend ``attention(q, k, v, **kwargs)`` would use, why, and why the others refused.

    Never raises for a refusal: when ``backend`` (or, for ``"auto"``, every backend) cannot
    serve the request, the returned :class:`~attnkit.backends.registry.Choice` has
    ``backend = None`` and its ``reasons`` say why. ``print(choice)`` shows it all.

    Example::

        >>> import torch, attnkit
        >>> x = torch.randn(1, 2, 4, 8)
        >>> attnkit.explain(x, x, x).backend
        'sdpa'
        >>> attnkit.explain(x, x, x, return_weights=True).backend
        'reference'
    """
    spec = canonicalize(q, k, v, **kwargs)
    return registry.choose(spec, backend, strict=False)
