"""The tiled backend's fused path (runs handed to torch's CPU flash kernel) against the reference
and against the eager tile body, and the requests it must leave to the eager body."""

import pytest
import torch

import attnkit
import attnkit.kernels.fused as kernel
import attnkit.kernels.plan as plan_module
from attnkit import masks, positions
from attnkit.backends.tiled import TiledBackend
from attnkit.testing import assert_close, assert_matches_float64_gold, make_qkv

from .test_tiled import MASKS

fused_small = TiledBackend(block_q=16, block_k=8)
eager_small = TiledBackend(block_q=16, block_k=8, kv_chunk=24, fuse=False)


@pytest.fixture
def calls(monkeypatch):
    """Counts fused forward/backward calls; the tiled backend uses small tiles."""
    seen = {"forward": 0, "backward": 0}
    fwd, bwd = kernel.fused_forward, kernel.fused_backward

    def count_fwd(*a, **kw):
        seen["forward"] += 1
        return fwd(*a, **kw)

    def count_bwd(*a, **kw):
        seen["backward"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(kernel, "fused_forward", count_fwd)
    monkeypatch.setattr(kernel, "fused_backward", count_bwd)
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", fused_small)
    return seen


def run(q, k, v, backend, **kw):
    out, w = attnkit.attention(q, k, v, backend=backend, return_weights=True, **kw)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out, w, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 37), (37, 37), (29, 53), (53, 29)])
def test_fused_matches_the_reference_float64(mask_name, Tq, Tk, calls):
    B = 2
    q, k, v = make_qkv(B, 4, Tq, Tk, D=5, Hkv=2, dtype=torch.float64, requires_grad=True)
    m = MASKS[mask_name](Tq, Tk, B)
    fast, ref = run(q, k, v, "tiled", mask=m), run(q, k, v, "reference", mask=m)
    assert calls == {"forward": 1, "backward": 1}
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], fast, ref):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("mask", [None, masks.causal(), masks.sliding_window(7), masks.causal(align="top_left")])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_fused_alibi_and_temperature_float64(mask, temperature, calls):
    q, k, v = make_qkv(2, 4, 41, 45, D=6, dtype=torch.float64, requires_grad=True, noncontiguous=True)
    kw = dict(mask=mask, bias=positions.ALiBi(4), normalizer=attnkit.normalizers.Softmax(temperature))
    fast, ref = run(q, k, v, "tiled", **kw), run(q, k, v, "reference", **kw)
    assert calls["forward"] == 1 and calls["backward"] == 1
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], fast, ref):
        assert_close(a, b, name=name)


def test_fully_masked_rows_give_zeros_and_zero_gradients(calls):
    q, k, v = make_qkv(1, 2, 20, 20, D=4, dtype=torch.float64, requires_grad=True)
    dead = masks.from_mod(lambda b, h, i, j: (i % 5 != 0) & (j <= i))  # rows 0, 5, 10, 15 see nothing
    out, w, dq, dk, dv = run(q, k, v, "tiled", mask=dead)
    ref = run(q, k, v, "reference", mask=dead)
    assert calls["forward"] == 1
    assert torch.all(out[:, :, ::5] == 0) and torch.all(dq[:, :, ::5] == 0)
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], (out, w, dq, dk, dv), ref):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("T", [1, 97, 1025])
@pytest.mark.parametrize("D", [40, 111])
def test_fused_float32_default_tiles_against_gold(T, D, monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend())
    q64, k64, v64 = make_qkv(1, 2, T, D=D, dtype=torch.float64, requires_grad=True)
    assert_matches_float64_gold(q64, k64, v64, "tiled", mask=masks.causal(), bias=positions.ALiBi(2))


def test_fused_equals_the_eager_tile_body_float32(monkeypatch):
    q, k, v = make_qkv(2, 4, 150, 131, D=16, Hkv=1, requires_grad=True)
    kw = dict(mask=masks.sliding_window(20) | masks.from_mod(lambda b, h, i, j: j < 3))
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", eager_small)
    eager = run(q, k, v, "tiled", **kw)
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", fused_small)
    fused = run(q, k, v, "tiled", **kw)
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], fused, eager):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("case", ["dropout", "sigmoid", "narrow values", "additive", "relative buckets",
                                  "learnable bias"])
