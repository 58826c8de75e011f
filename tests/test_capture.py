"""``attnkit.capture``: the weights of every attention call, whatever backend served it, with
the model's outputs unchanged and memory bounded by the request.

Oracle: ``attnkit.attention(..., backend="reference", return_weights=True)`` (the materializing
reference); outputs are compared with ``torch.equal`` (bit for bit) against a run without capture.
"""

import threading
import warnings

import pytest
import torch
from torch import nn

import attnkit
from attnkit import masks
from attnkit.backends.flex import available as flex_available
from attnkit.testing import assert_close, make_qkv


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's compile warnings
        yield


def reference_weights(q, k, v, **kw):
    return attnkit.attention(q, k, v, backend="reference", return_weights=True, **kw)[1]


class Block(nn.Module):
    """Pre-norm self-attention block with dropout on the weights and the residual branch."""

    def __init__(self, d=16, heads=4, dropout=0.1, kv_heads=None):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = attnkit.nn.MultiheadAttention(d, heads, dropout=dropout, num_kv_heads=kv_heads, batch_first=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, kpm=None):
        a, _ = self.attn(self.norm(x), key_padding_mask=kpm, need_weights=False)
        return x + self.drop(a)


class Net(nn.Module):
    def __init__(self, depth=3, d=16, heads=4, dropout=0.1):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, dropout, kv_heads=2 if i % 2 else None) for i in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x, kpm=None):
        for b in self.blocks:
            x = b(x, kpm)
        return self.head(x)


