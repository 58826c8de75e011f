"""Each refusal says what to do: the fix is named in the message, and the documented fixes work."""

import pytest
import torch

import attnkit
from attnkit.positions import bias_mod


def qkv(T=6, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, T, 8, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for _ in range(3)]


def test_sdpa_refusing_a_score_mod_says_how_to_declare_a_bias():
    q, k, v = qkv()
    choice = attnkit.explain(q, k, v, bias=lambda s, b, h, qi, ki: s - 0.1 * (qi - ki).abs(), backend="sdpa")
    assert not choice.ok and choice.backend is None
    msg = "; ".join(choice.reasons["sdpa"])
    assert "not declared additive" in msg and "attnkit.positions.bias_mod" in msg and "additive = True" in msg
    with pytest.raises(ValueError, match="bias_mod"):
        attnkit.attention(q, k, v, bias=lambda s, b, h, qi, ki: s, backend="sdpa")


def test_bias_mod_is_served_by_sdpa_and_equals_the_score_mod():
    q, k, v = qkv(requires_grad=True)
    fn = lambda b, h, qi, ki: -0.1 * (qi - ki).abs()  # noqa: E731
    as_bias = attnkit.attention(q, k, v, bias=bias_mod(fn), backend="sdpa")
    as_mod = attnkit.attention(q, k, v, bias=lambda s, b, h, qi, ki: s + fn(b, h, qi, ki), backend="reference")
    torch.testing.assert_close(as_bias, as_mod)
    g1 = torch.autograd.grad(as_bias.sum(), (q, k, v))
    g2 = torch.autograd.grad(as_mod.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_bias_mod_checks_its_function():
    with pytest.raises(TypeError, match=r"bias_mod must take 4 arguments, bias\(b, h, q_idx, kv_idx\)"):
        bias_mod(lambda s, b, h, qi, ki: s)
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must return a floating-point tensor"):
        attnkit.attention(q, k, v, bias=bias_mod(lambda b, h, qi, ki: qi - ki), backend="reference")


def test_tiled_serves_a_plain_score_mod_with_gradients():
    """The report's lambda closes over nothing that needs a gradient: tiled serves it, forward
    and backward, and matches the reference."""
    q, k, v = qkv(T=40, requires_grad=True)
    mod = lambda s, b, h, qi, ki: s - 0.1 * (qi - ki).abs()  # noqa: E731
    choice = attnkit.explain(q, k, v, bias=mod, backend="tiled")
    assert choice.ok, str(choice)
    out_t = attnkit.attention(q, k, v, bias=mod, mask=attnkit.masks.causal(), backend="tiled")
    out_r = attnkit.attention(q, k, v, bias=mod, mask=attnkit.masks.causal(), backend="reference")
    torch.testing.assert_close(out_t, out_r)
    for a, b in zip(torch.autograd.grad(out_t.square().sum(), (q, k, v)),
                    torch.autograd.grad(out_r.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_tiled_refuses_a_score_mod_that_reads_a_parameter_and_says_what_to_do():
    q, k, v = qkv(T=40)
    w = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
    mod = lambda s, b, h, qi, ki: s - w * (qi - ki).abs()  # noqa: E731
    choice = attnkit.explain(q, k, v, bias=mod, backend="tiled")
    assert not choice.ok
    msg = "; ".join(choice.reasons["tiled"])
    assert "requires grad" in msg and "backend='reference'" in msg and "torch.no_grad()" in msg
    # the reference trains it; under no_grad (inference) tiled serves it
    out = attnkit.attention(q, k, v, bias=mod)
    (g,) = torch.autograd.grad(out.sum(), (w,))
    assert g.abs() > 0
    with torch.no_grad():
        assert attnkit.explain(q, k, v, bias=mod, backend="tiled").ok


def test_a_three_argument_mask_lambda_names_the_signature():
    with pytest.raises(TypeError, match=r"mask_mod must take 4 arguments, mask_mod\(b, h, q_idx, kv_idx\).*"
                                        r"lambda b, h, q_idx, kv_idx"):
        attnkit.masks.as_mask(lambda h, q_idx, kv_idx: q_idx >= kv_idx)
    q, k, v = qkv()
    with pytest.raises(TypeError, match="mask_mod must take 4 arguments"):
        attnkit.attention(q, k, v, mask=lambda q_idx, kv_idx: q_idx >= kv_idx)


def test_a_score_mod_with_the_wrong_arity_names_the_signature():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"score_mod must take 5 arguments, score_mod\(score, b, h, q_idx, kv_idx\)"):
        attnkit.attention(q, k, v, bias=lambda s, qi, ki: s)


def test_a_normalizer_function_says_which_object_to_write():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"normalizer must be a name \(.*'softmax'.*\) or an "
                                        r"attnkit.normalizers.Normalizer object; got function '<lambda>'.*"
                                        r"subclass attnkit.normalizers.Normalizer and implement normalize"):
        attnkit.attention(q, k, v, normalizer=lambda s: s.softmax(-1))
    with pytest.raises(TypeError, match="subclass attnkit.scores.Score"):
        attnkit.attention(q, k, v, score=lambda a, b: a @ b.transpose(-2, -1))


def test_explain_returns_the_refusal_instead_of_raising():
    q, k, v = qkv()
    choice = attnkit.explain(q, k, v, return_weights=True, backend="sdpa")
    assert choice.backend is None and not choice.ok
    assert "weights were requested" in choice.reasons["sdpa"][0]
    assert "cannot serve" in str(choice) and "weights were requested" in str(choice)
    mha = attnkit.nn.MultiheadAttention(16, 4, backend="sdpa")
    assert not mha.explain(torch.randn(3, 1, 16), need_weights=True).ok
    with pytest.raises(ValueError, match="unknown backend"):  # a typo is still an error
        attnkit.explain(q, k, v, backend="sdp")


def test_auto_says_why_it_picked_sdpa():
    q, k, v = qkv()
    choice = attnkit.explain(q, k, v, mask=attnkit.masks.causal())
    assert choice.backend == "sdpa"
    assert "is_causal" in choice.because and "first" in choice.because
    assert choice.because in str(choice)
    choice = attnkit.explain(q, k, v, mask=attnkit.masks.sliding_window(2))
    assert choice.backend == "sdpa" and "dense" in choice.because and "block-sparse" in choice.because
    choice = attnkit.explain(q, k, v, return_weights=True)
    assert choice.backend == "reference" and "materializing" in choice.because


def test_a_score_subclass_with_only_forward_is_never_served_as_a_dot_product():
    """Writing forward() alone (what the error message suggests) must not let a fast backend
    compute the inherited q·k tile instead (it did: 0.30 off on tiled)."""

    class Shifted(attnkit.scores.Dot):
        def forward(self, q, k):
            return q @ k.transpose(-2, -1) + 0.5 * k.sum(-1).unsqueeze(-2)  # depends on the key

    class Plain(attnkit.scores.Score):
        def forward(self, q, k):
            return -torch.cdist(q, k)

    q, k, v = qkv(T=40)
    for score in (Shifted(), Plain()):
        ref = attnkit.attention(q, k, v, score=score, backend="reference")
        for b in ("sdpa", "tiled", "flex"):
            choice = attnkit.explain(q, k, v, score=score, backend=b)
            if choice.ok:
                torch.testing.assert_close(attnkit.attention(q, k, v, score=score, backend=b), ref)
        torch.testing.assert_close(attnkit.attention(q, k, v, score=score), ref)
    assert not attnkit.explain(q, k, v, score=Plain(), backend="tiled").ok
