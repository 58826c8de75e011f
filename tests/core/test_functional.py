"""attnkit.attention: reference vs torch SDPA, backend choice, properties, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.testing import assert_close, make_qkv

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def sdpa(q, k, v, **kw):
    """Independent oracle: torch SDPA with key/value heads repeated for GQA."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_reference_matches_sdpa_plain_and_gqa(dtype, H, Hkv):
    q, k, v = make_qkv(2, H, 7, 9, D=16, Dv=5, Hkv=Hkv, dtype=dtype)
    out = attnkit.attention(q, k, v, backend="reference")
    assert_close(out, sdpa(q, k, v), name="out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_causal_square_matches_sdpa_is_causal(dtype):
    q, k, v = make_qkv(2, 3, 11, D=8, dtype=dtype)
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    assert_close(out, sdpa(q, k, v, is_causal=True), name="out")


def test_causal_rectangular_aligns_bottom_right_and_top_left_on_request():
    q, k, v = make_qkv(1, 2, 3, 7, D=8, dtype=torch.float64)
    br = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=7 - 3)
    tl = torch.ones(3, 7, dtype=torch.bool).tril()
    assert_close(attnkit.attention(q, k, v, mask=masks.causal(), backend="reference"), sdpa(q, k, v, attn_mask=br))
    assert_close(attnkit.attention(q, k, v, mask=masks.causal(align="top_left"), backend="reference"),
                 sdpa(q, k, v, attn_mask=tl))
    for backend in ("sdpa", "reference"):
        assert_close(attnkit.attention(q, k, v, mask=masks.causal(), backend=backend), sdpa(q, k, v, attn_mask=br))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_mask_and_float_bias_match_sdpa(backend, dtype):
    q, k, v = make_qkv(2, 4, 6, 8, D=8, dtype=dtype)
    m = torch.rand(2, 1, 6, 8) > 0.3
    m[..., 0] = True
    bias = torch.randn(1, 4, 6, 8, dtype=dtype)
    out = attnkit.attention(q, k, v, mask=m, bias=bias, backend=backend)
    expect = sdpa(q, k, v, attn_mask=bias.masked_fill(~m, float("-inf")))
    assert_close(out, expect, scale=2.0)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_fully_masked_rows_give_zero_output_and_finite_grads(backend):
    q, k, v = make_qkv(2, 2, 5, 6, D=4, dtype=torch.float64, requires_grad=True)
    m = torch.ones(2, 2, 5, 6, dtype=torch.bool)
    m[0, 1, 2] = False
    m[1, :, 4] = False
    out = attnkit.attention(q, k, v, mask=m, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[0, 1, 2] == 0).all() and (out[1, :, 4] == 0).all()
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[0, 1, 2] == 0).all()
    ref = attnkit.attention(q.detach(), k.detach(), v.detach(), mask=m, backend="reference")
    assert_close(out.detach(), ref)


def test_weights_rows_sum_to_one_and_masked_are_zero():
    q, k, v = make_qkv(2, 3, 5, 7, D=4)
    m = masks.sliding_window(2)
    _, w = attnkit.attention(q, k, v, mask=m, return_weights=True)
    dense = m.materialize(5, 7)
    assert (w[~dense.expand_as(w)] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))


def test_auto_uses_sdpa_without_weights_and_reference_with_weights():
    q, k, v = make_qkv()
    assert attnkit.explain(q, k, v).backend == "sdpa"
    assert attnkit.explain(q, k, v, mask=masks.causal()).backend == "sdpa"
    choice = attnkit.explain(q, k, v, return_weights=True)
    assert choice.backend == "reference"
    assert "weights" in " ".join(choice.reasons["sdpa"])
    assert attnkit.explain(q, k, v, normalizer="sigmoid").backend == "reference"
    assert attnkit.explain(q, k, v, score="cosine").backend == "reference"
    # auto's answer equals the reference
    torch.testing.assert_close(attnkit.attention(q, k, v), attnkit.attention(q, k, v, backend="reference"))


def test_forced_backend_that_cannot_serve_lists_its_reasons():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="sdpa.*weights were requested"):
        attnkit.attention(q, k, v, return_weights=True, backend="sdpa")
    with pytest.raises(ValueError, match="unknown backend 'fast'.*'reference'"):
        attnkit.attention(q, k, v, backend="fast")


