"""The sparse patterns against hand-drawn pictures, the papers' own set definitions and each
other; BigBird's random blocks are reproducible."""

import os
import subprocess
import sys

import pytest
import torch

from attnkit import masks


def pic(rows):
    """``["x . x", ...]`` -> bool (T, T') tensor."""
    return torch.tensor([[c == "x" for c in r.split()] for r in rows], dtype=torch.bool)


def dense(m, Tq, Tk, heads=1):
    return m.materialize(Tq, Tk, heads=heads)[0, 0] if heads == 1 else m.materialize(Tq, Tk, heads=heads)[0]


# -- hand-drawn pictures (also the docstrings' pictures) ----------------------------------------
def test_strided_picture():
    assert torch.equal(dense(masks.strided(3), 8, 8), pic([
        "x . . . . . . .",
        "x x . . . . . .",
        "x x x . . . . .",
        "x x x x . . . .",
        ". x x x x . . .",
        ". . x x x x . .",
        "x . . x x x x .",
        ". x . . x x x x"]))


def test_fixed_picture():
    assert torch.equal(dense(masks.fixed(3), 8, 8), pic([
        "x . . . . . . .",
        "x x . . . . . .",
        "x x x . . . . .",
        ". . x x . . . .",
        ". . x x x . . .",
        ". . x x x x . .",
        ". . x . . x x .",
        ". . x . . x x x"]))


def test_longformer_picture():
    assert torch.equal(dense(masks.longformer(1, [0]), 6, 6), pic([
        "x x x x x x",
        "x x x . . .",
        "x x x x . .",
        "x . x x x .",
        "x . . x x x",
        "x . . . x x"]))


def test_dilated_window_picture():
    assert torch.equal(dense(masks.dilated_window(2, dilation=2), 7, 7), pic([
        "x . . . . . .",
        ". x . . . . .",
        "x . x . . . .",
        ". x . x . . .",
        "x . x . x . .",
        ". x . x . x .",
        ". . x . x . x"]))
    assert torch.equal(dense(masks.dilated_window(0, 2, dilation=3), 4, 8), pic([  # bottom-right: pos = q + 4
        ". . . . x . . x",
        ". . . . . x . .",
        ". . . . . . x .",
        ". . . . . . . x"]))


