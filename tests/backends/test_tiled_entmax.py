"""Sparsemax and α-entmax on the tiled backend (attnkit.kernels.entmax): exact against the
reference (float64 gold), against the independent ``entmax`` package, forward and backward, with
masks, biases, GQA, odd sizes and rows with no key."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnkit
from attnkit import masks, normalizers, positions
from attnkit.backends import REGISTRY
from attnkit.spec import canonicalize
from attnkit.testing import assert_matches_float64_gold, make_qkv, max_err

NORMALIZERS = {"sparsemax": "sparsemax", "entmax15": "entmax15", "entmax_1.3": normalizers.Entmax(1.3),
               "entmax_2.0": normalizers.Entmax(2.0)}


def _masks(Tk):
    return {
        "none": None, "causal": masks.causal(), "window": masks.sliding_window(9, 3),
        "padding_dead_row": masks.key_padding(torch.tensor([Tk, 0])),
        "block_sparse": masks.block_sparse(torch.tensor([[True, False, True], [True, True, False], [False, True, True]]), 64),
        "from_mod": masks.from_mod(lambda b, h, q, kv: (q + 2 * kv) % 3 != 0),
    }


@pytest.mark.parametrize("norm", list(NORMALIZERS))
@pytest.mark.parametrize("mask", list(_masks(150)))
def test_matches_the_float64_reference_forward_and_backward(norm, mask):
    """float32, GQA, ALiBi, Tq=133, Tk=150 (ragged tiles): within 2x the reference's own error."""
    q, k, v = make_qkv(2, 4, 133, 150, D=16, Dv=8, Hkv=2, dtype=torch.float64, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "tiled", normalizer=NORMALIZERS[norm], mask=_masks(150)[mask],
                                bias=positions.ALiBi(4))


@pytest.mark.parametrize("norm", list(NORMALIZERS))
def test_float64_is_exact(norm):
    q, k, v = make_qkv(1, 2, 70, 300, D=8, dtype=torch.float64, requires_grad=True)
    kw = dict(normalizer=NORMALIZERS[norm], mask=masks.causal(), score="dot")
    out = attnkit.attention(q, k, v, backend="tiled", **kw)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    g = torch.randn_like(out)
    assert max_err(out, ref) < 1e-12
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert max_err(a, b) < 1e-11


@pytest.mark.parametrize("which", ["sparsemax", "entmax15", "bisect_1.25"])
def test_matches_the_entmax_package(which):
    """The ``entmax`` package (Peters et al.'s own code) on the dense scores is the oracle."""
    entmax = pytest.importorskip("entmax", reason="the entmax package is in [dev]")
    q, k, v = make_qkv(2, 3, 40, 260, D=16, dtype=torch.float64, requires_grad=True)
    s = q @ k.transpose(-2, -1) / 4.0
    if which == "sparsemax":
        p, norm = entmax.sparsemax(s, dim=-1), "sparsemax"
    elif which == "entmax15":
        p, norm = entmax.entmax15(s, dim=-1), "entmax15"
    else:
        p, norm = entmax.entmax_bisect(s, alpha=1.25, dim=-1, n_iter=80), normalizers.Entmax(1.25)
    want = p @ v
    got = attnkit.attention(q, k, v, normalizer=norm, backend="tiled")
    assert max_err(got, want) < 1e-10
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert max_err(a, b) < 1e-8


def test_a_row_with_no_key_gives_zeros_and_no_gradient():
    q, k, v = make_qkv(2, 2, 20, 40, D=8, requires_grad=True)
    out = attnkit.attention(q, k, v, normalizer="entmax15", mask=masks.key_padding(torch.tensor([40, 0])),
                            backend="tiled")
    assert not out[1].any()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert not dq[1].any() and not dk[1].any() and not dv[1].any() and dq[0].abs().sum() > 0


