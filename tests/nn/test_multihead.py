"""attnkit.nn.MultiheadAttention against torch.nn.MultiheadAttention (weights copied with
from_torch), against explicit constructions (GQA == repeated-weight MHA), against full
recomputation (KV cache), and on properties (permutation equivariance, causality)."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.nn import KVCache, MultiheadAttention

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def make_pair(E=16, H=4, *, kdim=None, vdim=None, bias=True, batch_first=True, dtype=torch.float64, seed=0):
    """A torch MHA with random (nonzero) biases, and its attnkit copy."""
    torch.manual_seed(seed)
    t = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=dtype)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return t, MultiheadAttention.from_torch(t)


def torch_param_grads(t):
    """torch's gradients, named like attnkit's parameters."""
    if t._qkv_same_embed_dim:
        gq, gk, gv = t.in_proj_weight.grad.chunk(3)
    else:
        gq, gk, gv = t.q_proj_weight.grad, t.k_proj_weight.grad, t.v_proj_weight.grad
    g = {"q_proj.weight": gq, "k_proj.weight": gk, "v_proj.weight": gv, "out_proj.weight": t.out_proj.weight.grad}
    if t.in_proj_bias is not None:
        bq, bk, bv = t.in_proj_bias.grad.chunk(3)
        g.update({"q_proj.bias": bq, "k_proj.bias": bk, "v_proj.bias": bv, "out_proj.bias": t.out_proj.bias.grad})
    return g


def make_masks(kind_kpm, kind_attn, B, H, Tq, Tk, dtype, gen):
    """torch-convention masks. Key 0 is never hidden, so no row is fully masked (torch gives NaN there)."""
    kpm = attn = None
    if kind_kpm is not None:
        pad = torch.rand(B, Tk, generator=gen) < 0.3
        pad[:, 0] = False
        if kind_kpm == "bool":
            kpm = pad
        else:
            kpm = (0.5 * torch.randn(B, Tk, generator=gen, dtype=torch.float64)).to(dtype)
            kpm = kpm.masked_fill(pad, float("-inf"))
    if kind_attn is not None:
        shape = (Tq, Tk) if kind_attn.startswith("2d") else (B * H, Tq, Tk)
        hide = torch.rand(shape, generator=gen) < 0.3
        hide[..., 0] = False
        if kind_attn.endswith("bool"):
            attn = hide
        else:
            attn = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).masked_fill(hide, float("-inf"))
    return kpm, attn


def causal_hide(Tq, Tk):
    """torch convention (True = NOT allowed), bottom-right aligned."""
    return torch.ones(Tq, Tk, dtype=torch.bool).triu(Tk - Tq + 1)


CASES = [
    dict(),
    dict(dtype=torch.float32),
    dict(batch_first=False),
    dict(batch_first=False, dtype=torch.float32, kpm="bool"),
    dict(bias=False),
    dict(kpm="bool"),
    dict(kpm="float"),
    dict(attn="2d_bool"),
    dict(attn="2d_float"),
    dict(attn="3d_bool", dtype=torch.float32),
    dict(attn="3d_float"),
    dict(kpm="bool", attn="3d_bool"),
    dict(kpm="float", attn="2d_float", dtype=torch.float32),
    dict(causal=True),
    dict(causal=True, attn="3d_bool", kpm="bool"),
    dict(causal=True, need_weights=False),
    dict(kdim=12, vdim=7, Tk=9),
    dict(kdim=12, vdim=7, Tk=9, causal=True, kpm="bool", batch_first=False),
    dict(kdim=5, vdim=11, Tk=4, attn="3d_float", bias=False, dtype=torch.float32),
    dict(need_weights=False, kpm="bool", attn="2d_bool"),
    dict(train=True),
    dict(train=True, kpm="float", attn="3d_bool", dtype=torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_matches_torch_outputs_weights_and_grads(case):
    dtype = case.get("dtype", torch.float64)
    bf = case.get("batch_first", True)
    kdim, vdim = case.get("kdim"), case.get("vdim")
    need_weights = case.get("need_weights", True)
    B, H, E, Tq = 3, 4, 16, 6
    Tk = case.get("Tk", Tq)
    t, m = make_pair(E, H, kdim=kdim, vdim=vdim, bias=case.get("bias", True), batch_first=bf, dtype=dtype)
    t.train(case.get("train", False))
    m.train(case.get("train", False))
    gen = torch.Generator().manual_seed(1)
    kpm, attn = make_masks(case.get("kpm"), case.get("attn"), B, H, Tq, Tk, dtype, gen)

    self_attn = kdim is None
    def rnd(T, d):
        x = torch.randn(B, T, d, generator=gen, dtype=torch.float64).to(dtype)
        return x if bf else x.transpose(0, 1).contiguous()
    q = rnd(Tq, E).requires_grad_()
    k = q if self_attn else rnd(Tk, kdim).requires_grad_()
    v = q if self_attn else rnd(Tk, vdim).requires_grad_()

    t_attn, is_causal = attn, case.get("causal", False)
    if is_causal:  # torch needs the causal mask spelled out; is_causal is only a hint there
        hide = causal_hide(Tq, Tk)
        if attn is None:
            t_attn = hide
        else:
            t_attn = attn | hide
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: mismatched kpm/attn_mask types are deprecated
        out_t, w_t = t(q, k, v, key_padding_mask=kpm, attn_mask=t_attn, need_weights=need_weights,
                       is_causal=is_causal)
    if self_attn:
        out_m, w_m = m(q, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, is_causal=is_causal)
    else:
        out_m, w_m = m(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, is_causal=is_causal)

    tol = TOL[dtype]
    torch.testing.assert_close(out_m, out_t, **tol)
    if need_weights:
        assert w_m.shape == (B, Tq, Tk)
        torch.testing.assert_close(w_m, w_t, **tol)
    else:
        assert w_m is None and w_t is None

    g_out = torch.randn(out_t.shape, generator=gen, dtype=torch.float64).to(dtype)
    g_w = torch.randn(B, Tq, Tk, generator=gen, dtype=torch.float64).to(dtype)
    inputs = [q] if self_attn else [q, k, v]

    def loss(out, w):
        return (out * g_out).sum() + ((w * g_w).sum() if need_weights else 0)

    grads_t = torch.autograd.grad(loss(out_t, w_t), inputs + list(t.parameters()), allow_unused=True)
    for p, g in zip(t.parameters(), grads_t[len(inputs):]):
        p.grad = g
    grads_m = torch.autograd.grad(loss(out_m, w_m), inputs + [p for _, p in m.named_parameters()])
    for gm, gt in zip(grads_m[: len(inputs)], grads_t[: len(inputs)]):
        torch.testing.assert_close(gm, gt, **tol)
    want = torch_param_grads(t)
    names = [n for n, _ in m.named_parameters()]
    assert set(names) == set(want)
    for n, gm in zip(names, grads_m[len(inputs):]):
        torch.testing.assert_close(gm, want[n], **tol, msg=lambda s: f"grad of {n}: {s}")

    if need_weights:  # per-head weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, wh_t = t(q, k, v, key_padding_mask=kpm, attn_mask=t_attn, average_attn_weights=False)
        _, wh_m = m(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False, is_causal=is_causal)
        assert wh_m.shape == (B, H, Tq, Tk)
        torch.testing.assert_close(wh_m, wh_t, **tol)
        torch.testing.assert_close(wh_m.mean(1), w_m, **tol)


def test_unbatched_input_matches_torch_and_batched():
    t, m = make_pair(batch_first=False)
    x = torch.randn(5, 16, dtype=torch.float64)
    hide = torch.rand(4, 5, 5) < 0.3
    hide[..., 0] = False
    out_t, w_t = t(x, x, x, attn_mask=hide, average_attn_weights=False)
    out_m, w_m = m(x, attn_mask=hide, average_attn_weights=False)
    assert out_m.shape == (5, 16) and w_m.shape == (4, 5, 5)
    torch.testing.assert_close(out_m, out_t, **TOL[torch.float64])
    torch.testing.assert_close(w_m, w_t, **TOL[torch.float64])
    out_b, _ = m(x.unsqueeze(1), attn_mask=hide)  # (T, 1, E) with batch_first=False
    torch.testing.assert_close(out_b[:, 0], out_m, **TOL[torch.float64])


def test_attnkit_mask_object_uses_may_attend_convention():
    t, m = make_pair()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    win = attnkit.masks.sliding_window(2)  # True = may attend
    allowed = win.materialize(7, 7)[0, 0]
    out_t, w_t = t(x, x, x, attn_mask=~allowed)  # torch: True = NOT allowed
    out_m, w_m = m(x, attn_mask=win)
    torch.testing.assert_close(out_m, out_t, **TOL[torch.float64])
    torch.testing.assert_close(w_m, w_t, **TOL[torch.float64])
    # the same mask as the module's default mask
    m2 = MultiheadAttention.from_torch(t, mask=win)
    torch.testing.assert_close(m2(x)[0], out_t, **TOL[torch.float64])
    # combined with a per-call padding mask (AND)
    kpm = torch.tensor([[False] * 6 + [True], [False] * 7])
    out_t2, _ = t(x, x, x, attn_mask=~allowed, key_padding_mask=kpm)
    torch.testing.assert_close(m2(x, key_padding_mask=kpm)[0], out_t2, **TOL[torch.float64])


def test_score_mod_equals_additive_float_mask():
    """An ALiBi-style score mod given as a callable equals torch with the same bias as a 3-D float mask."""
    H, T = 4, 6
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(H)], dtype=torch.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes.to(score.dtype)[h] * (q_idx - kv_idx).abs()

    t, _ = make_pair(H=H)
    m = MultiheadAttention.from_torch(t, score_mod=alibi)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    i = torch.arange(T)
    bias = -slopes.view(H, 1, 1) * (i.view(T, 1) - i.view(1, T)).abs()  # (H, T, T)
    out_t, w_t = t(x, x, x, attn_mask=bias.repeat(2, 1, 1))  # (B*H, T, T)
    out_m, w_m = m(x)
    torch.testing.assert_close(out_m, out_t, **TOL[torch.float64])
    torch.testing.assert_close(w_m, w_t, **TOL[torch.float64])


def test_sigmoid_normalizer_matches_hand_computation():
    m = MultiheadAttention(8, 2, normalizer="sigmoid", dtype=torch.float64, batch_first=True)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    out, w = m(x, average_attn_weights=False)
    q = m.q_proj(x).view(1, 4, 2, 4).transpose(1, 2)
    k = m.k_proj(x).view(1, 4, 2, 4).transpose(1, 2)
    v = m.v_proj(x).view(1, 4, 2, 4).transpose(1, 2)
    w_ref = torch.sigmoid(q @ k.transpose(-1, -2) / 2.0)
    torch.testing.assert_close(w, w_ref)
    ref = m.out_proj((w_ref @ v).transpose(1, 2).reshape(1, 4, 8))
    torch.testing.assert_close(out, ref)


# -- GQA / MQA ------------------------------------------------------------------------------------
def expanded_mha(g: MultiheadAttention) -> MultiheadAttention:
    """An explicit MHA whose key/value heads repeat the GQA ones: query head h uses kv head h // groups."""
    H, Hkv, D, E = g.num_heads, g.num_kv_heads, g.head_dim, g.embed_dim
    m = MultiheadAttention(E, H, kdim=g.kdim, vdim=g.vdim, dtype=g.q_proj.weight.dtype, batch_first=True)
    with torch.no_grad():
        m.q_proj.load_state_dict(g.q_proj.state_dict())
        m.out_proj.load_state_dict(g.out_proj.state_dict())
        for src, dst in ((g.k_proj, m.k_proj), (g.v_proj, m.v_proj)):
            for h in range(H):
                kv = h // (H // Hkv)
                dst.weight[h * D:(h + 1) * D] = src.weight[kv * D:(kv + 1) * D]
                dst.bias[h * D:(h + 1) * D] = src.bias[kv * D:(kv + 1) * D]
    return m


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_and_mqa_equal_mha_with_repeated_kv_weights(num_kv_heads):
    torch.manual_seed(3)
    g = MultiheadAttention(32, 8, num_kv_heads=num_kv_heads, kdim=12, vdim=10, dtype=torch.float64, batch_first=True)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert g.k_proj.out_features == num_kv_heads * 4 and g.v_proj.out_features == num_kv_heads * 4
    m = expanded_mha(g)
    q, k, v = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64), \
        torch.randn(2, 7, 10, dtype=torch.float64)
    kpm = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    for need_weights in (True, False):
        out_g, w_g = g(q, k, v, key_padding_mask=kpm, is_causal=True, need_weights=need_weights,
                       average_attn_weights=False)
        out_m, w_m = m(q, k, v, key_padding_mask=kpm, is_causal=True, need_weights=need_weights,
                       average_attn_weights=False)
        torch.testing.assert_close(out_g, out_m, **TOL[torch.float64])
        if need_weights:
            torch.testing.assert_close(w_g, w_m, **TOL[torch.float64])
    # to_torch does the same expansion
    t = g.to_torch()
    out_t, _ = t(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(g(q, k, v, key_padding_mask=kpm)[0], out_t, **TOL[torch.float64])


def test_to_torch_roundtrip_and_refusals():
    t, m = make_pair(kdim=6, vdim=5, batch_first=False)
    t2 = m.to_torch()
    assert t2.batch_first is False and not t2._qkv_same_embed_dim
    q, k, v = torch.randn(4, 2, 16, dtype=torch.float64), torch.randn(3, 2, 6, dtype=torch.float64), \
        torch.randn(3, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(t2(q, k, v)[0], t(q, k, v)[0], **TOL[torch.float64])
    with pytest.raises(ValueError, match="score_mod"):
        MultiheadAttention(8, 2, score_mod=attnkit.positions.softcap(5.0), batch_first=True).to_torch()
    with pytest.raises(ValueError, match="normalizer"):
        MultiheadAttention(8, 2, normalizer="sigmoid", batch_first=True).to_torch()
    with pytest.raises(TypeError, match="from_torch takes add_bias_kv from mha"):
        MultiheadAttention.from_torch(torch.nn.MultiheadAttention(8, 2), add_bias_kv=True)
    with pytest.raises(TypeError, match="mha"):
        MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


# -- KV cache -------------------------------------------------------------------------------------
def decode(m, x, sizes, cache, need_weights=False, kpm=None):
    outs, ws, start = [], [], 0
    for n in sizes:
        end = start + n
        out, w = m(x[:, start:end], is_causal=True, cache=cache, need_weights=need_weights,
                   key_padding_mask=None if kpm is None else kpm[:, :end])
        outs.append(out)
        ws.append(w)
        start = end
    return torch.cat(outs, dim=1), ws


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("sizes", [[1] * 9, [3, 1, 5]], ids=["token_by_token", "chunks_3_1_5"])
@pytest.mark.parametrize("max_length", [None, 12])
def test_kv_cache_decoding_equals_full_causal(num_kv_heads, sizes, max_length):
    torch.manual_seed(4)
    m = MultiheadAttention(32, 8, num_kv_heads=num_kv_heads, dtype=torch.float64, batch_first=True).eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full, w_full = m(x, is_causal=True)
    cache = KVCache(max_length=max_length)
    out, ws = decode(m, x, sizes, cache, need_weights=True)
    assert cache.length == 9
    assert (out - full).abs().max() < 1e-10
    start = 0
    for n, w in zip(sizes, ws):  # chunk weights are the rows of the full map, over keys seen so far
        assert (w - w_full[:, start:start + n, :start + n]).abs().max() < 1e-10
        assert (w_full[:, start:start + n, start + n:] == 0).all()
        start += n
    # fast path (no weights) too
    out2, _ = decode(m, x, sizes, KVCache(max_length=max_length))
    assert (out2 - full).abs().max() < 1e-10


def test_kv_cache_with_left_padding():
    m = MultiheadAttention(16, 4, num_kv_heads=2, dtype=torch.float64, batch_first=True).eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[0, :2] = True  # sequence 0 is left-padded by 2
    full, _ = m(x, is_causal=True, key_padding_mask=kpm)
    out, _ = decode(m, x, [4, 1, 3], KVCache(), kpm=kpm)
    real = ~kpm  # padded query rows see only padding: both give zero attention there
    assert (out - full)[real].abs().max() < 1e-10


def test_kv_cache_beam_reorder_equals_recompute():
    m = MultiheadAttention(16, 4, dtype=torch.float64, batch_first=True).eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    cache = KVCache()
    m(x[:, :4], is_causal=True, cache=cache)
    beams = torch.tensor([1, 1, 0])
    cache.reorder(beams)
    nxt = torch.randn(3, 2, 16, dtype=torch.float64)
    out, _ = m(nxt, is_causal=True, cache=cache)
    seq = torch.cat([x[beams, :4], nxt], dim=1)
    full, _ = m(seq, is_causal=True)
    assert (out - full[:, 4:]).abs().max() < 1e-10


def test_cache_gradients_flow_through_cached_keys():
    """Training through a cache (autograd records the appends) equals the full computation."""
    m = MultiheadAttention(8, 2, dtype=torch.float64, batch_first=True)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    out, _ = decode(m, x, [2, 3], KVCache(max_length=5))
    g1 = torch.autograd.grad(out.sum(), x)[0]
    full, _ = m(x, is_causal=True)
    g2 = torch.autograd.grad(full.sum(), x)[0]
    torch.testing.assert_close(g1, g2, **TOL[torch.float64])


# -- properties -----------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 7), heads=st.sampled_from([(4, 4), (4, 2), (2, 1)]),
       seed=st.integers(0, 2 ** 16))
def test_self_attention_is_permutation_equivariant(B, T, heads, seed):
    torch.manual_seed(seed)
    H, Hkv = heads
    m = MultiheadAttention(8, H, num_kv_heads=Hkv, dtype=torch.float64, batch_first=True)
    x = torch.randn(B, T, 8, dtype=torch.float64)
    perm = torch.randperm(T)
    out, w = m(x, average_attn_weights=False)
    out_p, w_p = m(x[:, perm], average_attn_weights=False)
    torch.testing.assert_close(out_p, out[:, perm], **TOL[torch.float64])
    torch.testing.assert_close(w_p, w[:, :, perm][:, :, :, perm], **TOL[torch.float64])
    fast, _ = m(x[:, perm], need_weights=False)
    torch.testing.assert_close(fast, out[:, perm], **TOL[torch.float64])


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 8), data=st.data(), need_weights=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_causal_output_ignores_future_tokens(T, data, need_weights, seed):
    torch.manual_seed(seed)
    t = data.draw(st.integers(0, T - 2))
    m = MultiheadAttention(8, 2, num_kv_heads=1, dtype=torch.float64, batch_first=True)
    x = torch.randn(2, T, 8, dtype=torch.float64)
    y = x.clone()
    y[:, t + 1:] = 100 * torch.randn_like(y[:, t + 1:])
    a, _ = m(x, is_causal=True, need_weights=need_weights)
    b, _ = m(y, is_causal=True, need_weights=need_weights)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1]) or (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-12
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-6


def test_need_weights_false_uses_a_fast_backend_with_the_same_result():
    m = MultiheadAttention(16, 4, num_kv_heads=2, dtype=torch.float64, batch_first=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    kpm = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    assert m.explain(x, need_weights=False, is_causal=True, key_padding_mask=kpm).backend == "sdpa"
    assert m.explain(x, need_weights=True).backend == "reference"
    fast, w = m(x, need_weights=False, is_causal=True, key_padding_mask=kpm)
    assert w is None
    with attnkit.use_backend("reference"):
        ref, _ = m(x, need_weights=False, is_causal=True, key_padding_mask=kpm)
    torch.testing.assert_close(fast, ref, **TOL[torch.float64])
    # explain leaves a cache untouched
    cache = KVCache()
    m(x[:, :3], is_causal=True, cache=cache)
    m.explain(x[:, 3:], is_causal=True, cache=cache)
    assert cache.length == 3


def test_fully_masked_rows_give_zeros_not_nan():
    m = MultiheadAttention(8, 2, dtype=torch.float64, batch_first=True)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    kpm = torch.tensor([[True, True, True], [False, False, True]])
    for need_weights in (True, False):
        out, w = m(x, key_padding_mask=kpm, need_weights=need_weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0], m.out_proj.bias.expand(3, 8))  # zero context -> out_proj(0)
        if need_weights:
            assert (w[0] == 0).all() and torch.allclose(w[1].sum(-1), torch.ones(3, dtype=torch.float64))
    float_kpm = torch.zeros(2, 3, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    out, w = m(x, key_padding_mask=float_kpm)
    assert torch.isfinite(out).all() and (w[0] == 0).all()


def test_dropout_only_in_training_mode():
    m = MultiheadAttention(16, 4, dropout=0.5, dtype=torch.float64, batch_first=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    ref = MultiheadAttention(16, 4, dtype=torch.float64, batch_first=True)
    ref.load_state_dict(m.state_dict())
    m.eval()
    torch.testing.assert_close(m(x)[0], ref(x)[0])
    m.train()
    torch.manual_seed(0)
    a = m(x, need_weights=False)[0]
    assert (a - ref(x)[0]).abs().max() > 1e-3
    torch.manual_seed(0)
    torch.testing.assert_close(m(x, need_weights=False)[0], a)  # reproducible under a seed


def test_bfloat16_close_to_float64():
    m = MultiheadAttention(16, 4, num_kv_heads=2, batch_first=True)
    x = torch.randn(2, 5, 16)
    gold, w_gold = m.double()(x.double(), is_causal=True)
    mb = m.to(torch.bfloat16)
    for need_weights in (True, False):
        out, w = mb(x.to(torch.bfloat16), is_causal=True, need_weights=need_weights)
        assert out.dtype == torch.bfloat16
        assert (out.double() - gold).abs().max() < 5e-2
        if need_weights:
            assert (w.double() - w_gold).abs().max() < 2e-2


def test_trainable_score_parameters_are_registered():
    score = attnkit.scores.General(4, 4)
    m = MultiheadAttention(8, 2, score=score, batch_first=True)
    assert any(p is score.weight for p in m.parameters())
    out, _ = m(torch.randn(1, 3, 8))
    out.sum().backward()
    assert score.weight.grad is not None and score.weight.grad.abs().sum() > 0


# -- errors ---------------------------------------------------------------------------------------
def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"embed_dim.*num_heads.*10.*3"):
        MultiheadAttention(10, 3, batch_first=True)
    with pytest.raises(ValueError, match=r"num_kv_heads.*8.*3"):
        MultiheadAttention(16, 8, num_kv_heads=3, batch_first=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadAttention(16, 8, num_kv_heads=0, batch_first=True)
    with pytest.raises(ValueError, match="dropout"):
        MultiheadAttention(16, 8, dropout=1.5, batch_first=True)
    with pytest.raises(ValueError, match="unknown normalizer 'softmx'; valid names"):
        MultiheadAttention(16, 8, normalizer="softmx", batch_first=True)
    with pytest.raises(TypeError, match="score_mod="):
        MultiheadAttention(16, 8, bias=attnkit.positions.softcap(3.0), batch_first=True)
    with pytest.raises(TypeError, match="add_bias_kv must be a bool; got int"):
        MultiheadAttention(16, 8, 0.0, True, 1)  # torch's order: add_bias_kv is the fifth argument


def test_forward_errors_name_the_argument():
    m = MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"query must be a 3-D tensor.*\(5, 16, 1, 1\)"):
        m(torch.randn(5, 16, 1, 1))
    with pytest.raises(ValueError, match=r"query must have 16 features \(embed_dim\)"):
        m(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match=r"key must have 16 features \(kdim\)"):
        m(x, torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="key must have as many dims"):
        m(x, torch.randn(5, 16))
    with pytest.raises(ValueError, match="same batch size"):
        m(x, torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Tk\) = \(2, 5\).*\(2, 4\)"):
        m(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        m(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(Tq, Tk\) = \(5, 5\).*\(8, 5, 5\).*\(4, 5, 5\)"):
        m(x, attn_mask=torch.zeros(4, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask.*\(5, 4\)"):
        m(x, attn_mask=torch.zeros(5, 4))
    with pytest.raises(TypeError, match="attn_mask must be a tensor"):
        m(x, attn_mask=[[True]])
    with pytest.raises(TypeError, match="dtype torch.float64"):
        m(x.double())
    with pytest.raises(ValueError, match="value was given without key"):
        m(x, value=x)
    with pytest.raises(TypeError, match="cache must be an attnkit.nn.KVCache"):
        m(x, cache={})


def test_cache_batch_mismatch_and_mask_shape_with_cache():
    m = MultiheadAttention(16, 4, batch_first=True)
    cache = KVCache()
    m(torch.randn(2, 3, 16), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match=r"cache holds a batch of 2.*query has batch 3"):
        m(torch.randn(3, 1, 16), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match=r"key_padding_mask.*\(2, 4\).*cached keys"):
        m(torch.randn(2, 1, 16), key_padding_mask=torch.zeros(2, 1, dtype=torch.bool), cache=cache)
    assert cache.length == 3  # rejected calls leave the cache as it was
    cache2 = KVCache(max_length=4)
    m(torch.randn(2, 3, 16), cache=cache2)
    with pytest.raises(ValueError, match="max_length = 4"):
        m(torch.randn(2, 2, 16), cache=cache2)
    assert cache2.length == 3
    # a cache filled by a layer with other head sizes
    other = MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(ValueError, match="number of heads"):
        other(torch.randn(2, 1, 16), cache=cache)


# -- RoPE -----------------------------------------------------------------------------------------
def rope_by_hand(x, offset=0):
    """Half-split RoPE in complex form: z_i = x_i + 1j x_{i+D/2} times exp(1j m theta_i)."""
    D = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    m = torch.arange(offset, offset + x.shape[-2], dtype=torch.float64)
    rot = torch.polar(torch.ones((), dtype=torch.float64), torch.outer(m, theta))  # exp(1j m theta), (T, D/2)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_hand_rotation():
    m = MultiheadAttention(16, 2, num_kv_heads=1, rope=True, dtype=torch.float64, batch_first=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, w = m(x, is_causal=True, average_attn_weights=False)
    q = rope_by_hand(m.q_proj(x).view(2, 5, 2, 8).transpose(1, 2))
    k = rope_by_hand(m.k_proj(x).view(2, 5, 1, 8).transpose(1, 2))
    v = m.v_proj(x).view(2, 5, 1, 8).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)  # k broadcasts over the 2 query heads
    s = s.masked_fill(causal_hide(5, 5), float("-inf"))
    w_ref = torch.softmax(s, -1)
    torch.testing.assert_close(w, w_ref, **TOL[torch.float64])
    ref = m.out_proj((w_ref @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    with pytest.raises(ValueError, match="rope"):
        m.to_torch()


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_rope_with_kv_cache_equals_full(num_kv_heads):
    m = MultiheadAttention(32, 4, num_kv_heads=num_kv_heads, rope=True, dtype=torch.float64, batch_first=True).eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full, _ = m(x, is_causal=True)
    for sizes in ([1] * 9, [3, 1, 5]):
        out, _ = decode(m, x, sizes, KVCache())
        assert (out - full).abs().max() < 1e-10