# -- every backend -------------------------------------------------------------------------------
BACKENDS = ["reference", "sdpa", "tiled", pytest.param("flex", marks=pytest.mark.skipif(
    not flex_available(), reason="torch has no flex_attention"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_gives_the_reference_weights_and_leaves_the_output_alone(backend):
    """Sliding window + key padding (dead rows in batch 1), grouped-query heads, Tq != Tk; forward only,
    so every backend (flex included) serves it."""
    q, k, v = make_qkv(2, 4, 9, 12, D=16, Hkv=2)
    kw = dict(mask=masks.sliding_window(2) & masks.key_padding(torch.tensor([12, 3])))
    plain = attnkit.attention(q, k, v, backend=backend, **kw)
    with attnkit.capture() as rec:
        out = attnkit.attention(q, k, v, backend=backend, **kw)
    assert torch.equal(out, plain)
    assert len(rec) == 1 and rec[0].backend == backend
    r = rec[0]
    assert r.shape == (2, 4, 9, 12) and r.heads == (0, 1, 2, 3) and r.rows == tuple(range(9))
    assert r.weights.dtype == torch.float32 and r.weights.device.type == "cpu" and not r.weights.requires_grad
    ref = reference_weights(q, k, v, **kw)
    assert_close(r.weights, ref, name=f"{backend} weights")
    dead = ref.sum(-1) == 0  # batch 1: windows past the 3 real keys
    assert dead.any() and (r.weights[dead] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled"])
def test_float64_weights_match_the_reference_to_float64_precision(backend):
    q, k, v = make_qkv(1, 2, 33, 40, D=8, dtype=torch.float64, requires_grad=True)
    plain = attnkit.attention(q, k, v, backend=backend, mask=masks.sliding_window(5))
    with attnkit.capture() as rec:
        out = attnkit.attention(q, k, v, backend=backend, mask=masks.sliding_window(5))
    assert torch.equal(out, plain) and out.requires_grad  # the graph is untouched
    ref = reference_weights(q.detach(), k.detach(), v.detach(), mask=masks.sliding_window(5))
    assert (rec[0].weights.double() - ref).abs().max() < 1e-7  # only the float32 storage rounds


@pytest.mark.parametrize("kw", [
    dict(normalizer="sparsemax"), dict(normalizer="entmax15"), dict(normalizer="sigmoid"),
    dict(score=attnkit.scores.Cosine(0.5)), dict(bias=attnkit.positions.ALiBi(4)),
    dict(normalizer="hardmax"),
    dict(mask=masks.local_p(torch.tensor([[1.0, 2.5, 4.0, 6.0, 6.0, 3.0, 0.0]]).expand(2, 7), D=2)),
    dict(score=attnkit.scores.Additive(8, 8, 6)),
], ids=["sparsemax", "entmax15", "sigmoid", "cosine", "alibi", "hardmax", "local-p", "additive"])
def test_weights_of_other_families_match_the_reference(kw):
    q, k, v = make_qkv(2, 4, 7, 7, D=8)
    plain = attnkit.attention(q, k, v, **kw)
    with attnkit.capture() as rec:
        out = attnkit.attention(q, k, v, **kw)
    assert torch.equal(out, plain)
    assert_close(rec[0].weights, reference_weights(q, k, v, **kw))


def test_returned_weights_and_captured_weights_agree():
    q, k, v = make_qkv(1, 2, 6, 6, D=8)
    with attnkit.capture() as rec:
        _, w = attnkit.attention(q, k, v, return_weights=True, mask=masks.causal())
        _, w_sub = attnkit.attention(q, k, v, return_weights=attnkit.WeightsRequest(heads=[1], rows=[5]),
                                     mask=masks.causal())
    assert len(rec) == 2
    assert_close(rec[0].weights, w)
    assert_close(rec[1].weights, w)  # capture keeps every head and row whatever the call asked for
    assert_close(rec[1].weights[:, 1:2, 5:6], w_sub)


# -- models: outputs bit-identical ------------------------------------------------------------------
def test_model_outputs_are_bit_identical_with_and_without_capture_in_eval_mode():
    torch.manual_seed(0)
    net = Net(dropout=0.1).eval()
    x = torch.randn(2, 10, 16)
    kpm = torch.arange(10)[None] >= torch.tensor([[10], [6]])
    with torch.no_grad():
        plain = net(x, kpm)
        with attnkit.capture() as rec:
            out = net(x, kpm)
    assert torch.equal(out, plain)
    assert len(rec) == 3 and [r.shape for r in rec] == [(2, 4, 10, 10)] * 3
    # the weights are those of the module's own need_weights=True path (its reference weights)
    with torch.no_grad():
        h = net.blocks[0].norm(x)
        _, w = net.blocks[0].attn(h, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    assert_close(rec[0].weights, w)
    assert (rec[0].weights[1, :, :, 6:] == 0).all()  # padding gets exactly zero weight


def test_training_mode_with_dropout_is_unchanged_too():
    """Capture draws no random numbers: a seeded training step is the same with and without it,
    gradients included."""
    net = Net(dropout=0.2).train()
    x = torch.randn(2, 8, 16)

    def step():
        torch.manual_seed(123)
        net.zero_grad()
        y = net(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in net.parameters()], torch.rand(4)

    y0, g0, r0 = step()
    with attnkit.capture() as rec:
        y1, g1, r1 = step()
    assert torch.equal(y0, y1) and torch.equal(r0, r1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    # weights are taken before dropout: rows of real tokens sum to one
    torch.testing.assert_close(rec[0].weights.sum(-1), torch.ones(2, 4, 8))


@pytest.mark.parametrize("make", [lambda: "gumbel", lambda: attnkit.normalizers.Gumbel(tau=0.5, hard=True),
                                  lambda: attnkit.normalizers.StochasticHard()],
                         ids=["gumbel", "gumbel-hard", "stochastic-hard"])
def test_stochastic_normalizers_sample_once(make):
    """A sampling normalizer is not run twice: same seed, same output, same RNG state afterwards,
    and the captured weights are the very sample that made the output."""
    q, k, v = make_qkv(2, 2, 5, 6, D=8)
    torch.manual_seed(7)
    plain = attnkit.attention(q, k, v, normalizer=make())
    after_plain = torch.rand(3)
    torch.manual_seed(7)
    with attnkit.capture() as rec:
        out = attnkit.attention(q, k, v, normalizer=make())
    after = torch.rand(3)
    assert torch.equal(out, plain) and torch.equal(after, after_plain)
    torch.manual_seed(7)
    _, w = attnkit.attention(q, k, v, normalizer=make(), return_weights=True)
    assert torch.equal(rec[0].weights, w.float())
    assert torch.allclose(rec[0].weights @ v, out)  # the sample is the one the output used


def test_stochastic_hard_attention_module_is_unchanged_by_capture():
    """nn.StochasticHardAttention asks for weights itself (return_weights=True)."""
    att = attnkit.nn.StochasticHardAttention(8, 8, score="dot").train()
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)

    def run():
        torch.manual_seed(3)
        c1, w1, s1 = att(q, k, v)
        c2, w2, s2 = att(q, k, v)
        return c1, c2, w1, s1
    c1, c2, w1, s1 = run()
    with attnkit.capture() as rec:
        d1, d2, x1, t1 = run()
    assert torch.equal(c1, d1) and torch.equal(c2, d2)
    assert torch.equal(t1.index, w1.argmax(-1).where(w1.sum(-1) > 0, -1))
    assert torch.equal(rec[0].weights[:, 0], x1)  # the captured sample is the module's sample


# -- selection and memory ----------------------------------------------------------------------------
def test_heads_rows_and_layers_select_and_bound_the_memory():
    net = Net(depth=3).eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad(), attnkit.capture() as full:
        y0 = net(x)
    rows = range(0, 12, 5)
    with torch.no_grad(), attnkit.capture(heads=[3, 1, 9], rows=rows, layers=[0, 2]) as rec:
        y1 = net(x)
    assert torch.equal(y0, y1)
    assert [r.index for r in rec] == [0, 2]
    for r in rec:
        assert r.heads == (3, 1) and r.rows == (0, 5, 10)  # head 9 does not exist: skipped
        assert tuple(r.weights.shape) == (2, 2, 3, 12) and r.shape == (2, 4, 12, 12)
        # memory bounded by the request: the record owns exactly what was asked for, no larger base
        assert r.weights.untyped_storage().nbytes() == r.weights.numel() * 4
        torch.testing.assert_close(r.weights, full[r.index].weights[:, [3, 1]][:, :, [0, 5, 10]])
    with torch.no_grad(), attnkit.capture(heads=0, rows=11, layers=-1) as none:
        net(x)
    assert len(none) == 0  # -1 is not a call index; no call matched
    with torch.no_grad(), attnkit.capture(heads=2, rows=[11]) as one:
        net(x)
    assert [tuple(r.weights.shape) for r in one] == [(2, 1, 1, 12)] * 3


def test_long_sequence_rows_cost_only_their_rows():
    """A 4096-token causal call on the tiled backend: two rows of one head come back, (1, 1, 2, 4096)."""
    q, k, v = make_qkv(1, 4, 4096, 4096, D=16)
    with attnkit.capture(heads=[2], rows=[0, 4095]) as rec:
        attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled")
    w = rec[0].weights
    assert tuple(w.shape) == (1, 1, 2, 4096) and w.untyped_storage().nbytes() == 2 * 4096 * 4
    assert abs(float(w[0, 0, 0, 0]) - 1) < 1e-6 and (w[0, 0, 0, 1:] == 0).all()  # query 0 sees key 0 only
    assert_close(w[0, 0, 1], reference_weights(q[:, 2:3, -1:], k[:, 2:3], v[:, 2:3])[0, 0, 0])


def test_layer_globs_select_by_name():
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_self = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)
            self.dec_self = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)
            self.dec_cross = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, src, tgt):
            m = self.enc_self(src)[0]
            y = self.dec_self(tgt, is_causal=True)[0]
            return self.dec_cross(y, m, m)[0]

    src, tgt = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    m = EncDec().eval()
    with torch.no_grad(), attnkit.capture(layers=["dec_*"]) as dec:
        m(src, tgt)
    assert dec.names() == ["dec_self", "dec_cross"] and [r.index for r in dec] == [1, 2]
    assert [r.shape for r in dec] == [(1, 2, 3, 3), (1, 2, 3, 5)]
    with torch.no_grad(), attnkit.capture(layers=["*cross", 0]) as rec:
        m(src, tgt)
    assert rec.names() == ["enc_self", "dec_cross"]
    assert [r.name for r in rec.by_name("*_self")] == ["enc_self"]


def test_transformer_layers_are_named_by_path_and_match_its_own_weights():
    model = attnkit.models.get("Transformer")(11, 13, d_model=16, num_heads=2, num_encoder_layers=2,
                                             num_decoder_layers=2, dim_feedforward=32, dropout=0.0).eval()
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 4, 5]])
    with torch.no_grad(), attnkit.capture(layers=["*.cross_attn", "encoder_layers.1.*"]) as rec:
        model(src, src == 0, tgt)
    assert rec.names() == ["encoder_layers.1.self_attn", "decoder_layers.0.cross_attn", "decoder_layers.1.cross_attn"]
    assert [r.shape for r in rec] == [(1, 2, 4, 4), (1, 2, 3, 4), (1, 2, 3, 4)]
    with torch.no_grad():
        ref = model.attention_weights(src, src == 0, tgt)
    assert_close(rec[1].weights, ref["cross"][0])