def test_ties_give_the_uniform_distribution():
    """All scores equal (zero queries): sparsemax and entmax are uniform over the live keys."""
    q = torch.zeros(1, 1, 5, 8)
    k, v = torch.randn(1, 1, 300, 8), torch.randn(1, 1, 300, 4)
    for norm in ("sparsemax", "entmax15"):
        out, w = attnkit.attention(q, k, v, normalizer=norm, backend="tiled", return_weights=True)
        assert torch.allclose(w, torch.full_like(w, 1 / 300), atol=1e-7)
        assert torch.allclose(out, v.mean(2, keepdim=True).expand_as(out), atol=1e-5)


def test_weights_come_from_the_thresholds():
    q, k, v = make_qkv(1, 2, 50, 90, D=8, dtype=torch.float64)
    kw = dict(normalizer="sparsemax", mask=masks.sliding_window(30))
    _, w = attnkit.attention(q, k, v, backend="tiled", return_weights=attnkit.WeightsRequest(heads=[1], rows=[0, 49]),
                             **kw)
    _, ref = attnkit.attention(q, k, v, backend="reference", return_weights=True, **kw)
    assert max_err(w, ref[:, [1]][:, :, [0, 49]]) < 1e-12
    assert torch.allclose(w.sum(-1), torch.ones(1, 1, 2, dtype=torch.float64))


def test_refusals_say_why():
    q, k, v = make_qkv(1, 2, 8, D=8)
    b = REGISTRY["tiled"]
    assert any("alpha in (1, 2]" in w for w in b.not_supported_reasons(
        canonicalize(q, k, v, normalizer=normalizers.Entmax(2.5))))
    assert any("dropout" in w for w in b.not_supported_reasons(
        canonicalize(q, k, v, normalizer="sparsemax", dropout_p=0.1)))


def test_auto_takes_the_tiled_engine_for_long_rows():
    q, k, v = make_qkv(1, 8, 1024, D=16)
    assert attnkit.explain(q, k, v, normalizer="entmax15", mask=masks.causal()).backend == "tiled"
    q, k, v = make_qkv(1, 1, 16, D=16)
    assert attnkit.explain(q, k, v, normalizer="entmax15").backend == "reference"


@settings(max_examples=15, deadline=None)
@given(Tq=st.integers(1, 70), Tk=st.integers(1, 300), left=st.integers(0, 300), alpha=st.sampled_from([1.2, 1.5, 1.7, 2.0]),
       seed=st.integers(0, 1000))
def test_property_any_size_and_window(Tq, Tk, left, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, t, 8, generator=g, dtype=torch.float64) * 3 for t in (Tq, Tk, Tk))
    kw = dict(normalizer=normalizers.Entmax(alpha), mask=masks.sliding_window(left))
    out = attnkit.attention(q, k, v, backend="tiled", **kw)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    assert max_err(out, ref) < 1e-9


@pytest.mark.parametrize("groups,group,block_bytes,first", [(1, 32, 2**26, 8), (4096, 32, 2**26, 1),
                                                            (2, 4, 2**26, 2), (64, 32, 3000, 32)])
@pytest.mark.parametrize("norm", list(NORMALIZERS))
def test_both_threshold_searches_are_exact(monkeypatch, groups, group, block_bytes, first, norm):
    """One candidate group sends the rows with several groups near their maximum to the Newton
    passes; 4,096 finds every threshold in closed form (from the loosest lower bound, one group's
    maximum); groups of 4 keys cut the row into many; a few KiB per block cut every query block
    into single rows."""
    import attnkit.kernels.entmax as E

    monkeypatch.setattr(E, "CANDIDATE_GROUPS", groups)
    monkeypatch.setattr(E, "GROUP", group)
    monkeypatch.setattr(E, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(E, "FIRST_GROUPS", first)
    q, k, v = make_qkv(2, 2, 50, 400, D=8, dtype=torch.float64, requires_grad=True)
    q = (q * 0.3).detach().requires_grad_()  # flat scores: wide supports
    kw = dict(normalizer=NORMALIZERS[norm], mask=masks.causal())
    out = attnkit.attention(q, k, v, backend="tiled", **kw)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    assert max_err(out, ref) < 1e-11
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert max_err(a, b) < 1e-10
