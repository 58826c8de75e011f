"""attnkit's Triton sparsemax / 1.5-entmax kernels (attnkit.kernels.triton.entmax) against the
float64 reference and the ``entmax`` package, forward and backward.

Without a GPU they run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), 16 x 16 tiles, so every mask family gives empty, partial and full tiles. The
interpreter runs each program in Python: a few cases run by default, the whole matrix with
``python -m pytest -m interpreter``.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnkit
from attnkit import masks, normalizers, positions
from attnkit.kernels.triton import interpreting
from attnkit.testing import assert_matches_float64_gold, assert_matches_reference, make_qkv, max_err

pytest.importorskip("triton", reason='triton is not installed (pip install -e ".[gpu]")')
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attnkit.kernels.triton.entmax import entmax_forward  # noqa: E402  (after the interpreter check)
from tests.backends.test_triton import _mask_cases  # noqa: E402  (the same mask families as sigmoid)

SPARSE = {"sparsemax": "sparsemax", "entmax15": "entmax15", "Entmax(2)": normalizers.Entmax(2.0),
          "Entmax(1.5)": normalizers.Entmax(1.5), "Entmax(1.25)": normalizers.Entmax(1.25, n_iter=80),
          "Entmax(1.8)": normalizers.Entmax(1.8, n_iter=80)}


@pytest.mark.parametrize("norm", ["sparsemax", "entmax15", "Entmax(1.25)"])
def test_causal_alibi_gqa_forward_and_backward(norm):
    """float32, GQA (4 query heads on 2), ALiBi, Tq=37, Tk=45, D=16, Dv=24: output and all three
    gradients within 2x the reference's own float32 error of the float64 gold."""
    q, k, v = make_qkv(2, 4, 37, 45, D=16, Dv=24, Hkv=2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "triton", normalizer=SPARSE[norm], mask=masks.causal(),
                                bias=positions.ALiBi(4))


@pytest.mark.interpreter
@pytest.mark.parametrize("norm", ["sparsemax", "entmax15", "Entmax(1.25)"])
@pytest.mark.parametrize("mask_name", list(_mask_cases(37, 45, 2)))
@pytest.mark.parametrize("alibi", [False, True])
def test_every_mask_family_forward_and_backward(norm, mask_name, alibi):
    q, k, v = make_qkv(2, 4, 37, 45, D=16, Dv=24, Hkv=2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "triton", normalizer=SPARSE[norm], mask=_mask_cases(37, 45, 2)[mask_name],
                                bias=positions.ALiBi(4) if alibi else None)


@pytest.mark.interpreter
@pytest.mark.parametrize("norm", list(SPARSE))
@pytest.mark.parametrize("score", ["scaled_dot", "dot", "cosine"])
def test_normalizer_spellings_and_dot_scores(norm, score):
    q, k, v = make_qkv(1, 2, 20, 33, D=16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "triton", normalizer=SPARSE[norm], score=score, mask=masks.causal())


@pytest.mark.parametrize("norm", ["sparsemax", "entmax15"])
def test_matches_the_entmax_package(norm):
    """The ``entmax`` package (Peters et al.'s own code) on the dense scores is the oracle."""
    entmax = pytest.importorskip("entmax", reason="the entmax package is in [dev]")
    q, k, v = make_qkv(1, 2, 24, 70, D=16, dtype=torch.float64, device=DEVICE)
    s = q @ k.transpose(-2, -1) / 4.0
    p = (entmax.sparsemax if norm == "sparsemax" else entmax.entmax15)(s, dim=-1)
    out = attnkit.attention(q.float(), k.float(), v.float(), normalizer=norm, backend="triton")
    assert max_err(out, p @ v) < 2e-5


def _sums_to_one(q, k, tau, alpha):
    x = (alpha - 1.0) * (q @ k.transpose(-2, -1)).double() * q.shape[-1] ** -0.5
    d = (x - tau.double().unsqueeze(-1)).clamp_min(0)
    total = d.pow(1.0 / (alpha - 1.0)).sum(-1)
    return torch.allclose(total, torch.ones_like(total), atol=2e-5)


def test_threshold_passes_over_the_keys_are_few():
    """Without candidates every threshold step is a pass over the keys: they stop early (support
    unchanged / bracket closed), a handful per block on scores of three spreads, and the thresholds
    give weights summing to 1 on every row."""
    g = torch.Generator().manual_seed(3)
    for spread in (0.1, 1.0, 5.0):
        q = (torch.randn(1, 1, 16, 32, generator=g) * spread).to(DEVICE)
        k = torch.randn(1, 1, 256, 32, generator=g).to(DEVICE)
        v = torch.randn(1, 1, 256, 8, generator=g).to(DEVICE)
        for alpha in (2.0, 1.5):
            _, tau, _, steps = entmax_forward(q, k, v, 32 ** -0.5, alpha, None, None,
                                              {"fwd": {"block": (16, 64)}, "candidates": 0})
            assert 1 <= int(steps.max()) <= 12, (spread, alpha, steps)
            assert _sums_to_one(q, k, tau, alpha), (spread, alpha)


