"""Kernelized linear attention: the linear (chunked) form equals the explicit quadratic form."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit.linear import linear_attention, quadratic_linear_attention
from attnkit.testing import make_qkv


def loop_linear(q, k, v, phi, causal=False, keep=None, eps=1e-6):
    """Katharopoulos et al. eq. (5)/(9) written as a loop over queries (float64)."""
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            for i in range(Tq):
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = 0.0
                for j in range(Tk):
                    if causal and j > i + Tk - Tq:
                        continue
                    if keep is not None and not keep[b, j]:
                        continue
                    a = (phi(q[b, h, i]) @ phi(k[b, kh, j])).item()
                    num += a * v[b, kh, j]
                    den += a
                out[b, h, i] = num / (den + eps) if den + eps > 0 else 0.0
    return out


def elu1(x):
    return F.elu(x) + 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(5, 5), (3, 6), (6, 4)])
def test_quadratic_form_matches_loop(causal, Tq, Tk):
    q, k, v = make_qkv(2, 2, Tq, Tk, D=3, Dv=2, Hkv=1, dtype=torch.float64)
    keep = torch.tensor([[True] * Tk, [True] * (Tk - 2) + [False] * 2])
    got = quadratic_linear_attention(q, k, v, causal=causal, key_padding=keep)
    torch.testing.assert_close(got, loop_linear(q, k, v, elu1, causal, keep), rtol=0, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [None, "lengths", "keep"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 12, 100])
def test_linear_equals_quadratic_float64(causal, padding, chunk):
    T = 12
    q, k, v = make_qkv(2, 4, T, D=6, Dv=5, Hkv=2, dtype=torch.float64)
    kp = {None: None, "lengths": torch.tensor([12, 7]),
          "keep": torch.rand(2, T) > 0.3}[padding]
    lin = linear_attention(q, k, v, causal=causal, key_padding=kp, chunk_size=chunk)
    quad = quadratic_linear_attention(q, k, v, causal=causal, key_padding=kp)
    torch.testing.assert_close(lin, quad, rtol=1e-12, atol=1e-13)


@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 2), Tq=st.integers(1, 11),
       Tk=st.integers(1, 11), D=st.integers(1, 5), Dv=st.integers(1, 4), chunk=st.integers(1, 7),
       causal=st.booleans(), pad=st.booleans(), fmap=st.sampled_from(["elu+1", "relu"]))
def test_linear_equals_quadratic_property(B, Hkv, G, Tq, Tk, D, Dv, chunk, causal, pad, fmap):
    g = torch.Generator().manual_seed(B * 1000 + Tq * 31 + Tk)
    q, k, v = make_qkv(B, Hkv * G, Tq, Tk, D=D, Dv=Dv, Hkv=Hkv, dtype=torch.float64, generator=g)
    kp = torch.randint(0, Tk + 1, (B,), generator=g) if pad else None
    lin = linear_attention(q, k, v, feature_map=fmap, causal=causal, key_padding=kp, chunk_size=chunk)
    quad = quadratic_linear_attention(q, k, v, feature_map=fmap, causal=causal, key_padding=kp)
    torch.testing.assert_close(lin, quad, rtol=1e-11, atol=1e-12)
    assert torch.isfinite(lin).all()


def test_callable_feature_map_and_agreement_with_loop():
    q, k, v = make_qkv(1, 2, 7, D=4, dtype=torch.float64)
    phi = lambda x: x.square()  # noqa: E731  (non-negative)
    lin = linear_attention(q, k, v, feature_map=phi, causal=True, chunk_size=3)
    torch.testing.assert_close(lin, loop_linear(q, k, v, phi, causal=True), rtol=1e-12, atol=1e-13)


def test_padded_keys_have_no_influence_even_if_nan():
    q, k, v = make_qkv(2, 2, 8, D=4, dtype=torch.float64)
    lengths = torch.tensor([5, 8])
    for causal in (False, True):
        base = linear_attention(q, k, v, causal=causal, key_padding=lengths, chunk_size=3)
        k2, v2 = k.clone(), v.clone()
        k2[0, :, 5:] = float("nan")
        v2[0, :, 5:] = 1e6
        out = linear_attention(q, k2, v2, causal=causal, key_padding=lengths, chunk_size=3)
        torch.testing.assert_close(out, base, rtol=0, atol=0)
        # non-causal: equals running on the unpadded keys only
        if not causal:
            trunc = linear_attention(q[:1], k[:1, :, :5], v[:1, :, :5])
            torch.testing.assert_close(base[:1], trunc, rtol=1e-13, atol=1e-14)


def test_rows_with_no_visible_key_are_zero_not_nan():
    q, k, v = make_qkv(2, 1, 6, 3, D=4, dtype=torch.float64)
    out = linear_attention(q, k, v, causal=True)          # queries 0..2 precede every key
    assert torch.isfinite(out).all() and torch.all(out[:, :, :3] == 0)
    out = linear_attention(q, k, v, key_padding=torch.tensor([0, 3]), eps=0.0)
    assert torch.isfinite(out).all() and torch.all(out[0] == 0) and out[1].abs().sum() > 0


def test_causal_does_not_look_ahead():
    q, k, v = make_qkv(1, 2, 10, D=4, dtype=torch.float64)
    out = linear_attention(q, k, v, causal=True, chunk_size=4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 3.0
    v2[:, :, 6:] -= 2.0
    out2 = linear_attention(q, k2, v2, causal=True, chunk_size=4)
    torch.testing.assert_close(out2[:, :, :6], out[:, :, :6], rtol=0, atol=1e-15)
    assert (out2[:, :, 6:] - out[:, :, 6:]).abs().max() > 1e-3


def test_rows_sum_to_one_and_differs_from_softmax():
    q, k, v = make_qkv(1, 2, 6, D=4, dtype=torch.float64)
    _, w = quadratic_linear_attention(q, k, v, return_weights=True, eps=0.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 6, dtype=torch.float64))
    assert (w - attnkit.attention(q, k, v, return_weights=True)[1]).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_linear_gradcheck(causal):
    q, k, v = make_qkv(1, 2, 5, D=3, Dv=2, Hkv=1, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v: linear_attention(q, k, v, causal=causal, key_padding=torch.tensor([4]), chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))
    g = lambda q, k, v: quadratic_linear_attention(q, k, v, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(g, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    q, k, v = make_qkv(2, 2, 40, D=8, dtype=torch.float64)
    gold = linear_attention(q, k, v, causal=True)
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert out.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), gold, rtol=0, atol=tol)


def test_linear_errors():
    q, k, v = make_qkv(1, 2, 4, D=4)
    with pytest.raises(ValueError, match=r"unknown feature_map 'softmax'; valid names: 'elu\+1', 'relu'"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(TypeError, match="feature_map"):
        linear_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="eps"):
        linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="same last dim"):
        linear_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="H % Hkv"):
        linear_attention(make_qkv(1, 3, 4, D=4)[0], k, v)
    with pytest.raises(ValueError, match="key_padding"):
        linear_attention(q, k, v, key_padding=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="causal"):
        linear_attention(q, k, v, causal="yes")


def test_nan_in_padded_keys_gives_finite_gradients():
    from attnkit.linear import performer_attention
    q, k, v = make_qkv(1, 2, 6, D=4, dtype=torch.float64)
    k[0, :, 4:] = float("nan")
    v[0, :, 4:] = float("inf")
    for fn in (linear_attention, performer_attention):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv, causal=True, key_padding=torch.tensor([4]))
        out.square().sum().backward()
        for t in (qq, kk, vv):
            assert torch.isfinite(t.grad).all()
        assert torch.all(kk.grad[0, :, 4:] == 0) and kk.grad[0, :, :4].abs().sum() > 0


@pytest.mark.parametrize("Tq,Tk", [(0, 3), (3, 0), (0, 0)])
def test_empty_sequences_give_empty_or_zero_output(Tq, Tk):
    from attnkit.linear import performer_attention
    q, k, v = torch.randn(1, 2, Tq, 4), torch.randn(1, 2, Tk, 4), torch.randn(1, 2, Tk, 3)
    for causal in (False, True):
        for out in (linear_attention(q, k, v, causal=causal), performer_attention(q, k, v, causal=causal)):
            assert out.shape == (1, 2, Tq, 3) and torch.all(out == 0)
