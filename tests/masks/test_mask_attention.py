"""Every mask kind inside ``attnkit.attention``: masked pairs get exactly zero weight, rows with
no key give zeros (never NaN), causal patterns never read the future, SDPA agrees with the
reference, and gradients are right (float64 gradcheck), local-p's included."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.testing import assert_close, make_qkv

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _heads(draw):
    H = draw(st.sampled_from([1, 2, 4]))
    return H, draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))


@given(data=st.data())
def test_masked_pairs_get_zero_weight_and_dead_rows_give_zeros(data, cases, kind_sets):
    kind = data.draw(st.sampled_from(kind_sets["all"]), label="kind")
    Tq, Tk = data.draw(st.integers(1, 8), label="Tq"), data.draw(st.integers(1, 8), label="Tk")
    B = data.draw(st.integers(1, 2), label="B")
    H, Hkv = _heads(data.draw)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    normalizer = data.draw(st.sampled_from(["softmax", "sigmoid"]), label="normalizer")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    mask, _ = cases[kind](Tq, Tk, B, H)
    q, k, v = make_qkv(B, H, Tq, Tk, D=3, Dv=2, Hkv=Hkv, dtype=dtype, generator=g)

    out, w = attnkit.attention(q, k, v, mask=mask, normalizer=normalizer, return_weights=True, backend="reference")
    allowed = mask.materialize(Tq, Tk, B, H).expand(B, H, Tq, Tk)
    assert not torch.isnan(out).any() and not torch.isnan(w).any()
    assert (w[~allowed] == 0).all()                       # exactly zero, not just small
    dead = ~allowed.any(-1)                               # (B, H, Tq) rows with no allowed key
    assert (w[dead] == 0).all() and (out[dead] == 0).all()
    live = ~dead
    if normalizer == "softmax" and not mask.has_weight_factor and live.any():
        assert_close(w.sum(-1)[live], torch.ones(int(live.sum()), dtype=dtype), scale=4, name="row sums")
    if normalizer == "sigmoid":
        assert (w[allowed] > 0).all()                     # every allowed key keeps some weight


@pytest.mark.parametrize("Tq,Tk", [(6, 6), (3, 8)])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causal_kinds_do_not_read_the_future(causal_kind, Tq, Tk, backend, cases):
    B, H = 2, 2
    mask, _ = cases[causal_kind](Tq, Tk, B, H)
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(B, H, Tq, Tk, D=4, dtype=torch.float64, generator=g)
    out = attnkit.attention(q, k, v, mask=mask, backend=backend)
    pos = torch.arange(Tq) + Tk - Tq                      # bottom-right query positions
    for t in range(Tk):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1:] = torch.randn(k2[:, :, t + 1:].shape, generator=g, dtype=torch.float64) * 10
        v2[:, :, t + 1:] = torch.randn(v2[:, :, t + 1:].shape, generator=g, dtype=torch.float64) * 10
        out2 = attnkit.attention(q, k2, v2, mask=mask, backend=backend)
        rows = pos <= t
        torch.testing.assert_close(out2[:, :, rows], out[:, :, rows], atol=1e-12, rtol=0)
        if (~rows).any() and t + 1 < Tk:
            assert not torch.allclose(out2[:, :, ~rows], out[:, :, ~rows])  # the test can see a change


def test_a_non_causal_kind_does_read_the_future(cases):
    # control for the test above: the same check fails for a bidirectional pattern
    mask, _ = cases["strided_noncausal"](5, 5, 1, 1)
    q, k, v = make_qkv(1, 1, 5, 5, D=4, dtype=torch.float64)
    v2 = v.clone()
    v2[:, :, 3:] += 1.0
    a, b = (attnkit.attention(q, k, x, mask=mask, backend="reference") for x in (v, v2))
    assert not torch.allclose(a[:, :, :3], b[:, :, :3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq,Tk", [(1, 7), (5, 5), (7, 13), (6, 4)])
def test_sdpa_agrees_with_reference(kind, Tq, Tk, dtype, cases, kind_sets):
    B, H, Hkv = 2, 4, 2
    mask, _ = cases[kind](Tq, Tk, B, H)
    q, k, v = make_qkv(B, H, Tq, Tk, D=8, Dv=5, Hkv=Hkv, dtype=dtype)
    if kind in kind_sets["weight_factor"]:
        with pytest.raises(ValueError, match="local-p"):
            attnkit.attention(q, k, v, mask=mask, backend="sdpa")
        return
    for score in ("scaled_dot", "dot"):
        ref = attnkit.attention(q, k, v, mask=mask, score=score, backend="reference")
        fast = attnkit.attention(q, k, v, mask=mask, score=score, backend="sdpa")
        assert not torch.isnan(fast).any()
        assert_close(fast, ref, scale=2 if dtype == torch.bfloat16 else 1, name=f"{kind} {score}")


def _gradcheck(kind, normalizer, cases):
    B, H, Tq, Tk = 2, 2, 4, 5
    mask, _ = cases[kind](Tq, Tk, B, H)
    q, k, v = make_qkv(B, H, Tq, Tk, D=2, Dv=1, Hkv=1, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=mask, normalizer=normalizer, return_weights=True, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_float64(kind, cases):
    _gradcheck(kind, "softmax", cases)


@pytest.mark.parametrize("name", ["key_padding_lengths", "bigbird", "local_p_heads", "combined"])
def test_gradcheck_float64_sigmoid(name, cases):
    _gradcheck(name, "sigmoid", cases)


# -- local-p: the Gaussian factor and the gradient to the centers ----------------------------
def test_local_p_weights_equal_an_explicit_loop():
    g = torch.Generator().manual_seed(4)
    B, H, Tq, Tk, D = 2, 2, 3, 9, 2
    centers = torch.tensor([[0.4, 4.3, 7.9], [2.5, 8.6, 5.1]], dtype=torch.float64)
    q, k, v = make_qkv(B, H, Tq, Tk, D=4, dtype=torch.float64, generator=g)
    out, w = attnkit.attention(q, k, v, mask=masks.local_p(centers, D), return_weights=True, backend="reference")
    sigma = D / 2
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                p = centers[b, i].item()
                js = [j for j in range(Tk) if p - D <= j <= p + D]
                s = [(q[b, h, i] @ k[b, h, j]).item() / math.sqrt(4) for j in js]
                z = sum(math.exp(x) for x in s)
                want = [0.0] * Tk
                for j, x in zip(js, s):
                    want[j] = math.exp(x) / z * math.exp(-((j - p) ** 2) / (2 * sigma ** 2))
                torch.testing.assert_close(w[b, h, i], torch.tensor(want, dtype=torch.float64))
                assert w[b, h, i].sum() < 1  # not renormalized, as in the paper
    torch.testing.assert_close(out, w @ v)


@pytest.mark.parametrize("per_head", [False, True])
def test_local_p_gradcheck_reaches_the_centers(per_head):
    B, H, Tq, Tk, D = 1, 2, 4, 7, 2
    # centers kept away from the window edges (p ± D an integer) so finite differences are smooth
    base = torch.tensor([0.3, 1.6, 3.45, 5.7], dtype=torch.float64)
    centers = (base.expand(H, Tq) + torch.tensor([[0.0], [0.2]], dtype=torch.float64) if per_head else base)
    centers = centers.unsqueeze(0).clone().requires_grad_(True)
    q, k, v = make_qkv(B, H, Tq, Tk, D=3, Dv=2, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, c):
        return attnkit.attention(q, k, v, mask=masks.local_p(c, D), return_weights=True, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v, centers))
    out = f(q, k, v, centers)[0]
    (grad,) = torch.autograd.grad(out.square().sum(), centers)
    assert (grad.abs() > 1e-8).all()  # every center gets gradient, through the Gaussian factor


def test_local_p_combined_with_causal_gradcheck():
    centers = torch.tensor([[0.3, 1.6, 3.45, 5.7]], dtype=torch.float64, requires_grad=True)
    q, k, v = make_qkv(1, 1, 4, 7, D=3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, c):
        return attnkit.attention(q, k, v, mask=masks.local_p(c, 2) & masks.causal(), backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v, centers))
