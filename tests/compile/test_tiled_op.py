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
from attnkit.testing import make_qkv

MASKS = {
    "none": lambda: None,
    "causal": lambda: masks.causal(),
    "window": lambda: masks.sliding_window(8),
    "window both ways": lambda: masks.sliding_window(5, 3),
    "causal & window | window": lambda: (masks.causal() & masks.sliding_window(16)) | masks.sliding_window(0, 4),
    "chunked": lambda: masks.chunked(16),
    "key padding (lengths)": lambda: masks.key_padding(torch.tensor([90, 37])),
    "causal & key padding (keep)": lambda: masks.causal() & masks.key_padding(
        torch.arange(90)[None, :] % torch.tensor([[3], [5]]) != 0),
    "window & dead rows": lambda: masks.sliding_window(4) & masks.key_padding(torch.tensor([90, 0])),
}
BIASES = {"none": lambda H: None, "alibi": lambda H: positions.ALiBi(H),
          "symmetric alibi": lambda H: positions.ALiBi(H, symmetric=True),
          "softcap": lambda H: positions.softcap(3.0),
          "alibi, softcap": lambda H: [positions.ALiBi(H), positions.softcap(2.0)]}


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


def test_inputs_laid_out_as_modules_make_them():
    """(B, T, H, D) transposed, as attention modules hand them over: the fake kernels promise the
    strides the real ones return."""
    q, k, v = make_qkv(2, 4, 50, 60, D=8, noncontiguous=True, requires_grad=True)
    kw = dict(mask=masks.sliding_window(7, 7) & masks.key_padding(torch.tensor([60, 31])))
    f = lambda q, k, v: attnkit.attention(q, k, v, backend="tiled", **kw)  # noqa: E731
    got, want = torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_float64_gradients_of_the_operator_match_the_reference_tightly():
    q, k, v = _qkv(dtype=torch.float64, Tq=40, Tk=40)
    kw = dict(mask=masks.sliding_window(6) & masks.key_padding(torch.tensor([40, 21])),
              bias=[positions.ALiBi(4), positions.softcap(5.0)])
    f = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, backend="tiled", **kw), fullgraph=True)
    got, ref = f(q, k, v), attnkit.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_operator_passes_torch_opcheck():
    q, k, v = _qkv(B=1, H=2, Hkv=2, Tq=20, Tk=24, D=8)
    desc, data = describe(canonicalize(q, k, v, mask=masks.sliding_window(4) & masks.key_padding(torch.tensor([17])),
                                       bias=[positions.ALiBi(2), positions.softcap(3.0)]))
    assert len(data) == 1
    torch.library.opcheck(torch.ops.attnkit.tiled_attention.default, (q, k, v, data, desc))
    t = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # strides of (B, T, H, D)
    torch.library.opcheck(torch.ops.attnkit.tiled_attention.default, (*t, data, desc))


def test_only_what_a_description_states_exactly_becomes_the_operator():
    q, k, v = _qkv()
    assert describe(canonicalize(q, k, v, mask=masks.causal())) is not None
    refused = {
        "dense mask (data)": dict(mask=torch.ones(70, 90, dtype=torch.bool)),
        "tensor bias (data)": dict(bias=torch.zeros(70, 90)),
        "dropout": dict(dropout_p=0.1),
        "weights": dict(return_weights=True),
        "sigmoid": dict(normalizer="sigmoid"),
        "cosine score": dict(score="cosine"),
        "a score_mod callable": dict(bias=lambda s, b, h, q, kv: s * 0.5),
    }
    for what, kw in refused.items():
        assert describe(canonicalize(q, k, v, **kw)) is None, what
    b = [x.detach().bfloat16() for x in (q, k, v)]
    assert describe(canonicalize(*b, mask=masks.causal())) is None


def test_a_request_it_cannot_describe_still_runs_with_a_graph_break():
    q, k, v = _qkv()
    dense = torch.rand(70, 90, generator=torch.Generator().manual_seed(3)) < 0.7
    f = lambda q, k, v: attnkit.attention(q, k, v, mask=dense, backend="tiled")  # noqa: E731
    torch.testing.assert_close(torch.compile(f)(q, k, v), f(q, k, v))


class _TiledWindow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.alibi = positions.ALiBi(4)

    def forward(self, q, k, v, lengths):
        return attnkit.attention(q, k, v, mask=masks.sliding_window(8) & masks.key_padding(lengths),
                                 bias=[self.alibi, positions.softcap(4.0)], backend="tiled")


def test_export_keeps_the_operator_and_its_description_and_round_trips():
    m = _TiledWindow()
    q, k, v = (x.detach() for x in _qkv())
    ep = torch.export.export(m, (q, k, v, torch.tensor([90, 33])))
    assert "attnkit.tiled_attention" in str(ep.graph)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    q2, k2, v2 = (x.detach() for x in _qkv(seed=1))
    lengths = torch.tensor([12, 90])
    torch.testing.assert_close(loaded.module()(q2, k2, v2, lengths), m(q2, k2, v2, lengths))