def test_requests_the_fused_kernel_cannot_serve_use_the_eager_body(case, calls):
    D, Dv, dtype = 6, 6, torch.float64
    kw = {}
    if case == "dropout":
        kw = dict(dropout_p=0.2, generator=torch.Generator().manual_seed(0))
    elif case == "sigmoid":
        kw = dict(normalizer=attnkit.normalizers.Sigmoid())
    elif case == "narrow values":
        Dv = 3
    elif case == "additive":
        kw = dict(score=attnkit.scores.Additive(D, D, 8).double())
    elif case == "relative buckets":
        kw = dict(bias=positions.T5RelativeBias(num_heads=2, num_buckets=8, max_distance=16))
    elif case == "learnable bias":
        kw = dict(bias=torch.randn(1, 2, 30, 30, dtype=dtype, requires_grad=True))
    q, k, v = make_qkv(1, 2, 30, D=D, Dv=Dv, dtype=dtype, requires_grad=True)
    out = attnkit.attention(q, k, v, backend="tiled", mask=masks.causal(), **kw)
    out.float().sum().backward()
    assert calls == {"forward": 0, "backward": 0}
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("score", ["cosine", "general"])
def test_scores_prepared_outside_the_tiles_take_the_fused_path(score, calls):
    q, k, v = make_qkv(2, 2, 33, 27, D=5, dtype=torch.float64, requires_grad=True)
    s = attnkit.scores.Cosine() if score == "cosine" else attnkit.scores.General(5).double()
    fast, ref = run(q, k, v, "tiled", score=s, mask=masks.causal()), run(q, k, v, "reference", score=s,
                                                                       mask=masks.causal())
    assert calls == {"forward": 1, "backward": 1}
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], fast, ref):
        assert_close(a, b, name=name)


def test_the_fused_path_can_be_switched_off(calls, monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(fuse=False))
    q, k, v = make_qkv(1, 2, 30, D=4)
    attnkit.attention(q, k, v, backend="tiled", mask=masks.causal())
    assert calls["forward"] == 0


def test_fused_plans_have_long_full_runs_and_short_partial_runs():
    from attnkit.spec import canonicalize

    x = torch.zeros(1, 1, 4096, 8)
    spec = canonicalize(x, x, x, mask=masks.causal() & masks.from_mod(lambda b, h, i, j: (j % 7) != 3))
    plan = plan_module.make_plan(spec, 128, 128, 4096, partial_chunk=256)
    assert max(r.stop - r.start for runs in plan.runs for r in runs if r.partial) == 256
    spec = canonicalize(x, x, x, mask=masks.causal())
    plan = plan_module.make_plan(spec, 128, 128, 4096, partial_chunk=256)
    last = plan.runs[-1]
    assert [(r.start, r.stop, r.partial) for r in last] == [(0, 3968, False), (3968, 4096, True)]


def test_mixed_runs_join_full_tiles_to_short_partial_runs():
    from attnkit.spec import canonicalize

    x = torch.zeros(1, 1, 2048, 8)
    spec = canonicalize(x, x, x, mask=masks.sliding_window(256))
    plain = plan_module.make_plan(spec, 128, 128, 2048, partial_chunk=1024)
    mixed = plan_module.make_plan(spec, 128, 128, 2048, partial_chunk=1024, mix=True)
    assert [len(r) for r in plain.runs[4:]] == [3] * 12  # partial, full, partial
    assert [[(r.start, r.stop, r.partial) for r in runs] for runs in mixed.runs[4:6]] == [
        [(256, 640, True)], [(384, 768, True)]]
    assert mixed.runs[4][0].full_parts == ((384, 512),)  # the predicate skips the full middle tile
    spec = canonicalize(x, x, x, mask=masks.causal())
    mixed = plan_module.make_plan(spec, 128, 128, 2048, partial_chunk=512, mix=True)
    assert [(r.start, r.stop, r.partial) for r in mixed.runs[3]] == [(0, 512, True)]
    assert [(r.start, r.stop, r.partial) for r in mixed.runs[8]] == [(0, 1024, False), (1024, 1152, True)]


