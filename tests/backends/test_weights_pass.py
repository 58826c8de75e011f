"""The tiled backend's one-pass weights (every weight asked for, no gradient: a model run under
``torch.no_grad()`` with ``output_attentions``) against the reference: weights and output."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
import attnkit.kernels.weights as weights_kernel
from attnkit import masks, normalizers, positions, scores
from attnkit.backends.tiled import TiledBackend
from attnkit.testing import assert_close, make_qkv

small = TiledBackend(block_q=16, block_k=8, kv_chunk=24)  # ragged tiles, several runs per row block

MASKS = {
    "none": lambda Tq, Tk, B: None,
    "causal": lambda Tq, Tk, B: masks.causal(),
    "window": lambda Tq, Tk, B: masks.sliding_window(9, 2),
    "chunked&causal": lambda Tq, Tk, B: masks.chunked(7, torch.arange(B) % 3) & masks.causal(),
    "padding": lambda Tq, Tk, B: masks.key_padding(torch.arange(B) % max(Tk, 1) + 1),
    "block_sparse": lambda Tq, Tk, B: masks.block_sparse(
        torch.rand(-(-Tq // 8), -(-Tk // 8), generator=torch.Generator().manual_seed(Tq * 100 + Tk)) < 0.5, 8),
    "dead_rows": lambda Tq, Tk, B: masks.from_mod(lambda b, h, i, j: (i % 5 != 0) & (j <= i + 3)),
}
VARIANTS = {
    "softmax": dict(),
    "softmax t=0.7 + alibi": dict(normalizer=normalizers.Softmax(temperature=0.7), bias=positions.ALiBi(4)),
    "softcap": dict(bias=positions.softcap(4.0)),
    "sigmoid": dict(normalizer="sigmoid"),
    "cosine": dict(score=scores.Cosine()),
    "linear (normalize)": dict(score=scores.Kernel(), normalizer=normalizers.Normalize()),
}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", small)


@pytest.fixture
def passes(monkeypatch):
    """Counts one-pass weight computations (so a test cannot pass on the other path)."""
    seen = []
    real = weights_kernel.weights_pass
    monkeypatch.setattr("attnkit.backends.tiled.weights_pass", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    return seen


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_one_pass_weights_and_output_match_the_reference(mask_name, variant, passes):
    B, Tq, Tk = 2, 37, 45
    q, k, v = make_qkv(B, 4, Tq, Tk, D=5, Dv=3, Hkv=2, dtype=torch.float64)
    kw = dict(mask=MASKS[mask_name](Tq, Tk, B), **VARIANTS[variant])
    with torch.no_grad():
        out, w = attnkit.attention(q, k, v, backend="tiled", return_weights=True, **kw)
    ref_out, ref_w = attnkit.attention(q, k, v, backend="reference", return_weights=True, **kw)
    assert passes == [1]
    assert w.shape == ref_w.shape == (B, 4, Tq, Tk)
    assert_close(w, ref_w, name="weights")
    assert_close(out, ref_out, name="out")


@settings(max_examples=40, deadline=None)
@given(Tq=st.integers(1, 50), Tk=st.integers(1, 50), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 3]),
       mask=st.sampled_from(list(MASKS)), stripe_rows=st.sampled_from([1, 3, 1000]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), lazy=st.booleans(), seed=st.integers(0, 10_000))
def test_one_pass_weights_property(Tq, Tk, Hkv, G, mask, stripe_rows, dtype, lazy, seed):
    """Any sizes, GQA groups, stripes shorter than a row block, low precision, the result in a
    lazily zeroed mapping or not: the weights are the reference's (to the dtype), rows sum to 1
    or 0, the output is the weights times v."""
    torch.manual_seed(seed)
    B, H = 2, Hkv * G
    q, k, v = make_qkv(B, H, Tq, Tk, D=4, Hkv=Hkv, dtype=dtype)
    m = MASKS[mask](Tq, Tk, B)
    old = weights_kernel.STRIPE_BYTES, weights_kernel.LAZY_ZEROS_BYTES
    weights_kernel.STRIPE_BYTES = stripe_rows * B * H * Tk * 4
    weights_kernel.LAZY_ZEROS_BYTES = 0 if lazy else 1 << 40
    try:
        with torch.no_grad():
            out, w = attnkit.attention(q, k, v, backend="tiled", mask=m, return_weights=True)
    finally:
        weights_kernel.STRIPE_BYTES, weights_kernel.LAZY_ZEROS_BYTES = old
    ref_out, ref_w = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", mask=m,
                                       return_weights=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert w.dtype == dtype and out.dtype == dtype
    torch.testing.assert_close(w.double(), ref_w, rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=4 * tol)
    sums = w.double().sum(-1)
    assert (((sums - 1).abs() < 4 * tol) | (sums == 0)).all()


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc to read memory")
def test_a_large_result_costs_memory_only_where_written():
    """256 MiB of weights of which the mask leaves a quarter: the result reads as zero everywhere
    else, takes about a quarter of its size in RAM, and outlives everything that made it."""
    import gc

    before = _resident_mib()
    w = weights_kernel.zeros_result((4, 4096, 4096), torch.float32, "cpu")
    gc.collect()
    assert w.shape == (4, 4096, 4096) and w.dtype == torch.float32
    assert _resident_mib() - before < 16
    w[:, :, :1024] = 1.0
    grown = _resident_mib() - before
    assert 48 < grown < 128, grown                      # the written quarter (64 MiB), not 256 MiB
    assert float(w.sum()) == 4 * 4096 * 1024 and float(w[:, :, 1024:].abs().max()) == 0.0
    assert _resident_mib() - before < 128               # reading the zeros allocated nothing
    small = weights_kernel.zeros_result((3, 5), torch.bfloat16, "cpu")
    assert small.dtype == torch.bfloat16 and not small.any()
