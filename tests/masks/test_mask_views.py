"""The three views of every mask kind agree with an explicit Python loop over (q, kv):
``materialize``, ``bind`` (the FlexAttention-style predicate) and ``classify_blocks``."""

import pytest
import torch

from attnkit import masks
from attnkit.masks import EMPTY, FULL, PARTIAL, index_grid

B, H = 2, 3
SIZES = [(1, 7), (5, 5), (7, 13), (6, 4), (13, 7)]
BLOCKS = [(1, 1), (2, 2), (2, 3), (3, 2), (4, 4), (4, 6), (6, 4), (16, 16)]


def full(m, Tq, Tk):
    """A (B', H', Tq, Tk) mask expanded to (B, H, Tq, Tk)."""
    assert m.dim() == 4 and m.shape[-2:] == (Tq, Tk) and m.shape[0] in (1, B) and m.shape[1] in (1, H)
    return m.expand(B, H, Tq, Tk)


@pytest.mark.parametrize("Tq,Tk", SIZES)
def test_materialize_equals_double_loop(kind, Tq, Tk, cases, dense_oracle):
    mask, oracle = cases[kind](Tq, Tk, B, H)
    got = mask.materialize(Tq, Tk, B, H)
    assert got.dtype == torch.bool
    assert torch.equal(full(got, Tq, Tk), dense_oracle(oracle, Tq, Tk, B, H))


@pytest.mark.parametrize("Tq,Tk", [(5, 5), (7, 13), (6, 4)])
def test_bind_equals_materialize(kind, Tq, Tk, cases):
    mask, _ = cases[kind](Tq, Tk, B, H)
    fn = mask.bind(Tq, Tk)
    got = torch.as_tensor(fn(*index_grid(B, H, Tq, Tk)))
    want = mask.materialize(Tq, Tk, B, H)
    assert torch.equal(got.expand(B, H, Tq, Tk), want.expand(B, H, Tq, Tk))
    # the bound predicate also works one query row at a time (how a tiled kernel calls it)
    b, h, q, kv = index_grid(B, H, Tq, Tk)
    row = torch.as_tensor(fn(b, h, q[:, :, Tq - 1:Tq], kv))
    assert torch.equal(row.expand(B, H, 1, Tk), want.expand(B, H, Tq, Tk)[:, :, Tq - 1:Tq])


@pytest.mark.parametrize("Tq,Tk", [(1, 7), (5, 5), (7, 13), (13, 7)])
def test_classify_blocks_equals_brute_force(kind, Tq, Tk, cases, dense_oracle, classify_brute):
    mask, oracle = cases[kind](Tq, Tk, B, H)
    dense = dense_oracle(oracle, Tq, Tk, B, H)
    for bq, bk in BLOCKS:
        got = mask.classify_blocks(Tq, Tk, bq, bk, batch=B, heads=H)
        nq, nk = -(-Tq // bq), -(-Tk // bk)
        assert got.dtype == torch.int8 and got.shape[-2:] == (nq, nk), (bq, bk, got.shape)
        assert torch.equal(got.expand(B, H, nq, nk), classify_brute(dense, bq, bk)), (bq, bk)


def test_brute_force_classifier_on_a_hand_case(classify_brute):
    # causal 3 x 3 in tiles of 2: top-left tile partial, top-right empty, bottom row: full, full
    dense = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
    assert classify_brute(dense, 2, 2)[0, 0].tolist() == [[PARTIAL, EMPTY], [FULL, FULL]]
    assert masks.causal().classify_blocks(3, 3, 2, 2)[0, 0].tolist() == [[PARTIAL, EMPTY], [FULL, FULL]]


# -- block_sparse reads its layout directly ----------------------------------------------------
def _forbid_materializing(monkeypatch, mask):
    def boom(*a, **k):
        raise AssertionError("classify_blocks materialized the mask")
    monkeypatch.setattr(mask, "materialize", boom)
    monkeypatch.setattr(mask, "mask_mod", boom)


@pytest.mark.parametrize("Tq,Tk", [(8, 9), (7, 13), (1, 3)])
def test_block_sparse_classify_at_layout_size_is_the_layout(monkeypatch, Tq, Tk):
    g = torch.Generator().manual_seed(5)
    layout = torch.rand(3, 4, 5, generator=g) < 0.5        # (H, nQb, nKb), bigger than needed
    m = masks.block_sparse(layout, (3, 3))
    _forbid_materializing(monkeypatch, m)
    got = m.classify_blocks(Tq, Tk, 3, 3, heads=3)
    nq, nk = -(-Tq // 3), -(-Tk // 3)
    want = torch.where(layout[:, :nq, :nk], FULL, EMPTY).to(torch.int8)[None]
    assert torch.equal(got, want)
    assert set(got.unique().tolist()) <= {EMPTY, FULL}


def test_block_sparse_classify_at_layout_multiples_skips_materializing(monkeypatch, classify_brute):
    layout = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    m = masks.block_sparse(layout, 2)
    dense = m.materialize(6, 7)
    _forbid_materializing(monkeypatch, m)
    got = m.classify_blocks(6, 7, 4, 4)
    assert torch.equal(got, classify_brute(dense, 4, 4))
    assert got[0, 0].tolist() == [[PARTIAL, PARTIAL], [EMPTY, EMPTY]]


def test_block_sparse_shared_layout_does_not_depend_on_heads():
    layout = torch.tensor([[True, False], [False, True]])
    m = masks.block_sparse(layout, 2)
    assert m.materialize(4, 4, batch=2, heads=5).shape == (1, 1, 4, 4)
    assert m.classify_blocks(4, 4, 2, 2, heads=5).shape == (1, 1, 2, 2)


# -- BigBird's classify_blocks closed form uses the block layout ------------------------------
@pytest.mark.parametrize("Tq,Tk", [(12, 12), (4, 12), (10, 11), (14, 8)])
def test_bigbird_classify_on_block_grid_skips_materializing(monkeypatch, Tq, Tk, classify_brute):
    m = masks.bigbird(2, random_blocks=2, seed=7)
    dense = m.materialize(Tq, Tk)
    monkeypatch.setattr(m, "materialize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("materialized")))
    for bq, bk in [(2, 2), (4, 2), (2, 6)]:
        assert torch.equal(m.classify_blocks(Tq, Tk, bq, bk), classify_brute(dense, bq, bk)), (bq, bk)


# -- the bound predicate works under FlexAttention's vmap ---------------------------------------
@pytest.mark.parametrize("Tq,Tk", [(5, 5), (7, 13)])
def test_bind_builds_the_same_flex_block_mask(kind, Tq, Tk, cases):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mask, _ = cases[kind](Tq, Tk, B, H)
    bm = flex.create_block_mask(mask.bind(Tq, Tk), B, H, Tq, Tk, device="cpu", BLOCK_SIZE=2)
    live = bm.to_dense()[..., :-(-Tq // 2), :-(-Tk // 2)].bool()       # tiles Flex will visit
    want = mask.classify_blocks(Tq, Tk, 2, 2, batch=B, heads=H) != EMPTY
    assert torch.equal(live, want.expand(B, H, *want.shape[-2:]))
