"""Fused-backward combinations of the tiled backend that the other tests leave out: GQA/MQA with
ALiBi under every mask, biases with every kind of mask, Tq > Tk with a bias, rows left without
keys under a prescaled bias, frozen and learnable T5 buckets, bfloat16 and float32 against a
float64 gold, and the tall (``long_row_blocks``) plans.

Each case runs the tiled backend twice -- its fused body (asserting that the fused forward and
backward really ran, or that the request really fell back to the eager body) and its eager body
(``fuse=False``) -- against the reference: output, weights, and the gradients of q, k, v (and of
learnable bias parameters where they apply). Small tiles (16 x 8) make several tiles, runs and
ragged tiles at T ~ 20-70.
"""

import pytest
import torch

import attnkit
import attnkit.backends.tiled as backend_mod
import attnkit.kernels.fused as kernel
from attnkit import masks, positions
from attnkit.backends.tiled import TiledBackend
from attnkit.testing import assert_close, assert_matches_float64_gold, make_qkv

from .test_tiled import MASKS

F64 = torch.float64


def fused_small():
    return TiledBackend(block_q=16, block_k=8)


def eager_small():
    return TiledBackend(block_q=16, block_k=8, kv_chunk=24, fuse=False)


def tall_small():
    """Plans whose query blocks see >= 32 keys on average switch from 16 to 32 rows (when at most a
    quarter of the tall plan's area is partial: ``kv_chunk=32`` keeps partial (mixed) runs short)."""
    b = TiledBackend(block_q=16, block_k=8, kv_chunk=32)
    b.long_row_keys, b.long_row_blocks, b.causal_blocks = 32, (32,), (32, 16)
    return b


@pytest.fixture
def calls(monkeypatch):
    """Counts fused forward/backward calls and records the block_q of each fused forward's plan."""
    seen = {"forward": 0, "backward": 0, "block_q": [], "causal_runs": []}
    fwd, bwd = kernel.fused_forward, kernel.fused_backward

    def count_fwd(qp, kp, v, spec, plan):
        seen["forward"] += 1
        seen["block_q"].append(plan.block_q)
        seen["causal_runs"].append(sum(r.causal for runs in plan.runs for r in runs))
        return fwd(qp, kp, v, spec, plan)

    def count_bwd(*a, **kw):
        seen["backward"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(kernel, "fused_forward", count_fwd)
    monkeypatch.setattr(kernel, "fused_backward", count_bwd)

    def reset():
        seen.update(forward=0, backward=0, block_q=[], causal_runs=[])

    seen["reset"] = reset
    return seen


def counts(calls):
    return {"forward": calls["forward"], "backward": calls["backward"]}


def run(q, k, v, backend, params=(), **kw):
    """(out, weights, dq, dk, dv, *dparams) of one attention call."""
    out, w = attnkit.attention(q, k, v, backend=backend, return_weights=True, **kw)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out, w, *torch.autograd.grad(out, (q, k, v, *params), dout))


