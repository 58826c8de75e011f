import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnkit.nn import LuongAttention

H = [[0.5, -1.0], [0.0, 0.25]]                       # decoder states h_t, Tq = 2
HS = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]]           # source states h̄_s, Tk = 3 (keys = values)
WC = [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]   # W_c: h̃ = tanh([c0 + h0, c1 - h1])


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def expected(score_fn):
    weights, ctxs, htildes = [], [], []
    for h in H:
        a = softmax([score_fn(h, s) for s in HS])
        c = [sum(a[j] * HS[j][d] for j in range(3)) for d in range(2)]
        weights.append(a)
        ctxs.append(c)
        htildes.append([math.tanh(c[0] + h[0]), math.tanh(c[1] - h[1])])
    return torch.tensor([weights]), torch.tensor([ctxs]), torch.tensor([htildes])


def run(attn, attentional=True):
    if attentional:
        with torch.no_grad():
            attn.out_proj.weight.copy_(torch.tensor(WC))
    return attn(torch.tensor([H]), torch.tensor([HS]))


def check(attn, score_fn):
    w_exp, c_exp, h_exp = expected(score_fn)
    h_tilde, w = run(attn)
    torch.testing.assert_close(w, w_exp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h_tilde, h_exp, atol=1e-6, rtol=1e-6)
    return c_exp


def test_dot_hand_computed():
    check(LuongAttention(2, score="dot"), lambda h, s: h[0] * s[0] + h[1] * s[1])
    w_exp, c_exp, _ = expected(lambda h, s: h[0] * s[0] + h[1] * s[1])
    ctx, w = LuongAttention(2, score="dot", attentional=False)(torch.tensor([H]), torch.tensor([HS]))
    torch.testing.assert_close(ctx, c_exp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w, w_exp, atol=1e-6, rtol=1e-6)


def test_general_hand_computed():
    attn = LuongAttention(2, score="general")
    with torch.no_grad():
        attn.score.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, -1.0]]))
    # h W s = h0 (2 s0 + s1) + h1 (-s1)
    check(attn, lambda h, s: h[0] * (2 * s[0] + s[1]) - h[1] * s[1])


def test_concat_hand_computed():
    attn = LuongAttention(2, score="concat", hidden_dim=2)
    assert attn.score.key_proj.bias is None  # v_aᵀ tanh(W_a [h_t; h_s]) has no bias in the paper
    with torch.no_grad():
        attn.score.query_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        attn.score.key_proj.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, -1.0]]))
        attn.score.v.weight.copy_(torch.tensor([[2.0, 1.0]]))
    # W_a [h; s] = [h0 + s0 + s1, h1 - s1];  score = 2 tanh(.) + 1 tanh(.)
    check(attn, lambda h, s: 2 * math.tanh(h[0] + s[0] + s[1]) + math.tanh(h[1] - s[1]))


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_one_step_query_matches_sequence(score):
    attn = LuongAttention(4, score=score)
    q, k = torch.randn(3, 5, 4), torch.randn(3, 6, 4)
    out, w = attn(q, k)
    out1, w1 = attn(q[:, 2], k)
    assert out1.shape == (3, 4) and w1.shape == (3, 6)
    torch.testing.assert_close(out1, out[:, 2])
    torch.testing.assert_close(w1, w[:, 2])


@settings(max_examples=10, deadline=None)
@given(score=st.sampled_from(["dot", "general", "concat"]), B=st.integers(1, 3), Tq=st.integers(1, 4),
       Tk=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_padding_zero_weight_and_invariance(score, B, Tq, Tk, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    attn = LuongAttention(3, score=score, attentional=True, output_dim=2)
    q, k = torch.randn(B, Tq, 3, generator=g), torch.randn(B, Tk, 3, generator=g)
    pad = torch.rand(B, Tk, generator=g) < 0.4
    pad[:, 0] = False
    out, w = attn(q, k, key_padding_mask=pad)
    assert (w.masked_select(pad.unsqueeze(1).expand_as(w)) == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(B, Tq))
    k2 = k.clone()
    k2[pad] = torch.randn(int(pad.sum()), 3, generator=g) * 100
    out2, w2 = attn(q, k2, key_padding_mask=pad)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(w2, w)


def test_separate_values_and_all_padding():
    attn = LuongAttention(2, key_dim=3, score="general", value_dim=4)
    q, k, v = torch.randn(2, 2, 2), torch.randn(2, 3, 3), torch.randn(2, 3, 4)
    pad = torch.tensor([[True, True, True], [False, False, False]])
    out, w = attn(q, k, v, key_padding_mask=pad)
    assert out.shape == (2, 2, 2) and not out.isnan().any()
    assert (w[0] == 0).all()
    # all keys padded: c_t = 0, so h̃ = tanh(W_c [0; h_t])
    torch.testing.assert_close(out[0], torch.tanh(torch.cat([torch.zeros(2, 4), q[0]], -1) @ attn.out_proj.weight.t()))


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
@pytest.mark.parametrize("attentional", [True, False])
def test_gradcheck_float64(score, attentional):
    attn = LuongAttention(3, score=score, attentional=attentional).double()
    q = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    assert torch.autograd.gradcheck(lambda q, k: attn(q, k, key_padding_mask=pad)[0], (q, k))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    attn = LuongAttention(4, score="general")
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    gold, _ = attn(q.double(), k.double())  # float32 parameters are cast to the input dtype
    out, w = attn(q.to(dtype), k.to(dtype))
    assert out.dtype == dtype and w.dtype == dtype
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.double(), gold, atol=tol, rtol=tol)


def test_errors():
    with pytest.raises(ValueError, match="'concat', 'dot', 'general'"):
        LuongAttention(4, score="bilinear")
    with pytest.raises(TypeError, match="score must be one of 'concat', 'dot', 'general'"):
        LuongAttention(4, score=None)
    with pytest.raises(ValueError, match="key_dim == query_dim"):
        LuongAttention(4, key_dim=3, score="dot")
    with pytest.raises(ValueError, match="output_dim"):
        LuongAttention(4, output_dim=0)
    with pytest.raises(TypeError, match="attentional"):
        LuongAttention(4, attentional="yes")
    attn = LuongAttention(4, key_dim=3, score="general")
    with pytest.raises(ValueError, match="key"):
        attn(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="query"):
        attn(torch.randn(2, 3, 3), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        attn(torch.randn(2, 3, 4), torch.randn(2, 5, 3), key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
