"""ALiBi slopes and biases, and tanh soft-capping, as score mods inside attnkit.attention."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.positions import ALiBi, alibi_slopes, softcap
from attnkit.testing import assert_close, make_qkv


def paper_slopes(n):
    """The authors' get_slopes (github.com/ofirpress/attention_with_linear_biases), verbatim logic."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio ** i for i in range(n)]
    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + paper_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


def test_alibi_slopes_8_heads_are_half_to_1_over_256():
    assert alibi_slopes(8).tolist() == [1 / 2 ** i for i in range(1, 9)]


def test_alibi_slopes_6_heads_follow_the_non_power_of_2_rule():
    # the 4 slopes of 4 heads (1/4 .. 1/256), then every other slope of 8 heads, first 2 of them (1/2, 1/8)
    assert alibi_slopes(6).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 64, 96])
def test_alibi_slopes_match_authors_code(n):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(paper_slopes(n), dtype=torch.float64),
                               rtol=1e-13, atol=0)


def loop_alibi(slopes, Tq, Tk, symmetric=False):
    H = len(slopes)
    bias = torch.empty(1, H, Tq, Tk, dtype=torch.float64)
    for h in range(H):
        for i in range(Tq):
            for j in range(Tk):
                d = (i + Tk - Tq) - j
                bias[0, h, i, j] = -slopes[h] * (abs(d) if symmetric else d)
    return bias


@pytest.mark.parametrize("Tq,Tk", [(5, 5), (2, 6), (6, 3)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_alibi_bias_matches_loop(Tq, Tk, symmetric):
    alibi = ALiBi(6, symmetric=symmetric)
    bias = alibi.materialize_bias(Tq, Tk, heads=6, dtype=torch.float64)
    assert bias.shape == (1, 6, Tq, Tk)
    torch.testing.assert_close(bias, loop_alibi(paper_slopes(6), Tq, Tk, symmetric), rtol=0, atol=1e-15)
    # apply() on a score tensor adds the same bias
    s = torch.randn(2, 6, Tq, Tk, dtype=torch.float64)
    torch.testing.assert_close(alibi.apply_to_scores(s), s + bias, rtol=0, atol=1e-15)


def test_alibi_score_mod_on_a_tile_matches_full_bias():
    alibi = ALiBi(4)
    full = alibi.materialize_bias(8, 8, heads=4, dtype=torch.float64)
    h = torch.arange(4).view(1, 4, 1, 1)
    qi = torch.arange(3, 6).view(1, 1, 3, 1)
    kj = torch.arange(2, 7).view(1, 1, 1, 5)
    tile = alibi.score_mod(torch.zeros((), dtype=torch.float64), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                           h, qi, kj, 8, 8)
    torch.testing.assert_close(tile, full[:, :, 3:6, 2:7], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Tq,Tk,Hkv", [(7, 7, 4), (3, 9, 2)])
def test_alibi_sdpa_equals_reference_equals_tensor_bias(dtype, Tq, Tk, Hkv):
    q, k, v = make_qkv(2, 4, Tq, Tk, D=8, Hkv=Hkv, dtype=dtype)
    alibi = ALiBi(4)
    kw = dict(mask=masks.causal(), bias=alibi)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    sdpa = attnkit.attention(q, k, v, backend="sdpa", **kw)
    explicit = attnkit.attention(q, k, v, backend="reference", mask=masks.causal(),
                                 bias=loop_alibi(paper_slopes(4), Tq, Tk).to(dtype))
    assert_close(sdpa, ref, name="sdpa vs reference")
    assert_close(ref, explicit, name="ALiBi vs explicit bias tensor")


def test_alibi_bfloat16_close_to_float64():
    q, k, v = make_qkv(1, 4, 16, D=8, dtype=torch.float64)
    gold = attnkit.attention(q, k, v, bias=ALiBi(4), mask=masks.causal(), backend="reference")
    low = attnkit.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias=ALiBi(4), mask=masks.causal(),
                            backend="reference")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), gold, rtol=0, atol=5e-2)