def test_bigbird_without_random_blocks_picture():
    m = masks.bigbird(2, window_blocks=1, global_blocks=1, random_blocks=0)
    assert m.layout(12).int().tolist() == [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
        [1, 0, 0, 0, 1, 1]]
    assert torch.equal(dense(m, 12, 12), m.layout(12).repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_block_sparse_picture_and_tuple_blocks():
    layout = torch.tensor([[True, False], [True, True]])
    assert torch.equal(dense(masks.block_sparse(layout, 2), 4, 4), pic([
        "x x . .", "x x . .", "x x x x", "x x x x"]))
    assert torch.equal(dense(masks.block_sparse(layout, (1, 3)), 2, 5), pic([
        "x x x . .", "x x x x x"]))


# -- the papers' set definitions ------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2, 3, 5])
def test_strided_is_the_papers_union_of_two_heads(stride):
    # Child et al. 2019, §4.2: A1(i) = {t, ..., i} with t = max(0, i - l); A2(i) = {j : (i - j) mod l = 0}
    T = 11
    want = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(max(0, i - stride), i + 1):
            want[i, j] = True
        for j in range(0, i + 1):
            if (i - j) % stride == 0:
                want[i, j] = True
    assert torch.equal(dense(masks.strided(stride), T, T), want)


@pytest.mark.parametrize("stride,c", [(1, 1), (3, 1), (4, 2), (4, 4)])
def test_fixed_is_the_papers_union_of_two_heads(stride, c):
    # A1(i) = {j : floor(j/l) = floor(i/l)}; A2(i) = {j : j mod l in {l - c, ..., l - 1}}; causal j <= i
    T = 11
    want = torch.tensor([[j <= i and (j // stride == i // stride or j % stride in range(stride - c, stride))
                          for j in range(T)] for i in range(T)])
    assert torch.equal(dense(masks.fixed(stride, summary=c), T, T), want)


@pytest.mark.parametrize("make", [lambda: masks.strided(3, causal=False), lambda: masks.longformer(2, [1, 4]),
                                  lambda: masks.dilated_window(2, 2, 3), lambda: masks.bigbird(2, random_blocks=0)])
def test_bidirectional_patterns_are_symmetric(make):
    d = dense(make(), 10, 10)
    assert torch.equal(d, d.T)


def test_fixed_noncausal_summary_columns_are_seen_by_every_query():
    d = dense(masks.fixed(4, summary=2, causal=False), 10, 10)
    assert d[:, [2, 3, 6, 7]].all()                             # summary cells: every query reads them
    assert not d[0, 4:6].any() and not d[0, 8:].any()           # ... but they are not global queries
    assert torch.equal(d[4:8, 4:8], torch.ones(4, 4, dtype=torch.bool))  # own block


@pytest.mark.parametrize("make", [lambda: masks.strided(3), lambda: masks.fixed(3, 2), lambda: masks.dilated_window(2)])
def test_causal_patterns_are_inside_causal_and_see_themselves(make):
    d = dense(make(), 10, 10)
    assert not (d & ~torch.ones(10, 10, dtype=torch.bool).tril()).any()
    assert d.diagonal().all()


# -- patterns that reduce to one another -----------------------------------------------------------
@pytest.mark.parametrize("Tq,Tk", [(5, 5), (3, 9), (9, 3)])
def test_reductions(Tq, Tk):
    eq = lambda a, b: torch.equal(dense(a, Tq, Tk), dense(b, Tq, Tk))  # noqa: E731
    assert eq(masks.dilated_window(2, 1, dilation=1), masks.sliding_window(2, 1))
    assert eq(masks.longformer(2), masks.sliding_window(2, 2))
    assert eq(masks.bigbird(1, window_blocks=2, global_blocks=0, random_blocks=0), masks.sliding_window(2, 2))
    assert eq(masks.strided(1), masks.causal())
    assert eq(masks.fixed(1), masks.causal())
    assert eq(masks.strided(100), masks.causal())
    assert eq(masks.strided(100, causal=False), masks.sliding_window(100, 100))
    assert eq(masks.bigbird(2, window_blocks=10), masks.sliding_window(100, 100))
    layout = torch.rand(Tq, Tk) < 0.5
    assert torch.equal(dense(masks.block_sparse(layout, 1), Tq, Tk), layout)


def test_block_sparse_per_head_layouts():
    layout = torch.stack([torch.eye(3, dtype=torch.bool), ~torch.eye(3, dtype=torch.bool)])
    d = dense(masks.block_sparse(layout, 2), 6, 5, heads=2)
    assert d.shape == (2, 6, 5)
    assert torch.equal(d[0], layout[0].repeat_interleave(2, 0).repeat_interleave(2, 1)[:6, :5])
    assert torch.equal(d[1], ~d[0])


def test_longformer_global_rows_and_columns():
    T, w, glob = 12, 1, [0, 5]
    d = dense(masks.longformer(w, glob), T, T)
    for g in glob:
        assert d[g].all() and d[:, g].all()
    for i in set(range(T)) - set(glob):
        want = {j for j in range(T) if abs(i - j) <= w} | set(glob)
        assert set(torch.nonzero(d[i]).flatten().tolist()) == want
    flags = torch.zeros(T, dtype=torch.bool)
    flags[glob] = True
    assert torch.equal(dense(masks.longformer(w, flags), T, T), d)


# -- BigBird's random blocks -------------------------------------------------------------------------
def test_bigbird_random_blocks_per_row():
    bs, w, g, r, Tk = 2, 1, 1, 2, 40
    m = masks.bigbird(bs, window_blocks=w, global_blocks=g, random_blocks=r, seed=11)
    rnd, lay = m.random_layout(Tk), m.layout(Tk)
    n = Tk // bs
    assert rnd.shape == lay.shape == (n, n)
    for qb in range(n):
        fixed_part = {kb for kb in range(n) if abs(qb - kb) <= w or kb < g or qb < g}
        picked = set(torch.nonzero(rnd[qb]).flatten().tolist())
        assert not picked & fixed_part                     # random blocks add coverage
        assert len(picked) == min(r, n - len(fixed_part))  # exactly r when there are enough candidates
        assert set(torch.nonzero(lay[qb]).flatten().tolist()) == fixed_part | picked


def test_bigbird_random_blocks_more_than_candidates_take_them_all():
    m = masks.bigbird(2, random_blocks=50)
    assert dense(m, 10, 10).all()


def test_bigbird_is_reproducible_within_a_process():
    a = masks.bigbird(2, random_blocks=2, seed=5)
    torch.manual_seed(123)
    d1 = a.materialize(30, 30)
    torch.manual_seed(999)
    torch.rand(100)  # the global RNG state does not matter
    d2 = masks.bigbird(2, random_blocks=2, seed=5).materialize(30, 30)
    assert torch.equal(d1, d2) and torch.equal(a.materialize(30, 30), d1)
    seeds = {tuple(masks.bigbird(2, random_blocks=2, seed=s).layout(30).flatten().tolist()) for s in range(5)}
    assert len(seeds) > 1  # the seed does change the random blocks


def test_bigbird_is_reproducible_across_processes():
    code = ("import torch, attnkit; torch.manual_seed({s}); "
            "print(attnkit.masks.bigbird(3, random_blocks=2, seed=7).layout(40).int().flatten().tolist())")
    here = masks.bigbird(3, random_blocks=2, seed=7).layout(40).int().flatten().tolist()
    # another process, another global seed, another hash seed: the same layout
    env = dict(os.environ, PYTHONHASHSEED="1")
    res = subprocess.run([sys.executable, "-c", code.format(s=1)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert eval(res.stdout) == here


@pytest.mark.parametrize("Tq", [1, 3, 8, 17])
def test_bigbird_decoding_rows_are_the_last_rows_of_the_full_mask(Tq):
    m = masks.bigbird(3, random_blocks=2, seed=2)
    assert torch.equal(dense(m, Tq, 17), dense(m, 17, 17)[-Tq:])


def test_bigbird_layout_depends_on_tk():
    m = masks.bigbird(2, random_blocks=1)
    assert m.layout(9).shape == (5, 5) and m.layout(10).shape == (5, 5) and m.layout(11).shape == (6, 6)
    assert torch.equal(m.materialize(9, 9)[0, 0], m.materialize(10, 10)[0, 0, :9, :9])  # same block count


def test_reprs_name_the_parameters():
    assert "stride=3" in repr(masks.strided(3))
    assert "seed=4" in repr(masks.bigbird(2, seed=4)) and "block_size=2" in repr(masks.bigbird(2))
    assert "global_tokens=[0, 3]" in repr(masks.longformer(1, [3, 0]))
    assert "(2, 3)" in repr(masks.block_sparse(torch.ones(2, 3, dtype=torch.bool), 2))
    assert "dilation=3" in repr(masks.dilated_window(1, dilation=3))


def test_bigbird_draws_its_random_blocks_before_any_vmap():
    # FlexAttention evaluates mask_mod under vmap, which refuses random ops: the draw must already
    # have happened in check() (run by attnkit.attention) or bind().
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    want = masks.bigbird(2, random_blocks=1, seed=3).classify_blocks(12, 12, 2, 2) != masks.EMPTY
    m = masks.bigbird(2, random_blocks=1, seed=3)
    m.check(1, 1, 12, 12)

    def mod(b, h, q_idx, kv_idx):  # calls mask_mod directly, not through bind()
        return m.mask_mod(b, h, q_idx, kv_idx, 12, 12)

    bm = flex.create_block_mask(mod, None, None, 12, 12, device="cpu", BLOCK_SIZE=2)
    assert torch.equal(bm.to_dense().bool(), want)
    bound = masks.bigbird(2, random_blocks=1, seed=3).bind(12, 12)
    assert torch.equal(flex.create_block_mask(bound, None, None, 12, 12, device="cpu", BLOCK_SIZE=2)
                       .to_dense().bool(), want)
