"""attnkit.nn.MultiheadAttention is a drop-in for torch.nn.MultiheadAttention: code written for
torch (its constructor order and defaults, its state_dict, its usage inside torch's own
Transformer layers) gives the same results when the class is swapped."""

import pytest
import torch
from torch import nn

import attnkit
from attnkit.nn import MultiheadAttention

TOL = dict(atol=1e-10, rtol=1e-9)


def torch_and_swapped(*args, seed=0, **kwargs):
    """A torch MHA with random nonzero biases, and attnkit's built with the *same* arguments,
    loaded from torch's state_dict (the way a user swaps the class in existing code)."""
    torch.manual_seed(seed)
    t = nn.MultiheadAttention(*args, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m = MultiheadAttention(*args, dtype=torch.float64, **kwargs)
    m.load_state_dict(t.state_dict())
    return t, m


def inputs(shape_q, shape_kv=None, kdim=None, vdim=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g, dtype=torch.float64)
    kv = shape_q[:-1] if shape_kv is None else shape_kv
    k = torch.randn(*kv, kdim or shape_q[-1], generator=g, dtype=torch.float64)
    v = torch.randn(*kv, vdim or shape_q[-1], generator=g, dtype=torch.float64)
    return q, k, v


def assert_same_call(t, m, *args, **kwargs):
    out_t, w_t = t(*args, **kwargs)
    out_m, w_m = m(*args, **kwargs)
    torch.testing.assert_close(out_m, out_t, **TOL)
    assert (w_t is None) == (w_m is None)
    if w_t is not None:
        assert w_m.shape == w_t.shape
        torch.testing.assert_close(w_m, w_t, **TOL)
    return out_m


def test_defaults_and_argument_order_are_torchs():
    import inspect

    ours = list(inspect.signature(MultiheadAttention).parameters)
    theirs = list(inspect.signature(nn.MultiheadAttention).parameters)
    assert ours[:len(theirs)] == theirs
    for name in theirs:
        assert inspect.signature(MultiheadAttention).parameters[name].default == \
            inspect.signature(nn.MultiheadAttention).parameters[name].default, name
    fwd_ours = list(inspect.signature(MultiheadAttention.forward).parameters)
    fwd_theirs = list(inspect.signature(nn.MultiheadAttention.forward).parameters)
    assert fwd_ours[:len(fwd_theirs)] == fwd_theirs
    assert MultiheadAttention(8, 2).batch_first is False


def test_sequence_first_input_without_masks_matches_torch():
    """The report: (T, B, E) with no padding mask ran and differed from torch by 0.61."""
    t, m = torch_and_swapped(16, 4)
    q, k, v = inputs((5, 3, 16))  # (T, B, E)
    out = assert_same_call(t, m, q, k, v)
    assert out.shape == (5, 3, 16)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_need_weights_average_both_ways(batch_first, average):
    t, m = torch_and_swapped(16, 4, batch_first=batch_first)
    q, k, v = inputs((3, 5, 16), (3, 7)) if batch_first else inputs((5, 3, 16), (7, 3))
    assert_same_call(t, m, q, k, v, need_weights=True, average_attn_weights=average)
    assert_same_call(t, m, q, k, v, need_weights=False)


@pytest.mark.parametrize("batch_first", [False, True])
def test_kdim_vdim_positional_and_state_dict(batch_first):
    # torch's order: embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first
    t, m = torch_and_swapped(16, 4, 0.0, True, False, False, 6, 9, batch_first)
    assert "q_proj_weight" in t.state_dict()  # the separate-weights layout of torch
    shape_q, shape_kv = ((2, 5, 16), (2, 4)) if batch_first else ((5, 2, 16), (4, 2))
    q, k, v = inputs(shape_q, shape_kv, kdim=6, vdim=9)
    assert_same_call(t, m, q, k, v)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_mask_and_attn_mask_both_kinds(kind):
    t, m = torch_and_swapped(16, 4)
    q, k, v = inputs((6, 2, 16))
    g = torch.Generator().manual_seed(3)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    hide = torch.rand(6, 6, generator=g) < 0.3
    hide[:, 0] = False
    if kind == "bool":
        kpm, attn = pad, hide
    else:
        kpm = torch.zeros(2, 6, dtype=torch.float64).masked_fill(pad, float("-inf"))
        attn = torch.randn(6, 6, generator=g, dtype=torch.float64).masked_fill(hide, float("-inf"))
    assert_same_call(t, m, q, k, v, key_padding_mask=kpm, attn_mask=attn)
    attn3 = attn.expand(2 * 4, 6, 6).clone()
    assert_same_call(t, m, q, k, v, key_padding_mask=kpm, attn_mask=attn3, average_attn_weights=False)


def test_is_causal_with_its_mask_as_torch_requires():
    t, m = torch_and_swapped(16, 4)
    q, _, _ = inputs((6, 2, 16))
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    assert_same_call(t, m, q, q, q, attn_mask=causal, is_causal=True, need_weights=False)
    assert_same_call(t, m, q, q, q, attn_mask=causal.isinf(), is_causal=True)


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
def test_add_bias_kv_and_add_zero_attn(add_bias_kv, add_zero_attn):
    t, m = torch_and_swapped(16, 4, 0.0, True, add_bias_kv, add_zero_attn)
    q, k, v = inputs((5, 2, 16), (7, 2))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    hide = torch.zeros(5, 7, dtype=torch.bool)
    hide[0, 3:] = True
    assert_same_call(t, m, q, k, v)
    assert_same_call(t, m, q, k, v, key_padding_mask=pad, attn_mask=hide, average_attn_weights=False)
    # gradients reach the learned key and value like torch's
    m(q, k, v)[0].sum().backward()
    t(q, k, v)[0].sum().backward()
    if add_bias_kv:
        torch.testing.assert_close(m.bias_k.grad, t.bias_k.grad, **TOL)
        torch.testing.assert_close(m.bias_v.grad, t.bias_v.grad, **TOL)
    back = m.to_torch()  # and back to torch's class
    assert back.add_zero_attn == add_zero_attn and (back.bias_k is not None) == add_bias_kv
    assert_same_call(back, m, q, k, v)


def test_add_bias_kv_refuses_a_cache_and_a_score_mod():
    with pytest.raises(ValueError, match="cache cannot be used with add_bias_kv"):
        MultiheadAttention(8, 2, 0.0, True, True)(torch.randn(3, 1, 8), cache=attnkit.nn.KVCache())
    m = MultiheadAttention(8, 2, add_zero_attn=True, score_mod=attnkit.positions.ALiBi(2))
    with pytest.raises(ValueError, match="score_mod cannot be combined with add_bias_kv or add_zero_attn"):
        m(torch.randn(3, 1, 8))


def test_load_state_dict_of_a_model_that_holds_torchs_module():
    """A whole model saved with torch's class loads into the same model built with attnkit's."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.attn = cls(16, 4, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.attn(h, h, h)[0]

    a, b = Net(nn.MultiheadAttention), Net(MultiheadAttention)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(b(x), a(x), atol=1e-6, rtol=1e-5)


def test_load_state_dict_mismatch_says_why():
    t = nn.MultiheadAttention(16, 4)
    m = MultiheadAttention(16, 4, num_kv_heads=2)
    with pytest.raises(RuntimeError, match=r"in_proj_weight: expected 32 rows .*num_kv_heads = 2"):
        m.load_state_dict(t.state_dict())


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_swapped_into_torchs_transformer_encoder_layer(batch_first, norm_first):
    """torch's own usage: TransformerEncoderLayer calls self_attn(x, x, x, attn_mask=...,
    key_padding_mask=..., need_weights=False, is_causal=...) and reads its attributes; in eval
    mode it checks for its fast path (which must step aside)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                       dtype=torch.float64)
    swapped = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                         dtype=torch.float64)
    swapped.self_attn = MultiheadAttention(16, 4, 0.0, batch_first=batch_first, dtype=torch.float64)
    swapped.load_state_dict(layer.state_dict())
    x = torch.randn((2, 6, 16) if batch_first else (6, 2, 16), dtype=torch.float64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    for mode in ("train", "eval"):
        layer.train(mode == "train"), swapped.train(mode == "train")
        with torch.no_grad():
            torch.testing.assert_close(swapped(x, src_key_padding_mask=pad), layer(x, src_key_padding_mask=pad),
                                       **TOL)
            torch.testing.assert_close(swapped(x, src_mask=causal, is_causal=True),
                                       layer(x, src_mask=causal, is_causal=True), **TOL)


def test_swapped_into_torchs_transformer_decoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, dtype=torch.float64)
    swapped = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, dtype=torch.float64)
    swapped.self_attn = MultiheadAttention(16, 4, dtype=torch.float64)
    swapped.multihead_attn = MultiheadAttention(16, 4, dtype=torch.float64)
    swapped.load_state_dict(layer.state_dict())
    tgt, memory = torch.randn(5, 2, 16, dtype=torch.float64), torch.randn(7, 2, 16, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    torch.testing.assert_close(swapped(tgt, memory, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True),
                               layer(tgt, memory, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True),
                               **TOL)


def test_gradients_match_torch_after_loading_its_state_dict():
    t, m = torch_and_swapped(16, 4)
    q, k, v = inputs((5, 2, 16), (6, 2))
    t(q, k, v)[0].square().sum().backward()
    m(q, k, v)[0].square().sum().backward()
    wq, wk, wv = t.in_proj_weight.grad.chunk(3)
    torch.testing.assert_close(m.q_proj.weight.grad, wq, **TOL)
    torch.testing.assert_close(m.k_proj.weight.grad, wk, **TOL)
    torch.testing.assert_close(m.v_proj.weight.grad, wv, **TOL)
    torch.testing.assert_close(m.out_proj.weight.grad, t.out_proj.weight.grad, **TOL)
