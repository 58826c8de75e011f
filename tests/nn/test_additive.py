import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnkit.nn import AdditiveAttention


def set_weights(attn, Wq, Wk, b, v):
    with torch.no_grad():
        attn.score.query_proj.weight.copy_(torch.tensor(Wq))
        attn.score.key_proj.weight.copy_(torch.tensor(Wk))
        attn.score.key_proj.bias.copy_(torch.tensor(b))
        attn.score.v.weight.copy_(torch.tensor([v]))


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def loop_reference(attn, q, k, v, keep=None):
    """Explicit loops in float64 over (b, i, j) with the module's parameters."""
    Wq = attn.score.query_proj.weight.double()
    Wk, bk = attn.score.key_proj.weight.double(), attn.score.key_proj.bias.double()
    vw = attn.score.v.weight.double()[0]
    q, k, v = q.double(), k.double(), v.double()
    B, Tq, _ = q.shape
    Tk = k.shape[1]
    out = torch.zeros(B, Tq, v.shape[-1], dtype=torch.float64)
    w = torch.zeros(B, Tq, Tk, dtype=torch.float64)
    for b in range(B):
        real = [j for j in range(Tk) if keep is None or keep[b, j]]
        for i in range(Tq):
            e = torch.stack([vw @ torch.tanh(Wq @ q[b, i] + Wk @ k[b, j] + bk) for j in real]) if real else None
            if e is None:
                continue
            a = torch.softmax(e, 0)
            for n, j in enumerate(real):
                w[b, i, j] = a[n]
                out[b, i] += a[n] * v[b, j]
    return out, w


