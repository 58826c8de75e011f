"""float64 gradcheck of every differentiable normalizer, and of the straight-through estimators:
their gradient must be exactly that of the dense (Gumbel-)softmax they stand in for."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

from attnkit.normalizers import (Entmax, Entmax15, Gumbel, Hardmax, Sigmoid, Softmax, Sparsemax, TopK)

SMOOTH = {
    "sparsemax": Sparsemax(),
    "entmax15": Entmax15(),
    "entmax-1.25": Entmax(alpha=1.25),
    "entmax-1.5": Entmax(alpha=1.5),
    "entmax-2": Entmax(alpha=2.0),
    "softmax-T0.5": Softmax(temperature=0.5),
    "softmax": Softmax(),
    "sigmoid": Sigmoid(),
    "sigmoid-logn": Sigmoid(bias="log_n"),
}


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 2, 6, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    mask = torch.rand(3, 2, 6, generator=gen) > 0.3
    mask[..., 1] = True
    mask[2, 1] = False  # one fully masked row
    return x, mask


def _away_from_kinks(norm, x, mask, margin=1e-4):
    """α-entmax maps are not differentiable where a key enters/leaves the support, i.e. where
    ``(α-1) z_j - τ = p_j^(α-1)`` crosses 0; check that the random point is not within
    finite-difference reach of such a kink."""
    alpha = {Sparsemax: 2.0, Entmax15: 1.5}.get(type(norm), getattr(norm, "alpha", None))
    if alpha is None:  # softmax, sigmoid: smooth everywhere
        return
    y = norm(x.detach(), mask)
    live = mask & mask.any(-1, keepdim=True)
    gap = y[live] ** (alpha - 1)
    assert ((gap == 0) | (gap > margin)).all()  # keys in the support stay in
    for j in (live & (y == 0)).nonzero().tolist():  # keys outside stay out when nudged up
        bumped = x.detach().clone()
        bumped[tuple(j)] += margin
        assert norm(bumped, mask)[tuple(j)] == 0


@pytest.mark.parametrize("name", list(SMOOTH))
def test_gradcheck(name):
    norm = SMOOTH[name]
    x, mask = _inputs()
    _away_from_kinks(norm, x, mask)
    assert gradcheck(lambda s: norm(s), (x,), eps=1e-6, atol=1e-6)
    assert gradcheck(lambda s: norm(s, mask), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "entmax-1.5"])
def test_gradcheck_with_neg_inf_inputs(name):
    """-inf entries in the scores themselves (as masked scores reach ``normalize``)."""
    norm = SMOOTH[name]
    x, mask = _inputs(1)
    s = x.detach().masked_fill(~mask, float("-inf"))
    s[2, 1] = torch.tensor([0.3, -0.2, 0.9, 1.1, -1.0, 0.0], dtype=torch.float64)
    s.requires_grad_()
    assert gradcheck(norm.normalize, (s,), eps=1e-6, atol=1e-6)


def _st_with_soft_value(hard_fn, soft_fn):
    """Forward value of ``soft_fn``, backward of ``hard_fn``: gradcheck then compares the
    straight-through gradient with the true derivative of the soft function."""
    def f(s):
        h = hard_fn(s)
        return h - h.detach() + soft_fn(s).detach()
    return f


@pytest.mark.parametrize("hard,soft", [(Hardmax(), Softmax()), (Hardmax(temperature=0.5), Softmax(0.5)),
                                       (TopK(k=2), Softmax()), (TopK(k=3, temperature=2.0), Softmax(2.0))],
                         ids=["hardmax", "hardmax-T0.5", "topk2", "topk3-T2"])
def test_straight_through_gradient_is_softmax_gradient(hard, soft):
    x, mask = _inputs(2)
    assert gradcheck(_st_with_soft_value(lambda s: hard(s, mask), lambda s: soft(s, mask)), (x,), eps=1e-6,
                     atol=1e-6)
    j_hard = jacobian(lambda s: hard(s, mask), x.detach())
    j_soft = jacobian(lambda s: soft(s, mask), x.detach())
    torch.testing.assert_close(j_hard, j_soft, atol=0, rtol=0)
    # and the forward value really is hard
    assert not torch.allclose(hard(x, mask), soft(x, mask))


def test_gumbel_soft_gradcheck_and_hard_straight_through():
    x, mask = _inputs(3)

    def fresh(hard):  # the same noise on every call, so that finite differences see one function
        return Gumbel(tau=0.7, hard=hard, generator=torch.Generator().manual_seed(5))

    assert gradcheck(lambda s: fresh(False)(s, mask), (x,), eps=1e-6, atol=1e-6)
    assert gradcheck(_st_with_soft_value(lambda s: fresh(True)(s, mask), lambda s: fresh(False)(s, mask)), (x,),
                     eps=1e-6, atol=1e-6)
    j_hard = jacobian(lambda s: fresh(True)(s, mask), x.detach())
    j_soft = jacobian(lambda s: fresh(False)(s, mask), x.detach())
    torch.testing.assert_close(j_hard, j_soft, atol=0, rtol=0)