def test_long_rows_use_taller_query_blocks_and_weights_stay_exact(monkeypatch):
    import attnkit.backends.tiled as backend_mod

    plans = []
    real = backend_mod.make_plan
    monkeypatch.setattr(backend_mod, "make_plan", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend())
    q, k, v = make_qkv(1, 2, 2300, D=8, dtype=torch.float64)
    kw = dict(mask=masks.causal(), bias=positions.ALiBi(2))
    rows = [0, 127, 128, 255, 256, 1000, 1023, 1024, 1025, 2047, 2048, 2299]
    fused_plans = []
    real_fused = kernel.fused_forward
    monkeypatch.setattr(kernel, "fused_forward", lambda *a: fused_plans.append(a[4]) or real_fused(*a))
    out = attnkit.attention(q, k, v, backend="tiled", **kw)
    # causal rows average > 1024 keys: full runs in 1,024-row blocks, the diagonal in 256-row
    # blocks whose squares the kernel masks itself
    (plan,) = fused_plans
    heights = {qe - qs for qs, qe in plan.q_blocks}
    assert plan.block_q == 256 and heights >= {1024, 256} and sum(r.causal for rs in plan.runs for r in rs) == 9
    monkeypatch.setattr(kernel, "fused_forward", real_fused)
    assert_close(out, attnkit.attention(q, k, v, backend="reference", **kw))
    plans.clear()
    # weights asked for: the tallest one-level blocks that leave <= 1/4 of the area partial
    out, w = attnkit.attention(q, k, v, backend="tiled", return_weights=attnkit.WeightsRequest(rows=rows), **kw)
    assert [p.block_q for p in plans] == [128, 1024, 512, 256]
    ref_out, ref_w = attnkit.attention(q, k, v, backend="reference", return_weights=True, **kw)
    assert_close(out, ref_out)
    assert_close(w, ref_w[:, :, rows])
    plans.clear()
    attnkit.attention(q, k, v, backend="tiled", mask=masks.sliding_window(256))
    assert [p.block_q for p in plans] == [128]  # short rows keep 128
    plans.clear()
    layout = torch.rand(18, 18, generator=torch.Generator().manual_seed(0)) < 0.7
    used = []
    real_fwd = kernel.fused_forward
    monkeypatch.setattr(kernel, "fused_forward", lambda *a: used.append(a[4].block_q) or real_fwd(*a))
    out = attnkit.attention(q, k, v, backend="tiled", mask=masks.block_sparse(layout, 128))
    assert [p.block_q for p in plans] == [128, 1024, 512, 256] and used == [128]  # taller would mix layout rows
    assert plans[0].live_tiles > 0 and all(not r.partial for runs in plans[0].runs for r in runs)
    assert_close(out, attnkit.attention(q, k, v, backend="reference", mask=masks.block_sparse(layout, 128)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_bias_tensor_without_gradient_takes_the_fused_path(temperature, calls):
    q, k, v = make_qkv(2, 4, 37, 29, D=6, Hkv=2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 1, 37, 29, dtype=torch.float64)  # per batch, shared by the heads
    kw = dict(bias=[bias, positions.ALiBi(4)], mask=masks.causal(), scale=0.3,
              normalizer=attnkit.normalizers.Softmax(temperature))
    fast, ref = run(q, k, v, "tiled", **kw), run(q, k, v, "reference", **kw)
    assert calls == {"forward": 1, "backward": 1}
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], fast, ref):
        assert_close(a, b, name=name)


def test_relative_buckets_at_inference_take_the_fused_path(calls):
    t5 = positions.T5RelativeBias(num_heads=4, num_buckets=8, max_distance=16).double()
    q, k, v = make_qkv(1, 4, 50, 50, D=8, dtype=torch.float64)
    with torch.no_grad():
        out = attnkit.attention(q, k, v, bias=t5, mask=masks.sliding_window(20), backend="tiled")
        ref = attnkit.attention(q, k, v, bias=t5, mask=masks.sliding_window(20), backend="reference")
    assert calls["forward"] == 1
    assert_close(out, ref)


