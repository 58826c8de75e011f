"""The tiled backend against the reference: outputs, log-sum-exp, weights and gradients."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit import masks, scores
from attnkit.backends.tiled import TiledBackend
from attnkit.kernels.plan import make_plan, query_scale
from attnkit.kernels.tiled import tiled_forward
from attnkit.masks.base import EMPTY, FULL, Mask
from attnkit.spec import canonicalize
from attnkit.testing import assert_close, assert_close_to_gold, assert_matches_float64_gold, make_qkv

small = TiledBackend(block_q=16, block_k=8, kv_chunk=24)  # many ragged tiles and multi-tile runs


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", small)


def both(q, k, v, **kw):
    """(tiled out, reference out) and their gradients w.r.t. q, k, v."""
    res = []
    for backend in ("tiled", "reference"):
        out, w = attnkit.attention(q, k, v, backend=backend, return_weights=True, **kw)
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(), (q, k, v),
                                allow_unused=True)
        res.append((out, w, g))
    return res


MASKS = {
    "none": lambda Tq, Tk, B: None,
    "causal": lambda Tq, Tk, B: masks.causal(),
    "causal_top_left": lambda Tq, Tk, B: masks.causal(align="top_left"),
    "window": lambda Tq, Tk, B: masks.sliding_window(9, 2),
    "padding": lambda Tq, Tk, B: masks.key_padding(torch.arange(B) % max(Tk, 1) + 1),
    "causal&padding": lambda Tq, Tk, B: masks.causal() & masks.key_padding(torch.tensor([Tk, max(Tk // 2, 1)])[:B]),
    "mask_mod": lambda Tq, Tk, B: (lambda b, h, i, j: (i + j) % 3 != 0),
    "bool_tensor": lambda Tq, Tk, B: torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(0)) > 0.4,
    "window|global": lambda Tq, Tk, B: masks.sliding_window(3) | masks.from_mod(lambda b, h, i, j: j == 0),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 37), (37, 37), (29, 53), (53, 29)])
def test_masks_float64(mask_name, Tq, Tk):
    B = 2
    q, k, v = make_qkv(B, 4, Tq, Tk, D=5, Dv=3, Hkv=2, dtype=torch.float64, requires_grad=True)
    m = MASKS[mask_name](Tq, Tk, B)
    (o1, w1, g1), (o2, w2, g2) = both(q, k, v, mask=m)
    assert_close(o1, o2, name="out")
    assert_close(w1, w2, name="weights")
    for name, a, b in zip("qkv", g1, g2):
        assert_close(a, b, name=f"d{name}")


@pytest.mark.parametrize("T", [1, 97, 1025])
@pytest.mark.parametrize("D", [40, 64, 111])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_odd_sizes_default_tiles_float32_against_gold(T, D, fuse, monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(fuse=fuse))
    if T == 1025 and D != 64:
        pytest.skip("one large case is enough")
    q64, k64, v64 = make_qkv(1, 2, T, D=D, dtype=torch.float64, requires_grad=True)
    assert_matches_float64_gold(q64, k64, v64, "tiled", mask=masks.causal())


def test_log_sum_exp_matches_reference():
    q, k, v = make_qkv(2, 2, 41, 33, D=8, dtype=torch.float64)
    m = masks.sliding_window(5) & masks.key_padding(torch.tensor([33, 20]))
    spec = canonicalize(q, k, v, mask=m)
    plan = make_plan(spec, 16, 8, 24)
    assert plan.prescaled  # dot score without mods: the kernel takes q * scale
    _, lse = tiled_forward(q * query_scale(spec), k, v, spec, plan)
    s = (q @ k.transpose(-1, -2)) * spec.scale
    dense = m.materialize(41, 33, 2, 2)
    expect = torch.logsumexp(s.masked_fill(~dense, float("-inf")), -1)
    assert torch.equal(torch.isinf(lse), torch.isinf(expect))
    assert_close(lse[~torch.isinf(lse)], expect[~torch.isinf(expect)])


@pytest.mark.parametrize("score", [
    "dot", "cosine", lambda: scores.General(6, 6, heads=4), lambda: scores.General(6, 6), lambda: scores.Additive(6, 6, 5)])
def test_scores_and_their_parameters(score):
    s = score() if callable(score) else score
    if isinstance(s, torch.nn.Module):
        s = s.double()
    q, k, v = make_qkv(2, 4, 23, 31, D=6, Dv=3, Hkv=2, dtype=torch.float64, requires_grad=True)
    m = masks.causal()
    outs = []
    for backend in ("tiled", "reference"):
        if isinstance(s, torch.nn.Module):
            s.zero_grad()
        out = attnkit.attention(q, k, v, score=s, mask=m, backend=backend)
        grads = torch.autograd.grad(out.sum(), (q, k, v, *(s.parameters() if isinstance(s, torch.nn.Module) else ())))
        outs.append((out, grads))
    assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert_close(a, b)


@pytest.mark.parametrize("order", ["softcap", "alibi then softcap", "softcap then alibi", "two caps"])
def test_softcap_backward_is_closed_form_and_exact(order, monkeypatch):
    """Soft-capping's slope ``1 - (s/cap)²`` is chained into dS: the tile backward takes no
    autograd, and the gradients equal the reference's in float64 whatever the order of the mods."""
    H = 4
    mods = {"softcap": [attnkit.positions.softcap(0.8)],
            "alibi then softcap": [attnkit.positions.ALiBi(H), attnkit.positions.softcap(1.5)],
            "softcap then alibi": [attnkit.positions.softcap(1.5), attnkit.positions.ALiBi(H)],
            "two caps": [attnkit.positions.softcap(2.0), attnkit.positions.softcap(0.9)]}[order]
    q, k, v = make_qkv(2, H, 21, 30, D=8, Hkv=2, dtype=torch.float64, requires_grad=True)
    kw = dict(bias=mods, mask=masks.causal() & masks.sliding_window(11), scale=1.7)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    g_ref = torch.autograd.grad((ref * ref).sum(), (q, k, v))
    out = attnkit.attention(q, k, v, backend="tiled", **kw)

    def no_autograd(*a, **k):
        raise AssertionError("the tile backward took autograd")

    monkeypatch.setattr(torch.autograd, "grad", no_autograd)
    out.backward(2 * out.detach())
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for t, g in zip((q, k, v), g_ref):
        torch.testing.assert_close(t.grad, g, rtol=1e-10, atol=1e-11)


