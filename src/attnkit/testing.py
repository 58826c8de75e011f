"""Helpers for testing attention implementations against the reference.

Tolerances follow FlashAttention's practice: a fast path in a low precision is compared with
a float64 "gold" run, and may err by at most ``k`` times what the reference itself errs in
that same low precision (plus a small floor), instead of a fixed atol.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

#: (atol, rtol) floors per dtype
TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, (1e-5, 1e-4))


def make_qkv(B: int = 2, H: int = 4, Tq: int = 5, Tk: int | None = None, D: int = 8, Dv: int | None = None,
             Hkv: int | None = None, dtype=torch.float32, device=None, requires_grad: bool = False,
             generator: torch.Generator | None = None, noncontiguous: bool = False):
    """Random ``q (B,H,Tq,D)``, ``k (B,Hkv,Tk,D)``, ``v (B,Hkv,Tk,Dv)``. With ``noncontiguous``
    they are built as ``(B, T, H, D)`` and transposed, as modules produce them."""
    Tk = Tq if Tk is None else Tk
    Dv = D if Dv is None else Dv
    Hkv = H if Hkv is None else Hkv

    def rnd(h, t, d):
        if noncontiguous:
            x = torch.randn(B, t, h, d, generator=generator, dtype=torch.float64).to(dtype).transpose(1, 2)
        else:
            x = torch.randn(B, h, t, d, generator=generator, dtype=torch.float64).to(dtype)
        x = x.to(device) if device is not None else x
        return x.requires_grad_(requires_grad) if requires_grad else x

    return rnd(H, Tq, D), rnd(Hkv, Tk, D), rnd(Hkv, Tk, Dv)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_gold(fast: Tensor, ref: Tensor, gold: Tensor, *, k: float = 2.0, name: str = "output") -> None:
    """``|fast - gold| <= k * |ref - gold| + atol``: ``ref`` is the reference run in ``fast``'s dtype,
    ``gold`` the reference in float64."""
    atol, _ = tolerance(fast.dtype)
    e_fast, e_ref = max_err(fast, gold), max_err(ref, gold)
    if not e_fast <= k * e_ref + atol:
        raise AssertionError(f"{name}: fast path error {e_fast:.3e} exceeds {k} x reference error "
                             f"{e_ref:.3e} + {atol:.1e} ({fast.dtype})")


def assert_matches_float64_gold(q64: Tensor, k64: Tensor, v64: Tensor, backend: str, *, dtype=torch.float32,
                                dout: Tensor | None = None, **kwargs) -> None:
    """Run ``attnkit.attention(..., backend=backend, **kwargs)`` in ``dtype`` and check its output
    and gradients with :func:`assert_close_to_gold` against the reference in float64 (gold) and
    in ``dtype``. ``q64, k64, v64`` are float64 leaves.

    Example::

        >>> import torch, attnkit
        >>> q, k, v = make_qkv(1, 2, 33, D=8, dtype=torch.float64, requires_grad=True)
        >>> assert_matches_float64_gold(q, k, v, "tiled", mask=attnkit.masks.causal())
    """
    import attnkit

    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q64, k64, v64))
    if dout is None:
        dout = torch.randn(*q64.shape[:-1], v64.shape[-1], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0))

    def run(q, k, v, name):
        out = attnkit.attention(q, k, v, backend=name, **kwargs)
        return (out, *torch.autograd.grad(out, (q, k, v), dout.to(device=out.device, dtype=out.dtype)))

    gold, ref, fast = run(q64, k64, v64, "reference"), run(q, k, v, "reference"), run(q, k, v, backend)
    for name, f, r, g in zip(["out", "dq", "dk", "dv"], fast, ref, gold):
        assert_close_to_gold(f, r, g, name=name)


def assert_matches_reference(q: Tensor, k: Tensor, v: Tensor, backend: str, *, tol: float = 1e-5, **kwargs) -> None:
    """``attnkit.attention(..., backend=backend, **kwargs)`` and its gradients for a random output
    gradient within ``tol`` (largest absolute difference) of the reference backend's, in the
    inputs' dtype. ``q, k, v`` are leaves that require gradients.

    Example::

        >>> import torch, attnkit
        >>> q, k, v = make_qkv(1, 2, 9, D=8, requires_grad=True)
        >>> assert_matches_reference(q, k, v, "tiled", mask=attnkit.masks.causal())
    """
    import attnkit

    out = attnkit.attention(q, k, v, backend=backend, **kwargs)
    ref = attnkit.attention(q, k, v, backend="reference", **kwargs)
    assert out.shape == ref.shape and max_err(out, ref) < tol, f"output: {max_err(out, ref)}"
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and max_err(a, b) < tol, f"{name}: {max_err(a, b)}"


def assert_close(actual: Tensor, expected: Tensor, *, dtype: torch.dtype | None = None, scale: float = 1.0,
                 name: str = "tensor") -> None:
    """``torch.testing.assert_close`` with the dtype's tolerance floor (times ``scale``)."""
    atol, rtol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{name}: {m}")