def names_for(params):
    return ["out", "weights", "dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))]


def check_all(q, k, v, monkeypatch, calls, *, fused: bool, params=(), backend=None, **kw):
    """Reference vs tiled (fused body unless ``fused`` is False: then the request must fall back
    to the eager body) vs tiled with ``fuse=False``. Returns the three results."""
    ref = run(q, k, v, "reference", params, **kw)
    results = []
    for tiled in (backend or fused_small(), eager_small()):
        monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", tiled)
        calls["reset"]()
        res = run(q, k, v, "tiled", params, **kw)
        if tiled.fuse:
            want = {"forward": 1, "backward": 1} if fused else {"forward": 0, "backward": 0}
            assert counts(calls) == want, f"fused body expected: {fused}; calls: {counts(calls)}"
        else:
            assert counts(calls) == {"forward": 0, "backward": 0}
        for name, a, b in zip(names_for(params), res, ref):
            assert torch.isfinite(a).all(), f"{name}: non-finite values ({'fused' if tiled.fuse else 'eager'})"
            assert_close(a, b, name=f"{name} ({'fused' if tiled.fuse else 'eager'} body)")
        results.append(res)
    return ref, *results


def frozen_t5(H=4):
    t5 = positions.T5RelativeBias(num_heads=H, num_buckets=8, max_distance=16).double()
    with torch.no_grad():
        t5.embedding.weight.copy_(torch.randn(8, H, dtype=F64, generator=torch.Generator().manual_seed(3)))
    return t5.requires_grad_(False)


# --- 1. GQA / MQA with ALiBi under every mask ---------------------------------------------------

@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("Tq,Tk", [(37, 37), (29, 53), (53, 29)])
@pytest.mark.parametrize("Hkv", [2, 1], ids=["gqa", "mqa"])
def test_gqa_mqa_alibi_under_every_mask(mask_name, Tq, Tk, Hkv, calls, monkeypatch):
    B = 2
    q, k, v = make_qkv(B, 4, Tq, Tk, D=5, Hkv=Hkv, dtype=F64, requires_grad=True)
    check_all(q, k, v, monkeypatch, calls, fused=True, mask=MASKS[mask_name](Tq, Tk, B), bias=positions.ALiBi(4))


@pytest.mark.parametrize("H,Hkv", [(12, 4), (12, 1), (10, 2)])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_alibi_with_slopes_that_are_not_powers_of_two_float64(H, Hkv, mask, calls, monkeypatch):
    # regression: ALiBi.key_bias rounded slopes to float32, so float64 prescaled plans erred by
    # ~3e-7 when H has slopes that are not powers of two (H = 10, 12, ...)
    q, k, v = make_qkv(2, H, 37, 41, D=5, Hkv=Hkv, dtype=F64, requires_grad=True)
    check_all(q, k, v, monkeypatch, calls, fused=True, mask=None if mask is None else masks.causal(),
              bias=positions.ALiBi(H))


@pytest.mark.parametrize("H,Hkv", [(12, 4), (12, 1), (10, 2)])
def test_alibi_with_slopes_that_are_not_powers_of_two_float32_gold(H, Hkv, calls, monkeypatch):
    q, k, v = make_qkv(2, H, 67, D=5, Hkv=Hkv, dtype=F64, requires_grad=True)
    for tiled in (fused_small(), eager_small()):
        monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", tiled)
        calls["reset"]()
        assert_matches_float64_gold(q, k, v, "tiled", mask=masks.causal(), bias=positions.ALiBi(H))
        assert calls["forward"] == (1 if tiled.fuse else 0)


# --- 2. every bias with every kind of mask --------------------------------------------------------

BIASES = ["alibi", "t5_frozen", "tensor", "alibi+tensor", "softcap"]


def make_bias(name, B, H, Tq, Tk):
    if name == "alibi":
        return positions.ALiBi(H)
    if name == "t5_frozen":
        return frozen_t5(H)
    g = torch.Generator().manual_seed(1)
    if name == "tensor":
        return torch.randn(B, H, Tq, Tk, dtype=F64, generator=g)
    if name == "alibi+tensor":
        return [positions.ALiBi(H), torch.randn(B, 1, Tq, Tk, dtype=F64, generator=g)]
    if name == "softcap":
        return positions.softcap(1.5)
    raise ValueError(name)


MASKS2 = {
    "key_padding": lambda Tq, Tk, B: masks.key_padding(torch.tensor([Tk, Tk // 2 + 1, 3])[:B]),
    "bool_tensor": lambda Tq, Tk, B: torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(2)) > 0.3,
    "mask_mod": lambda Tq, Tk, B: (lambda b, h, i, j: ((i * 7 + j * 3 + h) % 4 != 0) & (j <= i + 10)),
    "window|longformer": lambda Tq, Tk, B: masks.sliding_window(6) | masks.longformer(2, [0, 17]),
    "window|global_token": lambda Tq, Tk, B: masks.sliding_window(5, 2) | masks.from_mod(
        lambda b, h, i, j: (j == 3) | (i == 1)),
    "causal_top_left": lambda Tq, Tk, B: masks.causal(align="top_left"),
}


@pytest.mark.parametrize("bias_name", BIASES)
@pytest.mark.parametrize("mask_name", list(MASKS2))
@pytest.mark.parametrize("Tq,Tk", [(37, 37), (29, 45)])
def test_biases_with_every_kind_of_mask(bias_name, mask_name, Tq, Tk, calls, monkeypatch):
    B, H = 3, 4
    q, k, v = make_qkv(B, H, Tq, Tk, D=5, Hkv=2, dtype=F64, requires_grad=True)
    check_all(q, k, v, monkeypatch, calls, fused=bias_name != "softcap", mask=MASKS2[mask_name](Tq, Tk, B),
              bias=make_bias(bias_name, B, H, Tq, Tk))


def test_values_narrower_than_keys_fall_back_to_the_eager_body(calls, monkeypatch):
    q, k, v = make_qkv(2, 4, 37, 29, D=5, Dv=3, Hkv=2, dtype=F64, requires_grad=True)
    check_all(q, k, v, monkeypatch, calls, fused=False, mask=masks.causal() & masks.key_padding(torch.tensor([29, 11])),
              bias=positions.ALiBi(4))


# --- 3. Tq > Tk with a bias -----------------------------------------------------------------------

@pytest.mark.parametrize("bias_name", ["alibi", "tensor", "t5_frozen", "alibi+tensor"])
@pytest.mark.parametrize("mask", [None, "causal", "causal_top_left"])
def test_more_queries_than_keys_with_a_bias(bias_name, mask, calls, monkeypatch):
    B, H, Tq, Tk = 2, 4, 53, 29
    q, k, v = make_qkv(B, H, Tq, Tk, D=5, Hkv=2, dtype=F64, requires_grad=True)
    m = {None: None, "causal": masks.causal(), "causal_top_left": masks.causal(align="top_left")}[mask]
    ref, fused, eager = check_all(q, k, v, monkeypatch, calls, fused=True, mask=m,
                                  bias=make_bias(bias_name, B, H, Tq, Tk))
    if mask == "causal":  # bottom-right: the first Tq - Tk queries see no key
        for res in (ref, fused, eager):
            assert torch.all(res[0][:, :, :Tq - Tk] == 0) and torch.all(res[2][:, :, :Tq - Tk] == 0)


# --- 4. rows left without keys under a prescaled (or per-run) bias -----------------------------------

@pytest.mark.parametrize("bias_name", ["alibi", "tensor", "t5_frozen", "alibi+tensor"])
@pytest.mark.parametrize("Tq,Tk,Hkv", [(40, 40, 4), (45, 31, 2), (31, 45, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["rows", "rows&causal"])
def test_rows_without_keys_give_exact_zeros_with_a_bias(bias_name, Tq, Tk, Hkv, causal, calls, monkeypatch):
    B, H = 2, 4
    q, k, v = make_qkv(B, H, Tq, Tk, D=5, Hkv=Hkv, dtype=F64, requires_grad=True)
    m = masks.from_mod(lambda b, h, i, j: (i % 5 != 0) & ((j + i) % 3 != 1))  # rows 0, 5, 10, ... are dead
    if causal:
        m = m & masks.causal()
    results = check_all(q, k, v, monkeypatch, calls, fused=True, mask=m, bias=make_bias(bias_name, B, H, Tq, Tk))
    for out, w, dq, dk, dv in results:
        assert torch.all(out[:, :, ::5] == 0), "dead rows must give exactly 0 output"
        assert torch.all(w[:, :, ::5] == 0), "dead rows must give exactly 0 weights"
        assert torch.all(dq[:, :, ::5] == 0), "dead rows must give exactly 0 dq"
        for x in (out, w, dq, dk, dv):
            assert not torch.isnan(x).any()


# --- 5. T5 buckets: frozen (fused backward), learnable (eager body, embedding gradient) ---------------

@pytest.mark.parametrize("mask", [None, "causal", "window", "padding"])
@pytest.mark.parametrize("Tq,Tk", [(37, 37), (23, 61)])
def test_frozen_t5_bias_runs_the_fused_backward(mask, Tq, Tk, calls, monkeypatch):
    B = 2
    q, k, v = make_qkv(B, 4, Tq, Tk, D=5, Hkv=2, dtype=F64, requires_grad=True)
    m = {None: None, "causal": masks.causal(), "window": masks.sliding_window(9, 3),
         "padding": masks.key_padding(torch.tensor([Tk, Tk - 20]))}[mask]
    t5 = frozen_t5()
    check_all(q, k, v, monkeypatch, calls, fused=True, mask=m, bias=t5)
    assert t5.embedding.weight.grad is None


@pytest.mark.parametrize("mask", [None, "causal", "window"])
@pytest.mark.parametrize("Tq,Tk", [(37, 37), (23, 61)])
def test_learnable_t5_bias_uses_the_eager_body_and_gets_its_gradient(mask, Tq, Tk, calls, monkeypatch):
    q, k, v = make_qkv(2, 4, Tq, Tk, D=5, Hkv=2, dtype=F64, requires_grad=True)
    m = {None: None, "causal": masks.causal(), "window": masks.sliding_window(9, 3)}[mask]
    t5 = frozen_t5().requires_grad_(True)
    ref, fused, eager = check_all(q, k, v, monkeypatch, calls, fused=False, params=(t5.embedding.weight,),
                                  mask=m, bias=t5)
    assert ref[-1].abs().sum() > 0  # the embedding gradient compared above is not trivially zero
    # and through .backward() into .grad, as a training loop reads it
    grads = []
    for backend in ("reference", "tiled"):
        t5.zero_grad(set_to_none=True)
        out = attnkit.attention(q, k, v, backend=backend, mask=m, bias=t5)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        grads.append(t5.embedding.weight.grad.clone())
    assert_close(grads[1], grads[0], name="t5.embedding.weight.grad")


@pytest.mark.parametrize("mask", [None, "causal", "padding"])
@pytest.mark.parametrize("with_alibi", [False, True], ids=["tensor", "alibi+tensor"])
def test_learnable_bias_tensor_uses_the_eager_body_and_gets_its_gradient(mask, with_alibi, calls, monkeypatch):
    B, H, Tq, Tk = 2, 4, 37, 45
    q, k, v = make_qkv(B, H, Tq, Tk, D=5, Hkv=2, dtype=F64, requires_grad=True)
    bias = torch.randn(B, 1, Tq, Tk, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    m = {None: None, "causal": masks.causal(), "padding": masks.key_padding(torch.tensor([45, 20]))}[mask]
    check_all(q, k, v, monkeypatch, calls, fused=False, params=(bias,), mask=m,
              bias=[positions.ALiBi(H), bias] if with_alibi else bias)


@pytest.mark.parametrize("bias_name", ["t5_frozen", "tensor", "alibi+tensor", "alibi"])
@pytest.mark.parametrize("mask", ["padding", "causal"])
def test_full_runs_cut_in_the_backward_with_biases(bias_name, mask, calls, monkeypatch):
    monkeypatch.setattr(kernel, "_CALL_BYTES", 2 * 2 * 4 * (5 + 5) * 8)  # 2 keys of dk, dv: cut at block_k
    B, H, Tq, Tk = 2, 4, 45, 70
    q, k, v = make_qkv(B, H, Tq, Tk, D=5, Hkv=2, dtype=F64, requires_grad=True)
    m = masks.key_padding(torch.tensor([70, 50])) if mask == "padding" else masks.causal()
    check_all(q, k, v, monkeypatch, calls, fused=True, mask=m, bias=make_bias(bias_name, B, H, Tq, Tk))


# --- 6. bfloat16 through the tiled backend against a float64 gold -----------------------------------

BF16_CASES = {
    "causal": dict(mask=masks.causal()),
    "window": dict(mask=masks.sliding_window(9)),
    "alibi+causal": dict(mask=masks.causal(), bias=positions.ALiBi(4)),
    "key_padding": dict(mask=masks.key_padding(torch.tensor([61, 30]))),
}


@pytest.mark.parametrize("case", list(BF16_CASES))
@pytest.mark.parametrize("Hkv", [4, 2])
def test_bfloat16_against_float64_gold(case, Hkv, calls, monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", fused_small())
    q, k, v = make_qkv(2, 4, 61, D=5, Hkv=Hkv, dtype=F64, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "tiled", dtype=torch.bfloat16, **BF16_CASES[case])
    # bf16 is accumulated in float32, which the fused body serves
    assert counts(calls) == {"forward": 1, "backward": 1}
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", eager_small())
    assert_matches_float64_gold(q, k, v, "tiled", dtype=torch.bfloat16, **BF16_CASES[case])


# --- 7. float32 against a float64 gold: GQA, MQA, B > 1 with per-batch padding ------------------------

@pytest.mark.parametrize("Hkv", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("case", ["causal", "alibi+causal", "padding", "padding&causal+alibi", "window+t5"])
def test_float32_gqa_and_batches_against_float64_gold(Hkv, case, calls, monkeypatch):
    B, H, T = 3, 4, 67
    pad = masks.key_padding(torch.tensor([67, 40, 9]))
    kw = {"causal": dict(mask=masks.causal()),
          "alibi+causal": dict(mask=masks.causal(), bias=positions.ALiBi(H)),
          "padding": dict(mask=pad),
          "padding&causal+alibi": dict(mask=pad & masks.causal(), bias=positions.ALiBi(H)),
          "window+t5": dict(mask=masks.sliding_window(11), bias=frozen_t5(H).float())}[case]
    q, k, v = make_qkv(B, H, T, D=5, Hkv=Hkv, dtype=F64, requires_grad=True)
    for tiled in (fused_small(), eager_small()):
        monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", tiled)
        calls["reset"]()
        assert_matches_float64_gold(q, k, v, "tiled", **kw)
        assert counts(calls) == ({"forward": 1, "backward": 1} if tiled.fuse else {"forward": 0, "backward": 0})


# --- 8. tall query blocks (long_row_blocks) beyond causal + ALiBi with H = Hkv ------------------------

TALL = {
    # name: (B, Hkv, Tq, Tk, kwargs builder)
    "gqa_alibi": (2, 2, 70, 70, lambda B, Tq, Tk: dict(bias=positions.ALiBi(4))),
    "mqa_alibi_causal": (1, 1, 260, 260, lambda B, Tq, Tk: dict(mask=masks.causal(), bias=positions.ALiBi(4))),
    "gqa_key_padding": (2, 2, 70, 70, lambda B, Tq, Tk: dict(mask=masks.key_padding(torch.tensor([70, 60])))),
    "key_padding_alibi": (2, 4, 70, 70, lambda B, Tq, Tk: dict(mask=masks.key_padding(torch.tensor([67, 70])),
                                                                 bias=positions.ALiBi(4))),
    "window": (1, 2, 400, 400, lambda B, Tq, Tk: dict(mask=masks.sliding_window(300))),
    "window_alibi": (1, 4, 400, 400, lambda B, Tq, Tk: dict(mask=masks.sliding_window(290, 10),
                                                              bias=positions.ALiBi(4))),
    "t5_frozen": (2, 2, 70, 70, lambda B, Tq, Tk: dict(bias=frozen_t5())),
    "t5_frozen_causal": (1, 2, 260, 260, lambda B, Tq, Tk: dict(mask=masks.causal(), bias=frozen_t5())),
    "tq<tk_causal_alibi": (2, 2, 45, 300, lambda B, Tq, Tk: dict(mask=masks.causal(), bias=positions.ALiBi(4))),
    "tq>tk_alibi": (2, 2, 100, 70, lambda B, Tq, Tk: dict(bias=positions.ALiBi(4))),
    "tq>tk_tensor_bias": (2, 2, 100, 45, lambda B, Tq, Tk: dict(
        bias=torch.randn(B, 4, Tq, Tk, dtype=F64, generator=torch.Generator().manual_seed(4)))),
    "tq>tk_causal_top_left_alibi": (1, 2, 150, 45, lambda B, Tq, Tk: dict(mask=masks.causal(align="top_left"),
                                                                          bias=positions.ALiBi(4))),
}


@pytest.mark.parametrize("case", list(TALL))
def test_tall_query_blocks(case, calls, monkeypatch):
    B, Hkv, Tq, Tk, build = TALL[case]
    plans = []
    real = backend_mod.make_plan
    monkeypatch.setattr(backend_mod, "make_plan", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    q, k, v = make_qkv(B, 4, Tq, Tk, D=5, Hkv=Hkv, dtype=F64, requires_grad=True)
    kw = build(B, Tq, Tk)
    ref = run(q, k, v, "reference", **kw)
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", tall_small())
    calls["reset"]()
    fast = run(q, k, v, "tiled", **kw)
    assert counts(calls) == {"forward": 1, "backward": 1}
    # (weights are asked for: a causal mask keeps one-level blocks, see test_stacked.py for the
    # two-level causal plan)
    assert [p.block_q for p in plans] == [16, 32] and calls["block_q"] == [32], "the tall plan must be taken"
    for name, a, b in zip(names_for(()), fast, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, name=name)
    # the same request in float32 against the float64 gold
    calls["reset"]()
    assert_matches_float64_gold(q, k, v, "tiled", **kw)
    # without weights, a causal mask whose last query sees the last key takes the two-level plan
    # (its diagonal in 16-row blocks) when its biases are row-separable (T5 buckets are not)
    two_level = type(kw.get("mask")) is masks.Causal and "top_left" not in case and "t5" not in case
    assert calls["block_q"] == [16 if two_level else 32]
