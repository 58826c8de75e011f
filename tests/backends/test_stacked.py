"""Stacked kernel calls of the fused tile body (runs of one shape in consecutive query blocks go
to the kernel as one call): the stacks partition the plan, the calls are few, and every way a
stack's mask is built (once for a translation-invariant mask or bias, per item otherwise) gives
the reference's output and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
import attnkit.kernels.fused as kernel
from attnkit import masks, positions
from attnkit.backends.tiled import TiledBackend
from attnkit.kernels.plan import causal_plan, gather_runs, make_plan, stack_runs
from attnkit.spec import canonicalize
from attnkit.testing import assert_close, make_qkv


def _pairs_of_plan(plan):
    return sorted((qs, r.start, r.stop, r.partial, r.full_parts, r.causal)
                  for (qs, _), runs in zip(plan.q_blocks, plan.runs) for r in runs)


def _pairs_of_stacks(stacks):
    out = []
    for s in stacks:
        for i in range(s.n):
            it = s.part(i, 1)
            out.append((it.q0, it.run.start, it.run.stop, it.run.partial, it.run.full_parts, it.run.causal))
    return sorted(out)


MASK_FAMILIES = {
    "none": lambda T: None,
    "causal": lambda T: masks.causal(),
    "window": lambda T: masks.sliding_window(T // 3 + 1),
    "window both ways": lambda T: masks.sliding_window(5, 11),
    "padding": lambda T: masks.key_padding(torch.tensor([T // 2 + 1])),
    "block sparse": lambda T: masks.block_sparse(torch.rand(-(-T // 8), -(-T // 8),
                                                            generator=torch.Generator().manual_seed(T)) < 0.5, 8),
}


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 200), block=st.sampled_from([8, 16, 32]), chunk=st.sampled_from([16, 64, 1024]),
       name=st.sampled_from(sorted(MASK_FAMILIES)))
def test_the_stacks_hold_every_run_of_the_plan_once(T, block, chunk, name):
    q, k, v = make_qkv(1, 2, T, D=4)
    spec = canonicalize(q, k, v, mask=MASK_FAMILIES[name](T))
    plan = make_plan(spec, block, block, chunk, partial_chunk=min(chunk, 64), mix=True)
    stacks = stack_runs(plan)
    assert _pairs_of_stacks(stacks) == _pairs_of_plan(plan)
    for s in stacks:  # one shape per stack, items whole query blocks apart
        assert s.n >= 1 and (s.n == 1 or s.step % block == 0)
        assert all(s.part(i, 1).rows == s.rows for i in range(s.n))


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 200), block=st.sampled_from([8, 16]), density=st.floats(0.05, 0.6),
       max_keys=st.sampled_from([8, 40, 10_000]), seed=st.integers(0, 10))
def test_stacks_and_gathers_hold_every_run_of_the_plan_once(T, block, density, max_keys, seed):
    nb = -(-T // block)
    layout = torch.rand(nb, nb, generator=torch.Generator().manual_seed(seed)) < density
    q, k, v = make_qkv(1, 2, T, D=4)
    spec = canonicalize(q, k, v, mask=masks.block_sparse(layout, block))
    plan = make_plan(spec, block, block, 1024, partial_chunk=64, mix=True)
    stacks, gathers = gather_runs(stack_runs(plan), max_keys)
    gathered = [(g.q0, r.start, r.stop, r.partial, r.full_parts, r.causal) for g in gathers for r in g.runs]
    assert sorted(_pairs_of_stacks(stacks) + gathered) == _pairs_of_plan(plan)
    for g in gathers:  # full runs of one query block, two or more, within the budget unless alone
        assert len(g.runs) >= 2 or g.length > max_keys or any(h.q0 == g.q0 and h is not g for h in gathers)
        assert all(not r.partial and not r.causal for r in g.runs)
        assert g.length <= max_keys or len(g.runs) == 1
        assert torch.equal(g.keys(), torch.cat([torch.arange(r.start, r.stop) for r in g.runs]))


@settings(max_examples=80, deadline=None)
@given(Tq=st.integers(2, 300), extra=st.integers(0, 40), fine=st.sampled_from([4, 8, 16]),
       ratio=st.sampled_from([1, 2, 4]), align=st.sampled_from(["bottom_right", "top_left"]))
def test_a_causal_plan_reads_every_live_key_of_every_row_once(Tq, extra, fine, ratio, align):
    Tk = Tq + extra if align == "bottom_right" else Tq
    q, k, v = make_qkv(1, 1, Tq, Tk, D=2)
    spec = canonicalize(q, k, v, mask=masks.causal(align=align))
    plan = causal_plan(spec, fine * ratio, fine, 8)
    assert plan is not None
    seen = torch.zeros(Tq, Tk, dtype=torch.int64)
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        for r in runs:
            if r.causal:  # the block's own square, causal from its corner
                assert r.stop - r.start == qe - qs and not r.partial
                seen[qs:qe, r.start:r.stop] += torch.ones(qe - qs, qe - qs, dtype=torch.int64).tril()
            else:
                assert not r.partial
                seen[qs:qe, r.start:r.stop] += 1
    assert torch.equal(seen, masks.causal(align=align).materialize(Tq, Tk)[0, 0].long())
    assert _pairs_of_stacks(stack_runs(plan)) == _pairs_of_plan(plan)


def _two_level_small():
    b = TiledBackend(block_q=16, block_k=8, kv_chunk=32)
    b.long_row_keys, b.causal_blocks = 8, (32, 8)
    return b


@pytest.mark.parametrize("Tq,Tk,H,Hkv", [(100, 100, 4, 4), (77, 130, 4, 2), (33, 33, 2, 1), (129, 129, 4, 4)])
@pytest.mark.parametrize("bias", [None, "alibi", "alibi/temperature"])
def test_the_two_level_causal_plan_matches_the_reference(kernel_calls, monkeypatch, Tq, Tk, H, Hkv, bias):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", _two_level_small())
    q, k, v = make_qkv(2, H, Tq, Tk, D=6, Hkv=Hkv, dtype=torch.float64, requires_grad=True, noncontiguous=True)
    kw = dict(mask=masks.causal(), bias=positions.ALiBi(H) if bias else None,
              normalizer=attnkit.normalizers.Softmax(0.7 if bias == "alibi/temperature" else 1.0))
    _assert_same(_grads(q, k, v, "tiled", **kw), _grads(q, k, v, "reference", **kw))
    assert any(n > 1 for n, _ in kernel_calls["forward"])  # the diagonal squares go as one call


def test_the_two_level_causal_plan_in_float32_against_the_float64_gold(monkeypatch):
    from attnkit.testing import assert_matches_float64_gold

    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", _two_level_small())
    q, k, v = make_qkv(1, 4, 150, D=8, dtype=torch.float64, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "tiled", mask=masks.causal(), bias=positions.ALiBi(4))


def test_a_causal_plan_is_only_for_a_causal_mask_whose_last_query_sees_the_last_key():
    for mask, Tq, Tk in [(masks.sliding_window(4), 30, 30), (masks.causal(align="top_left"), 20, 30),
                         (masks.causal(), 30, 20), (masks.causal() & masks.key_padding(torch.tensor([9])), 30, 30)]:
        q, k, v = make_qkv(1, 1, Tq, Tk, D=2)
        assert causal_plan(canonicalize(q, k, v, mask=mask), 16, 8, 8) is None


def test_a_sliding_window_is_one_stack_past_its_first_blocks():
    q, k, v = make_qkv(1, 2, 1024, D=4)
    spec = canonicalize(q, k, v, mask=masks.sliding_window(256))
    plan = make_plan(spec, 128, 128, 1024, partial_chunk=1024, mix=True)
    stacks = stack_runs(plan)
    assert max(s.n for s in stacks) == 1024 // 128 - 2  # blocks 2..7 see the same run shape
    assert len(stacks) == 3


@pytest.fixture
def kernel_calls(monkeypatch):
    seen = {"forward": [], "backward": []}
    fwd, bwd = kernel._FLASH, kernel._FLASH_BACKWARD

    def spy_fwd(q, k, v, *a, **kw):
        seen["forward"].append((q.shape[0], kw.get("attn_mask")))
        return fwd(q, k, v, *a, **kw)

    def spy_bwd(*a, **kw):
        seen["backward"].append(a[1].shape[0])
        return bwd(*a, **kw)

    monkeypatch.setattr(kernel, "_FLASH", spy_fwd)
    monkeypatch.setattr(kernel, "_FLASH_BACKWARD", spy_bwd)
    return seen


def _grads(q, k, v, backend, **kw):
    out = attnkit.attention(q, k, v, backend=backend, **kw)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _assert_same(fast, ref):
    for name, a, b in zip(["out", "dq", "dk", "dv"], fast, ref):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("bias", [None, "alibi"])
def test_a_window_runs_in_few_kernel_calls_and_matches_the_reference(kernel_calls, monkeypatch, bias):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(block_q=16, block_k=16))
    q, k, v = make_qkv(2, 4, 300, D=8, Hkv=2, dtype=torch.float64, requires_grad=True)
    kw = dict(mask=masks.sliding_window(40), bias=positions.ALiBi(4) if bias else None)
    fast, ref = _grads(q, k, v, "tiled", **kw), _grads(q, k, v, "reference", **kw)
    _assert_same(fast, ref)
    blocks = -(-300 // 16)
    assert len(kernel_calls["forward"]) <= 6 < blocks  # the edge blocks, the stack, the ragged end
    stacked = [(n, m) for n, m in kernel_calls["forward"] if n > 1]
    assert stacked and all(m.shape[0] == 1 for _, m in stacked)  # one mask for all items


def test_a_mask_that_is_not_translation_invariant_gets_one_mask_per_item(kernel_calls, monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(block_q=8, block_k=8))
    q, k, v = make_qkv(2, 3, 61, D=5, dtype=torch.float64, requires_grad=True)
    # a band of partial tiles (the same run shape in every block) with a pattern that moves
    odd = masks.from_mod(lambda b, h, i, j: (j <= i) & (j > i - 20) & ((i + 2 * j + b) % 3 != 0))
    fast, ref = _grads(q, k, v, "tiled", mask=odd), _grads(q, k, v, "reference", mask=odd)
    _assert_same(fast, ref)
    stacked = [(n, m) for n, m in kernel_calls["forward"] if n > 1]
    assert stacked and all(m.shape[0] == n for n, m in stacked)


def test_a_bias_tensor_gets_one_bias_per_item(kernel_calls, monkeypatch):
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(block_q=8, block_k=8))
    q, k, v = make_qkv(1, 2, 50, D=4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 50, 50, dtype=torch.float64)
    bias[..., 17, :] = float("-inf")  # a dead row inside a stacked item
    kw = dict(mask=masks.sliding_window(12), bias=bias)
    fast, ref = _grads(q, k, v, "tiled", **kw), _grads(q, k, v, "reference", **kw)
    _assert_same(fast, ref)
    assert torch.all(fast[0][:, :, 17] == 0)
    assert any(n > 1 for n, _ in kernel_calls["forward"])


@pytest.mark.parametrize("T,block_k", [(160, 8), (157, 8), (160, 16)])
def test_scattered_runs_are_gathered_into_one_call_per_block(kernel_calls, monkeypatch, T, block_k):
    """A block-sparse layout scatters its runs: each query block's go to the kernel as one call
    over their keys side by side (block by block where the runs are whole key blocks, key by key
    where the layout's blocks are finer than the plan's or the last block is ragged)."""
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(block_q=8, block_k=block_k))
    nb = -(-T // 8)
    layout = torch.rand(nb, nb, generator=torch.Generator().manual_seed(3)) < 0.2
    layout |= torch.eye(nb, dtype=torch.bool)
    q, k, v = make_qkv(2, 4, T, D=6, Hkv=2, dtype=torch.float64, requires_grad=True, noncontiguous=True)
    kw = dict(mask=masks.block_sparse(layout, 8))
    _assert_same(_grads(q, k, v, "tiled", **kw), _grads(q, k, v, "reference", **kw))
    if block_k == 8:
        runs = sum(len(r) for r in make_plan(canonicalize(q, k, v, **kw), 8, 8, 1024, mix=True).runs)
        assert len(kernel_calls["forward"]) < runs / 2
        assert len(kernel_calls["backward"]) == len(kernel_calls["forward"])


@pytest.mark.parametrize("budget,most", [(1, 1), (4000, 2), (1 << 30, None)])
def test_stacks_cut_into_pieces_give_the_same_result(kernel_calls, monkeypatch, budget, most):
    # an item's output is B·H·rows·Dv·8 = 1,536 bytes: a budget of 4,000 bytes holds 2 items
    monkeypatch.setattr(kernel, "_CALL_BYTES", budget)
    monkeypatch.setitem(attnkit.backends.REGISTRY, "tiled", TiledBackend(block_q=8, block_k=8))
    q, k, v = make_qkv(2, 2, 77, 83, D=6, dtype=torch.float64, requires_grad=True, noncontiguous=True)
    kw = dict(mask=masks.causal() & masks.sliding_window(20, 3), bias=positions.ALiBi(2))
    _assert_same(_grads(q, k, v, "tiled", **kw), _grads(q, k, v, "reference", **kw))
    items = max(n for n, _ in kernel_calls["forward"])
    assert items == most if most else items > 2


@pytest.mark.parametrize("mask", [masks.causal(), masks.causal(align="top_left"), masks.sliding_window(7),
                                  masks.sliding_window(4, 9), masks.dilated_window(6, 2, dilation=3),
                                  masks.strided(5), masks.strided(4, causal=False),
                                  masks.causal() & masks.sliding_window(5), ~masks.sliding_window(3),
                                  masks.sliding_window(2) | masks.sliding_window(0, 2)], ids=repr)
@pytest.mark.parametrize("Tq,Tk", [(40, 40), (13, 40), (40, 13)])
def test_masks_that_say_they_are_translation_invariant_are(mask, Tq, Tk):
    assert mask.translation_invariant
    shift = 7
    q = torch.arange(0, Tq - shift).view(-1, 1)
    kv = torch.arange(0, Tk - shift).view(1, -1)
    b = h = torch.zeros(1, 1, dtype=torch.long)
    here = mask.mask_mod(b, h, q, kv, Tq, Tk)
    there = mask.mask_mod(b, h, q + shift, kv + shift, Tq, Tk)
    assert torch.equal(here, there)


@pytest.mark.parametrize("mod", [positions.ALiBi(3), positions.ALiBi(3, symmetric=True),
                                 positions.T5RelativeBias(3), positions.T5RelativeBias(3, bidirectional=False)],
                         ids=repr)
def test_biases_that_say_they_are_translation_invariant_are(mod):
    assert mod.translation_invariant
    Tq, Tk, shift = 30, 45, 11
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(3).view(1, -1, 1, 1)
    q = torch.arange(Tq - shift).view(1, 1, -1, 1)
    kv = torch.arange(Tk - shift).view(1, 1, 1, -1)
    zero = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        here = mod.score_mod(zero, b, h, q, kv, Tq, Tk)
        there = mod.score_mod(zero, b, h, q + shift, kv + shift, Tq, Tk)
    assert torch.equal(here, there)
    row = mod.key_bias(h, kv, 5, Tq, Tk)
    if row is not None:  # relative to the tile's first query: a function of kv - q_ref
        assert torch.equal(row, mod.key_bias(h, kv + shift, 5 + shift, Tq, Tk))


def test_masks_that_depend_on_absolute_positions_do_not_say_so():
    for m in [masks.key_padding(torch.tensor([3])), masks.chunked(4), masks.from_mod(lambda b, h, i, j: j <= i),
              masks.causal() & masks.key_padding(torch.tensor([3])), masks.longformer(2, [0])]:
        assert not m.translation_invariant, m


@pytest.mark.parametrize("mod", [positions.ALiBi(3), positions.ALiBi(3, symmetric=True), positions.T5RelativeBias(3),
                                 positions.SoftCap(5.0)], ids=repr)
def test_mods_that_say_they_are_finite_are(mod):
    assert mod.finite
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(3).view(1, -1, 1, 1)
    q = torch.arange(50).view(1, 1, -1, 1)
    kv = torch.arange(4000).view(1, 1, 1, -1)
    score = torch.randn(1, 3, 50, 4000, dtype=torch.float64) * 1e3
    with torch.no_grad():
        assert torch.isfinite(mod.score_mod(score, b, h, q, kv, 50, 4000)).all()
