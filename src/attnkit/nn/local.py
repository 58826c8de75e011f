"""Local attention modules: a sliding-window multi-head attention, and Luong et al.'s local
attention (local-m and local-p) for encoder-decoder models.

* :class:`SlidingWindowAttention` -- multi-head self-attention where each token sees only a
  window of neighbours (Longformer's local part, Mistral's sliding window; Beltagy et al. 2020,
  https://arxiv.org/abs/2004.05150).
* :class:`LocalAttention` -- Luong, Pham & Manning 2015, "Effective Approaches to
  Attention-based Neural Machine Translation", https://arxiv.org/abs/1508.04025, §3.2.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import scores as _scores
from .._checks import check_positive, check_tensor, shape_str
from ..functional import attention
from ..masks import from_mod, key_padding, local_m, local_p, sliding_window
from ..masks.base import as_mask
from .multihead import MultiheadAttention

Tensor = torch.Tensor

__all__ = ["SlidingWindowAttention", "LocalAttention"]


def _check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int > 0; got {type(window).__name__}")
    if window <= 0:
        raise ValueError(f"window must be > 0 (how many neighbours each token sees on a side); got {window}")
    return window


class SlidingWindowAttention(MultiheadAttention):
    """Multi-head attention in which token ``i`` sees only tokens ``i - window ... i`` (causal) or
    ``i - window ... i + window`` (``causal=False``).

    It is a :class:`MultiheadAttention` whose default mask is
    ``attnkit.masks.sliding_window(window, 0 if causal else window)`` (ANDed with any ``mask=``
    given), so it takes the same forward arguments, works with a :class:`~attnkit.nn.KVCache`
    (the window is aligned bottom-right, on absolute positions) and with fast backends.
    ``causal=True`` already implies the causal mask; ``is_causal`` need not be passed::

        window = 2, causal          causal=False
        x . . . .                   x x x . .
        x x . . .                   x x x x .
        x x x . .                   x x x x x
        . x x x .                   . x x x x
        . . x x x                   . . x x x

    Args:
        embed_dim, num_heads: as for :class:`MultiheadAttention`.
        window: neighbours seen on each side (``> 0``).
        causal: see only the past (default) or both sides.
        **mha_kwargs: any other :class:`MultiheadAttention` argument (``num_kv_heads``,
            ``dropout``, ``score_mod``, ...). Unlike :class:`MultiheadAttention` (a drop-in for
            torch's, which defaults to ``(T, B, E)``), ``batch_first`` defaults to ``True``.

    Example::

        >>> import torch, attnkit
        >>> swa = attnkit.nn.SlidingWindowAttention(16, num_heads=4, window=2)
        >>> out, w = swa(torch.randn(1, 5, 16))
        >>> (w[0] > 0).int().tolist()[4]
        [0, 0, 1, 1, 1]
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int, causal: bool = True, **mha_kwargs):
        window = _check_window(window)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
        mask = sliding_window(window, 0 if causal else window)
        extra = mha_kwargs.pop("mask", None)
        if extra is not None:
            mask = mask & as_mask(extra)
        mha_kwargs.setdefault("batch_first", True)  # attnkit's convention; the torch drop-in keeps torch's
        super().__init__(embed_dim, num_heads, mask=mask, **mha_kwargs)
        self.window, self.causal = window, causal

    def extra_repr(self) -> str:
        return f"window={self.window}, causal={self.causal}, " + super().extra_repr()


_SCORES = ("general", "dot", "concat")
_MODES = ("m", "p")


