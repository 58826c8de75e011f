"""Additive (Bahdanau) scores in the tiled backend: the closed-form tile gradient against the
reference's autograd, and the tile sizes chosen for wide tiles."""

import pytest
import torch

import attnkit
from attnkit import masks, positions, scores
from attnkit.backends.tiled import TiledBackend
from attnkit.testing import assert_close, make_qkv


@pytest.fixture
def closed_calls(monkeypatch):
    calls = []
    real = scores.Additive.combine_vjp

    def spy(self, a, b):
        calls.append(a.shape)
        return real(self, a, b)

    monkeypatch.setattr(scores.Additive, "combine_vjp", spy)
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(block_q=16, block_k=8, kv_chunk=24))
    return calls


def grads_of(out, tensors):
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad(out, tensors, dout, allow_unused=True)


CASES = {
    "plain": dict(),
    "scale and temperature": dict(scale=0.7, normalizer=attnkit.normalizers.Softmax(temperature=0.5)),
    "alibi and padding": dict(bias=positions.ALiBi(4), mask=masks.key_padding(torch.tensor([31, 9]))),
    "sigmoid, window": dict(normalizer=attnkit.normalizers.Sigmoid(), mask=masks.sliding_window(5)),
    "causal": dict(mask=masks.causal()),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("freeze_v", [False, True])
def test_closed_form_tile_gradient_matches_autograd(case, freeze_v, closed_calls):
    torch.manual_seed(0)
    s = scores.Additive(6, 6, 5).double()
    s.v.weight.requires_grad_(not freeze_v)
    q, k, v = make_qkv(2, 4, 23, 31, D=6, Dv=3, Hkv=2, dtype=torch.float64, requires_grad=True)
    params = [p for p in s.parameters() if p.requires_grad]
    res = []
    for backend in ("tiled", "reference"):
        out = attnkit.attention(q, k, v, score=s, backend=backend, **CASES[case])
        res.append((out, *grads_of(out, (q, k, v, *params))))
    assert closed_calls, "the closed-form tile gradient was not used"
    for i, (a, b) in enumerate(zip(*res)):
        assert_close(a, b, name=f"output/grad {i}")


def test_projected_keys_use_the_closed_form_too(closed_calls):
    s = scores.Additive(4, 6, 8).double()
    q, k, v = make_qkv(3, 1, 17, 40, D=4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 1, 40, 6, dtype=torch.float64, requires_grad=True)
    kp = s.project_keys(k)
    out = attnkit.attention(q, kp, v, score=s.with_projected_keys(), backend="tiled")
    ref = attnkit.attention(q, k, v, score=s, backend="reference")
    assert_close(out, ref)
    for a, b in zip(grads_of(out, (q, k, v, *s.parameters())), grads_of(ref, (q, k, v, *s.parameters()))):
        assert_close(a, b)
    assert closed_calls


def test_a_learnable_bias_beside_an_additive_score_falls_back_to_autograd(closed_calls):
    s = scores.Additive(6, 6, 5).double()
    q, k, v = make_qkv(1, 2, 13, 11, D=6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 13, 11, dtype=torch.float64, requires_grad=True)
    outs = [attnkit.attention(q, k, v, score=s, bias=bias, backend=b) for b in ("tiled", "reference")]
    assert not closed_calls
    assert_close(outs[0], outs[1])
    for a, b in zip(grads_of(outs[0], (q, k, v, bias, s.v.weight)), grads_of(outs[1], (q, k, v, bias, s.v.weight))):
        assert_close(a, b)


def test_additive_gradcheck_through_the_closed_form(closed_calls):
    s = scores.Additive(3, 3, 4).double()
    q, k, v = make_qkv(1, 2, 9, 19, D=3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, w):
        with torch.no_grad():
            s.v.weight.copy_(w)
        return attnkit.attention(q, k, v, score=s, backend="tiled", mask=masks.causal(align="top_left"))

    assert torch.autograd.gradcheck(lambda q, k, v: f(q, k, v, s.v.weight.detach().clone()), (q, k, v))
    assert closed_calls


@pytest.mark.parametrize("B,H,hidden,itemsize", [(4, 1, 128, 4), (1, 1, 16, 4), (64, 8, 256, 8)])
def test_wide_tiles_stay_near_the_cache_budget(B, H, hidden, itemsize):
    backend = TiledBackend()
    q = torch.zeros(B, H, 100, hidden, dtype=torch.float32 if itemsize == 4 else torch.float64)
    spec = attnkit.spec.canonicalize(q, q, q, score=scores.Additive(hidden, hidden, hidden))
    bq, bk, chunk = backend.blocks_for(spec, q)
    assert bq == bk == 32 and chunk % bk == 0 and bk <= chunk <= backend.kv_chunk
    tile = B * H * bq * chunk * hidden * itemsize
    assert tile <= backend.wide_tile_bytes or chunk == bk
    assert backend.blocks_for(attnkit.spec.canonicalize(q, q, q), q) == (128, 128, 1024)  # dot scores
