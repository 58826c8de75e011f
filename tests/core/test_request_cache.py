"""Requests planned once per shapes and options (attnkit.request_cache): a remembered plan gives
the same result as a fresh one, is never served to a request it does not fit, and leaves every
check, the NaN policy, gradients and recording as they were."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnkit
from attnkit import functional, masks, request_cache
from attnkit.backends import registry
from attnkit.backends.sdpa import SDPABackend
from attnkit.spec import canonicalize
from attnkit.testing import assert_close, make_qkv

NAN = float("nan")


@pytest.fixture(autouse=True)
def fresh_cache():
    request_cache.clear()
    yield
    request_cache.clear()


@pytest.fixture
def plans(monkeypatch):
    """How many times attention planned a request from scratch."""
    calls = []
    real = functional.canonicalize
    monkeypatch.setattr(functional, "canonicalize", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def qkv(*args, seed: int, **kw):
    return make_qkv(*args, generator=torch.Generator().manual_seed(seed), **kw)


def reference(q, k, v, **kw):
    """The reference in float64, cast back to the inputs' dtype."""
    out = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    return tuple(x.to(q.dtype) for x in out) if isinstance(out, tuple) else out.to(q.dtype)


def test_a_repeated_small_call_is_planned_once_and_stays_exact(plans):
    q, k, v = qkv(1, 8, 1, Tk=512, D=64, seed=0)
    with torch.no_grad():
        outs = [attnkit.attention(q, k, v, mask=masks.causal()) for _ in range(5)]
    assert len(plans) == 1
    for out in outs:
        assert_close(out, reference(q, k, v, mask=masks.causal()), dtype=torch.float32)


@pytest.mark.parametrize("mask", [masks.causal(), masks.causal(align="top_left"), masks.sliding_window(3),
                                  masks.sliding_window(2, 1), masks.causal() & masks.sliding_window(4), None])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_remembered_plans_agree_with_the_reference_for_each_mask_and_size(mask, Hkv):
    # the same options at several sizes and again: every call is compared, hit or miss
    for Tq, Tk in [(1, 9), (1, 10), (3, 9), (1, 9), (3, 9), (5, 5), (5, 5)]:
        q, k, v = qkv(2, 4, Tq, Tk=Tk, D=8, Hkv=Hkv, seed=Tq * 100 + Tk)
        out = attnkit.attention(q, k, v, mask=mask)
        assert_close(out, reference(q, k, v, mask=mask), dtype=torch.float32)


def test_equal_masks_share_a_plan_and_different_parameters_do_not(plans):
    q, k, v = qkv(1, 2, 1, Tk=16, D=8, seed=1)
    expected = {left: reference(q, k, v, mask=masks.sliding_window(left)) for left in (3, 5)}
    plans.clear()
    for left in (3, 3, 5, 5, 3):
        out = attnkit.attention(q, k, v, mask=masks.sliding_window(left))
        assert_close(out, expected[left], dtype=torch.float32)
    assert len(plans) == 2


def test_a_mask_changed_after_the_call_is_not_served_its_old_plan():
    q, k, v = qkv(1, 2, 4, Tk=16, D=8, seed=2)  # several queries: the mask is built at each call
    m = masks.sliding_window(3)
    attnkit.attention(q, k, v, mask=m)
    m.left = 8  # the plan holds this very object
    out = attnkit.attention(q, k, v, mask=masks.sliding_window(3))
    assert_close(out, reference(q, k, v, mask=masks.sliding_window(3)), dtype=torch.float32)
    out = attnkit.attention(q, k, v, mask=m)
    assert_close(out, reference(q, k, v, mask=masks.sliding_window(8)), dtype=torch.float32)


