"""Normalizers turn a row of scores into attention weights.

Strings name parameter-free defaults; objects carry parameters:

===================  =====================================  ==========================================
name                 object                                 weights
===================  =====================================  ==========================================
``softmax``          ``Softmax(temperature=1.0)``           dense, ``exp(s/T) / Σ exp(s/T)``
``sigmoid``          ``Sigmoid(bias=None | "log_n")``       elementwise ``σ(s + b)``, rows need not sum to 1
``sparsemax``        ``Sparsemax()``                        sparse, Euclidean projection on the simplex
``entmax15``         ``Entmax15()``                         sparse, exact 1.5-entmax
``entmax``           ``Entmax(alpha=1.5, n_iter=None)``     sparse, α-entmax by bisection (any α > 1)
``hardmax``          ``Hardmax(temperature=1.0)``           one-hot argmax, straight-through softmax grad
``topk``             ``TopK(k=8, temperature=1.0)``         softmax over the k best, straight-through grad
``gumbel``           ``Gumbel(tau=1.0, hard=False, ...)``   Gumbel-softmax sample (one-hot with ``hard``)
``stochastic_hard``  ``StochasticHard(generator=None)``     one sampled key; train with ``reinforce_loss``
(object only)        ``Normalize(eps=1e-6)``                ``s / Σ s`` for non-negative (kernel) scores
===================  =====================================  ==========================================

Every normalizer is called as ``normalizer(scores, mask=None)``: masked keys get exactly 0 and
rows with no allowed key get all zeros, never NaN.
"""

from __future__ import annotations

from .._checks import lookup
from .base import Normalize, Normalizer, Sigmoid, Softmax
from .hard import Gumbel, Hardmax, HardSample, StochasticHard, TopK, reinforce_loss, straight_through
from .sparse import Entmax, Entmax15, Sparsemax, entmax15, entmax_bisect, sparsemax

#: parameter-free normalizers by name
NAMED = {
    "softmax": Softmax,
    "sigmoid": Sigmoid,
    "sparsemax": Sparsemax,
    "entmax15": Entmax15,
    "entmax": Entmax,
    "hardmax": Hardmax,
    "topk": TopK,
    "gumbel": Gumbel,
    "stochastic_hard": StochasticHard,
}


def get(normalizer) -> Normalizer:
    """Resolve ``normalizer=`` (a name or a :class:`Normalizer`)."""
    if isinstance(normalizer, Normalizer):
        return normalizer
    if isinstance(normalizer, str) and normalizer in ("softmax", "sigmoid"):  # stateless and per call: share one instance
        if normalizer not in _SHARED:
            _SHARED[normalizer] = NAMED[normalizer]()
        return _SHARED[normalizer]
    return lookup("normalizer", normalizer, NAMED, "attnkit.normalizers.Normalizer",
                  "To normalize with your own function, subclass attnkit.normalizers.Normalizer and implement "
                  "normalize(scores) -> weights over the last dim (masked scores arrive as -inf), then pass an "
                  "instance")()


_SHARED: dict[str, Normalizer] = {name: NAMED[name]() for name in ("softmax", "sigmoid")}  # (filled on a first
# call inside torch.compile, the cache would cost a recompile)


__all__ = ["Normalize", "Normalizer", "Softmax", "Sigmoid", "Sparsemax", "Entmax15", "Entmax", "Hardmax", "TopK", "Gumbel",
           "StochasticHard", "HardSample", "reinforce_loss", "straight_through", "sparsemax", "entmax15",
           "entmax_bisect", "get", "NAMED"]
