"""Normalizers turn a row of scores into attention weights.

Every normalizer is called as ``normalizer(scores, mask=None) -> weights`` where ``scores`` has
shape ``(..., Tk)`` and ``mask`` (bool, broadcastable, ``True`` = may attend) hides keys.
The base class guarantees SPEC §7: masked keys get exactly 0 weight, and a row whose keys
are all masked gets all-zero weights (never NaN), with zero gradient. A score of ``-inf`` (a
bias used as a mask) hides its key the same way.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_finite_number, check_positive

Tensor = torch.Tensor


def check_scores(scores: object, mask: object = None) -> None:
    """``TypeError`` unless ``scores`` is a floating-point tensor and ``mask`` None or a bool tensor."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor (..., Tk); got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor (float32, float64, bfloat16, ...); got {scores.dtype}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool):
        raise TypeError("mask must be a bool tensor (True = may attend); got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")


class Normalizer:
    """Base class. Subclasses implement :meth:`normalize` on rows that have at least one
    allowed key; masked scores arrive as ``-inf``."""

    name: str = "normalizer"
    #: each row of weights sums to 1 (over the allowed keys)
    sums_to_one: bool = True
    #: output rows are a deterministic function of the scores (False for sampling normalizers)
    deterministic: bool = True

    def normalize(self, scores: Tensor) -> Tensor:
        raise NotImplementedError

    #: each weight depends on its own score only (sigmoid); else a row's weights depend on the row
    elementwise: bool = False

    def __call__(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        check_scores(scores, mask)
        # a finite sum proves every score finite in one pass (a NaN or inf makes it NaN or inf);
        # a sum that is not finite (or overflows) takes the exact path below, which checks entry by entry
        # (under torch.compile the data is not asked: the general path below is branch-free)
        finite = False if torch.compiler.is_compiling() else bool(torch.isfinite(scores.detach().sum()))
        if mask is None and finite:
            return self.normalize(scores)
        hidden = torch.isneginf(scores)  # a -inf score (e.g. from a bias) hides its key as the mask does
        if mask is not None:
            hidden = hidden | ~mask
        dead = hidden.all(dim=-1, keepdim=True)  # rows with no key to attend to
        s = scores.masked_fill(hidden, float("-inf")).masked_fill(dead, 0.0)
        if finite:
            return self.normalize(s).masked_fill(hidden | dead, 0.0)
        # NaN or +inf on a live key: NaN weights (the whole row unless the normalizer is elementwise)
        bad = (torch.isnan(scores) | torch.isposinf(scores)) & ~hidden
        poison = (bad if self.elementwise else bad.any(-1, keepdim=True)) & ~hidden
        s = s.masked_fill(poison, 0.0)
        return self.normalize(s).masked_fill(hidden | dead, 0.0).masked_fill(poison, float("nan"))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Softmax(Normalizer):
    """``w_ij = exp(s_ij / T) / Σ_j' exp(s_ij' / T)`` with temperature ``T`` (default 1).

    Example::

        >>> import torch, attnkit
        >>> attnkit.normalizers.Softmax()(torch.tensor([0.0, 0.0]), torch.tensor([True, False])).tolist()
        [1.0, 0.0]
    """

    name = "softmax"

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(check_positive("temperature", temperature))

    def normalize(self, scores: Tensor) -> Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        return torch.softmax(scores, dim=-1)


class Sigmoid(Normalizer):
    """Elementwise ``w_ij = σ(s_ij + b)``: no normalization across keys (Ramapuram et al. 2024,
    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention").

    ``bias`` is a number, or ``"log_n"`` for ``b = -log(Tk)``, which keeps the total weight of a
    row O(1) as the sequence grows. Rows do not sum to 1.

    **Start with** ``Sigmoid(bias="log_n")``: the paper's recommended setting. With ``b = -log n``
    a row of ``n`` near-zero scores has weights ``1/(n+1)`` and a total near 1, as softmax would
    give, whatever the length; without it (``bias=None``, which the string ``"sigmoid"`` gives)
    every weight starts near 0.5 and a row's total grows with ``n``, which makes early training
    unstable on long sequences. Served by the ``reference`` and ``tiled`` backends.

    Example::

        >>> import torch, attnkit
        >>> attnkit.normalizers.Sigmoid()(torch.zeros(2)).tolist()
        [0.5, 0.5]
        >>> [round(w, 4) for w in attnkit.normalizers.Sigmoid(bias="log_n")(torch.zeros(4)).tolist()]
        [0.2, 0.2, 0.2, 0.2]
    """

    name = "sigmoid"
    sums_to_one = False
    elementwise = True

    def __init__(self, bias: float | str | None = None):
        if isinstance(bias, str) and bias != "log_n":
            raise ValueError(f"Sigmoid bias must be a number, None or 'log_n'; got {bias!r}")
        if bias is not None and not isinstance(bias, str):
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise TypeError(f"Sigmoid bias must be a number, None or 'log_n'; got {type(bias).__name__}")
            bias = check_finite_number("Sigmoid bias", bias)
        self.bias = bias

    def offset(self, num_keys: int) -> float:
        if self.bias is None:
            return 0.0
        if self.bias == "log_n":
            return -math.log(num_keys)
        return float(self.bias)

    def normalize(self, scores: Tensor) -> Tensor:
        return torch.sigmoid(scores + self.offset(scores.shape[-1]))


class Normalize(Normalizer):
    """Sum normalization ``w_ij = s_ij / (Σ_j' s_ij' + eps)`` over the allowed keys, for
    non-negative scores: with :class:`attnkit.scores.Kernel` it is linear attention
    (Katharopoulos et al. 2020). Masked keys contribute 0; rows with no key give 0.

    Example::

        >>> import torch, attnkit
        >>> attnkit.normalizers.Normalize(eps=0.0)(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([True, True, False])).tolist()
        [0.25, 0.75, 0.0]
    """

    name = "normalize"
    sums_to_one = False  # up to eps

    def __init__(self, eps: float = 1e-6):
        self.eps = float(check_positive("eps", eps, allow_zero=True))

    def normalize(self, scores: Tensor) -> Tensor:
        den = scores.sum(-1, keepdim=True) + self.eps
        return scores / den.masked_fill(den == 0, 1.0)

    def __call__(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        check_scores(scores, mask)
        if mask is None:
            return self.normalize(scores)
        return self.normalize(scores.masked_fill(~mask, 0.0))