def test_a_hit_reads_the_key_of_the_calls_own_mask_once(plans, monkeypatch):
    # the request's key holds the mask's parameters as they are now; when the plan holds this very
    # object there is nothing else to compare (a fresh equal mask: the plan's is read again, above)
    q, k, v = qkv(1, 2, 4, Tk=16, D=8, seed=3)
    m = masks.sliding_window(3)
    expected = reference(q, k, v, mask=m)
    plans.clear()
    attnkit.attention(q, k, v, mask=m)
    reads = []
    real = type(m).cache_key
    monkeypatch.setattr(type(m), "cache_key", lambda self: reads.append(self) or real(self))
    out = attnkit.attention(q, k, v, mask=m)
    assert len(plans) == 1 and reads == [m]
    assert_close(out, expected, dtype=torch.float32)
    attnkit.attention(q, k, v, mask=masks.sliding_window(3))
    assert len(plans) == 1 and len(reads) == 3 and reads[2] is m    # the fresh one's key, then the plan's


def test_masks_holding_tensors_or_callables_are_planned_every_call(plans):
    q, k, v = qkv(2, 2, 3, Tk=6, D=8, seed=3)
    lengths = torch.tensor([4, 6])
    pad = masks.key_padding(lengths)
    assert pad.cache_key() is None
    first = attnkit.attention(q, k, v, mask=pad)
    lengths[0] = 2  # refilled in place for the next batch
    second = attnkit.attention(q, k, v, mask=pad)
    n = len(plans)
    assert_close(second, reference(q, k, v, mask=masks.key_padding(torch.tensor([2, 6]))),
                 dtype=torch.float32)
    del plans[n:]
    assert not torch.allclose(first, second)
    attnkit.attention(q, k, v, mask=lambda b, h, i, j: i >= j)
    attnkit.attention(q, k, v, mask=torch.ones(3, 6, dtype=torch.bool))
    attnkit.attention(q, k, v, bias=torch.zeros(3, 6))
    attnkit.attention(q, k, v, return_weights=True)
    attnkit.attention(q, k, v, dropout_p=0.1)
    assert len(plans) == 7


def test_mask_cache_keys_follow_the_parameters():
    assert masks.causal().cache_key() == masks.causal().cache_key()
    assert masks.causal().cache_key() != masks.causal(align="top_left").cache_key()
    assert masks.sliding_window(3).cache_key() != masks.sliding_window(3, 1).cache_key()
    both = masks.causal() & masks.sliding_window(3)
    assert both.cache_key() == (masks.causal() & masks.sliding_window(3)).cache_key()
    assert (masks.causal() & masks.key_padding(torch.tensor([3]))).cache_key() is None
    hash(both.cache_key())


def test_errors_are_still_raised_after_a_call_was_remembered():
    q, k, v = qkv(1, 2, 1, Tk=8, D=8, seed=4)
    attnkit.attention(q, k, v, dropout_p=0.0)
    with pytest.raises(TypeError, match="dropout_p"):
        attnkit.attention(q, k, v, dropout_p=False)
    with pytest.raises(ValueError, match="dtype"):
        attnkit.attention(q, k, v.double())
    with pytest.raises(ValueError, match="sequence length"):
        attnkit.attention(q, k, v[:, :, :7])
    with pytest.raises(ValueError, match="scale"):
        attnkit.attention(q, k, v, scale=-1.0)


def test_a_gradient_after_a_remembered_no_grad_call(plans):
    q, k, v = qkv(1, 2, 4, Tk=8, D=8, seed=5)
    with torch.no_grad():
        attnkit.attention(q, k, v, mask=masks.causal())
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    attnkit.attention(*qs, mask=masks.causal()).sum().backward()
    assert len(plans) == 2  # grad and no-grad are two plans
    qd = [x.double().requires_grad_() for x in (q, k, v)]
    attnkit.attention(*qd, mask=masks.causal(), backend="reference").sum().backward()
    for a, b in zip(qs, qd):
        assert_close(a.grad, b.grad, dtype=torch.float32)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_the_nan_policy_applies_to_a_remembered_request(where):
    q, k, v = qkv(1, 2, 1, Tk=8, D=8, seed=6)
    attnkit.attention(q, k, v, mask=masks.sliding_window(3))
    x = {"q": q, "k": k, "v": v}[where].clone()
    x[0, 0, 0 if where == "q" else 6, 1] = NAN
    args = {"q": q, "k": k, "v": v, where: x}
    out = attnkit.attention(args["q"], args["k"], args["v"], mask=masks.sliding_window(3))
    bad = out[0, 0, :, 1] if where == "v" else out[0, 0]  # a value's NaN reaches its own column
    assert bad.isnan().all() and torch.isfinite(out[0, 1]).all()
    assert torch.isfinite(out[0, 0, :, [0, 2, 3]]).all() or where != "v"
    # a key outside the window changes nothing
    k2 = k.clone()
    k2[0, 0, 1, 1] = NAN
    assert_close(attnkit.attention(q, k2, v, mask=masks.sliding_window(3)),
                 reference(q, k, v, mask=masks.sliding_window(3)), dtype=torch.float32)


