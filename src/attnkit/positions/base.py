"""Score modifiers: ``score_mod(score, b, h, q_idx, kv_idx) -> score``.

(The full-tensor method is ``apply_to_scores``, not ``apply``: score mods that are also
``nn.Module`` s keep ``nn.Module.apply``.)

A score mod rewrites each raw score given its position, after scaling and before masking and
normalization. ALiBi, T5 relative buckets and soft-capping are score mods; so is a plain bias
tensor. Like masks, a score mod is evaluated on broadcastable index tensors, so backends can
apply it to the whole score matrix or to one tile of it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import broadcastable, check_arity, check_positive, shape_str
from ..masks.base import index_grid

Tensor = torch.Tensor


class ScoreMod:
    """Base class. Subclasses implement :meth:`score_mod`.

    ``additive = True`` declares that ``score_mod(s, ...) == s + bias(b, h, q, kv)``; such mods
    can be handed to kernels that only take an additive float mask (SDPA).
    """

    additive: bool = False
    #: ``score_mod(s, ...) == f(s)`` with ``f'`` in closed form (:meth:`pointwise_slope`)
    pointwise: bool = False
    #: the mod depends on ``q_idx`` and ``kv_idx`` only through ``kv_idx - q_idx`` (ALiBi, T5
    #: buckets), and so does :meth:`key_bias` on ``kv_idx - q_ref``: every tile on one diagonal gets
    #: the same values, which the tiled engine then builds once for all of them
    translation_invariant: bool = False
    #: the mod never gives -inf (ALiBi, T5 buckets, soft-capping): a kernel need not look for rows
    #: that a bias alone leaves without a live key
    finite: bool = False

    def score_mod(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
                  num_queries: int, num_keys: int) -> Tensor:
        raise NotImplementedError

    def pointwise_slope(self, out: Tensor) -> Tensor:
        """For a mod that is a function of the score alone, ``out = f(score)``: the derivative
        ``f'(score)`` written from ``out``, so a tiled backward chains it in closed form (no
        autograd per tile). Mods that declare ``pointwise = True`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} is not a pointwise score mod")

    def check(self, batch: int, heads: int, num_queries: int, num_keys: int) -> None:
        """Raise ``ValueError`` when the mod cannot apply to inputs of these sizes."""

    def key_bias(self, h: Tensor, kv_idx: Tensor, q_ref, num_queries: int, num_keys: int) -> Tensor | None:
        """For row-separable additive mods: the bias that query position ``q_ref`` would get,
        such that for any query ``i``, ``score_mod(s, b, h, i, j) - s - key_bias(h, j, q_ref)``
        depends on ``(h, i)`` only. Under softmax that row term cancels, so a tiled kernel adds
        one broadcast row per tile (``q_ref`` = the tile's first query keeps values small).
        None (the default) means the mod is not separable."""
        return None

    def on_device(self, device: torch.device) -> "ScoreMod":
        """This mod with the tensors it reads on ``device`` (default: itself). A compiled GPU
        kernel (flex) cannot read a CPU tensor captured by the mod; mods that keep constants on
        the CPU (ALiBi's slopes) return a copy, cached per device so compiled kernels are reused."""
        return self

    def bind(self, num_queries: int, num_keys: int) -> Callable:
        """A FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)``."""

        def score_mod(score, b, h, q_idx, kv_idx):
            return self.score_mod(score, b, h, q_idx, kv_idx, num_queries, num_keys)

        return score_mod

    def apply_to_scores(self, scores: Tensor) -> Tensor:
        """Apply to a full score tensor ``(B, H, Tq, Tk)``."""
        B, H, Tq, Tk = scores.shape
        self.check(B, H, Tq, Tk)
        return self.score_mod(scores, *index_grid(B, H, Tq, Tk, scores.device), Tq, Tk)

    def materialize_bias(self, num_queries: int, num_keys: int, batch: int = 1, heads: int | None = None,
                         device=None, dtype=torch.float32) -> Tensor:
        """The additive bias ``(B', H', Tq, Tk)`` of an ``additive`` mod (``heads`` defaults to the
        mod's own ``num_heads`` when it has one, else 1)."""
        if heads is None:
            heads = getattr(self, "num_heads", 1)
        if not self.additive:
            raise TypeError(f"{type(self).__name__} is not an additive score mod")
        self.check(batch, heads, num_queries, num_keys)
        zero = torch.zeros((), device=device, dtype=dtype)
        grid = index_grid(batch, heads, num_queries, num_keys, device)
        out = self.score_mod(zero, *grid, num_queries, num_keys)
        while out.dim() < 4:
            out = out.unsqueeze(0)
        return out.expand(out.shape[0], out.shape[1], num_queries, num_keys)


class TensorBias(ScoreMod):
    """A float tensor broadcastable to ``(B, H, Tq, Tk)`` added to the scores."""

    additive = True

    def __init__(self, tensor: Tensor):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"bias must be a float tensor; got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"bias tensor must be floating point (an additive bias); got dtype {tensor.dtype}. "
                            "Pass boolean masks as mask=...")
        if not 2 <= tensor.dim() <= 4:
            raise ValueError(f"bias tensor must have 2 to 4 dims broadcastable to (B, H, Tq, Tk); "
                             f"got shape {shape_str(tensor)}")
        #: as given: a learned bias (an ``nn.Parameter``) stays findable, and so registrable
        self.source = tensor

    @property
    def tensor(self) -> Tensor:
        """The bias as a 4-D view ``(B', H', Tq', Tk')`` of :attr:`source`."""
        t = self.source
        while t.dim() < 4:
            t = t.unsqueeze(0)
        return t

    def check(self, batch, heads, num_queries, num_keys):
        if not broadcastable(tuple(self.tensor.shape), (batch, heads, num_queries, num_keys)):
            raise ValueError(f"bias of shape {shape_str(self.tensor)} is not broadcastable to (B, H, Tq, Tk) = "
                             f"({batch}, {heads}, {num_queries}, {num_keys})")

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        t = self.tensor.to(q_idx.device)
        idx = [i if s != 1 else torch.zeros_like(i) for i, s in zip((b, h, q_idx, kv_idx), t.shape)]
        return score + t[idx[0], idx[1], idx[2], idx[3]]

    def apply_to_scores(self, scores):
        self.check(*scores.shape)
        return scores + self.tensor.to(scores.dtype)

    def materialize_bias(self, num_queries, num_keys, batch=1, heads=None, device=None, dtype=torch.float32):
        heads = self.tensor.shape[1] if heads is None else heads
        self.check(batch, heads, num_queries, num_keys)
        return self.tensor.to(device=device, dtype=dtype).expand(
            self.tensor.shape[0], self.tensor.shape[1], num_queries, num_keys)

    def __repr__(self):
        return f"TensorBias(shape={shape_str(self.tensor)})"


class FromScoreMod(ScoreMod):
    """Wrap a user ``fn(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention style).

    The tiled backend serves it, forward and backward, unless ``fn`` reads a tensor that
    requires grad (a learned parameter it closes over): :meth:`closes_over_grad` finds out by
    evaluating ``fn`` on one score. For an additive bias prefer :func:`bias_mod`, which SDPA
    serves too.
    """

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"score_mod must be callable; got {type(fn).__name__}")
        check_arity("score_mod", fn, 5, "score_mod(score, b, h, q_idx, kv_idx)")
        self.fn = fn

    def closes_over_grad(self, dtype: torch.dtype = torch.float32, device=None) -> bool:
        """Whether ``fn``'s output depends on a tensor that requires grad, found by evaluating it
        on a single score with grad mode on (a ``fn`` that fails on one score counts as yes)."""
        one = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
        idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        try:
            with torch.enable_grad():
                out = self.fn(one, idx, idx, idx, idx)
        except Exception:  # noqa: BLE001 -- unknown: be safe
            return True
        return isinstance(out, torch.Tensor) and out.requires_grad

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        out = self.fn(score, b, h, q_idx, kv_idx)
        name = f"score_mod {getattr(self.fn, '__name__', self.fn)!r}"
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{name} must return a tensor of scores; got {type(out).__name__}")
        if not out.is_floating_point():
            raise TypeError(f"{name} must return floating-point scores; got dtype {out.dtype}")
        target = torch.broadcast_shapes(score.shape, b.shape, h.shape, q_idx.shape, kv_idx.shape)
        if not broadcastable(tuple(out.shape), tuple(target)):
            raise ValueError(f"{name} returned shape {shape_str(out)}, which does not broadcast to the scores "
                             f"{shape_str(torch.empty(target))} (score, b, h, q_idx, kv_idx broadcast together)")
        return out.to(score.dtype)

    def __repr__(self):
        return f"from_score_mod({getattr(self.fn, '__name__', self.fn)!r})"


class FromBias(ScoreMod):
    """An additive bias given as ``fn(b, h, q_idx, kv_idx) -> bias``: ``score + fn(...)``.

    Declared additive, so every backend that takes a float bias serves it (SDPA materializes it
    as a float mask; the tiled backend adds it tile by tile); a plain ``score_mod`` callable
    cannot be, since attnkit cannot tell that it only adds. Build it with :func:`bias_mod`.
    """

    additive = True

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"bias_mod must be callable; got {type(fn).__name__}")
        check_arity("bias_mod", fn, 4, "bias(b, h, q_idx, kv_idx)")
        self.fn = fn

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        out = self.fn(b, h, q_idx, kv_idx)
        name = f"bias_mod {getattr(self.fn, '__name__', self.fn)!r}"
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = f"dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"{name} must return a floating-point tensor (the bias); got {got}")
        target = torch.broadcast_shapes(score.shape, b.shape, h.shape, q_idx.shape, kv_idx.shape)
        if not broadcastable(tuple(out.shape), tuple(target)):
            raise ValueError(f"{name} returned shape {shape_str(out)}, which does not broadcast to the scores "
                             f"{shape_str(torch.empty(target))}")
        return score + out.to(score.dtype)

    def closes_over_grad(self, dtype: torch.dtype = torch.float32, device=None) -> bool:
        """Whether ``fn``'s bias depends on a tensor that requires grad (see
        :meth:`FromScoreMod.closes_over_grad`; here ``fn`` takes no score)."""
        idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        try:
            with torch.enable_grad():
                out = self.fn(idx, idx, idx, idx)
        except Exception:  # noqa: BLE001 -- unknown: be safe
            return True
        return isinstance(out, torch.Tensor) and out.requires_grad

    def __repr__(self):
        return f"bias_mod({getattr(self.fn, '__name__', self.fn)!r})"


def bias_mod(fn: Callable) -> FromBias:
    """Declare an additive position bias ``fn(b, h, q_idx, kv_idx) -> bias`` (see :class:`FromBias`).

    Example::

        >>> import torch, attnkit
        >>> q = k = v = torch.randn(1, 2, 6, 8)
        >>> decay = attnkit.positions.bias_mod(lambda b, h, q_idx, kv_idx: -0.1 * (q_idx - kv_idx).abs())
        >>> attnkit.explain(q, k, v, bias=decay, backend="sdpa").backend
        'sdpa'
    """
    return FromBias(fn)


class SoftCap(ScoreMod):
    """tanh soft-capping ``cap * tanh(score / cap)`` (Gemma 2, Grok): scores stay in ``(-cap, cap)``.

    Example::

        >>> import attnkit, torch
        >>> attnkit.positions.softcap(2.0).apply_to_scores(torch.full((1, 1, 1, 1), 100.0)).item()
        2.0
    """

    pointwise = True
    finite = True

    def __init__(self, cap: float):
        self.cap = float(check_positive("cap", cap))

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        return self.cap * torch.tanh(score / self.cap)

    def pointwise_slope(self, out: Tensor) -> Tensor:
        """``d out / d score = 1 - tanh² = 1 - (out / cap)²``."""
        t = out / self.cap
        return 1.0 - t * t


def softcap(cap: float) -> SoftCap:
    """tanh soft-capping score mod (see :class:`SoftCap`)."""
    return SoftCap(cap)


def as_score_mod(bias) -> ScoreMod:
    """Coerce a ScoreMod, a float tensor or a 5-argument callable into a :class:`ScoreMod`."""
    if isinstance(bias, ScoreMod):
        return bias
    if isinstance(bias, torch.Tensor):
        return TensorBias(bias)
    if callable(bias):
        return FromScoreMod(bias)
    raise TypeError(
        "bias must be a float tensor broadcastable to (B, H, Tq, Tk), an attnkit.positions.ScoreMod "
        f"or a score_mod(score, b, h, q_idx, kv_idx) callable (or a list of these); got {type(bias).__name__}"
    )
