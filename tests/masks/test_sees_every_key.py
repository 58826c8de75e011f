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