def test_bias_tensor_with_grad_softcap_and_callable():
    q, k, v = make_qkv(1, 2, 19, 27, D=4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 19, 27, dtype=torch.float64, requires_grad=True)
    mods = [bias, attnkit.positions.softcap(0.7)]
    outs = [attnkit.attention(q, k, v, bias=mods, mask=masks.causal(), backend=b) for b in ("tiled", "reference")]
    grads = [torch.autograd.grad(o.sum(), (q, k, v, bias)) for o in outs]
    assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        assert_close(a, b)
    # a user score_mod callable is served with or without gradients for q, k, v; one that reads a
    # tensor requiring grad is declined (the tiled backward would not give that tensor its gradient)
    fn = lambda s, b, h, i, j: s - 0.1 * (i - j).abs()  # noqa: E731
    with torch.no_grad():
        assert_close(attnkit.attention(q, k, v, bias=fn, backend="tiled"),
                     attnkit.attention(q, k, v, bias=fn, backend="reference"))
    outs = [attnkit.attention(q, k, v, bias=fn, backend=b) for b in ("tiled", "reference")]
    assert_close(outs[0], outs[1])
    for a, b in zip(*[torch.autograd.grad(o.sum(), (q, k, v)) for o in outs]):
        assert_close(a, b)
    w = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    learned = lambda s, b, h, i, j: s - w * (i - j).abs()  # noqa: E731
    with pytest.raises(ValueError, match="reads a tensor that requires grad"):
        attnkit.attention(q, k, v, bias=learned, backend="tiled")


@pytest.mark.parametrize("norm", [attnkit.normalizers.Softmax(temperature=0.3), attnkit.normalizers.Sigmoid(),
                                  attnkit.normalizers.Sigmoid(bias="log_n")])