@pytest.mark.parametrize("candidates", [4, 16, 64])
def test_candidates_kept_in_the_first_pass_give_the_exact_threshold(candidates):
    """The keys kept while finding the maxima (compacted when full) give each row's threshold with
    no pass over the keys when they fit; rows that overflow fall back to passes; exact either way
    against the dense reference, for flat (wide supports) and peaked scores."""
    g = torch.Generator().manual_seed(5)
    fallback = False
    for spread in (0.2, 1.0, 4.0):
        q = (torch.randn(1, 2, 16, 32, generator=g) * spread).to(DEVICE)
        k, v = torch.randn(1, 2, 300, 32, generator=g).to(DEVICE), torch.randn(1, 2, 300, 8, generator=g).to(DEVICE)
        for alpha, norm in ((2.0, "sparsemax"), (1.5, "entmax15"), (1.25, normalizers.Entmax(1.25, n_iter=80))):
            out, tau, _, steps = entmax_forward(q, k, v, 32 ** -0.5, alpha, None, None,
                                                {"fwd": {"block": (16, 64)}, "candidates": candidates})
            ref = attnkit.attention(q.double(), k.double(), v.double(), normalizer=norm, backend="reference")
            assert max_err(out, ref) < 2e-5 and _sums_to_one(q, k, tau, alpha), (candidates, spread, alpha)
            x = (alpha - 1.0) * (q @ k.transpose(-2, -1)) * 32 ** -0.5
            widest = int((x > x.amax(-1, keepdim=True) - 1).sum(-1).max())   # keys above max - 1
            if widest <= candidates:
                assert int(steps.max()) == 0, (candidates, spread, alpha, widest, steps)
            fallback |= int(steps.max()) > 0
    # the flat scores overflow 4 candidates: the exact thresholds above came from the fallback passes
    assert fallback or candidates > 4


@pytest.mark.interpreter
def test_random_scores_at_8192_keys_fit_in_128_candidates():
    """The figure the module docstring quotes: D=128, N=8,192 random scores (two spreads), both α:
    no pass over the keys for the threshold."""
    g = torch.Generator().manual_seed(0)
    for spread in (1.0, 3.0):
        q = (torch.randn(1, 2, 16, 128, generator=g) * spread).to(DEVICE)
        k, v = torch.randn(1, 2, 8192, 128, generator=g).to(DEVICE), torch.randn(1, 2, 8192, 8, generator=g).to(DEVICE)
        for alpha in (2.0, 1.5):
            _, tau, _, steps = entmax_forward(q, k, v, 128 ** -0.5, alpha, None, None,
                                              {"fwd": {"block": (16, 128)}, "candidates": 128})
            assert int(steps.max()) == 0 and _sums_to_one(q, k, tau, alpha), (spread, alpha, steps)


@pytest.mark.interpreter
def test_half_precision():
    q, k, v = make_qkv(1, 4, 33, 40, D=32, Hkv=1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for norm in ("sparsemax", "entmax15"):
        assert_matches_float64_gold(q, k, v, "triton", dtype=torch.float16, normalizer=norm,
                                    mask=masks.sliding_window(9), bias=positions.ALiBi(4))


@pytest.mark.interpreter
def test_noncontiguous_inputs_and_their_gradients():
    q, k, v = make_qkv(2, 2, 21, D=16, device=DEVICE, noncontiguous=True)
    k = torch.randn(2, 2, 21, 32, device=DEVICE)[..., :16]
    for x in (q, k, v):
        x.requires_grad_()
    assert_matches_reference(q, k, v, "triton", normalizer="entmax15", mask=masks.causal())


@pytest.mark.interpreter
@settings(max_examples=8, deadline=None)
@given(Tq=st.integers(1, 40), Tk=st.integers(1, 40), left=st.integers(0, 40), right=st.integers(0, 40),
       groups=st.sampled_from([1, 2]), norm=st.sampled_from(["sparsemax", "entmax15"]))
def test_property_windows_any_size(Tq, Tk, left, right, groups, norm):
    q, k, v = make_qkv(1, 2 * groups, Tq, Tk, D=16, Hkv=2, device=DEVICE, requires_grad=True)
    assert_matches_reference(q, k, v, "triton", normalizer=norm, mask=masks.sliding_window(left, right))
