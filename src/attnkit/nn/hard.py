r"""Hard attention modules: attend to one key (or a few) instead of a blend (seed 000 §2.3).

Both modules compare each query with every key using a score (``"dot"``, ``"scaled_dot"``,
``"general"`` = ``qᵀ W k``, ``"additive"`` = ``vᵀ tanh(W_q q + W_k k)``), pick keys with a hard
normalizer, and return the picked values:

* :class:`HardAttention` -- deterministic or Gumbel hard attention trained by backpropagation
  through a straight-through estimator (:class:`~attnkit.normalizers.Hardmax`,
  :class:`~attnkit.normalizers.TopK`, hard :class:`~attnkit.normalizers.Gumbel`);
* :class:`StochasticHardAttention` -- Show, Attend and Tell's stochastic hard attention (Xu et al.
  2015, https://arxiv.org/abs/1502.03044): samples one key per query and returns the sample's
  log-probability, to be trained with :func:`attnkit.normalizers.reinforce_loss`.

Inputs are batch first: ``query (B, Tq, Dq)``, ``keys (B, Tk, Dk)``, ``values (B, Tk, Dv)``.
``key_padding_mask (B, Tk)`` follows torch's convention: ``True`` = padding (not attended).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import scores as _scores
from .._checks import check_positive, check_tensor, lookup, shape_str
from ..functional import attention
from ..normalizers import Gumbel, Hardmax, HardSample, Normalizer, StochasticHard, TopK

Tensor = torch.Tensor

SCORES = ("dot", "scaled_dot", "general", "additive")
MODES = {"hardmax": Hardmax, "topk": TopK, "gumbel": Gumbel}


def _make_score(score: Union[str, _scores.Score], query_dim: int, key_dim: int,
                hidden_dim: Optional[int]) -> Union[str, _scores.Score]:
    """A score name/object usable by ``attnkit.attention`` for queries of ``query_dim`` features and
    keys of ``key_dim`` features."""
    if isinstance(score, _scores.Score):
        return score
    name = lookup("score", score, {n: n for n in SCORES})
    if name in ("dot", "scaled_dot"):
        if query_dim != key_dim:
            raise ValueError(f"score={name!r} needs query_dim == key_dim; got query_dim = {query_dim} and "
                             f"key_dim = {key_dim} (use score='general' or 'additive')")
        return name
    if name == "general":
        return _scores.General(query_dim, key_dim)
    return _scores.Additive(query_dim, key_dim, hidden_dim if hidden_dim is not None else key_dim)


def _heads_view(query: Tensor, keys: Tensor, values: Tensor, key_padding_mask: Optional[Tensor],
                query_dim: int, key_dim: int):
    """Check ``(B, T, E)`` inputs and return one-head views ``(B, 1, T, E)`` and the functional
    mask ``(B, 1, 1, Tk)`` (True = may attend)."""
    check_tensor("query", query, 3, "(B, Tq, Dq)")
    check_tensor("keys", keys, 3, "(B, Tk, Dk)")
    check_tensor("values", values, 3, "(B, Tk, Dv)")
    if query.shape[-1] != query_dim:
        raise ValueError(f"query must have query_dim = {query_dim} features; got shape {shape_str(query)}")
    if keys.shape[-1] != key_dim:
        raise ValueError(f"keys must have key_dim = {key_dim} features; got shape {shape_str(keys)}")
    if not (query.shape[0] == keys.shape[0] == values.shape[0]):
        raise ValueError(f"query, keys and values must have the same batch size; got query {shape_str(query)}, "
                         f"keys {shape_str(keys)}, values {shape_str(values)}")
    if keys.shape[1] != values.shape[1]:
        raise ValueError(f"keys and values must have the same length Tk; got keys {shape_str(keys)}, "
                         f"values {shape_str(values)}")
    mask = None
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, 2, "(B, Tk)")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding); got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (keys.shape[0], keys.shape[1]):
            raise ValueError(f"key_padding_mask must have shape (B, Tk) = ({keys.shape[0]}, {keys.shape[1]}); "
                             f"got {shape_str(key_padding_mask)}")
        mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk), True = may attend
    return query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), mask


class HardAttention(nn.Module):
    r"""Hard attention trained by backpropagation through a straight-through estimator.

    ``s_ij = score(q_i, k_j)``, ``w_i = hard(s_i)`` (one-hot or top-k, masked keys excluded),
    ``context_i = Σ_j w_ij v_j``; the backward pass uses the softmax (or Gumbel-softmax) gradient.

    Args:
        query_dim: ``Dq``.
        key_dim: ``Dk`` (must equal ``Dq`` for ``"dot"``/``"scaled_dot"``).
        hidden_dim: hidden size of the ``"additive"`` score (default ``key_dim``).
        score: ``"dot"`` (default), ``"scaled_dot"``, ``"general"`` (``qᵀ W k``), ``"additive"``
            (``vᵀ tanh(W_q q + W_k k + b)``) or an :class:`attnkit.scores.Score`.
        mode: ``"hardmax"`` (default; argmax), ``"topk"`` (softmax over the ``k`` best),
            ``"gumbel"`` (a one-hot Gumbel-softmax sample with temperature ``tau``; in eval mode the
            argmax, without noise), or any :class:`attnkit.normalizers.Normalizer`.
        k: keys kept by ``"topk"``.
        tau: Gumbel temperature for ``"gumbel"``.
        generator: ``torch.Generator`` for the Gumbel noise.

    Shapes: ``query (B, Tq, Dq)``, ``keys (B, Tk, Dk)``, ``values (B, Tk, Dv)``, ``key_padding_mask
    (B, Tk)`` bool with ``True`` = padding → ``context (B, Tq, Dv)``, ``weights (B, Tq, Tk)``.

    Example::

        >>> import torch, attnkit
        >>> att = attnkit.nn.HardAttention(query_dim=4, key_dim=4)
        >>> k = torch.eye(4).expand(2, 4, 4); v = torch.arange(8.0).view(2, 4, 1)
        >>> ctx, w = att(k[:, [2, 0]] * 3, k, v)
        >>> ctx.squeeze(-1).tolist(), w.shape
        ([[2.0, 0.0], [6.0, 4.0]], torch.Size([2, 2, 4]))
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: Optional[int] = None,
                 score: Union[str, _scores.Score] = "dot", mode: Union[str, Normalizer] = "hardmax", *,
                 k: int = 8, tau: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.query_dim = int(check_positive("query_dim", query_dim, integer=True))
        self.key_dim = int(check_positive("key_dim", key_dim, integer=True))
        if hidden_dim is not None:
            check_positive("hidden_dim", hidden_dim, integer=True)
        self.score = _make_score(score, self.query_dim, self.key_dim, hidden_dim)
        if isinstance(mode, Normalizer):
            self.mode, self.normalizer = type(mode).__name__, mode
        else:
            self.mode = lookup("mode", mode, {n: n for n in MODES})
            if self.mode == "hardmax":
                self.normalizer = Hardmax()
            elif self.mode == "topk":
                self.normalizer = TopK(k=k)
            else:
                self.normalizer = Gumbel(tau=tau, hard=True, generator=generator)
        self._eval_normalizer = Hardmax() if self.mode == "gumbel" else self.normalizer

    def forward(self, query: Tensor, keys: Tensor, values: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        q, k, v, mask = _heads_view(query, keys, values, key_padding_mask, self.query_dim, self.key_dim)
        norm = self.normalizer if self.training else self._eval_normalizer
        out, w = attention(q, k, v, score=self.score, normalizer=norm, mask=mask, return_weights=True)
        return out.squeeze(1), w.squeeze(1)  # (B, Tq, Dv), (B, Tq, Tk)

    def extra_repr(self) -> str:
        s = self.score if isinstance(self.score, str) else type(self.score).__name__
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={s!r}, normalizer={self.normalizer!r}"


class StochasticHardAttention(nn.Module):
    r"""Stochastic hard attention (Xu et al. 2015, "Show, Attend and Tell",
    https://arxiv.org/abs/1502.03044), trained with REINFORCE.

    ``p_i = softmax_j(score(q_i, k_j))`` over allowed keys, ``j_i ~ Categorical(p_i)``,
    ``context_i = v_{j_i}``. The weights are one-hot and carry no gradient to the scores: train
    the score with ``attnkit.normalizers.reinforce_loss(sample.log_prob, reward, baseline)``; the
    values get the usual gradient through the context. In eval mode (``greedy_eval=True``) the
    most probable key is taken instead of a sample.

    Args:
        query_dim, key_dim, hidden_dim, score: as for :class:`HardAttention`.
        generator: ``torch.Generator`` making the samples reproducible.
        greedy_eval: take the argmax instead of sampling when ``not self.training``.

    Returns ``(context (B, Tq, Dv), weights (B, Tq, Tk), sample)``, where ``sample`` is a
    :class:`attnkit.normalizers.HardSample` with ``index (B, Tq)`` (``-1`` for queries whose keys
    are all padding), ``log_prob (B, Tq)``, ``probs (B, Tq, Tk)`` and ``entropy (B, Tq)``.

    Example::

        >>> import torch, attnkit
        >>> att = attnkit.nn.StochasticHardAttention(3, 5, score="general", generator=torch.Generator().manual_seed(0))
        >>> ctx, w, sample = att(torch.randn(2, 4, 3), torch.randn(2, 6, 5), torch.randn(2, 6, 7))
        >>> ctx.shape, w.sum(-1).tolist()[0], sample.log_prob.shape
        (torch.Size([2, 4, 7]), [1.0, 1.0, 1.0, 1.0], torch.Size([2, 4]))
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: Optional[int] = None,
                 score: Union[str, _scores.Score] = "dot", *, generator: Optional[torch.Generator] = None,
                 greedy_eval: bool = True):
        super().__init__()
        self.query_dim = int(check_positive("query_dim", query_dim, integer=True))
        self.key_dim = int(check_positive("key_dim", key_dim, integer=True))
        if hidden_dim is not None:
            check_positive("hidden_dim", hidden_dim, integer=True)
        if not isinstance(greedy_eval, bool):
            raise TypeError(f"greedy_eval must be a bool; got {type(greedy_eval).__name__}")
        self.score = _make_score(score, self.query_dim, self.key_dim, hidden_dim)
        self.generator = StochasticHard(generator=generator).generator  # validated
        self.greedy_eval = greedy_eval

    def forward(self, query: Tensor, keys: Tensor, values: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, HardSample]:
        q, k, v, mask = _heads_view(query, keys, values, key_padding_mask, self.query_dim, self.key_dim)
        norm = StochasticHard(generator=self.generator, greedy=self.greedy_eval and not self.training)
        # the reference backend calls the normalizer once on the full rows, so last_sample is this call's
        out, w = attention(q, k, v, score=self.score, normalizer=norm, mask=mask, return_weights=True,
                           backend="reference")
        s = norm.last_sample  # fields (B, 1, Tq[, Tk])
        sample = HardSample(index=s.index.squeeze(1), log_prob=s.log_prob.squeeze(1), probs=s.probs.squeeze(1),
                            entropy=s.entropy.squeeze(1))
        return out.squeeze(1), w.squeeze(1), sample

    def extra_repr(self) -> str:
        s = self.score if isinstance(self.score, str) else type(self.score).__name__
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={s!r}, greedy_eval={self.greedy_eval}"


__all__ = ["HardAttention", "StochasticHardAttention"]