def test_use_backend_forces_and_restores():
    q, k, v = make_qkv()
    with attnkit.use_backend("reference"):
        assert attnkit.explain(q, k, v).backend == "reference"
    assert attnkit.explain(q, k, v).backend == "sdpa"


def test_softmax_temperature_folds_into_sdpa_scale():
    q, k, v = make_qkv(dtype=torch.float64)
    norm = attnkit.normalizers.Softmax(temperature=0.5)
    a = attnkit.attention(q, k, v, normalizer=norm, backend="sdpa")
    b = attnkit.attention(q, k, v, normalizer=norm, backend="reference")
    assert_close(a, b)
    assert_close(b, sdpa(q, k, v, scale=2.0 / math.sqrt(8)))


def test_explicit_scale_and_dot_score():
    q, k, v = make_qkv(dtype=torch.float64)
    assert_close(attnkit.attention(q, k, v, score="dot", backend="reference"), sdpa(q, k, v, scale=1.0))
    assert_close(attnkit.attention(q, k, v, scale=0.3, backend="reference"), sdpa(q, k, v, scale=0.3))


def test_return_weights_gives_exact_weights():
    q, k, v = make_qkv(1, 2, 3, 4, D=4, dtype=torch.float64)
    out, w = attnkit.attention(q, k, v, return_weights=True)
    expect = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    assert_close(w, expect)
    assert_close(out, expect @ v)


def test_dropout_reproducible_with_generator_and_unbiased():
    q, k, v = make_qkv(1, 2, 64, D=8, dtype=torch.float64)
    a = attnkit.attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    b = attnkit.attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    c = attnkit.attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # inverted dropout keeps the expectation: average many draws of the weights
    g = torch.Generator().manual_seed(0)
    v1 = torch.ones_like(v)
    mean = torch.stack([attnkit.attention(q, k, v1, dropout_p=0.3, generator=g) for _ in range(200)]).mean(0)
    assert abs(mean.mean().item() - 1.0) < 0.02
    # without a generator, dropout runs through SDPA and still drops
    assert attnkit.explain(q, k, v, dropout_p=0.3).backend == "sdpa"
    assert not torch.equal(attnkit.attention(q, k, v, dropout_p=0.5), attnkit.attention(q, k, v))


@pytest.mark.parametrize("score", ["dot", "scaled_dot", "cosine"])
def test_gradcheck_named_scores(score):
    q, k, v = make_qkv(1, 2, 3, 4, D=3, Dv=2, dtype=torch.float64, requires_grad=True)
    m = masks.causal()
    assert torch.autograd.gradcheck(
        lambda q, k, v: attnkit.attention(q, k, v, score=score, mask=m, backend="reference"), (q, k, v))


def test_gradcheck_bias_and_softcap():
    q, k, v = make_qkv(1, 2, 3, 4, D=3, Dv=2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    cap = attnkit.positions.softcap(1.5)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attnkit.attention(q, k, v, bias=[b, cap], backend="reference"), (q, k, v, bias))


def test_score_mod_callable_and_list_order():
    q, k, v = make_qkv(1, 1, 3, 3, D=2, dtype=torch.float64)
    double = lambda s, b, h, i, j: s * 2  # noqa: E731
    plus_pos = lambda s, b, h, i, j: s + (i - j).to(s.dtype)  # noqa: E731
    _, w = attnkit.attention(q, k, v, bias=[double, plus_pos], return_weights=True, score="dot")
    raw = q @ k.transpose(-1, -2)
    ij = torch.arange(3).view(3, 1) - torch.arange(3).view(1, 3)
    assert_close(w, torch.softmax(raw * 2 + ij, -1))


