"""Run one request on every backend and check that each agrees with a float64 reference or refuses.

The contract (checked by :func:`check`):

* the float64 reference ("gold") either serves the request or raises ``ValueError``/``TypeError``
  (an invalid request); then every backend raises one of those too;
* every backend either refuses with the registry's ``ValueError`` ("backend 'x' cannot serve this
  request: ...") or serves it, and then its output, weights and the gradients of q, k, v and of
  every learnable parameter agree with the gold: NaN in exactly the same places (which must also
  be where the NaN policy, computed here independently, puts them) and, elsewhere, an error at
  most ``K`` times that of the reference run in the same dtype plus a floor (FlashAttention's rule);
* gradients are finite everywhere (attnkit.nonfinite's policy).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

import attnkit
from attnkit.backends import REGISTRY
from attnkit.backends.tiled import TiledBackend
from attnkit.testing import tolerance

from .grammar import Built, Request, allowed, build

K = 3.0

#: the backends under test: name -> (registry entry to call, object to put there or None)
BACKENDS = {
    "sdpa": ("sdpa", None),
    "tiled": ("tiled", None),                                                    # fused body, default tiles
    "tiled_eager": ("tiled", TiledBackend(fuse=False)),
    "tiled_small": ("tiled", TiledBackend(block_q=16, block_k=8, kv_chunk=32)),  # many tiles and runs
    "tiled_small_eager": ("tiled", TiledBackend(block_q=16, block_k=8, kv_chunk=24, fuse=False)),
    "flex": ("flex", None),
    "auto": ("auto", None),
}


@contextlib.contextmanager
def _installed(entry: str, obj):
    if obj is None:
        yield
        return
    old = REGISTRY[entry]
    REGISTRY[entry] = obj
    try:
        yield
    finally:
        REGISTRY[entry] = old


@contextlib.contextmanager
def eager_flex():
    """Run the flex backend uncompiled: compiling per random shape would take seconds each; the
    translation of masks and score mods, which is attnkit's, is the same."""
    import attnkit.backends.flex as fx

    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        yield
        return
    old = fx._compiled
    fx._compiled = lambda dynamic=False: flex_attention
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        fx._compiled = old


class Refused(Exception):
    pass


