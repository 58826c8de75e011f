"""Which backend ``auto`` picks on CUDA, and why, checked without a GPU by faking the device in the
request (``AttentionSpec.device``): the backends decide from the request alone."""

import dataclasses

import pytest
import torch

import attnkit
from attnkit import masks, normalizers, positions
from attnkit.backends import choose
from attnkit.kernels.triton import available as triton_available
from attnkit.spec import canonicalize

CUDA = torch.device("cuda")


def spec_on(device, N=1024, grad=True, **kw):
    q = torch.randn(1, 4, N, 16, requires_grad=grad)
    k = torch.randn(1, 4, N, 16, requires_grad=grad)
    v = torch.randn(1, 4, N, 16, requires_grad=grad)
    spec = canonicalize(q, k, v, **kw)
    return dataclasses.replace(spec, device=torch.device(device))


@pytest.mark.parametrize("kw", [dict(), dict(mask=masks.causal(align="top_left")), dict(mask=masks.causal())])
def test_plain_and_causal_softmax_go_to_sdpa(kw):
    c = choose(spec_on(CUDA, **kw))
    assert c.backend == "sdpa", str(c)


@pytest.mark.parametrize("kw", [dict(mask=masks.sliding_window(128)),
                                dict(mask=masks.causal(), bias=positions.ALiBi(4)),
                                dict(mask=masks.chunked(64) | masks.causal()),
                                dict(bias=positions.bias_mod(lambda b, h, q, kv: -(q - kv).abs() * 0.1))])
def test_masks_and_score_mods_flex_expresses_go_to_flex_with_gradients(kw):
    c = choose(spec_on(CUDA, **kw))
    assert c.backend == "flex", str(c)
    assert "block-sparse" in " ".join(c.reasons["sdpa"])  # sdpa declined: the dense mask
    # on CPU the same request stays with the tiled engine (flex has no CPU backward)
    assert choose(spec_on("cpu", **kw)).backend == "tiled"


def test_small_masked_requests_stay_with_sdpa_on_cuda():
    assert choose(spec_on(CUDA, N=128, mask=masks.sliding_window(16))).backend == "sdpa"


@pytest.mark.parametrize("kw", [dict(normalizer=normalizers.Sigmoid(bias="log_n")),
                                dict(normalizer="sigmoid", mask=masks.causal(), bias=positions.ALiBi(4)),
                                dict(normalizer="sigmoid", mask=masks.key_padding(torch.tensor([700])))])
def test_sigmoid_goes_to_triton(kw):
    c = choose(spec_on(CUDA, **kw))
    if triton_available():
        assert c.backend == "triton", str(c)
        assert "normalizer 'sigmoid' is not softmax" in " ".join(c.reasons["flex"])
    else:
        assert c.backend == "tiled" and "not installed" in " ".join(c.reasons["triton"])
    assert choose(spec_on("cpu", **kw)).backend == "tiled"


@pytest.mark.parametrize("kw, why", [
    (dict(normalizer="sigmoid", dropout_p=0.1), "dropout"),
    (dict(normalizer="sigmoid", bias=positions.bias_mod(lambda b, h, q, kv: (q - kv) * 0.1)), "score mods"),
])
def test_what_neither_flex_nor_triton_serves_goes_to_the_tiled_engine(kw, why):
    c = choose(spec_on(CUDA, **kw))
    assert c.backend == "tiled", str(c)
    assert why in " ".join(c.reasons["flex"]) + " ".join(c.reasons.get("triton", []))


@pytest.mark.parametrize("norm", ["sparsemax", "entmax15", normalizers.Entmax(1.5), normalizers.Entmax(2.0),
                                  normalizers.Entmax(1.25)])
def test_sparsemax_and_entmax_go_to_triton(norm):
    c = choose(spec_on(CUDA, normalizer=norm, mask=masks.causal(), bias=positions.ALiBi(4)))
    assert c.backend == ("triton" if triton_available() else "tiled"), str(c)
    assert choose(spec_on("cpu", normalizer=norm)).backend == "tiled"


def test_additive_scores_under_softmax_go_to_triton():
    from attnkit import scores

    sc = scores.Additive(16, 16, 32)
    c = choose(spec_on(CUDA, score=sc, mask=masks.causal()))
    assert c.backend == ("triton" if triton_available() else "tiled"), str(c)
    assert choose(spec_on("cpu", score=sc, mask=masks.causal())).backend == "tiled"
    c = choose(spec_on(CUDA, score=sc, normalizer="sigmoid"))      # the kernel takes softmax only
    assert c.backend == "tiled"
    if triton_available():
        assert "takes softmax" in " ".join(c.reasons["triton"])


def test_any_entmax_up_to_two_goes_to_triton_and_hard_normalizers_to_the_reference():
    c = choose(spec_on(CUDA, normalizer=normalizers.Entmax(1.3)))
    assert c.backend == ("triton" if triton_available() else "tiled"), str(c)
    c = choose(spec_on(CUDA, normalizer=normalizers.Entmax(2.5)))
    assert c.backend == "reference"
    if triton_available():
        assert "alpha = 2.5" in " ".join(c.reasons["triton"])
    assert choose(spec_on(CUDA, normalizer="hardmax")).backend == "reference"


@pytest.mark.parametrize("kw", [dict(mask=masks.causal(), return_weights=True),
                                dict(return_weights=attnkit.WeightsRequest(heads=[1], rows=[0, 5])),
                                dict(normalizer="entmax15", return_weights=True)])
def test_weights_go_to_the_triton_weights_kernel(kw):
    c = choose(spec_on(CUDA, **kw))
    if triton_available():
        assert c.backend == "triton", str(c)
        assert "weights kernel" in c.because
    else:
        assert c.backend == "tiled"
    assert choose(spec_on("cpu", **kw)).backend == "tiled"


def test_the_choice_says_why_each_backend_declined():
    text = str(choose(spec_on(CUDA, mask=masks.causal(), return_weights=True, dropout_p=0.1)))
    assert text.startswith("backend: tiled")
    for name in ("sdpa", "flex", "triton", "tiled"):
        assert f"  {name}:" in text
