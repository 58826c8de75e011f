"""Requests remembered per shapes and options, so that small calls skip their planning.

A decoding step or a short sequence costs ``attnkit.attention`` more in Python (validating the
arguments into an :class:`~attnkit.spec.AttentionSpec`, choosing the backend) than in arithmetic.
Both depend only on the inputs' shapes, dtypes, devices, whether a gradient is needed and the
options, so a call whose options are plain values (a score and normalizer by name, a mask whose
:meth:`~attnkit.masks.Mask.cache_key` is its parameters, no bias, no dropout, no weights) is
planned once and later calls with the same key reuse the plan: the layers of a model at one
decoding step share one plan, a training loop over one batch shape reuses its own.

Anything else (tensor masks and biases, callables, score or normalizer objects, dropout,
weights, ``torch.compile``) takes the full path every time. A backend added or replaced, or a
:func:`~attnkit.backends.use_backend` block, changes the key (:func:`registry.state`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch

from .backends import registry
from .masks.base import Mask
from .scores import NAMED as _NAMED_SCORES
from .spec import AttentionSpec

Tensor = torch.Tensor

#: normalizers by name whose objects hold no state (a fresh one per call is the same as one kept)
NORMALIZERS = ("softmax", "sigmoid", "sparsemax", "entmax15")
#: at most this many remembered plans; the oldest goes first
MAX_ENTRIES = 256

_PLANS: OrderedDict[tuple, tuple[AttentionSpec, str, Callable, Optional[tuple]]] = OrderedDict()


def key(q, k, v, score, normalizer, mask, bias, scale, dropout_p, return_weights, backend,
        generator) -> Optional[tuple]:
    """The key of a request whose plan may be remembered, or None when it may not."""
    if (type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor or bias is not None
            or generator is not None or return_weights is not False
            or type(dropout_p) not in (float, int) or dropout_p != 0
            or type(score) is not str or score not in _NAMED_SCORES
            or type(normalizer) is not str or normalizer not in NORMALIZERS
            or not (scale is None or type(scale) in (float, int))
            or type(backend) is not str or torch.compiler.is_compiling()):
        return None
    if backend != "auto" and not getattr(registry.REGISTRY.get(backend), "static_reasons", True):
        return None  # its refusals depend on more than the request (an environment variable)
    if mask is None:
        mask_key = None
    elif isinstance(mask, Mask):
        mask_key = mask.cache_key()
        if mask_key is None:
            return None
    else:
        return None
    grad = torch.is_grad_enabled()
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            grad and (q.requires_grad or k.requires_grad or v.requires_grad), score, normalizer, scale, mask_key,
            backend, registry.state())


def get(request_key: Optional[tuple], mask=None) -> Optional[tuple[AttentionSpec, str, Callable]]:
    """The remembered ``(spec, backend name, run)`` for this key (``mask``: the call's mask, whose
    parameters the key holds), or None."""
    if request_key is None:
        return None
    hit = _PLANS.get(request_key)
    if hit is None:
        return None
    spec, name, run, mask_key = hit
    # the plan's mask is read again unless it is the call's own (whose key was just taken)
    if spec.mask is not None and spec.mask is not mask and spec.mask.cache_key() != mask_key:
        _PLANS.pop(request_key, None)  # the mask object the plan holds was changed after the call
        return None
    return spec, name, run


def plan(request_key: Optional[tuple], spec: AttentionSpec, name: str) -> Callable:
    """The call that runs ``spec`` on backend ``name`` (its ``prepare(spec)`` where it has one:
    the decisions that depend on the request alone, taken once), remembered under
    ``request_key`` unless that is None."""
    backend = registry.REGISTRY[name]
    if request_key is None:
        return backend
    run = backend.prepare(spec) if hasattr(backend, "prepare") else backend
    while len(_PLANS) >= MAX_ENTRIES:
        try:
            _PLANS.popitem(last=False)  # the oldest (O(1): a plain dict's first live entry is not)
        except KeyError:  # another thread emptied it first
            break
    _PLANS[request_key] = (spec, name, run, None if spec.mask is None else spec.mask.cache_key())
    return run


def clear() -> None:
    """Forget every remembered plan."""
    _PLANS.clear()
