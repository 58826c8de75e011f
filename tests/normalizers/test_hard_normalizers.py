"""Hardmax, TopK, Gumbel, StochasticHard and reinforce_loss."""

import math

import pytest
import torch

import attnkit
from attnkit.normalizers import (Gumbel, Hardmax, HardSample, Softmax, StochasticHard, TopK, reinforce_loss)

NEG_INF = float("-inf")


def _rows(seed=0, n=6, tk=7, p_keep=0.6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tk, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(n, tk, generator=gen) < p_keep
    mask[:, -1] = True
    return x, mask


# -- Hardmax / TopK against explicit loops ------------------------------------------------------
def test_hardmax_is_one_hot_argmax_of_allowed_keys():
    x, mask = _rows()
    x[0, 0] = 100.0
    mask[0, 0] = False  # the largest score is masked: never chosen
    w = Hardmax()(x, mask)
    for i in range(x.shape[0]):
        allowed = [j for j in range(x.shape[1]) if mask[i, j]]
        best = max(allowed, key=lambda j: x[i, j].item())
        assert w[i].tolist() == [1.0 if j == best else 0.0 for j in range(x.shape[1])]


def test_hardmax_ties_pick_first_and_bfloat16_is_exact():
    assert Hardmax()(torch.tensor([1.0, 3.0, 3.0])).tolist() == [0.0, 1.0, 0.0]
    x = torch.randn(5, 9, dtype=torch.bfloat16, requires_grad=True)
    w = Hardmax()(x)
    assert w.dtype == torch.bfloat16 and (w.sum(-1) == 1).all() and set(w.unique().tolist()) <= {0.0, 1.0}
    w.backward(torch.randn(5, 9, dtype=torch.bfloat16))
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_topk_matches_explicit_loop(k):
    x, mask = _rows(1)
    w = TopK(k=k)(x, mask)
    for i in range(x.shape[0]):
        allowed = [j for j in range(x.shape[1]) if mask[i, j]]
        top = sorted(allowed, key=lambda j: -x[i, j].item())[:k]  # fewer than k allowed: all of them
        z = sum(math.exp(x[i, j].item()) for j in top)
        expected = [math.exp(x[i, j].item()) / z if j in top else 0.0 for j in range(x.shape[1])]
        torch.testing.assert_close(w[i], torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    if k == 1:
        assert torch.equal(w, Hardmax()(x, mask))
    if k == 10:  # every row has fewer allowed keys than k: plain softmax
        torch.testing.assert_close(w, Softmax()(x, mask), atol=1e-12, rtol=0)


def test_topk_temperature():
    x = torch.tensor([2.0, 1.0, 0.0, -5.0], dtype=torch.float64)
    w = TopK(k=2, temperature=0.5)(x)
    e = torch.tensor([math.exp(4.0), math.exp(2.0)], dtype=torch.float64)
    torch.testing.assert_close(w[:2], e / e.sum())
    assert w[2:].tolist() == [0.0, 0.0]


# -- Gumbel ---------------------------------------------------------------------------------
def test_gumbel_soft_equals_softmax_of_perturbed_scores():
    x, mask = _rows(2)
    w = Gumbel(tau=0.5, generator=torch.Generator().manual_seed(7))(x, mask)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7)).double()  # the same stream
    g = -torch.log(-torch.log(u))
    s = ((x + g) / 0.5).masked_fill(~mask, NEG_INF)
    torch.testing.assert_close(w, torch.softmax(s, -1), atol=1e-6, rtol=1e-5)


def test_gumbel_generator_reproducible_and_hard_one_hot():
    x, mask = _rows(3, n=40)
    a = Gumbel(tau=1.0, hard=True, generator=torch.Generator().manual_seed(0))(x, mask)
    b = Gumbel(tau=1.0, hard=True, generator=torch.Generator().manual_seed(0))(x, mask)
    c = Gumbel(tau=1.0, hard=True, generator=torch.Generator().manual_seed(1))(x, mask)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a == 0) | (a == 1)).all() and (a.sum(-1) == 1).all() and (a[~mask] == 0).all()
    soft = Gumbel(generator=torch.Generator().manual_seed(0))
    assert not soft.deterministic and not Gumbel(hard=True).deterministic
    assert torch.equal(soft(x, mask), Gumbel(generator=torch.Generator().manual_seed(0))(x, mask))
    # the generator advances: two calls differ
    assert not torch.equal(soft(x, mask), soft(x, mask))


