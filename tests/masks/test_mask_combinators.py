"""``&``, ``|`` and ``~`` equal the elementwise logic of the materialized masks, also when one
side is a bool tensor or a plain ``mask_mod`` callable; causal alignment conventions."""

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks
from attnkit.testing import assert_close, make_qkv

B, H, Tq, Tk = 2, 3, 7, 11
PAIRS = [("causal", "key_padding_keep"), ("sliding_window", "strided_noncausal"), ("block_sparse_heads", "fixed"),
         ("longformer", "bigbird"), ("dilated", "local_m"), ("mask_mod_callable", "bool_tensor"),
         ("causal_top_left", "block_sparse"), ("fixed_noncausal_top_left", "longformer_bool")]


def dense(m, Tq=Tq, Tk=Tk):
    return m.materialize(Tq, Tk, B, H).expand(B, H, Tq, Tk)


def test_pairs_are_not_trivial(cases):
    # the two masks of each pair disagree somewhere and are neither all True nor all False
    for a, b in PAIRS:
        da, db = dense(cases[a](Tq, Tk, B, H)[0]), dense(cases[b](Tq, Tk, B, H)[0])
        assert (da != db).any() and da.any() and db.any() and not da.all() and not db.all(), (a, b)


@pytest.mark.parametrize("a,b", PAIRS)
def test_and_or_not_are_elementwise(a, b, cases, classify_brute):
    ma, _ = cases[a](Tq, Tk, B, H)
    mb, _ = cases[b](Tq, Tk, B, H)
    da, db = dense(ma), dense(mb)
    combos = {
        "and": (ma & mb, da & db),
        "or": (ma | mb, da | db),
        "not": (~ma, ~da),
        "nested": (~(ma | mb) | (ma & ~mb), ~(da | db) | (da & ~db)),
    }
    for name, (m, want) in combos.items():
        assert torch.equal(dense(m), want), name
        # the tile classes of a combination follow from its dense mask, ragged edges included
        for bq, bk in [(2, 2), (3, 4)]:
            got = m.classify_blocks(Tq, Tk, bq, bk, batch=B, heads=H)
            assert torch.equal(got.expand(B, H, *got.shape[-2:]), classify_brute(want, bq, bk)), (name, bq, bk)


@pytest.mark.parametrize("name", ["strided", "longformer", "bigbird", "block_sparse", "key_padding_lengths"])
def test_combining_with_a_bool_tensor_either_side(name, cases):
    m, _ = cases[name](Tq, Tk, B, H)
    g = torch.Generator().manual_seed(1)
    t = torch.rand(B, 1, Tq, Tk, generator=g) < 0.5
    d = dense(m)
    for combo, want in [(m & t, d & t), (t & m, t & d), (m | t, d | t), (t | m, t | d)]:
        assert isinstance(combo, masks.Mask)
        assert torch.equal(dense(combo), want.expand(B, H, Tq, Tk))
    # a 2-D (Tq, Tk) tensor broadcasts over batch and heads
    t2 = t[0, 0]
    assert torch.equal(dense(m & t2), d & t2)


@pytest.mark.parametrize("name", ["fixed", "dilated", "longformer_bool", "causal"])
def test_combining_with_a_mask_mod_callable_either_side(name, cases):
    m, _ = cases[name](Tq, Tk, B, H)

    def even_keys(b, h, q_idx, kv_idx):
        return kv_idx % 2 == 0

    kv_even = (torch.arange(Tk) % 2 == 0).expand(B, H, Tq, Tk)
    d = dense(m)
    assert torch.equal(dense(m & even_keys), d & kv_even)
    assert torch.equal(dense(even_keys & m), d & kv_even)
    assert torch.equal(dense(m | even_keys), d | kv_even)
    assert torch.equal(dense(even_keys | m), d | kv_even)


def test_combined_masks_in_attention_match_dense_tensor_mask(cases):
    q, k, v = make_qkv(B, H, Tq, Tk, D=4, dtype=torch.float64)
    m = (masks.strided(3) | masks.longformer(1, [0])) & masks.key_padding(torch.tensor([Tk, 5]))
    out_obj = attnkit.attention(q, k, v, mask=m, backend="reference")
    out_tensor = attnkit.attention(q, k, v, mask=dense(m), backend="reference")
    assert torch.equal(out_obj, out_tensor)


def test_local_p_and_causal_keeps_the_gaussian_factor():
    centers = torch.tensor([[1.3, 2.2, 3.9]], dtype=torch.float64)
    lp = masks.local_p(centers, D=2)
    both = lp & masks.causal()
    assert both.has_weight_factor and (masks.causal() & lp).has_weight_factor
    f_lp = lp.materialize_factor(3, 5, dtype=torch.float64)
    assert torch.equal(both.materialize_factor(3, 5, dtype=torch.float64), f_lp)
    assert torch.equal(dense_one(both, 3, 5), dense_one(lp, 3, 5) & dense_one(masks.causal(), 3, 5))


def dense_one(m, Tq, Tk):
    return m.materialize(Tq, Tk)[0, 0]


# -- causal alignment ------------------------------------------------------------------------
@pytest.mark.parametrize("Tq,Tk", [(1, 7), (3, 7), (5, 5), (7, 3)])
def test_causal_aligns_bottom_right_by_default(Tq, Tk):
    got = dense_one(masks.causal(), Tq, Tk)
    assert torch.equal(got, torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq))
    assert got[-1].all()  # the last query sees every key


def test_causal_bottom_right_picture():
    # Tq=2, Tk=4: the last query sees the last key (KV-cache decoding)
    assert dense_one(masks.causal(), 2, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert dense_one(masks.causal(align="top_left"), 2, 4).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("Tq,Tk", [(1, 7), (3, 7), (5, 5), (7, 3)])
def test_causal_top_left_is_the_sdpa_tril_convention(Tq, Tk):
    assert torch.equal(dense_one(masks.causal(align="top_left"), Tq, Tk), torch.ones(Tq, Tk, dtype=torch.bool).tril())
    q, k, v = make_qkv(1, 2, Tq, Tk, D=4, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # SDPA's own is_causal is top-left
    for backend in ("reference", "sdpa"):
        out = attnkit.attention(q, k, v, mask=masks.causal(align="top_left"), backend=backend)
        assert_close(out, want, name=backend)


@pytest.mark.parametrize("factory", [masks.sliding_window, lambda w: masks.strided(w + 1),
                                     lambda w: masks.dilated_window(w, 0, 1), lambda w: masks.fixed(w + 1)])
def test_decoding_rows_are_the_last_rows_of_the_square_mask(factory):
    # bottom-right alignment: a (Tq, Tk) mask is the last Tq rows of the (Tk, Tk) mask
    m = factory(2)
    sq = dense_one(m, 9, 9)
    for Tq_ in (1, 4, 9):
        assert torch.equal(dense_one(m, Tq_, 9), sq[-Tq_:])


def test_query_invariance_propagates_through_combinators():
    import torch
    from attnkit import masks

    pad = masks.key_padding(torch.tensor([3, 5]))
    assert pad.query_invariant and (pad & pad).query_invariant and (~pad).query_invariant
    assert not (pad & masks.causal()).query_invariant and not (pad | masks.sliding_window(2)).query_invariant
    assert not masks.causal().query_invariant
