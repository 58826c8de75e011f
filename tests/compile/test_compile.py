"""attnkit under ``torch.compile``: the routes that trace without a graph break, and their results
equal eager's (first slice: ``attnkit.attention`` on the reference, sdpa and auto routes)."""

import pytest
import torch
import torch._dynamo as dynamo

import attnkit
from attnkit import masks, positions

B, H, T, D = 2, 4, 48, 16

MASKS = {
    "none": lambda: None,
    "causal": lambda: masks.causal(),
    "sliding_window": lambda: masks.sliding_window(8),
    "key_padding lengths": lambda: masks.key_padding(torch.tensor([T, 30])),
    "key_padding keep": lambda: masks.key_padding(torch.arange(T).expand(B, T) < torch.tensor([[T], [20]])),
    "causal & padding": lambda: masks.causal() & masks.key_padding(torch.tensor([T, 30])),
}
BIASES = {"none": lambda: None, "alibi": lambda: positions.ALiBi(H), "softcap": lambda: positions.softcap(5.0)}
BACKENDS = ["reference", "sdpa", "auto"]


def _qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _fn(backend, mask, bias):
    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=MASKS[mask](), bias=BIASES[bias](), backend=backend)
    return f


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_traces_without_a_graph_break(backend, mask):
    explained = dynamo.explain(_fn(backend, mask, "none"))(*_qkv())
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("bias", ["alibi", "softcap"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_biases_trace_without_a_graph_break(backend, bias):
    explained = dynamo.explain(_fn(backend, "causal", bias))(*_qkv())
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]


@pytest.mark.parametrize("mask", ["causal", "key_padding lengths", "causal & padding"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_output_and_gradients_equal_eager(backend, mask):
    f = _fn(backend, mask, "none")
    q, k, v = _qkv(requires_grad=True)
    want = f(q, k, v)
    grads_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # traces forward and backward
    got = compiled(q, k, v)
    grads_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b)


def test_inductor_compiles_causal_sdpa_and_matches_eager():
    f = _fn("auto", "sliding_window", "none")
    q, k, v = _qkv()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_eager_still_quarantines_non_finite_inputs():
    """The NaN policy's data checks are skipped only while compiling: eager keeps them."""
    q, k, v = _qkv()
    q[0, 0, 3, 0] = float("nan")
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend="sdpa")
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, 4:]).all()


# -- modules and models ---------------------------------------------------------------------------
def _mha_calls():
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)  # torch's convention: True = not allowed
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 30:] = True
    return {"plain": dict(), "causal": dict(attn_mask=mask, is_causal=True), "key_padding_mask": dict(key_padding_mask=pad)}


@pytest.mark.parametrize("call", list(_mha_calls()))
def test_multihead_attention_compiles_fullgraph_and_equals_eager(call):
    torch.manual_seed(0)
    mha = attnkit.nn.MultiheadAttention(32, 4, batch_first=True)
    kw = _mha_calls()[call]

    def f(x):
        return mha(x, x, x, need_weights=False, **kw)[0]

    x = torch.randn(B, T, 32, requires_grad=True)
    explained = dynamo.explain(f)(x)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    want = f(x)
    gw = torch.autograd.grad(want.square().sum(), (x, next(mha.parameters())))
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    gg = torch.autograd.grad(got.square().sum(), (x, next(mha.parameters())))
    torch.testing.assert_close(got, want)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def test_transformer_training_step_traces_without_a_graph_break():
    from attnkit.models import Transformer

    torch.manual_seed(0)
    m = Transformer(50, 60, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                    dropout=0.0)
    src = torch.randint(3, 50, (2, 11))
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    tgt = torch.randint(3, 60, (2, 9))

    def loss(src, pad, tgt):
        return m(src, pad, tgt).float().logsumexp(-1).sum()

    explained = dynamo.explain(loss)(src, pad, tgt)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    want = loss(src, pad, tgt)
    gw = torch.autograd.grad(want, list(m.parameters()), allow_unused=True)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(src, pad, tgt)
    gg = torch.autograd.grad(got, list(m.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want)
    for a, b in zip(gg, gw):
        if b is not None:
            torch.testing.assert_close(a, b)


# -- auto inside a compiled region ------------------------------------------------------------------
def test_auto_inside_compile_takes_the_tiled_operator_or_passes_over_the_tiled_backend(monkeypatch):
    """Eagerly, a long sliding window goes to the tiled backend. Traced with static sizes it still
    does when the tiled operator describes the request (one opaque op, forward and backward);
    where it cannot (a cosine score: the Python tile loop, a graph break) auto passes over it for
    the traceable reference. With symbolic sizes auto takes SDPA, with no size test (no guard at
    the size limit). Never flex on CPU (inductor cannot lower masks built inside the graph)."""
    q = torch.randn(1, 2, 2048, 16)
    mask = masks.sliding_window(16)
    assert attnkit.explain(q, q, q, mask=mask).backend == "tiled"
    assert attnkit.explain(q, q, q, mask=mask, score="cosine").backend == "tiled"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attnkit.explain(q, q, q, mask=mask).backend == "tiled"
    choice = attnkit.explain(q, q, q, mask=mask, score="cosine")
    assert choice.backend == "reference" and "torch.compile" in "; ".join(choice.reasons["tiled"])
    assert "torch.compile" in "; ".join(choice.reasons["flex"])
    g = q.clone().requires_grad_(True)
    assert attnkit.explain(g, g, g, mask=mask).backend == "tiled"
    assert attnkit.explain(g, g, g, mask=mask, return_weights=True).backend == "reference"
    small = torch.randn(1, 2, 64, 16)
    assert attnkit.explain(small, small, small, mask=mask).backend == "sdpa"


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_auto_with_a_dynamic_length_takes_sdpa_without_a_size_guard(grad):
    """A dynamic sequence length compiles once for lengths on both sides of auto's size limit."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def f(q):
        return attnkit.attention(q, q, q, mask=masks.sliding_window(16))

    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for T in (64, 1100):
        q = torch.randn(1, 2, T, 16, requires_grad=grad)
        torch.testing.assert_close(compiled(q), f(q), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1, counter.frame_count


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_a_long_sliding_window_under_auto_traces_as_one_graph(grad):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1024, 16, generator=g).requires_grad_(grad) for _ in range(3))
    assert attnkit.explain(q, k, v, mask=masks.sliding_window(16)).backend == "tiled"  # eagerly

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=masks.sliding_window(16))

    explained = dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    want = f(q, k, v)
    got = torch.compile(f, fullgraph=True, backend="aot_eager" if grad else "inductor")(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if grad:
        for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask", ["causal", "sliding_window", "key_padding lengths"])
def test_flex_traces_without_a_graph_break_and_equals_the_reference(mask):
    """Asked for by name, flex is traced into the caller's graph. The mask and the ALiBi slopes are
    built outside the compiled function, as a module builds them in ``__init__``: inductor's CPU
    flex kernel (torch 2.13) cannot lower a mask or bias tensor computed inside the graph."""
    m, b = MASKS[mask](), positions.ALiBi(H)

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=m, bias=b, backend="flex")

    q, k, v = _qkv()
    explained = dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    want = attnkit.attention(q, k, v, mask=m, bias=b, backend="reference")
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), want, rtol=1e-4, atol=1e-5)
