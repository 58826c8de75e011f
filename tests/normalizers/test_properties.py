"""Property tests over random shapes and masks, for every normalizer that makes rows sum to 1:
rows sum to 1, masked keys get exactly 0, fully masked rows give exact zeros, and nothing is NaN
(forward or backward) -- both calling the normalizer and through ``attnkit.attention``."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit.normalizers import Entmax, Gumbel, StochasticHard, TopK

# name -> factory (a fresh object per example so sampling ones are seeded)
NORMALIZERS = {
    "softmax": lambda: "softmax",
    "sparsemax": lambda: "sparsemax",
    "entmax15": lambda: "entmax15",
    "entmax": lambda: "entmax",
    "entmax-1.25": lambda: Entmax(alpha=1.25),
    "entmax-3": lambda: Entmax(alpha=3.0),
    "hardmax": lambda: "hardmax",
    "topk": lambda: "topk",
    "topk-2": lambda: TopK(k=2),
    "gumbel": lambda: Gumbel(generator=torch.Generator().manual_seed(0)),
    "gumbel-hard": lambda: Gumbel(tau=0.5, hard=True, generator=torch.Generator().manual_seed(0)),
    "stochastic_hard": lambda: StochasticHard(generator=torch.Generator().manual_seed(0)),
}
ONE_HOT = {"hardmax", "gumbel-hard", "stochastic_hard"}
NO_SCORE_GRAD = {"stochastic_hard"}  # trained by REINFORCE, its weights carry no gradient


@st.composite
def problems(draw, allow_dead=True):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Tq, Tk = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, Tq, Tk, generator=gen) < draw(st.floats(0.2, 1.0))
    # at least one allowed key per row, then (maybe) some fully masked rows
    first = torch.randint(Tk, (B, H, Tq, 1), generator=gen)
    mask.scatter_(-1, first, True)
    if allow_dead and draw(st.booleans()):
        mask &= torch.rand(B, H, Tq, 1, generator=gen) < 0.7
    return B, H, Tq, Tk, dtype, gen, mask


def _check_weights(w, mask, name, dtype):
    dead = ~mask.any(-1)
    live = ~dead
    assert w.dtype == dtype and torch.isfinite(w).all()
    assert (w[~mask] == 0).all(), "masked keys must get exactly 0"
    assert (w[dead] == 0).all(), "fully masked rows must be exactly 0"
    assert (w >= 0).all()
    sums = w.double().sum(-1)[live]
    if name in ONE_HOT:
        assert ((w == 0) | (w == 1)).all() and (sums == 1).all()
    else:
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=tol, rtol=0)


@pytest.mark.parametrize("name", list(NORMALIZERS))
@given(problem=problems())
def test_normalizer_rows(name, problem):
    B, H, Tq, Tk, dtype, gen, mask = problem
    norm = attnkit.normalizers.get(NORMALIZERS[name]())
    scores = (torch.randn(B, H, Tq, Tk, generator=gen) * 3).to(dtype).requires_grad_()
    w = norm(scores, mask)
    _check_weights(w, mask, name, dtype)
    if name in NO_SCORE_GRAD:
        assert not w.requires_grad
        return
    (w * torch.randn(w.shape, generator=gen).to(dtype)).sum().backward()
    g = scores.grad
    assert torch.isfinite(g).all()
    assert (g[~mask] == 0).all() and (g[~mask.any(-1)] == 0).all()


@pytest.mark.parametrize("name", list(NORMALIZERS))
@given(problem=problems())
def test_through_attention_reference(name, problem):
    B, H, Tq, Tk, dtype, gen, mask = problem
    D, Dv = 4, 3
    q = torch.randn(B, H, Tq, D, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, H, Tk, D, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(B, H, Tk, Dv, generator=gen).to(dtype).requires_grad_()
    out, w = attnkit.attention(q, k, v, normalizer=NORMALIZERS[name](), mask=mask, return_weights=True,
                               backend="reference")
    _check_weights(w, mask, name, dtype)
    # the same weights as the normalizer on the explicit scaled scores (fresh, identically seeded objects)
    s = (q.detach().double() @ k.detach().double().transpose(-2, -1) / D ** 0.5).to(dtype)
    expected = attnkit.normalizers.get(NORMALIZERS[name]())(s, mask)
    if name in ONE_HOT:
        # a near-tie can flip with the rounding of the scores: compare only clear winners
        assert (w == expected).all(-1).double().mean() >= 0.5
    else:
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(w, expected, atol=tol, rtol=0)
    dead = ~mask.any(-1)
    assert torch.isfinite(out).all() and (out[dead] == 0).all()
    out.float().pow(2).sum().backward()
    for x in (q, k, v):
        assert x.grad is None or torch.isfinite(x.grad).all()
    assert torch.isfinite(v.grad).all()
    if dead.any() and q.grad is not None:  # dead query rows get no gradient
        assert (q.grad[dead] == 0).all()


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_no_keys_at_all(name):
    """Tk = 0: every row is empty, so the output is zeros (not an error, not NaN)."""
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4)
    out, w = attnkit.attention(q, k, k, normalizer=NORMALIZERS[name](), return_weights=True, backend="reference")
    assert w.shape == (1, 2, 3, 0) and out.shape == (1, 2, 3, 4) and (out == 0).all()


def test_deterministic_flags():
    get = attnkit.normalizers.get
    for name in ("softmax", "sigmoid", "sparsemax", "entmax15", "entmax", "hardmax", "topk"):
        assert get(name).deterministic, name
    for name in ("gumbel", "stochastic_hard"):
        assert not get(name).deterministic, name
    assert StochasticHard(greedy=True).deterministic and not StochasticHard.deterministic


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "sparsemax", "entmax15", "entmax", "hardmax", "topk"])
def test_minus_infinity_scores_hide_keys_like_the_mask(name):
    norm = attnkit.normalizers.get(name)
    s = torch.randn(3, 6, dtype=torch.float64)
    s[0] = float("-inf")  # a whole row hidden by a bias: zeros, not NaN
    s[1, 2:] = float("-inf")
    mask = torch.isfinite(s)
    by_score = norm(s)
    by_mask = norm(torch.where(mask, s, torch.zeros_like(s)), mask)
    assert not torch.isnan(by_score).any()
    assert torch.equal(by_score[0], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(by_score, by_mask)
