"""SlidingWindowAttention (against torch with the window as attn_mask) and Luong local
attention (local-m, local-p) against explicit loops."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.nn import KVCache, LocalAttention, SlidingWindowAttention

F64 = dict(atol=1e-10, rtol=1e-9)


# -- SlidingWindowAttention ------------------------------------------------------------------------
def window_hide(T, window, causal):
    """torch convention (True = NOT allowed), built with explicit loops."""
    hide = torch.ones(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if i - window <= j <= (i if causal else i + window):
                hide[i, j] = False
    return hide


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window_matches_torch_with_window_mask(causal, window):
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    m = SlidingWindowAttention.from_torch(t, window=window, causal=causal)
    assert isinstance(m, SlidingWindowAttention) and m.window == window
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    hide = window_hide(7, window, causal)
    out_t, w_t = t(x, x, x, attn_mask=hide, average_attn_weights=False)
    out_m, w_m = m(x, average_attn_weights=False)
    torch.testing.assert_close(out_m, out_t, **F64)
    torch.testing.assert_close(w_m, w_t, **F64)
    assert (w_m[:, :, hide] == 0).all()
    fast, _ = m(x, need_weights=False)
    torch.testing.assert_close(fast, out_t, **F64)
    g_t, = torch.autograd.grad(out_t.sum(), x)
    g_m, = torch.autograd.grad(fast.sum(), x)
    torch.testing.assert_close(g_m, g_t, **F64)


def test_sliding_window_with_kv_cache_equals_full():
    m = SlidingWindowAttention(16, 4, window=2, num_kv_heads=2, dtype=torch.float64).eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    full, _ = m(x)
    cache, outs, start = KVCache(), [], 0
    for n in (3, 1, 4):
        outs.append(m(x[:, start:start + n], cache=cache, need_weights=False)[0])
        start += n
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-10


def test_sliding_window_errors_and_extra_mask():
    with pytest.raises(ValueError, match=r"window must be > 0.*got 0"):
        SlidingWindowAttention(16, 4, window=0)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(16, 4, window=-3)
    with pytest.raises(TypeError, match="window"):
        SlidingWindowAttention(16, 4, window=1.5)
    # a user mask is ANDed with the window
    m = SlidingWindowAttention(8, 2, window=2, mask=attnkit.masks.causal(), causal=False, dtype=torch.float64)
    _, w = m(torch.randn(1, 5, 8, dtype=torch.float64))
    assert ((w[0] > 0) == ~window_hide(5, 2, True)).all()


# -- LocalAttention: local-m -----------------------------------------------------------------------
def local_m_by_hand(query, keys, value, D, offset=0):
    """Luong local-m (dot score) with explicit loops: softmax over s in [t-D, t+D]."""
    B, Tq, _ = query.shape
    S = keys.shape[1]
    ctx = torch.zeros(B, Tq, value.shape[-1], dtype=query.dtype)
    w = torch.zeros(B, Tq, S, dtype=query.dtype)
    for b in range(B):
        for t in range(Tq):
            p = t + offset
            window = [s for s in range(S) if p - D <= s <= p + D]
            if not window:
                continue
            scores = torch.stack([query[b, t] @ keys[b, s] for s in window])
            a = torch.softmax(scores, 0)
            for s, a_s in zip(window, a):
                w[b, t, s] = a_s
                ctx[b, t] += a_s * value[b, s]
    return ctx, w


def test_local_m_hand_computed_tiny_case():
    """D = 1, one decoder state per position, 4 source states with dot scores worked out on paper:
    t=0 sees s in {0,1}: scores (1, 0) -> weights (e/(e+1), 1/(e+1))."""
    att = LocalAttention(2, D=1, mode="m", score="dot").double()
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    query = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    ctx, w = att(query, keys)
    e = math.e
    want0 = [e / (e + 1), 1 / (e + 1), 0.0, 0.0]
    want1 = [1 / 3, 1 / 3, 1 / 3, 0.0]  # t=1: window {0,1,2}, all scores 0
    torch.testing.assert_close(w[0], torch.tensor([want0, want1], dtype=torch.float64))
    torch.testing.assert_close(ctx[0, 0], torch.tensor([e / (e + 1), 1 / (e + 1)], dtype=torch.float64))


@settings(max_examples=15, deadline=None)
@given(Tq=st.integers(1, 6), S=st.integers(1, 8), D=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_local_m_zero_outside_window_and_matches_loops(Tq, S, D, seed):
    torch.manual_seed(seed)
    att = LocalAttention(4, D=D, mode="m", score="dot").double()
    q, k, v = (torch.randn(2, Tq, 4, dtype=torch.float64), torch.randn(2, S, 4, dtype=torch.float64),
               torch.randn(2, S, 3, dtype=torch.float64))
    ctx, w = att(q, k, v)
    t = torch.arange(Tq).view(Tq, 1)
    s = torch.arange(S).view(1, S)
    outside = (s < t - D) | (s > t + D)
    assert (w[:, outside] == 0).all()
    ctx_ref, w_ref = local_m_by_hand(q, k, v, D)
    torch.testing.assert_close(w, w_ref, **F64)
    torch.testing.assert_close(ctx, ctx_ref, **F64)


def test_local_m_step_by_step_with_offset_equals_full():
    att = LocalAttention(4, D=2, mode="m", score="general").double()
    q, k = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 7, 4, dtype=torch.float64)
    ctx, w = att(q, k)
    for t in range(5):
        c_t, w_t = att(q[:, t], k, offset=t)  # one decoder step (B, dq)
        assert c_t.shape == (2, 4) and w_t.shape == (2, 7)
        torch.testing.assert_close(c_t, ctx[:, t], **F64)
        torch.testing.assert_close(w_t, w[:, t], **F64)


def test_concat_score_matches_hand_computation():
    att = LocalAttention(3, key_dim=5, D=2, mode="m", score="concat", hidden_dim=4).double()
    q, k = torch.randn(1, 3, 3, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)
    _, w = att(q, k)
    sc = att.score
    for t in range(3):
        window = [s for s in range(4) if t - 2 <= s <= t + 2]
        scores = torch.stack([sc.v.weight[0] @ torch.tanh(sc.query_proj.weight @ q[0, t] + sc.key_proj.weight @ k[0, s])
                              for s in window])
        torch.testing.assert_close(w[0, t, window], torch.softmax(scores, 0), **F64)


# -- LocalAttention: local-p -----------------------------------------------------------------------
def local_p_by_hand(att, query, keys, value, lengths):
    """Luong local-p with explicit loops: p_t = S_b * sigmoid(v_p . tanh(W_p h_t)); softmax over
    s in [p_t - D, p_t + D] (and s < S_b), times exp(-(s - p_t)^2 / (2 (D/2)^2)), no renormalization."""
    B, Tq, _ = query.shape
    S, D = keys.shape[1], att.D
    sigma = D / 2
    W = att.score.weight
    ctx = torch.zeros(B, Tq, value.shape[-1], dtype=query.dtype)
    w = torch.zeros(B, Tq, S, dtype=query.dtype)
    for b in range(B):
        for t in range(Tq):
            h = query[b, t]
            p = float(lengths[b]) * torch.sigmoid(att.v_p.weight[0] @ torch.tanh(att.W_p.weight @ h))
            window = [s for s in range(int(lengths[b])) if p - D <= s <= p + D]
            if not window:
                continue
            a = torch.softmax(torch.stack([h @ W @ keys[b, s] for s in window]), 0)
            for s, a_s in zip(window, a):
                w[b, t, s] = a_s * torch.exp(-((s - p) ** 2) / (2 * sigma ** 2))
                ctx[b, t] += w[b, t, s] * value[b, s]
    return ctx, w


def test_local_p_tiny_case_matches_hand_computation():
    torch.manual_seed(1)
    att = LocalAttention(3, key_dim=2, D=2, mode="p").double()
    q, k, v = (torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 6, 2, dtype=torch.float64),
               torch.randn(2, 6, 4, dtype=torch.float64))
    ctx, w = att(q, k, v)
    ctx_ref, w_ref = local_p_by_hand(att, q, k, v, [6, 6])
    torch.testing.assert_close(w, w_ref, **F64)
    torch.testing.assert_close(ctx, ctx_ref, **F64)
    sums = w.sum(-1)
    assert (sums < 1 - 1e-3).all(), f"local-p weights are not renormalized; got row sums {sums}"


def test_local_p_hand_numbers_for_a_known_center():
    """Force p_t = S * sigmoid(0) = S/2 = 2 (W_p = 0), D = 2, S = 4, equal scores:
    window s in {0..3}, softmax = 1/4 each, Gaussian sigma = 1: exp(-(s-2)^2/2)."""
    att = LocalAttention(2, D=2, mode="p", score="dot").double()
    with torch.no_grad():
        att.W_p.weight.zero_()
    q = torch.zeros(1, 1, 2, dtype=torch.float64)
    k = torch.randn(1, 4, 2, dtype=torch.float64)
    _, w = att(q, k)
    want = torch.tensor([0.25 * math.exp(-2), 0.25 * math.exp(-0.5), 0.25, 0.25 * math.exp(-0.5)],
                        dtype=torch.float64)
    torch.testing.assert_close(w[0, 0], want, **F64)


def test_local_p_source_length_comes_from_padding():
    torch.manual_seed(2)
    att = LocalAttention(3, D=1, mode="p", score="general").double()
    q, k = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 7])
    pad = torch.arange(7).view(1, 7) >= lengths.view(2, 1)  # True = padding
    ctx, w = att(q, k, key_padding_mask=pad)
    ctx2, w2 = att(q, k, key_padding_mask=lengths)
    torch.testing.assert_close(w, w2, **F64)
    assert (w[0, :, 4:] == 0).all()
    ctx_ref, w_ref = local_p_by_hand(att, q, k, k, lengths)
    torch.testing.assert_close(w, w_ref, **F64)
    torch.testing.assert_close(ctx, ctx_ref, **F64)
    centers = att.predict_centers(q, lengths)
    assert (centers[0] <= 4).all() and (centers >= 0).all()


def test_local_p_gradients_reach_W_p_and_v_p():
    torch.manual_seed(3)
    att = LocalAttention(4, D=2, mode="p").double()
    q, k = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 9, 4, dtype=torch.float64)
    ctx, w = att(q, k)
    (ctx.square().sum() + w.sum()).backward()
    for name in ("W_p.weight", "v_p.weight", "score.weight"):
        g = dict(att.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 1e-8, name


@pytest.mark.parametrize("mode,score", [("p", "general"), ("p", "concat"), ("m", "general"), ("m", "dot")])
def test_gradcheck_wrt_inputs(mode, score):
    torch.manual_seed(4)
    att = LocalAttention(3, D=2, mode=mode, score=score).double()
    q = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: att(q, k), (q, k))


def test_need_weights_false_gives_the_same_context():
    att = LocalAttention(4, D=2, mode="m").double()
    q, k = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    ctx, w = att(q, k, need_weights=False)
    assert w is None
    torch.testing.assert_close(ctx, att(q, k)[0], **F64)


def test_float32_and_bfloat16_run_close_to_float64():
    att = LocalAttention(4, D=2, mode="p")
    q, k = torch.randn(2, 3, 4), torch.randn(2, 8, 4)
    gold, w_gold = att.double()(q.double(), k.double())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        ctx, w = att.to(dtype)(q.to(dtype), k.to(dtype))
        assert ctx.dtype == dtype
        assert (w.double() - w_gold).abs().max() < tol


def test_local_attention_errors():
    with pytest.raises(ValueError, match=r"unknown mode 'q'; valid names"):
        LocalAttention(4, mode="q")
    with pytest.raises(ValueError, match=r"unknown score 'cosine'; valid names: 'general', 'dot', 'concat'"):
        LocalAttention(4, score="cosine")
    with pytest.raises(ValueError, match=r"'dot' needs key_dim == query_dim.*4.*5"):
        LocalAttention(4, key_dim=5, score="dot")
    with pytest.raises(ValueError, match="D must be > 0"):
        LocalAttention(4, D=0)
    att = LocalAttention(4, D=2)
    with pytest.raises(ValueError, match="query must have 4 features"):
        att(torch.randn(1, 2, 3), torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match=r"keys must be a 3-D tensor"):
        att(torch.randn(1, 2, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool \(B, S\) = \(1, 5\)"):
        att(torch.randn(1, 2, 4), torch.randn(1, 5, 4), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, S = 5\]"):
        att(torch.randn(1, 2, 4), torch.randn(1, 5, 4), key_padding_mask=torch.tensor([6]))
