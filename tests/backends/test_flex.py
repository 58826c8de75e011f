"""The flex backend (compiled FlexAttention) against the reference, forward only on CPU."""

import warnings

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.backends.flex import available
from attnkit.spec import canonicalize
from attnkit.testing import assert_close, make_qkv

pytestmark = pytest.mark.skipif(not available(), reason="torch has no flex_attention")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_window_padding_alibi_temperature_gqa_and_dead_rows_match_reference():
    q, k, v = make_qkv(2, 4, 70, 50, D=16, Hkv=2)
    keep = masks.sliding_window(9) & masks.key_padding(torch.tensor([50, 20]))  # rows of batch 1 die
    kw = dict(mask=keep, bias=[attnkit.positions.ALiBi(4), attnkit.positions.softcap(3.0)],
              normalizer=attnkit.normalizers.Softmax(temperature=0.7))
    out = attnkit.attention(q, k, v, backend="flex", **kw)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    assert_close(out, ref, scale=5)
    # bottom-right: query i sits at i - 20, so queries < 20 see no key; in batch 1 (20 keys) the
    # window of query i reaches a real key only while i - 20 - 9 < 20
    assert (out[:, :, :20] == 0).all() and (out[1, :, 49:] == 0).all() and (out[1, :, 20:49] != 0).any()


def test_cosine_score_through_prepare():
    q, k, v = make_qkv(1, 2, 33, 33, D=16)
    assert_close(attnkit.attention(q, k, v, backend="flex", score="cosine", mask=masks.causal()),
                 attnkit.attention(q, k, v, backend="reference", score="cosine", mask=masks.causal()), scale=10)


def test_refusals_say_why_and_auto_leaves_flex_alone():
    q, k, v = make_qkv(1, 2, 8, 8, D=16, requires_grad=True)
    reasons = " ".join(attnkit.backends.REGISTRY["flex"].not_supported_reasons(canonicalize(q, k, v)))
    assert "no backward pass on CPU" in reasons
    with pytest.raises(ValueError, match="flex.*sigmoid"):
        attnkit.attention(q.detach(), k.detach(), v.detach(), backend="flex", normalizer="sigmoid")
    big = make_qkv(1, 8, 2048, 2048, D=16)
    assert attnkit.explain(*big, mask=masks.sliding_window(64)).backend != "flex"
