"""One test per bug that differential fuzzing (tests/fuzz/test_differential.py) found.

Each pins the request hypothesis printed (shrunk) and, beside it, a plain statement of the bug.
"""

import pytest
import torch

import attnkit
from attnkit import masks, normalizers as N, positions as P, scores as S
from attnkit.testing import assert_close, make_qkv

from .differential import check
from .grammar import Request


def test_sdpa_divides_the_bias_by_the_softmax_temperature():
    # softmax((s + bias) / T): SDPA folded T into the scale of q·k only, so a bias with a
    # temperature other than 1 was T times too strong
    q, k, v = make_qkv(1, 2, 6, 9, D=4, dtype=torch.float64)
    kw = dict(bias=P.ALiBi(2), normalizer=N.Softmax(temperature=0.5), mask=masks.causal())
    assert_close(attnkit.attention(q, k, v, backend="sdpa", **kw), attnkit.attention(q, k, v, backend="reference", **kw))
    check(Request(B=2, H=6, Hkv=3, Tq=8, Tk=38, D=8, Dv=8, dtype=torch.bfloat16, score=("scaled_dot",),
                  normalizer=("softmax_t", 0.5), mask=("and", ("dead_rows", 2), ("dead_rows", 2)),
                  biases=(("alibi", False), ("alibi", False)), grad=False, seed=1))


def test_backends_that_cannot_differentiate_see_score_parameters_that_need_gradients():
    # a learnable bilinear score with q, k, v that need no gradient still needs a backward pass:
    # flex (no backward on CPU) accepted the request and failed inside torch
    general = S.General(4, 4).double()
    q, k, v = make_qkv(1, 2, 5, D=4, dtype=torch.float64)
    reasons = attnkit.backends.REGISTRY["flex"].not_supported_reasons(attnkit.spec.canonicalize(q, k, v, score=general))
    assert any("backward" in r for r in reasons)
    check(Request(B=3, H=8, Hkv=2, Tq=216, Tk=35, D=16, Dv=1, dtype=torch.float32, score=("general", False, True),
                  normalizer=("softmax_t", 0.3), mask=None, biases=(("softcap", 0.5), ("softcap", 20.0)), scale=0.05,
                  grad=False, nonfinite=("live", "k", float("inf")), seed=11119))


def test_tiled_leaves_a_score_mod_callable_to_the_reference_while_autograd_is_on():
    # the callable may close over a tensor that needs a gradient, which the tiled backward cannot
    # see: only q, k, v not needing gradients used to be enough to take it
    table = torch.zeros(5, requires_grad=True)
    q, k, v = make_qkv(1, 1, 5, D=4)

    def shift(s, b, h, i, j):
        return s + table[j]

    with pytest.raises(ValueError, match="reads a tensor that requires grad"):
        attnkit.attention(q, k, v, bias=shift, backend="tiled")
    out = attnkit.attention(q, k, v, bias=shift)  # auto: the reference, which differentiates the closure
    (g,) = torch.autograd.grad((out * torch.arange(5.0).view(1, 1, 5, 1)).sum(), table)
    assert g.abs().sum() > 0
    with torch.no_grad():
        assert_close(attnkit.attention(q, k, v, bias=shift, backend="tiled"), out)


def test_alibi_slopes_stay_float64_on_the_prescaled_tiled_path():
    # ALiBi.key_bias rounded its slopes to float32: float64 requests with H whose slopes are not
    # powers of two (10, 12, ...) were 3e-7 off the reference (tests/backends/test_fused_coverage.py)
    q, k, v = make_qkv(2, 12, 37, 41, D=5, Hkv=4, dtype=torch.float64)
    kw = dict(mask=masks.causal(), bias=P.ALiBi(12))
    assert_close(attnkit.attention(q, k, v, backend="tiled", **kw), attnkit.attention(q, k, v, backend="reference", **kw))


def test_chunked_linear_attention_keeps_the_scale_of_its_scores():
    # kernel score + Normalize with scale c: c·s / (c·Σs + eps) differs from s / (Σs + eps); the
    # tiled backend's O(T) chunked form dropped the scale (off by ~eps / Σs)
    q, k, v = make_qkv(1, 2, 9, D=3, dtype=torch.float64)
    for mask in (None, masks.causal()):
        kw = dict(score=S.Kernel(), normalizer=N.Normalize(eps=0.5), scale=0.05, mask=mask)
        assert_close(attnkit.attention(q, k, v, backend="tiled", **kw), attnkit.attention(q, k, v, backend="reference", **kw))
    check(Request(B=1, H=1, Hkv=1, Tq=1, Tk=1, D=1, Dv=1, dtype=torch.float64, score=("kernel",),
                  normalizer=("normalize",), mask=None, scale=0.05, seed=0))


def test_flex_refuses_the_location_score():
    # Location's scores are columns of W_a q, not a dot product, but it inherited tile_is_dot: flex
    # served it as q·k (found by the long fuzz run)
    loc = S.Location(4, 8)
    q, k, v = make_qkv(1, 1, 2, 3, D=4)
    with torch.no_grad():
        reasons = attnkit.backends.REGISTRY["flex"].not_supported_reasons(attnkit.spec.canonicalize(q, k, v, score=loc))
    assert any("not a dot product" in r for r in reasons)
    check(Request(B=1, H=1, Hkv=1, Tq=1, Tk=2, D=1, Dv=1, dtype=torch.float32, score=("location", False),
                  normalizer=("softmax",), mask=None, grad=False, seed=0))