@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), D=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_self_attention_is_permutation_equivariant(B, H, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    perm = torch.randperm(T, generator=g)
    out, w = attnkit.attention(x, x, x, return_weights=True)
    out_p, w_p = attnkit.attention(x[:, :, perm], x[:, :, perm], x[:, :, perm], return_weights=True)
    assert_close(out_p, out[:, :, perm])
    assert_close(w_p, w[:, :, perm][..., perm])


@given(T=st.integers(2, 10), t=st.integers(0, 9), Hkv=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_causal_output_ignores_the_future(T, t, Hkv, seed):
    t = t % T
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(1, 4, T, D=4, Hkv=Hkv, dtype=torch.float64, generator=g)
    out = attnkit.attention(q, k, v, mask=masks.causal())
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    k2[:, :, t + 1:] += 5.0
    v2[:, :, t + 1:] -= 3.0
    q2[:, :, t + 1:] *= -1
    out2 = attnkit.attention(q2, k2, v2, mask=masks.causal())
    assert_close(out2[:, :, : t + 1], out[:, :, : t + 1])


@given(H=st.sampled_from([2, 4, 6]), Tq=st.integers(1, 7), Tk=st.integers(1, 7), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["reference", "sdpa"]))
def test_gqa_equals_mha_with_repeated_kv_heads(H, Tq, Tk, seed, backend):
    Hkv = H // 2
    q, k, v = make_qkv(2, H, Tq, Tk, D=4, Hkv=Hkv, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gqa = attnkit.attention(q, k, v, mask=masks.causal(), backend=backend)
    mha = attnkit.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask=masks.causal(),
                            backend=backend)
    assert_close(gqa, mha)


def test_noncontiguous_inputs():
    q, k, v = make_qkv(2, 4, 6, D=8, noncontiguous=True, dtype=torch.float64)
    assert not q.is_contiguous()
    assert_close(attnkit.attention(q, k, v, backend="reference"),
                 attnkit.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="sdpa"))


# -- bad input (SPEC §7) --------------------------------------------------------------------------------
def _qkv():
    return make_qkv(2, 4, 5, 6, D=8)


@pytest.mark.parametrize("make,exc,msg", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be a 4-D tensor \(B, H, Tq, D\); got shape \(4, 5, 8\)"),
    (lambda q, k, v: (q, k[..., None], v), ValueError, r"k must be a 4-D tensor"),
    (lambda q, k, v: (q, k, v.tolist()), TypeError, r"v must be a torch.Tensor"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"same batch size"),
    (lambda q, k, v: (q, k, v[:, :2]), ValueError, r"k and v must have the same number of heads"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), ValueError, r"H % Hkv == 0.*H = 4.*Hkv = 3"),
    (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"same sequence length"),
    (lambda q, k, v: (q[..., :7], k, v), ValueError, r"same last dim"),
    (lambda q, k, v: (q.double(), k, v), ValueError, r"same dtype"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, r"floating-point"),
])
def test_bad_shapes_and_types(make, exc, msg):
    with pytest.raises(exc, match=msg):
        attnkit.attention(*make(*_qkv()))


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\); got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p"),
    (dict(scale=0.0), ValueError, r"scale must be a finite number > 0"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite number > 0"),
    (dict(score="bilinear"), ValueError, r"unknown score 'bilinear'; valid names: 'cosine', 'dot', 'scaled_dot'"),
    (dict(score="additive"), ValueError, r"scores.Additive\(query_dim, key_dim, hidden_dim\)"),
    (dict(normalizer="softmaxx"), ValueError, r"unknown normalizer 'softmaxx'; valid names: .*'softmax'"),
    (dict(backend=3), TypeError, r"backend must be a string"),
    (dict(mask=torch.ones(5, 6)), TypeError, r"bool tensor.*bias="),
    (dict(mask=torch.ones(3, 5, 6, dtype=torch.bool)), ValueError, r"not broadcastable to \(B, H, Tq, Tk\) = \(2, 4, 5, 6\)"),
    (dict(mask="causal"), TypeError, r"mask must be an attnkit.masks.Mask"),
    (dict(bias=torch.ones(5, 7)), ValueError, r"bias of shape \(1, 1, 5, 7\) is not broadcastable"),
    (dict(bias=torch.ones(5, 6, dtype=torch.bool)), TypeError, r"bias tensor must be floating point"),
    (dict(bias="alibi"), TypeError, r"bias must be a float tensor"),
    (dict(return_weights=1), TypeError, r"return_weights must be a bool or an attnkit.WeightsRequest"),
    (dict(mask=masks.key_padding(torch.tensor([1, 2, 3]))), ValueError, r"key_padding was built for batch 3"),
])
def test_bad_options(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        attnkit.attention(*_qkv(), **kw)


def test_mask_callable_is_a_mask_mod():
    q, k, v = make_qkv(1, 1, 4, D=2, dtype=torch.float64)
    _, w = attnkit.attention(q, k, v, mask=lambda b, h, i, j: j <= i, return_weights=True)
    assert (w[0, 0].triu(1) == 0).all()
    assert_close(w, attnkit.attention(q, k, v, mask=masks.causal(), return_weights=True)[1])