def test_alibi_gradcheck_through_reference():
    q, k, v = make_qkv(1, 2, 4, 5, D=3, dtype=torch.float64, requires_grad=True)
    def f(q, k, v):
        return attnkit.attention(q, k, v, bias=ALiBi(2, symmetric=True), backend="reference")
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_alibi_errors():
    q, k, v = make_qkv(1, 4, 3, D=8)
    with pytest.raises(ValueError, match="num_heads = 2"):
        attnkit.attention(q, k, v, bias=ALiBi(2))
    with pytest.raises(ValueError, match="num_heads"):
        ALiBi(0)
    with pytest.raises(TypeError, match="symmetric"):
        ALiBi(4, symmetric="yes")


# -- soft-capping ---------------------------------------------------------------------------------

def test_softcap_values():
    s = torch.tensor([[[[-100.0, -1.0, 0.0, 0.5, 3.0, 1e4]]]], dtype=torch.float64)
    out = softcap(2.0).apply_to_scores(s)
    expected = torch.tensor([2 * math.tanh(x / 2) for x in s.flatten().tolist()], dtype=torch.float64)
    torch.testing.assert_close(out.flatten(), expected, rtol=0, atol=1e-15)
    assert out.abs().max() <= 2.0


@given(cap=st.floats(0.5, 50.0), x=st.floats(-1e3, 1e3))
def test_softcap_bounded_monotone_and_near_identity_for_small_scores(cap, x):
    mod = softcap(cap)
    y = mod.apply_to_scores(torch.tensor([[[[x, x + 1.0]]]], dtype=torch.float64)).flatten()
    assert abs(y[0].item()) <= cap and y[1] >= y[0]
    small = torch.tensor([[[[cap * 1e-4]]]], dtype=torch.float64)
    assert math.isclose(mod.apply_to_scores(small).item(), cap * 1e-4, rel_tol=1e-7)


def test_softcap_in_attention_matches_explicit_and_is_not_additive():
    q, k, v = make_qkv(2, 2, 5, 6, D=4, dtype=torch.float64)
    q = q * 5
    cap = 3.0
    s = torch.tanh(q @ k.transpose(-2, -1) / 2.0 / cap) * cap        # scale 1/sqrt(4), then cap
    expected = torch.softmax(s, -1) @ v
    out = attnkit.attention(q, k, v, bias=softcap(cap), backend="reference")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="additive"):
        attnkit.attention(q, k, v, bias=softcap(cap), backend="sdpa")


def test_softcap_and_alibi_gradcheck_through_reference():
    q, k, v = make_qkv(1, 2, 4, D=3, dtype=torch.float64, requires_grad=True)
    def f(q, k, v):
        return attnkit.attention(q * 3, k, v, bias=[ALiBi(2), softcap(1.5)], mask=masks.causal(),
                                 backend="reference")
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_softcap_rejects_bad_cap():
    with pytest.raises(ValueError, match="cap"):
        softcap(0.0)
    with pytest.raises(TypeError, match="cap"):
        softcap("big")


def test_a_bias_mod_is_flagged_as_needing_gradients_only_when_it_reads_a_tensor_that_requires_grad():
    """``bias_mod`` functions take four arguments (no score): the probe calls them with four, so
    a plain one stays on the tiled backend's closed-form backward under autograd."""
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plain = attnkit.positions.bias_mod(lambda b, h, q_idx, kv_idx: -0.1 * (q_idx - kv_idx).abs().double())
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    learned = attnkit.positions.bias_mod(lambda b, h, q_idx, kv_idx: -w[h] * (q_idx - kv_idx).abs())
    assert not plain.closes_over_grad(torch.float64) and learned.closes_over_grad(torch.float64)
    assert attnkit.canonicalize(q, k, v, bias=plain).grad_mods == ()
    assert attnkit.canonicalize(q, k, v, bias=learned).grad_mods == (repr(learned),)
    assert attnkit.explain(q, k, v, bias=plain, backend="tiled").backend == "tiled"
    out = attnkit.attention(q, k, v, bias=plain, backend="tiled")
    ref = attnkit.attention(q, k, v, bias=plain, backend="reference")
    g, g_ref = torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.allclose(out, ref) and all(torch.allclose(a, b) for a, b in zip(g, g_ref))