class LocalAttention(nn.Module):
    r"""Luong et al. 2015 local attention (https://arxiv.org/abs/1508.04025, §3.2): decoder
    state ``h_t`` attends to a window ``[p_t - D, p_t + D]`` of the encoder states ``h̄_s``.

    .. math::
        \text{local-m: } p_t = t \qquad
        \text{local-p: } p_t = S\cdot\sigma(v_p^\top \tanh(W_p h_t))

        a_t(s) = \mathrm{softmax}_{s \in [p_t - D,\, p_t + D]}\ \mathrm{score}(h_t, \bar h_s)
                 \cdot \underbrace{\exp\!\Big(-\frac{(s - p_t)^2}{2\sigma^2}\Big)}_{\text{local-p only}},
        \qquad \sigma = D/2,\qquad c_t = \sum_s a_t(s)\, \bar v_s

    with ``score`` one of Luong's ``dot`` (``h_tᵀ h̄_s``), ``general`` (``h_tᵀ W_a h̄_s``,
    :class:`attnkit.scores.General`) or ``concat`` (``v_aᵀ tanh(W_a [h_t; h̄_s])``,
    :class:`attnkit.scores.Additive` without bias). In local-p the weights are *not*
    renormalized after the Gaussian, as in the paper, so rows sum to less than 1; the Gaussian
    is what carries gradient to ``W_p`` and ``v_p``. ``S`` is each sequence's source length
    (from ``key_padding_mask`` when given, else ``Tk``). This module computes the context
    vector only; Luong's attentional state ``tanh(W_c [c_t; h_t])`` belongs to the decoder.

    Args:
        query_dim: ``dq``, features of the decoder states.
        key_dim: ``dk``, features of the encoder states (default ``dq``).
        D: window half-width (the paper uses 10); ``σ = D/2``.
        mode: ``"p"`` (predictive, default) or ``"m"`` (monotonic).
        score: ``"general"`` (default), ``"dot"`` (needs ``dk == dq``), ``"concat"``, or an
            :mod:`attnkit.scores` object.
        hidden_dim: hidden size of ``concat`` (default ``dq``).
        predict_dim: hidden size of ``W_p`` (default ``dq``).

    Forward:
        ``forward(query, keys, value=None, key_padding_mask=None, need_weights=True, offset=0)``
        with ``query (B, Tq, dq)`` (or one decoder step ``(B, dq)``), ``keys (B, S, dk)``,
        ``value (B, S, dv)`` (default ``keys``), ``key_padding_mask`` a bool ``(B, S)`` with
        ``True`` = padding (torch's convention) or integer lengths ``(B,)``; ``offset`` is the
        decoder position of the first query for local-m (``p_t = offset + t``, for step-by-step
        decoding). Returns ``context (B, Tq, dv)`` and ``weights (B, Tq, S)`` (or None when
        ``need_weights=False``); ``(B, dv)``, ``(B, S)`` for a single step.

    Example::

        >>> import torch, attnkit
        >>> att = attnkit.nn.LocalAttention(8, key_dim=6, D=2, mode="p")
        >>> ctx, w = att(torch.randn(3, 4, 8), torch.randn(3, 10, 6))
        >>> ctx.shape, w.shape
        (torch.Size([3, 4, 6]), torch.Size([3, 4, 10]))
    """

    def __init__(self, query_dim: int, key_dim: Optional[int] = None, D: int = 10, mode: str = "p",
                 score: Union[str, _scores.Score] = "general", hidden_dim: Optional[int] = None,
                 predict_dim: Optional[int] = None):
        super().__init__()
        query_dim = int(check_positive("query_dim", query_dim, integer=True))
        key_dim = query_dim if key_dim is None else int(check_positive("key_dim", key_dim, integer=True))
        self.D = int(check_positive("D", D, integer=True))
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; valid names: 'm' (monotonic), 'p' (predictive)")
        self.query_dim, self.key_dim, self.mode = query_dim, key_dim, mode
        if isinstance(score, _scores.Score):
            self.score = score
        elif score == "general":
            self.score = _scores.General(query_dim, key_dim)
        elif score == "dot":
            if key_dim != query_dim:
                raise ValueError(f"score 'dot' needs key_dim == query_dim; got query_dim = {query_dim} and "
                                 f"key_dim = {key_dim} (use 'general' or 'concat')")
            self.score = _scores.Dot()
        elif score == "concat":
            hidden = query_dim if hidden_dim is None else int(check_positive("hidden_dim", hidden_dim, integer=True))
            self.score = _scores.Additive(query_dim, key_dim, hidden, bias=False)
        else:
            raise ValueError(f"unknown score {score!r}; valid names: " + ", ".join(repr(s) for s in _SCORES)
                             + " (or an attnkit.scores.Score object)")
        if mode == "p":
            pd = query_dim if predict_dim is None else int(check_positive("predict_dim", predict_dim, integer=True))
            self.W_p = nn.Linear(query_dim, pd, bias=False)
            self.v_p = nn.Linear(pd, 1, bias=False)

    def predict_centers(self, query: Tensor, source_lengths: Tensor) -> Tensor:
        """Local-p centers ``p_t = S·σ(v_pᵀ tanh(W_p h_t))``: ``query (B, Tq, dq)``, ``source_lengths``
        ``S (B,)`` -> ``(B, Tq)`` in ``[0, S]``."""
        if self.mode != "p":
            raise ValueError("predict_centers needs mode='p'")
        gate = torch.sigmoid(self.v_p(torch.tanh(self.W_p(query)))).squeeze(-1)  # (B, Tq)
        return source_lengths.to(gate.dtype).unsqueeze(-1) * gate

    def forward(self, query: Tensor, keys: Tensor, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                offset: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """See the class docstring."""
        check_tensor("query", query)
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be (B, Tq, dq) or one step (B, dq); got shape {shape_str(query)}")
        single = query.dim() == 2
        if single:
            query = query.unsqueeze(1)  # (B, dq) -> (B, 1, dq)
        check_tensor("keys", keys, 3, "(B, S, dk)")
        value = keys if value is None else check_tensor("value", value, 3, "(B, S, dv)")
        B, Tq, _ = query.shape
        S = keys.shape[1]
        if query.shape[-1] != self.query_dim:
            raise ValueError(f"query must have {self.query_dim} features (query_dim); got shape {shape_str(query)}")
        if keys.shape[0] != B or value.shape[0] != B or value.shape[1] != S:
            raise ValueError(f"query (B, Tq, dq), keys (B, S, dk) and value (B, S, dv) must agree on B and S; got "
                             f"query {shape_str(query)}, keys {shape_str(keys)}, value {shape_str(value)}")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int; got {type(offset).__name__}")

        keep, lengths = None, None
        if key_padding_mask is not None:
            kpm = check_tensor("key_padding_mask", key_padding_mask)
            if kpm.dtype == torch.bool and tuple(kpm.shape) == (B, S):
                keep = ~kpm  # torch convention: True = padding
                lengths = keep.sum(-1)
            elif not kpm.is_floating_point() and kpm.dtype != torch.bool and tuple(kpm.shape) == (B,):
                if (kpm < 0).any() or (kpm > S).any():
                    raise ValueError(f"key_padding_mask lengths must lie in [0, S = {S}]; got {kpm.tolist()}")
                lengths = kpm
                keep = torch.arange(S, device=kpm.device) < kpm.unsqueeze(-1)
            else:
                raise ValueError(f"key_padding_mask must be a bool (B, S) = ({B}, {S}) tensor (True = padding) "
                                 f"or integer lengths (B,) = ({B},); got {kpm.dtype} {shape_str(kpm)}")

        if self.mode == "p":
            S_b = lengths if lengths is not None else torch.full((B,), S, device=query.device)
            mask = local_p(self.predict_centers(query, S_b), self.D)  # centers (B, Tq)
        elif offset == 0:
            mask = local_m(self.D)
        else:
            D = self.D
            mask = from_mod(lambda b, h, q, kv: (kv >= q + offset - D) & (kv <= q + offset + D))
        if keep is not None:
            mask = mask & key_padding(keep)

        q, k, v = query.unsqueeze(1), keys.unsqueeze(1), value.unsqueeze(1)  # (B, T, d) -> (B, 1, T, d)
        if need_weights:
            out, w = attention(q, k, v, score=self.score, mask=mask, return_weights=True)
            w = w.squeeze(1)  # (B, 1, Tq, S) -> (B, Tq, S)
        else:
            out, w = attention(q, k, v, score=self.score, mask=mask), None
        out = out.squeeze(1)  # (B, 1, Tq, dv) -> (B, Tq, dv)
        if single:
            out, w = out.squeeze(1), (None if w is None else w.squeeze(1))
        return out, w

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, D={self.D}, mode={self.mode!r}"