def test_hand_computed_2x3():
    # Tq = 2 queries, Tk = 3 keys, dq = dk = hidden = 2, dv = 2
    attn = AdditiveAttention(2, 2, 2)
    set_weights(attn, Wq=[[1.0, 0.0], [0.0, 1.0]], Wk=[[1.0, 0.0], [0.0, 2.0]], b=[0.0, -0.5], v=[1.0, -1.0])
    q = [[0.5, -1.0], [0.0, 0.25]]
    k = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]]
    val = [[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]]
    expected_w, expected_c = [], []
    for qi in q:
        # e_ij = 1 * tanh(q_i0 + k_j0 + 0) - 1 * tanh(q_i1 + 2 k_j1 - 0.5)
        e = [math.tanh(qi[0] + kj[0]) - math.tanh(qi[1] + 2 * kj[1] - 0.5) for kj in k]
        a = softmax(e)
        expected_w.append(a)
        expected_c.append([sum(a[j] * val[j][d] for j in range(3)) for d in range(2)])
    ctx, w = attn(torch.tensor([q]), torch.tensor([k]), torch.tensor([val]))
    torch.testing.assert_close(w, torch.tensor([expected_w]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ctx, torch.tensor([expected_c]), atol=1e-6, rtol=1e-6)
    # one decoder step: 2-D query -> (B, dv), (B, Tk)
    ctx1, w1 = attn(torch.tensor([q[1]]), torch.tensor([k]), torch.tensor([val]))
    assert ctx1.shape == (1, 2) and w1.shape == (1, 3)
    torch.testing.assert_close(w1, torch.tensor([expected_w[1]]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ctx1, torch.tensor([expected_c[1]]), atol=1e-6, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), Tq=st.integers(1, 4), Tk=st.integers(1, 5), dq=st.integers(1, 4),
       dk=st.integers(1, 4), dv=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_matches_explicit_loops(B, Tq, Tk, dq, dk, dv, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    attn = AdditiveAttention(dq, dk, 3)
    q, k, v = torch.randn(B, Tq, dq, generator=g), torch.randn(B, Tk, dk, generator=g), torch.randn(B, Tk, dv, generator=g)
    keep = torch.rand(B, Tk, generator=g) > 0.3
    ctx, w = attn(q, k, v, key_padding_mask=~keep)
    ref_ctx, ref_w = loop_reference(attn, q, k, v, keep)
    torch.testing.assert_close(ctx.double(), ref_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-5, rtol=1e-5)


def test_padding_gets_zero_weight_and_is_ignored():
    attn = AdditiveAttention(3, 4, 5)
    q, k, v = torch.randn(2, 3, 3), torch.randn(2, 6, 4), torch.randn(2, 6, 2)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 1] = True
    ctx, w = attn(q, k, v, key_padding_mask=pad)
    assert (w[pad.unsqueeze(1).expand_as(w)] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    k2, v2 = k.clone(), v.clone()
    k2[pad], v2[pad] = 1e4, -1e4
    ctx2, w2 = attn(q, k2, v2, key_padding_mask=pad)
    torch.testing.assert_close(ctx2, ctx)
    torch.testing.assert_close(w2, w)


def test_all_padding_gives_zeros_not_nan():
    attn = AdditiveAttention(2, 2, 2)
    pad = torch.tensor([[True, True, True], [False, True, True]])
    ctx, w = attn(torch.randn(2, 2), torch.randn(2, 3, 2), torch.randn(2, 3, 4), key_padding_mask=pad)
    assert not ctx.isnan().any() and not w.isnan().any()
    assert (ctx[0] == 0).all() and (w[0] == 0).all()
    assert w[1].tolist() == [1.0, 0.0, 0.0]


def test_need_weights_false():
    attn = AdditiveAttention(2, 3, 4)
    q, k, v = torch.randn(2, 3, 2), torch.randn(2, 5, 3), torch.randn(2, 5, 2)
    ctx, w = attn(q, k, v, need_weights=False)
    assert w is None
    torch.testing.assert_close(ctx, attn(q, k, v)[0])


def test_gradcheck_float64():
    attn = AdditiveAttention(2, 3, 4).double()
    q = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v, key_padding_mask=pad)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q[:, 0], k, v)[0], (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    attn = AdditiveAttention(3, 3, 4)
    q, k, v = torch.randn(2, 2, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    gold, gold_w = attn.double()(q.double(), k.double(), v.double())
    ctx, w = attn.to(dtype)(q.to(dtype), k.to(dtype), v.to(dtype))
    assert ctx.dtype == dtype and w.dtype == dtype
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ctx.double(), gold, atol=tol, rtol=tol)
    torch.testing.assert_close(w.double(), gold_w, atol=tol, rtol=tol)


def test_errors():
    with pytest.raises(ValueError, match="hidden_dim"):
        AdditiveAttention(2, 2, 0)
    with pytest.raises(TypeError, match="query_dim"):
        AdditiveAttention(2.5, 2, 2)
    with pytest.raises(ValueError, match="dropout"):
        AdditiveAttention(2, 2, 2, dropout=1.5)
    attn = AdditiveAttention(2, 3, 4, value_dim=5)
    q, k, v = torch.randn(2, 1, 2), torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="query"):
        attn(torch.randn(2, 1, 3), k, v)
    with pytest.raises(ValueError, match="key"):
        attn(q, torch.randn(2, 4, 2), v)
    with pytest.raises(ValueError, match="value"):
        attn(q, k, torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="must agree"):
        attn(q, k, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 4\)"):
        attn(q, k, v, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        attn(q, k, v, key_padding_mask=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        attn([[1.0, 2.0]], k, v)


def test_dropout_only_while_training_and_weights_are_pre_dropout():
    attn = AdditiveAttention(2, 2, 3, dropout=0.5)
    q, k, v = torch.randn(2, 4, 2), torch.randn(2, 6, 2), torch.randn(2, 6, 3)
    attn.eval()
    ctx_eval, w_eval = attn(q, k, v)
    attn.train()
    torch.manual_seed(1)
    ctx_train, w_train = attn(q, k, v)
    torch.testing.assert_close(w_train, w_eval)
    assert not torch.allclose(ctx_train, ctx_eval)
    # inverted dropout: each context is a sum of kept weights / (1 - p) times values
    assert ((ctx_train - ctx_eval).abs() > 1e-6).any()


def test_projected_keys_give_identical_results_and_gradients():
    torch.manual_seed(0)
    att = AdditiveAttention(5, 6, 7, value_dim=3).double()
    q = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 3, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    a, wa = att(q, k, v, key_padding_mask=pad)
    b, wb = att(q, k, v, key_padding_mask=pad, projected_key=att.project_keys(k))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    torch.testing.assert_close(wa, wb, rtol=0, atol=1e-14)
    ga = torch.autograd.grad(a.sum(), (q, k, *att.parameters()))
    gb = torch.autograd.grad(b.sum(), (q, k, *att.parameters()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="projected_key must be"):
        att(q, k, v, projected_key=att.project_keys(k)[:, :5])