def test_auto_sends_masked_and_biased_requests_to_tiled_from_512_tokens():
    x = torch.randn(1, 8, 512, 8)  # 2M scores: past the size where auto prefers the reference
    alibi = dict(bias=positions.ALiBi(8), mask=masks.causal())
    assert attnkit.explain(x, x, x, **alibi).backend == "tiled"
    assert attnkit.explain(x, x, x, mask=masks.sliding_window(64)).backend == "tiled"
    assert attnkit.explain(x, x, x, dropout_p=0.1, **alibi).backend == "sdpa"  # the eager body: dense wins
    small = x[:, :, :256]
    assert attnkit.explain(small, small, small, **alibi).backend == "sdpa"
    long = torch.randn(1, 8, 4096, 8)
    pad = masks.key_padding(torch.tensor([4000]))  # a (B, 1, 1, Tk) row for SDPA: nothing dense
    assert attnkit.explain(long, long, long, mask=pad).backend == "sdpa"


def test_a_bias_tensor_that_is_minus_infinity_on_whole_rows_gives_zeros(calls):
    q, k, v = make_qkv(1, 2, 40, 40, D=4, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, 1, 40, 40, dtype=torch.float64)
    bias[..., 5, :] = float("-inf")  # row 5 sees nothing
    bias[..., 9, 20:] = float("-inf")  # row 9 sees nothing in the second run of its block
    fast, ref = run(q, k, v, "tiled", bias=bias), run(q, k, v, "reference", bias=bias)
    assert calls["forward"] == 1
    assert torch.all(fast[0][:, :, 5] == 0)
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], fast, ref):
        assert_close(a, b, name=name)


def test_long_full_runs_are_cut_in_the_backward(calls, monkeypatch):
    # B·H·(D + Dv)·8 bytes = 1 KiB per key: the backward's kernel calls see at most 16 keys of a
    # full run (runs with partial tiles are at most kv_chunk = 24 keys)
    monkeypatch.setattr(kernel, "_CALL_BYTES", 16 << 10)
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(block_q=16, block_k=8, kv_chunk=24))
    widths = []
    backward = kernel._FLASH_BACKWARD

    def spy(dout, q, k, *rest, **kw):
        widths.append(k.shape[2])
        return backward(dout, q, k, *rest, **kw)

    monkeypatch.setattr(kernel, "_FLASH_BACKWARD", spy)
    q, k, v = make_qkv(2, 4, 70, 90, D=8, dtype=torch.float64, requires_grad=True)
    kw = dict(mask=masks.causal(), bias=positions.ALiBi(4))
    fast, ref = run(q, k, v, "tiled", **kw), run(q, k, v, "reference", **kw)
    assert calls["backward"] == 1
    assert max(widths) <= 24 and 16 in widths
    for name, a, b in zip(["out", "weights", "dq", "dk", "dv"], fast, ref):
        assert_close(a, b, name=name)


def test_fused_plans_scale_the_queries_only_where_the_eager_body_or_a_bias_reads_them():
    """The kernel takes the scale itself (no pass over q and dq), except where a row-separable bias
    rides on prescaled queries (ALiBi) or the weights come from the eager tile body (which would
    otherwise scale every tile); the results agree with the reference either way."""
    from attnkit.spec import canonicalize

    q, k, v = make_qkv(1, 2, 300, D=16, dtype=torch.float64)
    b = TiledBackend(block_q=64, block_k=64)
    for kw, prescaled in [({}, False), ({"return_weights": True}, True),
                          ({"bias": positions.ALiBi(2)}, True)]:
        spec = canonicalize(q, k, v, mask=masks.sliding_window(40), **kw)
        qp, _, _, plan, _, _ = b.setup(q, k, v, spec)
        assert plan.fused and plan.prescaled == prescaled
        assert torch.equal(qp, q * spec.scale) if prescaled else qp is q
        got = attnkit.attention(q, k, v, mask=masks.sliding_window(40), backend="tiled", **kw)
        ref = attnkit.attention(q, k, v, mask=masks.sliding_window(40), backend="reference", **kw)
        for a, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            assert_close(a, r)