def test_gumbel_hard_samples_follow_softmax_and_never_pick_masked():
    """Gumbel-max trick: argmax(s + g) ~ softmax(s). Masked keys, even with a huge score, never win."""
    s = torch.tensor([1.0, 0.0, 50.0, -1.0, 0.5])
    mask = torch.tensor([True, True, False, True, True])
    n = 20000
    w = Gumbel(hard=True, generator=torch.Generator().manual_seed(0))(s.expand(n, 5), mask)
    freq = w.mean(0)
    assert freq[2].item() == 0.0
    torch.testing.assert_close(freq, Softmax()(s, mask), atol=0.015, rtol=0)


def test_gumbel_low_tau_is_nearly_one_hot():
    x, mask = _rows(4)
    w = Gumbel(tau=0.01, generator=torch.Generator().manual_seed(0))(x, mask)
    assert (w.max(-1).values > 0.99).all()


# -- StochasticHard ---------------------------------------------------------------------------
def test_stochastic_hard_sample_fields():
    x, mask = _rows(5)
    mask[2] = False  # fully masked row
    x.requires_grad_()
    sh = StochasticHard(generator=torch.Generator().manual_seed(0))
    w = sh(x, mask)
    s = sh.last_sample
    assert isinstance(s, HardSample) and not sh.deterministic and StochasticHard(greedy=True).deterministic
    assert s.index.shape == (6,) and s.index.dtype == torch.long and s.log_prob.shape == (6,)
    assert s.probs.shape == (6, 7) and s.entropy.shape == (6,)
    live = [i for i in range(6) if i != 2]
    p_ref = torch.softmax(x.detach().masked_fill(~mask, NEG_INF), -1)
    for i in live:
        j = s.index[i].item()
        assert mask[i, j] and w[i].tolist() == [1.0 if jj == j else 0.0 for jj in range(7)]
        assert abs(s.log_prob[i].item() - math.log(p_ref[i, j].item())) < 1e-12
        allowed = mask[i]
        ent = -(p_ref[i, allowed] * p_ref[i, allowed].log()).sum().item()
        assert abs(s.entropy[i].item() - ent) < 1e-12
        torch.testing.assert_close(s.probs[i].detach(), p_ref[i])
    # fully masked row: zero weights, index -1, log_prob 0, probs 0, entropy 0
    assert w[2].tolist() == [0.0] * 7 and s.index[2].item() == -1 and s.log_prob[2].item() == 0.0
    assert s.probs[2].tolist() == [0.0] * 7 and s.entropy[2].item() == 0.0
    # the weights carry no gradient; log_prob, probs and entropy do, with no NaN
    assert not w.requires_grad
    (s.log_prob.sum() + s.entropy.sum() + (s.probs * torch.randn(6, 7, dtype=torch.float64)).sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all() and (x.grad[2] == 0).all()


def test_stochastic_hard_frequencies_reproducibility_and_greedy():
    s = torch.tensor([0.5, -1.0, 1.5, 0.0])
    mask = torch.tensor([True, True, True, False])
    n = 20000
    sh = StochasticHard(generator=torch.Generator().manual_seed(1))
    w = sh(s.expand(n, 4), mask)
    torch.testing.assert_close(w.mean(0), Softmax()(s, mask), atol=0.015, rtol=0)
    idx = sh.last_sample.index
    sh2 = StochasticHard(generator=torch.Generator().manual_seed(1))
    sh2(s.expand(n, 4), mask)
    assert torch.equal(sh2.last_sample.index, idx)
    g = StochasticHard(greedy=True)
    assert g(s.expand(3, 4), mask).tolist() == [[0.0, 0.0, 1.0, 0.0]] * 3
    assert g.last_sample.index.tolist() == [2, 2, 2]


def test_stochastic_hard_bfloat16():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    sh = StochasticHard()
    w = sh(x, torch.tensor([True] * 5 + [False]))
    assert w.dtype == torch.bfloat16 and (w.sum(-1) == 1).all() and (w[:, 5] == 0).all()
    assert sh.last_sample.log_prob.dtype == torch.bfloat16


# -- reinforce_loss ---------------------------------------------------------------------------
def test_reinforce_loss_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.25)], requires_grad=True)
    reward = torch.tensor([1.0, 0.0])
    loss = reinforce_loss(logp, reward, baseline=0.5)
    expected = -((1.0 - 0.5) * math.log(0.5) + (0.0 - 0.5) * math.log(0.25)) / 2
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    assert logp.grad.tolist() == [-0.25, 0.25]


