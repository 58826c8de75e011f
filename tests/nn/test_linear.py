"""attnkit.nn LinearAttention, PerformerAttention, LinformerAttention."""

import math

import pytest
import torch

import attnkit
import attnkit.nn
from attnkit.linear import linear_attention
from attnkit.nn import LinearAttention, LinformerAttention, PerformerAttention

MODULES = {
    "linear": lambda **kw: LinearAttention(16, 4, **kw),
    "linear_causal": lambda **kw: LinearAttention(16, 4, causal=True, chunk_size=3, **kw),
    "performer": lambda **kw: PerformerAttention(16, 4, num_features=32, seed=0, **kw),
    "performer_causal": lambda **kw: PerformerAttention(16, 4, num_features=32, causal=True, seed=0, **kw),
    "linformer": lambda **kw: LinformerAttention(16, 4, seq_len=12, proj_len=5, **kw),
}


def heads(x, H):
    B, T, E = x.shape
    return x.view(B, T, H, E // H).transpose(1, 2)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_shapes_self_and_cross(name, num_kv_heads):
    m = MODULES[name](num_kv_heads=num_kv_heads)
    x, mem = torch.randn(2, 7, 16), torch.randn(2, 10, 16)
    assert m(x).shape == (2, 7, 16)
    assert m(x, mem, mem).shape == (2, 7, 16)
    assert m(x, mem).shape == (2, 7, 16)                     # value defaults to key


def test_linear_module_equals_functional_with_its_projections():
    m = LinearAttention(12, 3, causal=True, feature_map="relu", num_kv_heads=1).double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    q = heads(x @ m.q_proj.weight.T + m.q_proj.bias, 3)
    k = heads(x @ m.k_proj.weight.T + m.k_proj.bias, 1)
    v = heads(x @ m.v_proj.weight.T + m.v_proj.bias, 1)
    o = linear_attention(q, k, v, feature_map="relu", causal=True).transpose(1, 2).reshape(2, 6, 12)
    torch.testing.assert_close(m(x), o @ m.out_proj.weight.T + m.out_proj.bias, rtol=1e-12, atol=1e-13)


def test_performer_module_approximates_softmax_attention_with_its_projections():
    torch.manual_seed(0)
    m = PerformerAttention(16, 2, num_features=4096, seed=1).double()
    x = 0.3 * torch.randn(2, 8, 16, dtype=torch.float64)
    q = heads(m.q_proj(x), 2)
    k = heads(m.k_proj(x), 2)
    v = heads(m.v_proj(x), 2)
    exact = m.out_proj(attnkit.attention(q, k, v).transpose(1, 2).reshape(2, 8, 16))
    assert (m(x) - exact).abs().mean() < 0.02 * exact.abs().mean() + 1e-3


def test_linformer_module_equals_explicit_formula():
    m = LinformerAttention(8, 2, seq_len=10, proj_len=4).double()
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    q, k, v = heads(m.q_proj(x), 2), heads(m.k_proj(x), 2), heads(m.v_proj(x), 2)
    E, F = m.E[:, :7], m.F[:, :7]
    o = torch.softmax(q @ (E @ k).transpose(-2, -1) / math.sqrt(4), -1) @ (F @ v)
    expected = m.out_proj(o.transpose(1, 2).reshape(1, 7, 8))
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_padded_keys_have_no_influence(name):
    m = MODULES[name]().eval()
    x = torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True                                        # torch convention: True = padding
    pad[1, 2] = True
    out = m(x, key_padding_mask=pad)
    x2 = x.clone()
    x2[0, 6:] = torch.randn(3, 16) * 10
    x2[1, 2] = 100.0
    # queries at unpadded positions read the same (modified padded positions are also queries here)
    out2 = m(x, x2, x2, key_padding_mask=pad)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    if name in ("linear", "performer"):
        # exact dropping: equals running on the unpadded keys only (batch 0)
        trunc = m(x[:1], x[:1, :6], x[:1, :6])
        torch.testing.assert_close(out[:1], trunc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["linear_causal", "performer_causal"])
def test_causal_modules_do_not_look_ahead(name):
    m = MODULES[name]().double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    torch.testing.assert_close(m(x2)[:, :7], m(x)[:, :7], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_backward_reaches_every_parameter(name):
    m = MODULES[name]()
    m(torch.randn(2, 8, 16)).square().mean().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(MODULES))
def test_bfloat16_modules(name):
    m = MODULES[name]()
    x = torch.randn(2, 8, 16)
    gold = m(x)
    out = m.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), gold, rtol=0, atol=0.1)


def test_performer_seed_redraw_and_state():
    a, b = PerformerAttention(16, 4, num_features=8, seed=3), PerformerAttention(16, 4, num_features=8, seed=3)
    assert torch.equal(a.projection, b.projection)
    assert "projection" in a.state_dict() and a.projection.shape == (8, 4)
    fixed = PerformerAttention(16, 4, num_features=8, seed=3, redraw=False).train()
    p0 = fixed.projection.clone()
    fixed(torch.randn(1, 3, 16))
    assert torch.equal(fixed.projection, p0)
    r = PerformerAttention(16, 4, num_features=8, seed=3, redraw=True)
    p0 = r.projection.clone()
    r.train()(torch.randn(1, 3, 16))
    p1 = r.projection.clone()
    assert not torch.equal(p1, p0)
    r.eval()(torch.randn(1, 3, 16))
    assert torch.equal(r.projection, p1)                     # eval keeps the projection
    torch.manual_seed(0)
    g1 = PerformerAttention(16, 4, num_features=8).projection
    torch.manual_seed(0)
    assert torch.equal(g1, PerformerAttention(16, 4, num_features=8).projection)   # seed=None: global RNG


def test_linformer_shorter_inputs_and_share_kv():
    m = LinformerAttention(16, 4, seq_len=12, proj_len=5, share_kv=True)
    assert m.F is None and sum(p.numel() for n, p in m.named_parameters() if n in ("E", "F")) == 60
    assert m(torch.randn(2, 4, 16)).shape == (2, 4, 16)
    with pytest.raises(ValueError, match="seq_len = 12"):
        m(torch.randn(2, 13, 16))


def test_module_errors():
    with pytest.raises(ValueError, match="num_features"):
        PerformerAttention(16, 4, num_features=0)
    with pytest.raises(ValueError, match=r"valid names: 'elu\+1', 'relu'"):
        LinearAttention(16, 4, feature_map="exp")
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(10, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LinearAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="proj_len"):
        LinformerAttention(16, 4, seq_len=8, proj_len=0)
    m = LinearAttention(16, 4)
    with pytest.raises(TypeError, match="True = padding"):
        m(torch.randn(2, 5, 16), key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Tk\) = \(2, 5\)"):
        m(torch.randn(2, 5, 16), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must have last dim 16"):
        m(torch.randn(2, 5, 8))


def test_exported_from_attnkit_nn():
    assert attnkit.nn.LinearAttention is LinearAttention
    assert attnkit.nn.PerformerAttention is PerformerAttention
    assert attnkit.nn.LinformerAttention is LinformerAttention
