r"""Hard normalizers: argmax, top-k, Gumbel-softmax and stochastic hard attention.

Hard attention looks at one key (or a few) instead of a blend. The forward pass is discrete, so
the gradient has to come from somewhere else:

* :class:`Hardmax` and :class:`TopK` use a *straight-through* estimator (Bengio et al. 2013,
  https://arxiv.org/abs/1308.3432): the forward value is the hard weights, the backward pass is
  that of the dense softmax, written ``hard + (soft - soft.detach())``;
* :class:`Gumbel` perturbs the scores with Gumbel noise (Jang et al. 2017,
  https://arxiv.org/abs/1611.01144): a soft, differentiable sample, or with ``hard=True`` its
  one-hot argmax with the straight-through gradient of the soft sample;
* :class:`StochasticHard` samples one key per query from the softmax and is trained with
  REINFORCE (Xu et al. 2015, "Show, Attend and Tell", https://arxiv.org/abs/1502.03044): the
  weights carry no gradient; the sample's log-probability, recorded on ``.last_sample``, feeds
  :func:`reinforce_loss`.

Masked keys (``-inf`` scores) are never chosen and get exactly 0 weight; rows with no allowed
key give zeros. Normalizers that sample set ``deterministic = False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import broadcastable, check_positive, shape_str
from .base import Normalizer, check_scores

Tensor = torch.Tensor

_NEG_INF = float("-inf")
_NAN = float("nan")


# -- helpers ---------------------------------------------------------------------------------
def _dead(scores: Tensor) -> Tensor:
    """``(..., 1)``: rows whose keys are all masked (all ``-inf``)."""
    return (scores == _NEG_INF).all(dim=-1, keepdim=True)


def _softmax(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """Softmax over the last dim that gives zeros (not NaN) on rows that are all ``-inf``."""
    dead = _dead(scores)
    s = scores.masked_fill(dead, 0.0)
    if temperature != 1.0:
        s = s / temperature
    return torch.softmax(s, dim=-1).masked_fill(dead, 0.0)


def _argmax_one_hot(scores: Tensor) -> Tensor:
    """One-hot rows at the argmax (the first one on ties), zero on rows that are all ``-inf``."""
    if scores.shape[-1] == 0:
        return torch.zeros_like(scores)
    index = scores.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(scores).scatter(-1, index, 1.0).masked_fill(_dead(scores), 0.0)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Value of ``hard``, gradient of ``soft``: ``hard + (soft - soft.detach())``.

    The parenthesis matters: ``soft - soft.detach()`` is exactly 0, so the value is exactly
    ``hard`` in every dtype (``hard + soft - soft`` rounds in bfloat16).
    """
    return hard + (soft - soft.detach())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gumbel_noise(shape: torch.Size, *, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard Gumbel samples ``g = -log(-log U)``, ``U ~ Uniform(0, 1)``, drawn in float32 from
    ``generator`` (or the global RNG) and cast to ``dtype``."""
    draw_on = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=draw_on, dtype=torch.float32).to(device)
    u = u.clamp_min(torch.finfo(torch.float32).tiny)  # rand may return exactly 0
    return (-torch.log(-torch.log(u))).to(dtype)


def _check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    return generator


def _check_temperature(temperature: object) -> float:
    t = float(check_positive("temperature", temperature))
    if t == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    return t


# -- deterministic hard normalizers -----------------------------------------------------------
class Hardmax(Normalizer):
    r"""One-hot argmax with the straight-through gradient of softmax.

    Forward: ``w_ij = 1`` if ``j = argmax_j' s_ij'`` (the first one on ties), else 0.
    Backward: the gradient of ``softmax(s / T)`` (``temperature`` ``T``, default 1), i.e.
    ``w = hard + (soft - soft.detach())``. Shapes: ``(..., Tk) -> (..., Tk)``.

    Example::

        >>> import torch, attnkit
        >>> attnkit.normalizers.Hardmax()(torch.tensor([0.1, 2.0, 0.3])).tolist()
        [0.0, 1.0, 0.0]
        >>> attnkit.normalizers.Hardmax()(torch.tensor([0.1, 2.0, 0.3]), torch.tensor([True, False, True])).tolist()
        [0.0, 0.0, 1.0]
    """

    name = "hardmax"

    def __init__(self, temperature: float = 1.0):
        self.temperature = _check_temperature(temperature)

    def normalize(self, scores: Tensor) -> Tensor:
        hard = _argmax_one_hot(scores.detach())
        return straight_through(hard, _softmax(scores, self.temperature))


class TopK(Normalizer):
    r"""Softmax over the ``k`` largest scores of each row, 0 elsewhere, with the straight-through
    gradient of the dense softmax.

    Forward: ``w_ij = exp(s_ij/T) / Σ_{j' ∈ top_k(i)} exp(s_ij'/T)`` for ``j`` among the ``k``
    highest allowed scores of row ``i`` (ties broken by ``torch.topk``), else 0. A row with fewer
    than ``k`` allowed keys keeps them all (plain softmax). Backward: the gradient of the dense
    ``softmax(s / T)``, i.e. ``w = sparse + (soft - soft.detach())``. ``k = 1`` is :class:`Hardmax`.

    Args:
        k: keys kept per row, an int >= 1. The default, 8, makes ``"topk"`` a sparse attention on
            long rows while leaving rows of at most 8 keys as plain softmax.
        temperature: ``T > 0`` (default 1).

    Example::

        >>> import torch, attnkit
        >>> w = attnkit.normalizers.TopK(k=2)(torch.tensor([0.0, 3.0, -1.0, 3.0]))
        >>> w.tolist()
        [0.0, 0.5, 0.0, 0.5]
    """

    name = "topk"

    def __init__(self, k: int = 8, temperature: float = 1.0):
        self.k = int(check_positive("k", k, integer=True))
        self.temperature = _check_temperature(temperature)

    def normalize(self, scores: Tensor) -> Tensor:
        kk = min(self.k, scores.shape[-1])
        top = scores.topk(kk, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True) & (scores > _NEG_INF)
        sparse = _softmax(scores.masked_fill(~keep, _NEG_INF), self.temperature)
        return straight_through(sparse.detach(), _softmax(scores, self.temperature))


# -- sampling normalizers ---------------------------------------------------------------------
class Gumbel(Normalizer):
    r"""Gumbel-softmax (Jang, Gu & Poole 2017, https://arxiv.org/abs/1611.01144; Maddison et al. 2017).

    ``y = softmax((s + g) / τ)`` with ``g_j ~ Gumbel(0, 1)`` i.i.d. With ``hard=True`` the forward
    value is ``one_hot(argmax_j y_j)`` (an exact sample of ``softmax(s)``) and the gradient is the
    one of ``y`` (straight-through). Masked keys (``-inf``) are never chosen. Noise is drawn from
    ``generator`` when given (reproducible), else from the global RNG.

    Args:
        tau: temperature ``τ > 0``; small ``τ`` gives near one-hot soft samples.
        hard: one-hot forward with the straight-through gradient.
        generator: a ``torch.Generator`` on the scores' device.

    Example::

        >>> import torch, attnkit
        >>> g = attnkit.normalizers.Gumbel(tau=0.5, hard=True, generator=torch.Generator().manual_seed(0))
        >>> w = g(torch.zeros(2, 4), torch.tensor([True, True, False, True]))
        >>> w.sum(-1).tolist(), w[:, 2].tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """

    name = "gumbel"
    deterministic = False

    def __init__(self, tau: float = 1.0, hard: bool = False, generator: torch.Generator | None = None):
        tau_f = float(check_positive("tau", tau))
        if tau_f == float("inf"):
            raise ValueError(f"tau must be a finite number > 0; got {tau}")
        if not isinstance(hard, bool):
            raise TypeError(f"hard must be a bool; got {type(hard).__name__}")
        self.tau = tau_f
        self.hard = hard
        self.generator = _check_generator(generator)

    def normalize(self, scores: Tensor) -> Tensor:
        dtype = _compute_dtype(scores.dtype)
        g = gumbel_noise(scores.shape, generator=self.generator, device=scores.device, dtype=dtype)
        y = (scores.to(dtype) + g) / self.tau  # -inf + g stays -inf: masked keys keep probability 0
        soft = _softmax(y)
        if self.hard:
            soft = straight_through(_argmax_one_hot(y.detach()), soft)
        return soft.to(scores.dtype)


@dataclass
class HardSample:
    """What :class:`StochasticHard` sampled in its last call (``...`` = the rows' leading dims,
    e.g. ``(B, H)``).

    Attributes:
        index: ``(..., Tq)`` long, the sampled key per query; ``-1`` for fully masked rows.
        log_prob: ``(..., Tq)``, ``log p(index)`` under the softmax, differentiable w.r.t. the
            scores; 0 for fully masked rows.
        probs: ``(..., Tq, Tk)``, the softmax over allowed keys (differentiable; 0 on masked keys
            and fully masked rows).
        entropy: ``(..., Tq)``, ``-Σ_j p_j log p_j`` (differentiable; 0 for fully masked rows).
    """

    index: Tensor
    log_prob: Tensor
    probs: Tensor
    entropy: Tensor


class StochasticHard(Normalizer):
    r"""Stochastic hard attention (Xu et al. 2015, "Show, Attend and Tell",
    https://arxiv.org/abs/1502.03044): each query attends to one key sampled from
    ``p = softmax(s)`` over its allowed keys.

    Forward: ``w_ij = 1`` for the sampled ``j ~ Categorical(p_i)``, else 0. The weights carry no
    gradient (a sample is not differentiable); the sample is stored as a :class:`HardSample` on
    ``.last_sample``, whose ``log_prob`` trains the scores with :func:`reinforce_loss`
    (``∇ E[R] = E[(R - b) ∇ log p(j)]``), while the values still get the ordinary gradient
    through ``w @ v``. ``greedy=True`` takes ``argmax p`` instead of sampling (e.g. at eval).
    Fully masked rows give zero weights, ``index = -1`` and ``log_prob = 0``.

    Args:
        generator: a ``torch.Generator`` making the samples reproducible (else the global RNG).
        greedy: pick the most probable key instead of sampling.

    Example::

        >>> import torch, attnkit
        >>> sh = attnkit.normalizers.StochasticHard(generator=torch.Generator().manual_seed(0))
        >>> w = sh(torch.randn(3, 5), torch.tensor([[True] * 5, [False, True, True, False, False], [False] * 5]))
        >>> w.sum(-1).tolist(), sh.last_sample.index[2].item(), sh.last_sample.log_prob[2].item()
        ([1.0, 1.0, 0.0], -1, 0.0)
    """

    name = "stochastic_hard"
    deterministic = False

    def __init__(self, generator: torch.Generator | None = None, greedy: bool = False):
        if not isinstance(greedy, bool):
            raise TypeError(f"greedy must be a bool; got {type(greedy).__name__}")
        self.generator = _check_generator(generator)
        self.greedy = greedy
        self.last_sample: HardSample | None = None
        if greedy:
            self.deterministic = True  # argmax instead of a sample

    def __repr__(self) -> str:
        return f"StochasticHard(generator={self.generator!r}, greedy={self.greedy})"

    def __call__(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        # Unlike the base class, fully masked rows reach normalize() as all -inf, so that the
        # sample can record them (index -1, log_prob 0).
        check_scores(scores, mask)
        if mask is not None:
            scores = scores.masked_fill(~mask, _NEG_INF)
        return self.normalize(scores)

    def normalize(self, scores: Tensor) -> Tensor:
        dtype = _compute_dtype(scores.dtype)
        s = scores.to(dtype)
        # NaN or +inf on an allowed key: the row's sample is undefined (weights NaN, index -1)
        poison = (torch.isnan(s) | torch.isposinf(s)).any(dim=-1, keepdim=True)
        s = s.masked_fill(poison & (s > _NEG_INF) | torch.isnan(s), 0.0)
        dead = _dead(s)                                   # (..., 1)
        allowed = (s > _NEG_INF) & ~dead                  # (..., Tk)
        logp = torch.log_softmax(s.masked_fill(dead, 0.0), dim=-1)  # dead rows: uniform, finite
        probs = logp.exp().masked_fill(dead, 0.0)
        rows = s.shape[:-1]
        if s.shape[-1] == 0:
            index = torch.full(rows, -1, dtype=torch.long, device=s.device)
            log_prob = s.new_zeros(rows)
        else:
            with torch.no_grad():
                if self.greedy:
                    index = logp.argmax(dim=-1)
                else:
                    flat = logp.exp().reshape(-1, s.shape[-1])
                    if self.generator is not None and self.generator.device != flat.device:
                        flat = flat.to(self.generator.device)  # sample where the generator lives
                    index = torch.multinomial(flat, 1, generator=self.generator).view(rows).to(s.device)
            log_prob = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(dead.squeeze(-1), 0.0)
            index = index.masked_fill(dead.squeeze(-1), -1)
        entropy = -(probs * logp.masked_fill(~allowed, 0.0)).sum(dim=-1)
        weights = torch.zeros(s.shape, dtype=scores.dtype, device=s.device)
        if s.shape[-1]:
            weights = weights.scatter(-1, index.clamp_min(0).unsqueeze(-1), 1.0).masked_fill(dead, 0.0)
        if torch.compiler.is_compiling() or bool(poison.any()):  # (traced: branch-free)
            p1 = poison.squeeze(-1)
            index = index.masked_fill(p1, -1)
            log_prob, entropy = log_prob.masked_fill(p1, _NAN), entropy.masked_fill(p1, _NAN)
            probs = probs.masked_fill(poison & allowed, _NAN)
            weights = weights.masked_fill(poison & allowed, _NAN)
        self.last_sample = HardSample(index=index, log_prob=log_prob.to(scores.dtype),
                                      probs=probs.to(scores.dtype), entropy=entropy.to(scores.dtype))
        return weights


def reinforce_loss(log_prob: Tensor, reward: Tensor | float, baseline: Tensor | float | None = None,
                   entropy: Tensor | None = None, entropy_weight: float = 0.0) -> Tensor:
    r"""REINFORCE with a baseline (Williams 1992; as used for hard attention by Xu et al. 2015,
    https://arxiv.org/abs/1502.03044):

    ``loss = mean[-(R - b).detach() · log p]  +  mean[(b - R)²]  -  λ · mean[H]``

    The middle term (fitting the baseline to the reward) is added only when ``baseline`` requires
    grad; the last only when ``entropy_weight`` ``λ > 0``. Minimizing it follows the unbiased
    gradient ``-E[(R - b) ∇ log p]`` of the expected reward.

    Args:
        log_prob: ``(...)`` log-probabilities of the sampled choices (e.g. ``HardSample.log_prob``).
        reward: ``R``, a number or a tensor broadcastable to ``log_prob`` (treated as a constant).
        baseline: ``b``, a number or a tensor broadcastable to ``log_prob`` (e.g. a learned value).
        entropy: ``(...)`` entropies (``HardSample.entropy``), needed when ``entropy_weight > 0``.
        entropy_weight: ``λ >= 0``, the weight of the entropy bonus.

    Returns:
        a scalar loss.

    Example::

        >>> import torch, attnkit
        >>> logp = torch.log(torch.tensor([0.5, 0.25])).requires_grad_()
        >>> loss = attnkit.normalizers.reinforce_loss(logp, reward=torch.tensor([1.0, 0.0]), baseline=0.5)
        >>> loss.backward(); logp.grad.tolist()
        [-0.25, 0.25]
    """
    if not isinstance(log_prob, torch.Tensor):
        raise TypeError(f"log_prob must be a torch.Tensor; got {type(log_prob).__name__}")
    if not log_prob.is_floating_point():
        raise TypeError(f"log_prob must be a floating-point tensor; got {log_prob.dtype}")

    def as_tensor(name: str, x: object) -> Tensor:
        if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a number or a tensor; got {type(x).__name__}")
        if not isinstance(x, torch.Tensor):
            x = torch.tensor(float(x), dtype=log_prob.dtype, device=log_prob.device)
        t = x if x.is_floating_point() else x.to(log_prob.dtype)
        if not broadcastable(tuple(t.shape), tuple(log_prob.shape)):
            raise ValueError(f"{name} must be broadcastable to log_prob's shape {shape_str(log_prob)}; "
                             f"got shape {shape_str(t)}")
        return t

    r = as_tensor("reward", reward).detach()
    b = None if baseline is None else as_tensor("baseline", baseline)
    lam = float(check_positive("entropy_weight", entropy_weight, allow_zero=True))
    advantage = r if b is None else r - b
    loss = -(advantage.detach() * log_prob).mean()
    if b is not None and b.requires_grad:
        b_full, r_full = torch.broadcast_tensors(b, r)
        loss = loss + ((b_full - r_full) ** 2).mean()
    if lam > 0:
        if entropy is None:
            raise ValueError(f"entropy must be given when entropy_weight > 0; got entropy_weight = {entropy_weight}")
        if not isinstance(entropy, torch.Tensor):
            raise TypeError(f"entropy must be a torch.Tensor; got {type(entropy).__name__}")
        loss = loss - lam * entropy.mean()
    return loss


__all__ = ["Hardmax", "TopK", "Gumbel", "StochasticHard", "HardSample", "reinforce_loss", "straight_through",
           "gumbel_noise"]
