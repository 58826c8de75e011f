"""attnkit.nn.KVCache: append/length/reset, capacity, beam-search reorder, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.nn import KVCache


def pieces(sizes, B=2, H=3, D=4, Dv=5, dtype=torch.float64):
    return [(torch.randn(B, H, n, D, dtype=dtype), torch.randn(B, H, n, Dv, dtype=dtype)) for n in sizes]


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(0, 4), min_size=1, max_size=5), preallocate=st.booleans())
def test_append_returns_everything_appended_in_order(sizes, preallocate):
    ps = pieces(sizes)
    cache = KVCache(max_length=sum(sizes) + 3 if preallocate else None)
    assert cache.length == 0 and cache.keys is None and cache.batch_size is None
    for i, (k, v) in enumerate(ps):
        k_all, v_all = cache.append(k, v)
        want_k = torch.cat([p[0] for p in ps[: i + 1]], dim=2)
        want_v = torch.cat([p[1] for p in ps[: i + 1]], dim=2)
        assert torch.equal(k_all, want_k) and torch.equal(v_all, want_v)
        assert cache.length == len(cache) == want_k.shape[2]
        assert torch.equal(cache.keys, want_k) and torch.equal(cache.values, want_v)
    assert cache.batch_size == 2


def test_earlier_results_are_not_overwritten_by_later_appends():
    cache = KVCache(max_length=6)
    (k1, v1), (k2, v2) = pieces([2, 3])
    a_k, _ = cache.append(k1, v1)
    snapshot = a_k.clone()
    cache.append(k2, v2)
    assert torch.equal(a_k, snapshot)


def test_reset_forgets_and_keeps_capacity():
    cache = KVCache(max_length=4)
    (k, v), = pieces([3])
    cache.append(k, v)
    cache.reset()
    assert cache.length == 0 and cache.keys is None and cache.max_length == 4
    (k, v), = pieces([4], B=5)  # a new batch size is fine after reset
    k_all, _ = cache.append(k, v)
    assert torch.equal(k_all, k)


def test_max_length_exceeded_names_it_and_leaves_cache_unchanged():
    cache = KVCache(max_length=5)
    (k1, v1), (k2, v2) = pieces([3, 3])
    cache.append(k1, v1)
    with pytest.raises(ValueError, match=r"max_length = 5 exceeded.*holds 3.*3 more"):
        cache.append(k2, v2)
    assert cache.length == 3 and torch.equal(cache.keys, k1)
    with pytest.raises(ValueError, match="max_length"):
        KVCache(max_length=0)
    with pytest.raises(TypeError, match="max_length"):
        KVCache(max_length=2.5)


def test_mismatched_appends_are_rejected():
    cache = KVCache()
    (k, v), = pieces([2])
    cache.append(k, v)
    with pytest.raises(ValueError, match="batch of 2"):
        cache.append(torch.randn(3, 3, 1, 4, dtype=torch.float64), torch.randn(3, 3, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="number of heads"):
        cache.append(torch.randn(2, 1, 1, 4, dtype=torch.float64), torch.randn(2, 1, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="feature sizes"):
        cache.append(torch.randn(2, 3, 1, 6, dtype=torch.float64), torch.randn(2, 3, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        cache.append(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 5))
    with pytest.raises(ValueError, match=r"k and v must agree"):
        cache.append(torch.randn(2, 3, 2, 4, dtype=torch.float64), torch.randn(2, 3, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"k must be a 4-D tensor"):
        cache.append(torch.randn(2, 3, 4), torch.randn(2, 3, 1, 5))
    assert cache.length == 2


@pytest.mark.parametrize("max_length", [None, 8])
def test_reorder_selects_batch_rows_for_beam_search(max_length):
    cache = KVCache(max_length=max_length)
    (k1, v1), (k2, v2) = pieces([2, 1])
    cache.append(k1, v1)
    idx = torch.tensor([1, 1, 0])  # 3 hypotheses: two continue beam 1, one beam 0
    cache.reorder(idx)
    assert cache.batch_size == 3 and cache.length == 2
    assert torch.equal(cache.keys, k1[idx]) and torch.equal(cache.values, v1[idx])
    k3, v3 = torch.randn(3, 3, 1, 4, dtype=torch.float64), torch.randn(3, 3, 1, 5, dtype=torch.float64)
    k_all, v_all = cache.append(k3, v3)
    assert torch.equal(k_all, torch.cat([k1[idx], k3], dim=2))
    assert torch.equal(v_all, torch.cat([v1[idx], v3], dim=2))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        cache.reorder(torch.tensor([3]))
    with pytest.raises(ValueError, match="1-D integer"):
        cache.reorder(torch.tensor([0.0]))
    KVCache().reorder(torch.tensor([0, 0]))  # empty: nothing to reorder


def test_concat_does_not_change_the_cache():
    cache = KVCache()
    (k1, v1), (k2, v2) = pieces([2, 2])
    cache.append(k1, v1)
    k_all, _ = cache.concat(k2, v2)
    assert k_all.shape[2] == 4 and cache.length == 2


@pytest.mark.parametrize("max_length", [None, 10])
def test_gradients_reach_every_appended_step(max_length):
    cache = KVCache(max_length=max_length)
    ks = [torch.randn(1, 2, n, 3, dtype=torch.float64, requires_grad=True) for n in (2, 1, 3)]
    vs = [torch.randn(1, 2, n, 3, dtype=torch.float64, requires_grad=True) for n in (2, 1, 3)]
    for k, v in zip(ks, vs):
        k_all, v_all = cache.append(k, v)
    w = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1)
    ((k_all * w).sum() + 2 * v_all.sum()).backward()
    start = 0
    for k, v in zip(ks, vs):
        n = k.shape[2]
        assert torch.equal(k.grad, w[:, :, start:start + n].expand_as(k))
        assert torch.equal(v.grad, torch.full_like(v, 2.0))
        start += n