def test_a_new_or_replaced_backend_and_a_forced_one_are_not_served_an_old_choice():
    q, k, v = qkv(1, 2, 3, Tk=8, D=8, seed=7)
    ran = []

    class Spy(SDPABackend):
        def prepare(self, spec):
            return self  # plain calls only: the spy sees each

        def __call__(self, q, k, v, spec):
            ran.append(1)
            return super().__call__(q, k, v, spec)

    attnkit.attention(q, k, v)
    old = registry.REGISTRY["sdpa"]
    registry.REGISTRY["sdpa"] = Spy()
    try:
        attnkit.attention(q, k, v)
        attnkit.attention(q, k, v)
        assert ran == [1, 1]
    finally:
        registry.REGISTRY["sdpa"] = old
    attnkit.attention(q, k, v)
    assert ran == [1, 1]
    with attnkit.backends.use_backend("reference"), attnkit.capture() as rec:
        attnkit.attention(q, k, v)
    assert [r.backend for r in rec] == ["reference"]


def test_recorders_see_remembered_calls():
    q, k, v = qkv(1, 2, 3, Tk=8, D=8, seed=8)
    attnkit.attention(q, k, v, mask=masks.causal())
    with attnkit.capture() as rec:
        attnkit.attention(q, k, v, mask=masks.causal())
    assert len(rec) == 1 and rec[0].backend == "sdpa"
    assert_close(rec[0].weights, reference(q, k, v, mask=masks.causal(), return_weights=True)[1],
                 dtype=torch.float32)


def test_the_cache_holds_at_most_its_bound(monkeypatch):
    monkeypatch.setattr(request_cache, "MAX_ENTRIES", 4)
    for Tk in range(1, 12):
        q, k, v = qkv(1, 1, 1, Tk=Tk, D=4, seed=Tk)
        attnkit.attention(q, k, v)
    assert len(request_cache._PLANS) == 4


def test_no_plan_is_remembered_inside_torch_compile(monkeypatch):
    q, k, v = qkv(1, 1, 2, Tk=4, D=4, seed=9)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert request_cache.key(q, k, v, "scaled_dot", "softmax", None, None, None, 0.0, False, "auto", None) is None


@settings(max_examples=60, deadline=None)
@given(Tq=st.integers(1, 5), Tk=st.integers(1, 40), left=st.integers(0, 8), right=st.integers(0, 3),
       top_left=st.booleans(), Hkv=st.sampled_from([1, 2]))
def test_sdpa_prepared_calls_match_its_plain_call(Tq, Tk, left, right, top_left, Hkv):
    align = "top_left" if top_left else "bottom_right"
    q, k, v = qkv(1, 2, Tq, Tk=Tk, D=8, Hkv=Hkv, seed=Tq * 1000 + Tk)
    b = SDPABackend()
    for mask in (None, masks.causal(align=align), masks.sliding_window(left, right, align=align)):
        spec = canonicalize(q, k, v, mask=mask)
        if b.not_supported_reasons(spec):
            continue
        prepared = b.prepare(spec)
        assert_close(prepared(q, k, v, spec)[0], b(q, k, v, spec)[0], dtype=torch.float32)