def test_softmax_temperature_and_sigmoid(norm):
    q, k, v = make_qkv(2, 2, 33, 40, D=4, dtype=torch.float64, requires_grad=True)
    m = masks.causal() & masks.key_padding(torch.tensor([40, 3]))
    (o1, w1, g1), (o2, w2, g2) = both(q, k, v, mask=m, normalizer=norm)
    assert_close(o1, o2)
    assert_close(w1, w2)
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_fully_masked_rows_give_zeros_and_finite_grads():
    q, k, v = make_qkv(2, 2, 30, 30, D=4, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 2, 30, 30, dtype=torch.bool)
    keep[0, :, 3:20] = False  # whole query blocks with no live key
    keep[1, 1, 7] = False
    (o1, w1, g1), (o2, w2, g2) = both(q, k, v, mask=keep)
    assert (o1[0, :, 3:20] == 0).all() and (w1[0, :, 3:20] == 0).all() and (o1[1, 1, 7] == 0).all()
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_reference_error(dtype):
    q64, k64, v64 = make_qkv(2, 4, 70, 50, D=16, Hkv=1, dtype=torch.float64)
    gold = attnkit.attention(q64, k64, v64, mask=masks.causal(), backend="reference")
    q, k, v = (x.to(dtype) for x in (q64, k64, v64))
    fast = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled")
    ref = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    assert fast.dtype == dtype
    assert_close_to_gold(fast, ref, gold)


def test_noncontiguous_inputs():
    q, k, v = make_qkv(2, 4, 21, 21, D=8, noncontiguous=True, dtype=torch.float64, requires_grad=True)
    (o1, _, g1), (o2, _, g2) = both(q, k, v, mask=masks.causal())
    assert_close(o1, o2)
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_plan_skips_empty_tiles_and_marks_full_ones():
    q, k, v = make_qkv(1, 1, 64, 64, D=4)
    spec = canonicalize(q, k, v, mask=masks.sliding_window(8))
    plan = make_plan(spec, 8, 8, 8)
    # a window of 8 keys behind each query touches the diagonal tile and the one before it
    assert plan.live_tiles == 8 + 7 and plan.total_tiles == 64
    for i, runs in enumerate(plan.runs):
        assert [r.start for r in runs] == ([0] if i == 0 else [8 * (i - 1), 8 * i])
        assert all(r.partial for r in runs)  # window edges cut every live tile
    spec = canonicalize(q, k, v, mask=masks.causal())
    plan = make_plan(spec, 8, 8, 64)
    assert plan.live_tiles == 36
    assert all(len(runs) == (1 if i == 0 else 2) for i, runs in enumerate(plan.runs))  # full run + diagonal


