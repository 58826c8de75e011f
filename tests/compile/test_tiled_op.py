"""The tiled backend inside ``torch.compile`` and ``torch.export``: a request its description
string states exactly runs as one opaque operator (``torch.ops.attnkit.tiled_attention``), with
no graph break, forward and backward equal to the eager tiled backend's and to the reference."""

import io

import pytest
import torch
import torch._dynamo as dynamo

import attnkit
from attnkit import masks, positions
from attnkit.backends.tiled_op import describe
from attnkit.spec import canonicalize

MASKS = {
    "none": lambda: None,
    "causal": lambda: masks.causal(),
    "window": lambda: masks.sliding_window(8),
    "window both ways": lambda: masks.sliding_window(5, 3),
    "causal & window | window": lambda: (masks.causal() & masks.sliding_window(16)) | masks.sliding_window(0, 4),
}
BIASES = {"none": lambda H: None, "alibi": lambda H: positions.ALiBi(H),
          "symmetric alibi": lambda H: positions.ALiBi(H, symmetric=True)}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _qkv(B=2, H=4, Hkv=2, Tq=70, Tk=90, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("mask", list(MASKS))
def test_compiled_tiled_has_no_graph_break_and_equals_eager_and_the_reference(mask, bias):
    q, k, v = _qkv()
    kw = dict(mask=MASKS[mask](), bias=BIASES[bias](4))

    def f(q, k, v):
        return attnkit.attention(q, k, v, backend="tiled", **kw)

    explained = dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v)
    want = f(q, k, v)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    dout = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), dout)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(g_got, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_float64_gradients_of_the_operator_match_the_reference_tightly():
    q, k, v = _qkv(dtype=torch.float64, Tq=40, Tk=40)
    kw = dict(mask=masks.sliding_window(6), bias=positions.ALiBi(4))
    f = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, backend="tiled", **kw), fullgraph=True)
    got, ref = f(q, k, v), attnkit.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_operator_passes_torch_opcheck():
    q, k, v = _qkv(B=1, H=2, Hkv=2, Tq=20, Tk=24, D=8)
    desc = describe(canonicalize(q, k, v, mask=masks.sliding_window(4), bias=positions.ALiBi(2)))
    torch.library.opcheck(torch.ops.attnkit.tiled_attention.default, (q, k, v, desc))


def test_only_what_a_description_states_exactly_becomes_the_operator():
    q, k, v = _qkv()
    assert describe(canonicalize(q, k, v, mask=masks.causal())) is not None
    refused = {
        "key padding (data)": dict(mask=masks.key_padding(torch.tensor([90, 50]))),
        "dense mask (data)": dict(mask=torch.ones(70, 90, dtype=torch.bool)),
        "tensor bias (data)": dict(bias=torch.zeros(70, 90)),
        "dropout": dict(dropout_p=0.1),
        "weights": dict(return_weights=True),
        "sigmoid": dict(normalizer="sigmoid"),
        "cosine score": dict(score="cosine"),
        "softcap (its tile backward takes autograd)": dict(bias=positions.softcap(4.0)),
    }
    for what, kw in refused.items():
        assert describe(canonicalize(q, k, v, **kw)) is None, what
    b = [x.detach().bfloat16() for x in (q, k, v)]
    assert describe(canonicalize(*b, mask=masks.causal())) is None


def test_a_request_it_cannot_describe_still_runs_with_a_graph_break():
    q, k, v = _qkv()
    pad = masks.key_padding(torch.tensor([90, 50]))
    f = lambda q, k, v: attnkit.attention(q, k, v, mask=pad, backend="tiled")  # noqa: E731
    torch.testing.assert_close(torch.compile(f)(q, k, v), f(q, k, v))


class _TiledWindow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.alibi = positions.ALiBi(4)

    def forward(self, q, k, v):
        return attnkit.attention(q, k, v, mask=masks.sliding_window(8), bias=self.alibi, backend="tiled")


def test_export_keeps_the_operator_and_its_description_and_round_trips():
    m = _TiledWindow()
    q, k, v = (x.detach() for x in _qkv())
    ep = torch.export.export(m, (q, k, v))
    assert "attnkit.tiled_attention" in str(ep.graph)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    q2, k2, v2 = (x.detach() for x in _qkv(seed=1))
    torch.testing.assert_close(loaded.module()(q2, k2, v2), m(q2, k2, v2))