# -- names ---------------------------------------------------------------------------------------------
def test_names_are_module_paths_through_containers():
    net = Net(depth=2).eval()
    with torch.no_grad(), attnkit.capture() as rec:
        net(torch.randn(1, 4, 16))
    assert rec.names() == ["blocks.0.attn", "blocks.1.attn"]


def test_names_of_direct_children_and_bare_calls():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)
            self.second = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.second(self.first(x)[0])[0]

    q, k, v = make_qkv(1, 2, 3, 3, D=4)
    with torch.no_grad(), attnkit.capture() as rec:
        Two()(torch.randn(1, 3, 8))
        attnkit.attention(q, k, v); line = _line()  # noqa: E702
    assert rec.names() == ["first", "second", f"test_capture.py:{line}"]
    assert [r.index for r in rec] == [0, 1, 2]


def _line():
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_nested_capture_blocks_both_record_with_their_own_selection():
    two = nn.Sequential(attnkit.nn.MultiheadAttention(8, 2, batch_first=True), nn.Identity())

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, need_weights=False)[0]

    m = Wrap().eval()
    x = torch.randn(1, 4, 8)
    with torch.no_grad(), attnkit.capture() as outer:
        m(x)
        with attnkit.capture(heads=[1]) as inner:
            m(x)
        m(x)
    assert inner.names() == ["mha"] and tuple(inner[0].weights.shape) == (1, 1, 4, 4)
    assert outer.names() == ["mha"] * 3 and [r.index for r in outer] == [0, 1, 2]
    assert all(tuple(r.weights.shape) == (1, 2, 4, 4) for r in outer)
    del two