class CountingCausal(Mask):
    """Causal, with an analytic tile classification, counting predicate evaluations."""

    def __init__(self):
        self.evaluated = 0

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        self.evaluated += torch.broadcast_tensors(q_idx, kv_idx)[0].numel()
        return q_idx >= kv_idx

    def classify_blocks(self, Tq, Tk, bq, bk, batch=1, heads=1, device=None):
        i = torch.arange(-(-Tq // bq)).view(-1, 1)
        j = torch.arange(-(-Tk // bk)).view(1, -1)
        out = torch.full((1, 1, i.shape[0], j.shape[1]), 1, dtype=torch.int8)
        out[0, 0][(j * bk) > (i * bq + bq - 1)] = EMPTY
        out[0, 0][(j * bk + bk - 1) <= (i * bq)] = FULL
        return out


def test_full_tiles_skip_the_mask_predicate():
    m = CountingCausal()
    q, k, v = make_qkv(1, 1, 64, 64, D=4, dtype=torch.float64)
    out = attnkit.attention(q, k, v, mask=m, backend="tiled")
    assert_close(out, attnkit.attention(q, k, v, mask=masks.causal(), backend="reference"))
    # only the 4 diagonal 16x(8..16) tiles of the 16x8 tiling are evaluated, never the full ones
    assert m.evaluated <= 4 * 16 * 16


def test_weights_do_not_change_which_kernel_computed_the_output_under_autograd():
    q, k, v = make_qkv(1, 2, 40, 40, D=4, dtype=torch.float64)
    q.requires_grad_()
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled")
    out_w, w = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled", return_weights=True)
    assert torch.equal(out, out_w)
    assert_close(w @ v, out)


def test_every_weight_without_autograd_comes_with_the_output_from_one_pass(monkeypatch):
    """No gradient, every weight asked for: the output is the weights times v (one set of scores),
    equal to the tiled kernel's output to rounding; no forward kernel runs."""
    import attnkit.kernels.tiled as tiled_kernel

    q, k, v = make_qkv(1, 2, 40, 40, D=4, dtype=torch.float64)
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled")
    ran = []
    monkeypatch.setattr(tiled_kernel.TiledAttentionFn, "apply", lambda *a: ran.append(a))
    with torch.no_grad():
        out_w, w = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled", return_weights=True)
    assert not ran
    assert torch.equal(out_w, w @ v)
    assert_close(out_w, out)


def test_tiled_refuses_what_it_cannot_do_and_says_why():
    q, k, v = make_qkv()
    for kw, why in [(dict(normalizer=attnkit.normalizers.Softmax()), None),
                    (dict(score=scores.Location(8, 5)), "tile by tile"),
                    (dict(mask=masks.local_p(torch.zeros(2, 5), 2)), "local-p")]:
        reasons = attnkit.backends.REGISTRY["tiled"].not_supported_reasons(canonicalize(q, k, v, **kw))
        assert (not reasons) if why is None else why in " ".join(reasons)


@given(Tq=st.integers(1, 40), Tk=st.integers(1, 40), H=st.sampled_from([1, 2, 4]), mask=st.sampled_from(list(MASKS)),
       norm=st.sampled_from(["softmax", "sigmoid"]), weights=st.booleans(), seed=st.integers(0, 1000))
def test_auto_is_never_wrong(Tq, Tk, H, mask, norm, weights, seed):
    torch.manual_seed(seed)
    q, k, v = make_qkv(2, H, Tq, Tk, D=4, Hkv=1, dtype=torch.float64)
    kw = dict(mask=MASKS[mask](Tq, Tk, 2), normalizer=norm, return_weights=weights)
    with attnkit.use_backend("auto"):
        a = attnkit.attention(q, k, v, **kw)
    b = attnkit.attention(q, k, v, backend="reference", **kw)
    for x, y in zip(a if weights else [a], b if weights else [b]):
        assert_close(x, y)
    # the tiled backend also agrees on every one of these requests
    c = attnkit.attention(q, k, v, backend="tiled", **kw)
    for x, y in zip(c if weights else [c], b if weights else [b]):
        assert_close(x, y)


def test_auto_picks_tiled_for_large_requests_sdpa_cannot_serve():
    q, k, v = make_qkv(1, 4, 600, 600, D=8)
    assert attnkit.explain(q, k, v, normalizer="sigmoid").backend == "tiled"
    assert attnkit.explain(q, k, v).backend == "sdpa"
    small_q = make_qkv(1, 1, 8, 8, D=8)
    choice = attnkit.explain(*small_q, normalizer="sigmoid")
    assert choice.backend == "reference" and "reference is faster" in " ".join(choice.reasons["tiled"])


@pytest.mark.parametrize("norm", ["softmax", "sigmoid"])
def test_dropout_is_reproducible_and_matches_the_reference_mask(norm):
    q, k, v = make_qkv(2, 4, 45, 38, D=6, Hkv=2, dtype=torch.float64, requires_grad=True)
    kw = dict(dropout_p=0.4, normalizer=norm, mask=masks.causal())

    def run(backend, seed):
        out = attnkit.attention(q, k, v, backend=backend, generator=torch.Generator().manual_seed(seed), **kw)
        return (out, *torch.autograd.grad(out.sum(), (q, k, v)))

    tiled, ref = run("tiled", 7), run("reference", 7)
    for a, b in zip(tiled, ref):
        assert_close(a, b)
    again = run("tiled", 7)
    assert all(torch.equal(a, b) for a, b in zip(tiled, again))
    assert not torch.equal(run("tiled", 8)[0], tiled[0])
    # the dropped weights are exactly the reference's: zero where dropped, w/(1-p) where kept
    _, w = attnkit.attention(q, k, v, backend="reference", return_weights=True, **{**kw, "dropout_p": 0.0})
    ones = torch.eye(38, dtype=torch.float64).expand(2, 2, 38, 38)
    dropped = attnkit.attention(q, k, ones, backend="tiled", generator=torch.Generator().manual_seed(7), **kw)
    kept = dropped != 0
    assert 0.5 < kept[w.expand_as(dropped) > 0].float().mean() < 0.7
    assert_close(dropped[kept], (w.expand_as(dropped) / 0.6)[kept])


def test_dropout_gradcheck():
    q, k, v = make_qkv(1, 2, 5, 6, D=3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return attnkit.attention(q, k, v, backend="tiled", dropout_p=0.3, generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_weights_for_a_subset_of_heads_and_rows(backend):
    q, k, v = make_qkv(2, 4, 37, 29, D=5, Hkv=2, dtype=torch.float64)
    kw = dict(mask=masks.causal() & masks.key_padding(torch.tensor([29, 11])), bias=attnkit.positions.ALiBi(4))
    _, full = attnkit.attention(q, k, v, backend="reference", return_weights=True, **kw)
    req = attnkit.WeightsRequest(heads=[3, 0], rows=[36, 0, 17])
    out, w = attnkit.attention(q, k, v, backend=backend, return_weights=req, **kw)
    assert w.shape == (2, 2, 3, 29)
    assert_close(w, full[:, [3, 0]][:, :, [36, 0, 17]])
    assert_close(out, attnkit.attention(q, k, v, backend="reference", **kw))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("heads,rows", [(None, None), ([3, 0, 1], None), (None, [36, 0, 17])])
def test_head_averaged_weights_are_summed_tile_by_tile(monkeypatch, grad, heads, rows):
    """WeightsRequest(average=True): the mean over the chosen heads, equal to the reference's; the
    tiled backend never allocates a per-head weights tensor for it (one pass without autograd,
    recomputed from the log-sum-exp with it)."""
    import attnkit.kernels.weights as kweights

    q, k, v = make_qkv(2, 4, 37, 29, D=5, Hkv=2, dtype=torch.float64)
    q.requires_grad_(grad)
    kw = dict(mask=masks.causal() & masks.key_padding(torch.tensor([29, 11])), bias=attnkit.positions.ALiBi(4))
    _, full = attnkit.attention(q, k, v, backend="reference", return_weights=True, **kw)
    expected = full if heads is None else full[:, heads]
    expected = (expected if rows is None else expected[:, :, rows]).mean(1, keepdim=True)
    shapes = []
    real = kweights.zeros_result
    monkeypatch.setattr(kweights, "zeros_result", lambda shape, *a: shapes.append(shape) or real(shape, *a))
    req = attnkit.WeightsRequest(heads=heads, rows=rows, average=True)
    out, w = attnkit.attention(q, k, v, backend="tiled", return_weights=req, **kw)
    assert w.shape == expected.shape == (2, 1, 37 if rows is None else 3, 29)
    assert_close(w, expected)
    assert_close(out, attnkit.attention(q, k, v, backend="reference", **kw))
    assert shapes and all(sh[1] == 1 for sh in shapes if len(sh) == 4), shapes
    _, w_ref = attnkit.attention(q, k, v, backend="reference", return_weights=req, **kw)
    assert_close(w_ref, expected)


def test_head_averaged_weights_of_a_nan_row_are_nan_on_its_live_keys():
    q, k, v = make_qkv(1, 2, 6, D=4, dtype=torch.float64)
    q = q.clone()
    q[0, 1, 2, 0] = float("nan")                          # head 1, row 2
    _, w = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled",
                             return_weights=attnkit.WeightsRequest(average=True))
    bad = torch.zeros(6, 6, dtype=torch.bool)
    bad[2, :3] = True                                     # the row's live keys (causal: 0..2)
    assert torch.equal(torch.isnan(w[0, 0]), bad)
    q[0, 1, 2, 0] = 0.0
    _, w_ok = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled", return_weights=True)
    assert_close(w[0, 0][~bad], w_ok.mean(1)[0][~bad])


def test_weights_of_a_few_rows_of_a_long_sequence_are_cheap_and_exact(monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend())
    T = 16384
    q, k, v = make_qkv(1, 2, T, D=8)
    req = attnkit.WeightsRequest(heads=1, rows=[0, 5000, T - 1])
    out, w = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled", return_weights=req)
    s = (q[0, 1, [0, 5000, T - 1]] @ k[0, 1].T) / 8 ** 0.5
    s = s.masked_fill(torch.arange(T)[None] > torch.tensor([0, 5000, T - 1])[:, None], float("-inf"))
    assert w.shape == (1, 1, 3, T)
    assert_close(w[0, 0], torch.softmax(s, -1), scale=10)


def test_weights_request_errors():
    q, k, v = make_qkv(1, 2, 4, D=4)
    with pytest.raises(ValueError, match=r"WeightsRequest rows must lie in \[0, 4\); got \[4\]"):
        attnkit.attention(q, k, v, return_weights=attnkit.WeightsRequest(rows=[4]))
    with pytest.raises(TypeError, match="WeightsRequest heads must be an int or a sequence of ints"):
        attnkit.WeightsRequest(heads="all")
    with pytest.raises(TypeError, match="WeightsRequest average must be a bool; got str"):
        attnkit.WeightsRequest(average="yes")
    with pytest.raises(TypeError, match="return_weights must be a bool or an attnkit.WeightsRequest"):
        attnkit.attention(q, k, v, return_weights=1)


def test_auto_prefers_tiled_over_a_dense_sdpa_mask_for_long_sequences():
    x = torch.randn(1, 2, 2048, 8)
    choice = attnkit.explain(x, x, x, mask=masks.sliding_window(64))
    assert choice.backend == "tiled" and "materialized densely" in " ".join(choice.reasons["sdpa"])
    assert attnkit.explain(x, x, x, bias=attnkit.positions.ALiBi(2), mask=masks.causal()).backend == "tiled"
    assert attnkit.explain(x, x, x, mask=masks.causal()).backend == "sdpa"  # native is_causal: no dense mask
    assert attnkit.explain(x, x, x, mask=torch.ones(2048, 2048, dtype=torch.bool)).backend == "sdpa"  # already dense
    small = x[:, :, :256]
    assert attnkit.explain(small, small, small, mask=masks.sliding_window(64)).backend == "sdpa"


LINEAR = dict(score=scores.Kernel(), normalizer=attnkit.normalizers.Normalize())


@pytest.mark.parametrize("mask_name", ["none", "causal", "window", "causal&padding", "bool_tensor"])
def test_linear_attention_tiles_match_the_quadratic_reference(mask_name):
    q, k, v = make_qkv(2, 4, 29, 53, D=5, Dv=3, Hkv=2, dtype=torch.float64, requires_grad=True)
    (o1, w1, g1), (o2, w2, g2) = both(q, k, v, mask=MASKS[mask_name](29, 53, 2), **LINEAR)
    assert_close(o1, o2)
    assert_close(w1, w2)
    for a, b in zip(g1, g2):
        assert_close(a, b)


@pytest.mark.parametrize("mask", [None, masks.causal()])
def test_plain_and_causal_linear_attention_run_in_chunked_form(mask, monkeypatch):
    import attnkit.backends.tiled as tiled_mod

    calls = []
    real = tiled_mod.linear_attention
    monkeypatch.setattr(tiled_mod, "linear_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = make_qkv(1, 2, 40, 40, D=4, dtype=torch.float64, requires_grad=True)
    out = attnkit.attention(q, k, v, mask=mask, backend="tiled", **LINEAR)
    ref = attnkit.attention(q, k, v, mask=mask, backend="reference", **LINEAR)
    assert calls and calls[0]["causal"] == (mask is not None)
    assert_close(out, ref)
    assert_close(torch.autograd.grad(out.sum(), q)[0], torch.autograd.grad(ref.sum(), q)[0])
    assert_close(ref, attnkit.linear.linear_attention(q, k, v, causal=mask is not None))


def test_alibi_as_a_row_separable_bias_keeps_float32_precision(monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend())
    q64, k64, v64 = make_qkv(1, 8, 3000, D=16, dtype=torch.float64, requires_grad=True)
    kw = dict(bias=attnkit.positions.ALiBi(8), mask=masks.causal())
    spec = canonicalize(q64, k64, v64, **kw)
    assert make_plan(spec, 128, 128, 1024).prescaled  # ALiBi rides on the prescaled path
    assert_matches_float64_gold(q64, k64, v64, "tiled", **kw)