def test_reinforce_loss_learned_baseline_and_entropy():
    logp = torch.tensor([-0.1, -2.0, -0.7], requires_grad=True)
    ent = torch.tensor([0.3, 0.9, 0.6], requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 1.0])
    b = torch.tensor(0.25, requires_grad=True)
    loss = reinforce_loss(logp, reward, baseline=b, entropy=ent, entropy_weight=0.1)
    adv = reward - 0.25
    expected = -(adv * logp.detach()).mean() + ((0.25 - reward) ** 2).mean() - 0.1 * ent.detach().mean()
    assert abs(loss.item() - expected.item()) < 1e-6
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)
    # the baseline learns only from its MSE to the reward, not from the policy term
    assert abs(b.grad.item() - (2 * (0.25 - reward)).mean().item()) < 1e-6
    torch.testing.assert_close(ent.grad, torch.full((3,), -0.1 / 3))
    # no baseline: the plain REINFORCE estimator
    assert abs(reinforce_loss(logp, reward).item() - (-(reward * logp.detach()).mean()).item()) < 1e-6


def test_reinforce_gradient_is_unbiased():
    """E[∇ reinforce_loss] = -∇ E[R] = -∇ Σ_j softmax(s)_j R_j (estimated with many samples)."""
    s = torch.tensor([0.3, -0.5, 1.0, 0.2], requires_grad=True)
    r = torch.tensor([1.0, 3.0, -1.0, 0.5])
    n = 40000
    sh = StochasticHard(generator=torch.Generator().manual_seed(0))
    sh(s.expand(n, 4))
    idx = sh.last_sample.index
    reinforce_loss(sh.last_sample.log_prob, r[idx], baseline=r.mean()).backward()
    s_ref = s.detach().clone().requires_grad_()
    (-(torch.softmax(s_ref, -1) * r).sum()).backward()
    torch.testing.assert_close(s.grad, s_ref.grad, atol=0.03, rtol=0)


def test_reinforce_loss_errors():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reward"):
        reinforce_loss(logp, torch.ones(2))
    with pytest.raises(ValueError, match="baseline"):
        reinforce_loss(logp, torch.ones(2, 3), baseline=torch.ones(4))
    with pytest.raises(ValueError, match="entropy"):
        reinforce_loss(logp, 1.0, entropy_weight=0.1)
    with pytest.raises(ValueError, match="entropy_weight"):
        reinforce_loss(logp, 1.0, entropy=logp, entropy_weight=-1.0)
    with pytest.raises(TypeError, match="log_prob"):
        reinforce_loss([0.0], 1.0)
    with pytest.raises(TypeError, match="reward"):
        reinforce_loss(logp, "1")


# -- parameters and names ---------------------------------------------------------------------
def test_bad_parameters():
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="tau"):
            Gumbel(tau=bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="k"):
            TopK(k=bad)
    with pytest.raises(TypeError, match="k"):
        TopK(k=1.5)
    with pytest.raises(ValueError, match="temperature"):
        Hardmax(temperature=0)
    with pytest.raises(TypeError, match="hard"):
        Gumbel(hard="yes")
    with pytest.raises(TypeError, match="generator"):
        Gumbel(generator=0)
    with pytest.raises(TypeError, match="generator"):
        StochasticHard(generator="seed")


def test_unknown_normalizer_lists_valid_names():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError) as err:
        attnkit.attention(q, q, q, normalizer="sparsmax")
    msg = str(err.value)
    assert "'sparsmax'" in msg
    for name in ("softmax", "sigmoid", "sparsemax", "entmax15", "entmax", "hardmax", "topk", "gumbel",
                 "stochastic_hard"):
        assert repr(name) in msg
    with pytest.raises(TypeError, match="normalizer"):
        attnkit.normalizers.get(3)


def test_names_resolve_to_documented_defaults():
    get = attnkit.normalizers.get
    assert isinstance(get("hardmax"), Hardmax)
    assert get("topk").k == 8
    g = get("gumbel")
    assert isinstance(g, Gumbel) and g.tau == 1.0 and g.hard is False
    assert isinstance(get("stochastic_hard"), StochasticHard)