def run(built: Built, entry: str, dtype: torch.dtype, dout: torch.Tensor | None):
    """``(out, weights, grads)`` of one backend in ``dtype``; raises :class:`Refused` on the
    registry's refusal."""
    r = built.req
    q, k, v = (x.detach().to(dtype).requires_grad_(r.grad) for x in (built.q, built.k, built.v))
    kw = built.kwargs(q)
    try:
        res = attnkit.attention(q, k, v, backend=entry, **kw)
    except ValueError as e:
        if "cannot serve this request" in str(e):
            raise Refused(str(e)) from None
        raise
    out, w = res if isinstance(res, tuple) else (res, None)
    grads = None
    if r.grad:
        inputs = [q, k, v] + list(built.params)
        grads = torch.autograd.grad(out, inputs, dout.to(out.dtype), allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return out.detach(), None if w is None else w.detach(), grads


def expected_nonfinite(built: Built) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the policy puts NaN, computed from the inputs and the dense mask by brute force:
    ``out (B, H, Tq, Dv)`` and ``weights (B, H, Tq, Tk)`` bool."""
    r = built.req
    live = allowed(built)                                                   # (B, H, Tq, Tk)
    G = r.H // r.Hkv
    q_bad = ~torch.isfinite(built.q.detach()).all(-1)                       # (B, H, Tq)
    k_bad = (~torch.isfinite(built.k.detach()).all(-1)).repeat_interleave(G, 1)  # (B, H, Tk)
    v_bad = (~torch.isfinite(built.v.detach())).repeat_interleave(G, 1)     # (B, H, Tk, Dv)
    if r.score[0] == "location":  # the location score never reads the keys
        k_bad = torch.zeros_like(k_bad)
    row = (q_bad & live.any(-1)) | (live & k_bad.unsqueeze(2)).any(-1)      # (B, H, Tq)
    for t, obj in zip(r.biases, built._objects["biases"]):                  # NaN or +inf in a bias tensor
        if t[0] == "tensor":
            x = obj.detach()
            row |= (live & (torch.isnan(x) | torch.isposinf(x))).any(-1)
    out = row.unsqueeze(-1) | ((live.double() @ v_bad.double()) > 0)
    weights = row.unsqueeze(-1) & live
    return out, weights


def _select(w: torch.Tensor, r: Request) -> torch.Tensor:
    if r.weights is True or not r.weights:
        return w
    heads, rows, average = r.weights
    w = w if heads is None else w[:, list(heads)]
    w = w if rows is None else w[:, :, list(rows)]
    if average:  # a bool tensor here is the expected non-finite pattern: a head's NaN makes the mean NaN
        return w.any(1, keepdim=True) if w.dtype == torch.bool else w.mean(1, keepdim=True)
    return w


def compare(name: str, fast: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor, dtype: torch.dtype,
            magnitude: float = 1.0) -> None:
    """``fast`` (computed in ``dtype``) against ``gold``: same non-finite entries, and elsewhere
    ``|fast - gold| <= K |ref - gold| + floor``, the floor being the dtype's tolerance times the
    larger of ``magnitude`` and ``gold``'s own (a gradient that cancels to 0 in exact arithmetic,
    e.g. of a softmax over one key, is left with rounding of the size of the terms that cancel)."""
    assert fast.shape == gold.shape, f"{name}: shape {tuple(fast.shape)}, expected {tuple(gold.shape)}"
    fbad, gbad = ~torch.isfinite(fast), ~torch.isfinite(gold)
    if not torch.equal(fbad, gbad):
        diff = torch.nonzero(fbad != gbad)[:3].tolist()
        raise AssertionError(f"{name}: non-finite entries differ from the reference, e.g. at {diff} "
                             f"(fast has {int(fbad.sum())}, reference {int(gbad.sum())})")
    keep = ~gbad
    f, rr, g = fast.double()[keep], ref.double()[keep], gold.double()[keep]
    if not g.numel():
        return
    atol = tolerance(dtype)[0] * max(1.0, magnitude, g.abs().max().item())
    e_fast, e_ref = (f - g).abs().max().item(), (rr - g).abs().max().item()
    if not e_fast <= K * e_ref + atol:
        raise AssertionError(f"{name}: error {e_fast:.3e} vs the float64 reference exceeds {K} x the same-dtype "
                             f"reference's {e_ref:.3e} + {atol:.1e} ({dtype})")


def check(r: Request, backends: dict | None = None) -> dict[str, str]:
    """Run ``r`` on every backend of ``backends`` (default :data:`BACKENDS`); returns what each
    did ("served" or the refusal)."""
    backends = BACKENDS if backends is None else backends
    built = build(r)
    dout = torch.randn(r.B, r.H, r.Tq, r.Dv, generator=torch.Generator().manual_seed(r.seed + 1), dtype=torch.float64)
    outcome: dict[str, str] = {}
    try:
        gold = run(built, "reference", torch.float64, dout)
    except (ValueError, TypeError) as e:  # an invalid request: everyone must say so
        for name, (entry, obj) in backends.items():
            with _installed(entry, obj), eager_flex():
                try:
                    run(built, entry, r.dtype, dout)
                except (ValueError, TypeError):
                    continue
            raise AssertionError(f"the reference rejects the request ({e}) but {name} serves it")
        return {"all": f"invalid: {e}"}
    exp_out, exp_w = expected_nonfinite(built)
    assert torch.equal(~torch.isfinite(gold[0]), exp_out), "reference: NaN where the policy puts none (or missing)"
    if gold[1] is not None:
        assert torch.equal(~torch.isfinite(gold[1]), _select(exp_w, r)), "reference weights: NaN pattern off policy"
    if gold[2] is not None:
        assert all(bool(torch.isfinite(g).all()) for g in gold[2]), "reference: a gradient is not finite"
    ref = gold if r.dtype == torch.float64 else run(built, "reference", r.dtype, dout)
    compare_all("reference", ref, ref, gold, r.dtype)
    outcome["reference"] = "served"
    for name, (entry, obj) in backends.items():
        with _installed(entry, obj), eager_flex():
            try:
                fast = run(built, entry, r.dtype, dout)
            except Refused as e:
                outcome[name] = str(e)
                continue
        compare_all(name, fast, ref, gold, r.dtype)
        outcome[name] = "served"
    return outcome


def compare_all(name, fast, ref, gold, dtype) -> None:
    compare(f"{name} out", fast[0], ref[0], gold[0], dtype)
    if gold[1] is not None:
        assert fast[1] is not None, f"{name}: no weights returned"
        compare(f"{name} weights", fast[1], ref[1], gold[1], dtype)
    if gold[2] is not None:
        labels = ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(gold[2]) - 3)]
        magnitude = max((g.abs().max().item() for g in gold[2] if g.numel()), default=1.0)
        for label, f, rr, g in zip(labels, fast[2], ref[2], gold[2]):
            assert bool(torch.isfinite(f).all()), f"{name} {label}: not finite"
            compare(f"{name} {label}", f, rr, g, dtype, magnitude)
