"""Denormals flushed to zero on every intra-op thread around large tiled calls, and each thread's
own setting given back afterwards."""

import pytest
import torch

import attnkit
import attnkit.kernels.tiled as tiled
from attnkit import masks, positions
from attnkit.kernels.denormals import flushing_denormals, supported
from attnkit.testing import assert_close, make_qkv

needs_flag = pytest.mark.skipif(not supported(), reason="torch here does not run on libgomp, or the CPU has no "
                                "flush-to-zero flag: flushing_denormals does nothing")


def _denormal_products(n=1 << 20):
    """``1e-30 * 1e-10`` (a float32 denormal) over a tensor large enough to be split across threads."""
    return torch.full((n,), 1e-30) * 1e-10


@needs_flag
def test_every_thread_flushes_inside_and_not_after():
    assert torch.get_num_threads() >= 1
    assert bool((_denormal_products() > 0).all())
    with flushing_denormals():
        assert bool((_denormal_products() == 0).all())  # every thread's share was flushed
    assert bool((_denormal_products() > 0).all())


@needs_flag
def test_a_thread_that_already_flushed_keeps_doing_so():
    torch.set_flush_denormal(True)
    try:
        with flushing_denormals():
            pass
        assert float((torch.full((1,), 1e-30) * 1e-10)[0]) == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_disabled_it_changes_nothing():
    with flushing_denormals(enabled=False):
        assert bool((_denormal_products() > 0).all())


@needs_flag
def test_large_tiled_calls_flush_and_stay_exact(monkeypatch):
    seen = []
    real = tiled.flushing_denormals

    def spy(enabled=True):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr(tiled, "flushing_denormals", spy)
    monkeypatch.setattr(tiled, "FLUSH_MIN_SCORES", 0)
    # steep ALiBi slopes over long distances: the weights far from the diagonal are denormal
    q, k, v = make_qkv(1, 4, 700, D=8, requires_grad=True)
    kw = dict(mask=masks.causal(), bias=positions.ALiBi(4))
    out = attnkit.attention(q, k, v, backend="tiled", **kw)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert seen == [True, True]  # forward and backward
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attnkit.attention(q64, k64, v64, backend="reference", **kw)
    assert_close(out, ref.float(), name="out")
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref.sum(), (q64, k64, v64))):
        assert_close(a, b.float(), name=f"d{name}")