def test_nested_blocks_without_modules_and_cleanup_after_an_error():
    q, k, v = make_qkv(1, 2, 3, 3, D=4)
    with attnkit.capture() as outer:
        with attnkit.capture(rows=[0]) as inner:
            attnkit.attention(q, k, v)
        attnkit.attention(q, k, v)
    assert len(inner) == 1 and tuple(inner[0].weights.shape) == (1, 2, 1, 3)
    assert len(outer) >= 1 and tuple(outer[-1].weights.shape) == (1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with attnkit.capture():
            raise RuntimeError("boom")
    assert attnkit.recording.active() is None
    attnkit.attention(q, k, v)  # no recorder left behind


def test_an_empty_inner_block_leaves_the_outer_one_recording():
    q, k, v = make_qkv(1, 2, 3, 3, D=4)
    with attnkit.capture() as outer:
        with attnkit.capture() as inner:
            pass
        attnkit.attention(q, k, v)
    assert len(inner) == 0 and len(outer) == 1


def test_modules_in_other_threads_still_run_during_a_capture():
    lin, errors = nn.Linear(2, 2), []

    def other():
        try:
            lin(torch.randn(1, 2))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    with attnkit.capture():
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert errors == []


def test_bad_selections_name_the_argument():
    with pytest.raises(TypeError, match="capture layers"):
        with attnkit.capture(layers=1.5):
            pass
    with pytest.raises(TypeError, match="capture layers entries"):
        with attnkit.capture(layers=[None]):
            pass


def test_root_names_calls_made_through_methods_other_than_forward():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def run(self, x):  # like greedy(): forward is never called
            for b in self.layers:
                x = b.attn(x, need_weights=False)[0]
            return x

    m = Model()
    with attnkit.capture(root=m) as rec:
        m.run(torch.randn(1, 3, 8))
    assert rec.names() == ["layers.0.attn", "layers.1.attn"]
    with attnkit.capture() as rec:
        m.run(torch.randn(1, 3, 8))
    assert rec.names() == ["MultiheadAttention", "MultiheadAttention"]  # without root: no path to find
