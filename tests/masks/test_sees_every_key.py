"""``Mask.sees_every_key``: when a mask's parameters prove that every query sees every key,
``attnkit.attention`` drops it (a decoding step under a causal mask costs what the unmasked call
costs). The claim is checked against the materialized mask; it may say False when unsure, never
True wrongly."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.spec import canonicalize

ALIGN = st.one_of(st.sampled_from(["bottom_right", "top_left"]), st.integers(-3, 12))


def _masks(draw_left, draw_right, align):
    return [masks.Causal(align), masks.SlidingWindow(draw_left, draw_right, align)]


@settings(max_examples=200, deadline=None)
@given(tq=st.integers(1, 9), tk=st.integers(1, 9), left=st.integers(0, 10), right=st.integers(0, 10),
       align=ALIGN, combine=st.sampled_from(["alone", "and", "or"]))
def test_sees_every_key_is_never_claimed_wrongly(tq, tk, left, right, align, combine):
    causal, window = _masks(left, right, align)
    mask = {"alone": window, "and": causal & window, "or": causal | window}[combine]
    for m in (causal, mask):
        if m.sees_every_key(tq, tk):
            assert bool(m.materialize(tq, tk).all()), (m, tq, tk)


def test_the_usual_cases_are_recognized():
    assert masks.causal().sees_every_key(1, 512)                   # one query at the end of the cache
    assert not masks.causal().sees_every_key(2, 512)
    assert not masks.causal(align="top_left").sees_every_key(1, 512)
    assert masks.sliding_window(600).sees_every_key(1, 512)
    assert not masks.sliding_window(16).sees_every_key(1, 512)
    assert (masks.causal() & masks.sliding_window(600)).sees_every_key(1, 512)
    assert not masks.key_padding(torch.tensor([512])).sees_every_key(1, 512)   # data: never claimed


def test_a_decoding_step_under_a_causal_mask_is_the_unmasked_call():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    assert canonicalize(q, k, v, mask=masks.causal()).mask is None
    assert canonicalize(q, k, v, mask=masks.sliding_window(8)).mask is not None
    torch.testing.assert_close(attnkit.attention(q, k, v, mask=masks.causal()), attnkit.attention(q, k, v))
    dense = masks.causal().materialize(1, 40)  # a tensor mask is data: it is kept
    assert canonicalize(q, k, v, mask=dense).mask is not None
    torch.testing.assert_close(attnkit.attention(q, k, v, mask=masks.causal()),
                               attnkit.attention(q, k, v, mask=dense, backend="reference"))


# -- Mask.key_range: one query's window read as a slice of the keys --------------------------

@settings(max_examples=300, deadline=None)
@given(tq=st.integers(1, 4), tk=st.integers(1, 12), left=st.integers(0, 10), right=st.integers(0, 10),
       align=ALIGN, combine=st.sampled_from(["alone", "and", "causal"]))
def test_key_range_is_exactly_the_live_keys_when_claimed(tq, tk, left, right, align, combine):
    causal, window = _masks(left, right, align)
    mask = {"alone": window, "and": causal & window, "causal": causal}[combine]
    span = mask.key_range(tq, tk)
    live = mask.materialize(tq, tk)[0, 0]
    if span is not None:
        lo, hi = span
        want = torch.zeros(tq, tk, dtype=torch.bool)
        want[:, lo:hi] = True
        assert 0 <= lo < hi <= tk and torch.equal(live, want), (mask, tq, tk, span)
    elif tq == 1 and combine != "and" and live.any():
        raise AssertionError(f"{mask} at one query has a contiguous window {live} but claims none")


@settings(max_examples=60, deadline=None)
@given(tk=st.integers(1, 40), left=st.integers(0, 50), right=st.integers(0, 5), hkv=st.sampled_from([1, 2]),
       align=st.sampled_from(["bottom_right", "top_left", 7]))
def test_a_decoding_window_on_sdpa_reads_a_slice_and_matches_the_reference(tk, left, right, hkv, align):
    import pytest

    from attnkit.testing import assert_close, make_qkv

    mask = masks.SlidingWindow(left, right, align)
    if mask.key_range(1, tk) is None:
        return  # no live key at all: the usual path (tested elsewhere)
    q, k, v = make_qkv(2, 4, 1, tk, D=6, Hkv=hkv, dtype=torch.float64)
    ref = attnkit.attention(q, k, v, mask=mask, backend="reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masks.SlidingWindow, "materialize", lambda *a, **kw: (_ for _ in ()).throw(
            AssertionError("the window was materialized")))
        how = str(attnkit.explain(q, k, v, mask=mask, backend="sdpa"))
        assert ("no mask" if mask.sees_every_key(1, tk) else "on keys") in how
        assert_close(attnkit.attention(q, k, v, mask=mask, backend="sdpa"), ref)
