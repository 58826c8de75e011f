"""Score functions: how a query and a key are compared.

A score takes ``q (B, H, Tq, Dq)`` and ``k (B, H, Tk, Dk)`` (key heads already expanded for
grouped-query attention) and returns raw scores ``(B, H, Tq, Tk)``. ``attnkit.attention`` then
multiplies by ``scale``, applies biases and masks, normalizes and aggregates.

Parameter-free scores are named by strings (``"dot"``, ``"scaled_dot"``, ``"cosine"``); scores
with parameters are ``nn.Module`` objects (:class:`General`, :class:`Additive`,
:class:`Location`) whose parameters train with the model that holds them.

======================  ============================================  ==================
name / class            score(q_i, k_j)                               default scale
======================  ============================================  ==================
``dot``                 ``q_i · k_j``                                 1
``scaled_dot``          ``q_i · k_j``                                 ``1/sqrt(D)``
``cosine`` / Cosine     ``cos(q_i, k_j) / tau``                       1
General (Luong)         ``q_iᵀ W k_j``                                1
Additive (Bahdanau)     ``vᵀ tanh(W_q q_i + W_k k_j + b)``            1
Location (Luong)        ``(W_a q_i)_j`` (ignores the keys)            1
======================  ============================================  ==================
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive, lookup

Tensor = torch.Tensor


class Score(nn.Module):
    """Base class: ``forward(q, k) -> scores (B, H, Tq, Tk)``."""

    #: name used by ``attnkit.info`` and ``explain``
    name: str = "score"
    #: True when q and k must share their last dim
    same_dim: bool = True
    #: True when :meth:`tile` is a plain dot product of the prepared tensors (fast kernels)
    tile_is_dot: bool = True
    #: False when the score cannot be evaluated tile by tile
    tileable: bool = True
    #: False when the scores ignore the key vectors (only their positions count)
    reads_keys: bool = True

    def __init_subclass__(cls, **kwargs):
        """A subclass that writes its own ``forward`` but says nothing of tiles (no ``tile``,
        ``prepare``, ``tile_is_dot`` or ``tileable`` of its own) is served by ``forward`` alone:
        the fast backends would otherwise compute the inherited tile form (a dot product)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "forward" in own and not any(a in own for a in ("tile", "prepare", "tile_is_dot", "tileable")):
            cls.tile_is_dot = False
            cls.tileable = False

    def prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token work done once before tiling; ``tile(*prepare(q, k)) == forward(q, k)``."""
        return q, k

    def tile(self, qp: Tensor, kp: Tensor) -> Tensor:
        """Scores of one tile from prepared queries ``(.., tq, ·)`` and keys ``(.., tk, ·)``."""
        return qp @ kp.transpose(-2, -1)

    def tile_parameters(self) -> list[Tensor]:
        """Parameters that :meth:`tile` reads (those of :meth:`prepare` get gradients outside)."""
        return []

    #: True when :meth:`tile_vjp` gives the tile's gradients in closed form
    has_tile_vjp: bool = False

    def tile_vjp(self, qp: Tensor, kp: Tensor) -> tuple[Tensor, Callable]:
        """``tile(qp, kp)`` and a function of ``ds`` returning the gradients of
        ``(tile(qp, kp) * ds).sum()`` w.r.t. ``qp``, ``kp`` and each of :meth:`tile_parameters`
        (shaped like it), in closed form, without autograd; only where ``has_tile_vjp``."""
        raise NotImplementedError(f"score {self.name!r} has no closed-form tile gradient")

    def default_scale(self, head_dim: int) -> float:
        return 1.0

    def check(self, q: Tensor, k: Tensor) -> None:
        """Raise when q/k feature sizes do not fit this score."""
        if self.same_dim and q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"score {self.name!r} needs q and k with the same last dim; got q (..., {q.shape[-1]}) "
                f"and k (..., {k.shape[-1]})"
            )

    def extra_repr(self) -> str:
        return ""


class Dot(Score):
    """``s_ij = q_i · k_j`` (Luong "dot")."""

    name = "dot"
    tile_is_dot = True

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return q @ k.transpose(-2, -1)


class ScaledDot(Dot):
    """``s_ij = q_i · k_j / sqrt(D)`` (Transformer); the ``1/sqrt(D)`` is the default ``scale``."""

    name = "scaled_dot"

    def default_scale(self, head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim)


class Cosine(Score):
    """``s_ij = cos(q_i, k_j) / tau`` (Graves et al. 2014; Swin v2). Scores lie in ``[-1/tau, 1/tau]``.

    Example::

        >>> import torch, attnkit
        >>> q = torch.tensor([[[[1.0, 0.0]]]]); k = torch.tensor([[[[2.0, 0.0], [0.0, 3.0]]]])
        >>> attnkit.scores.Cosine(tau=0.5)(q, k).tolist()
        [[[[2.0, 0.0]]]]
    """

    name = "cosine"

    def __init__(self, tau: float = 0.1, eps: float = 1e-8):
        super().__init__()
        self.tau = float(check_positive("tau", tau))
        self.eps = float(check_positive("eps", eps))

    def prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return qn / self.tau, kn

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return self.tile(*self.prepare(q, k))

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class General(Score):
    """Bilinear ("general", Luong et al. 2015): ``s_ij = q_iᵀ W k_j``.

    ``W`` has shape ``(Dq, Dk)`` shared by all heads, or ``(H, Dq, Dk)`` with ``heads=H``.
    Pass ``weight=`` to use a given tensor instead of a fresh parameter.

    Example::

        >>> import torch, attnkit
        >>> s = attnkit.scores.General(weight=torch.eye(2) * 2)
        >>> s(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 3, 2)).tolist()
        [[[[4.0, 4.0, 4.0]]]]
    """

    name = "general"
    same_dim = False

    def __init__(self, query_dim: int | None = None, key_dim: int | None = None, heads: int | None = None,
                 *, weight: Tensor | None = None):
        super().__init__()
        if weight is None:
            if query_dim is None:
                raise ValueError("General needs query_dim (and key_dim) or weight=")
            query_dim = int(check_positive("query_dim", query_dim, integer=True))
            key_dim = int(check_positive("key_dim", key_dim if key_dim is not None else query_dim, integer=True))
            if heads is None:
                weight = nn.init.xavier_uniform_(torch.empty(query_dim, key_dim))
            else:
                heads = int(check_positive("heads", heads, integer=True))
                weight = torch.stack([nn.init.xavier_uniform_(torch.empty(query_dim, key_dim)) for _ in range(heads)])
            self.weight = nn.Parameter(weight)
        else:
            if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3):
                raise ValueError("General weight must be a (Dq, Dk) or (H, Dq, Dk) tensor; got "
                                 f"{getattr(weight, 'shape', type(weight).__name__)}")
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=weight.requires_grad)

    def check(self, q: Tensor, k: Tensor) -> None:
        w = self.weight
        if q.shape[-1] != w.shape[-2] or k.shape[-1] != w.shape[-1]:
            raise ValueError(f"General weight has shape {tuple(w.shape)} (..., Dq, Dk) but q has Dq = {q.shape[-1]} "
                             f"and k has Dk = {k.shape[-1]}")
        if w.dim() == 3 and w.shape[0] != q.shape[1]:
            raise ValueError(f"General weight has {w.shape[0]} heads but q has H = {q.shape[1]}")

    def prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weight.to(q.dtype)
        return (q @ w if w.dim() == 2 else torch.einsum("bhqd,hde->bhqe", q, w)), k

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return self.tile(*self.prepare(q, k))


class Additive(Score):
    """Additive / concat attention (Bahdanau et al. 2015): ``s_ij = vᵀ tanh(W_q q_i + W_k k_j + b)``.

    Parameters are shared across heads. The reference evaluation materializes the
    ``(B, H, Tq, Tk, hidden)`` tensor; use :meth:`project` and :meth:`combine` to evaluate it by
    tiles (the tiled backend does).

    Example::

        >>> import torch, attnkit
        >>> s = attnkit.scores.Additive(query_dim=3, key_dim=5, hidden_dim=4)
        >>> s(torch.randn(2, 1, 7, 3), torch.randn(2, 1, 6, 5)).shape
        torch.Size([2, 1, 7, 6])
    """

    name = "additive"
    same_dim = False
    tile_is_dot = False

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        for n, v in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            check_positive(n, v, integer=True)
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False)
        self.key_proj = nn.Linear(key_dim, hidden_dim, bias=bias)
        self.v = nn.Linear(hidden_dim, 1, bias=False)

    def check(self, q: Tensor, k: Tensor) -> None:
        if q.shape[-1] != self.query_proj.in_features or k.shape[-1] != self.key_proj.in_features:
            raise ValueError(
                f"Additive score expects q (..., {self.query_proj.in_features}) and k (..., "
                f"{self.key_proj.in_features}); got q (..., {q.shape[-1]}) and k (..., {k.shape[-1]})"
            )

    def project(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``a = W_q q (B, H, Tq, hidden)`` and ``b = W_k k + bias (B, H, Tk, hidden)``."""
        return F.linear(q, self.query_proj.weight.to(q.dtype)), self.project_keys(k)

    def project_keys(self, k: Tensor) -> Tensor:
        """``W_k k + bias`` (``(..., Tk, hidden)``): compute it once when many queries (decoder
        steps) attend to the same keys, and pass the result with :meth:`with_projected_keys`."""
        return F.linear(k, self.key_proj.weight.to(k.dtype),
                        None if self.key_proj.bias is None else self.key_proj.bias.to(k.dtype))

    def with_projected_keys(self) -> "Score":
        """This score for keys already passed through :meth:`project_keys` (same parameters)."""
        return _AdditiveProjectedKeys(self)

    def combine(self, a: Tensor, b: Tensor) -> Tensor:
        """Scores ``(B, H, tq, tk)`` from projected blocks ``a (B, H, tq, hidden)``, ``b (B, H, tk, hidden)``."""
        hidden = torch.tanh_(a.unsqueeze(-2) + b.unsqueeze(-3))  # (B, H, tq, tk, hidden), fresh: in place
        return (hidden @ self.v.weight.to(a.dtype).t()).squeeze(-1)

    def combine_vjp(self, a: Tensor, b: Tensor) -> tuple[Tensor, Callable]:
        """``combine(a, b)`` and the closed-form gradients of ``(combine(a, b) * ds).sum()``.
        With ``t = tanh(a_i + b_j)``: ``dv = Σ_ij ds_ij t_ij``,
        ``da_i = v ∘ (Σ_j ds_ij − Σ_j ds_ij t_ij²)`` and ``db_j = v ∘ (Σ_i ds_ij − Σ_i ds_ij t_ij²)``:
        a few passes over the one ``(tq, tk, hidden)`` tile instead of autograd's graph."""
        w = self.v.weight.to(a.dtype)  # (1, hidden)
        t = torch.tanh_(a.unsqueeze(-2) + b.unsqueeze(-3))
        scores = (t @ w.t()).squeeze(-1)

        def grads(ds: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor]]:
            dw = ds.reshape(1, -1) @ t.reshape(-1, t.shape[-1])
            g = t.square_().mul_(ds.unsqueeze(-1))  # ds_ij t_ij², in place
            da = (ds.sum(-1, keepdim=True) - g.sum(-2)) * w
            db = (ds.sum(-2).unsqueeze(-1) - g.sum(-3)) * w
            return da, db, (dw.to(self.v.weight.dtype),)

        return scores, grads

    def prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.project(q, k)

    def tile(self, qp: Tensor, kp: Tensor) -> Tensor:
        return self.combine(qp, kp)

    def tile_parameters(self) -> list[Tensor]:
        return [self.v.weight]

    has_tile_vjp = True

    def tile_vjp(self, qp: Tensor, kp: Tensor):
        return self.combine_vjp(qp, kp)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return self.combine(*self.project(q, k))


class _AdditiveProjectedKeys(Score):
    """:class:`Additive` whose keys arrive as ``W_k k + bias`` (see ``Additive.project_keys``)."""

    name = "additive"
    same_dim = False
    tile_is_dot = False

    def __init__(self, base: Additive):
        super().__init__()
        self.__dict__["base"] = base  # not a submodule: the parameters belong to ``base``

    def check(self, q: Tensor, k: Tensor) -> None:
        b = self.base
        if q.shape[-1] != b.query_proj.in_features or k.shape[-1] != b.query_proj.out_features:
            raise ValueError(f"Additive score with projected keys expects q (..., {b.query_proj.in_features}) and "
                             f"projected k (..., {b.query_proj.out_features}); got q (..., {q.shape[-1]}) "
                             f"and k (..., {k.shape[-1]})")

    def prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return F.linear(q, self.base.query_proj.weight.to(q.dtype)), k

    def tile(self, qp: Tensor, kp: Tensor) -> Tensor:
        return self.base.combine(qp, kp)

    def tile_parameters(self) -> list[Tensor]:
        return [self.base.v.weight]

    has_tile_vjp = True

    def tile_vjp(self, qp: Tensor, kp: Tensor):
        return self.base.combine_vjp(qp, kp)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return self.tile(*self.prepare(q, k))


class Location(Score):
    """Location-based (Luong et al. 2015): ``s_ij = (W_a q_i)_j`` -- the score depends only on
    the query and the key's position ``j < max_keys``; the key vectors are ignored.

    Example::

        >>> import torch, attnkit
        >>> attnkit.scores.Location(query_dim=4, max_keys=10)(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 6, 4)).shape
        torch.Size([1, 1, 2, 6])
    """

    name = "location"
    same_dim = False
    tileable = False  # the score of key j is column j of W_a q: it needs absolute key positions
    tile_is_dot = False
    reads_keys = False  # a NaN in a key does not reach the scores (attnkit.nonfinite)

    def __init__(self, query_dim: int, max_keys: int):
        super().__init__()
        self.proj = nn.Linear(int(check_positive("query_dim", query_dim, integer=True)),
                              int(check_positive("max_keys", max_keys, integer=True)))

    def check(self, q: Tensor, k: Tensor) -> None:
        if q.shape[-1] != self.proj.in_features:
            raise ValueError(f"Location score expects q (..., {self.proj.in_features}); got (..., {q.shape[-1]})")
        if k.shape[-2] > self.proj.out_features:
            raise ValueError(f"Location score was built for at most max_keys = {self.proj.out_features} keys; "
                             f"got Tk = {k.shape[-2]}")

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return F.linear(q, self.proj.weight.to(q.dtype), self.proj.bias.to(q.dtype))[..., : k.shape[-2]]


FeatureMap = Union[str, Callable[[Tensor], Tensor]]

#: named feature maps ``φ`` of :class:`Kernel` and :func:`attnkit.linear.linear_attention` (values >= 0)
FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


def feature_map_fn(feature_map: FeatureMap) -> Callable[[Tensor], Tensor]:
    """The function ``φ`` named by ``feature_map`` (a key of :data:`FEATURE_MAPS`), or the callable itself."""
    if callable(feature_map):
        return feature_map
    if not isinstance(feature_map, str):
        raise TypeError(f"feature_map must be a name ({', '.join(map(repr, FEATURE_MAPS))}) or a callable; "
                        f"got {type(feature_map).__name__}")
    return lookup("feature_map", feature_map, FEATURE_MAPS)


class Kernel(Score):
    """Kernelized score ``s_ij = φ(q_i) · φ(k_j)`` (Katharopoulos et al. 2020,
    https://arxiv.org/abs/2006.16236), non-negative for φ = elu+1. With
    ``normalizer=attnkit.normalizers.Normalize()`` this is linear attention; the tiled backend
    then runs the O(T) chunked form for plain and causal masks.

    Example::

        >>> import torch, attnkit
        >>> s = attnkit.scores.Kernel()
        >>> bool((s(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4)) > 0).all())
        True
    """

    name = "kernel"

    def __init__(self, feature_map="elu+1"):
        super().__init__()
        self.feature_map_name = feature_map if isinstance(feature_map, str) else getattr(feature_map, "__name__", "φ")
        self.feature_map = feature_map
        self.phi = feature_map_fn(feature_map)

    def prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.phi(q), self.phi(k)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return self.tile(*self.prepare(q, k))

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map_name!r}"


#: parameter-free scores available by name
NAMED = {"dot": Dot, "scaled_dot": ScaledDot, "cosine": Cosine}
#: scores that need parameters: the class to build instead of a string
NEEDS_OBJECT = {"general": "attnkit.scores.General(query_dim, key_dim)",
                "additive": "attnkit.scores.Additive(query_dim, key_dim, hidden_dim)",
                "location": "attnkit.scores.Location(query_dim, max_keys)"}


def get(score: str | Score) -> Score:
    """Resolve ``score=`` (a name or a :class:`Score`)."""
    if isinstance(score, Score):
        return score
    if isinstance(score, str) and score in NEEDS_OBJECT:
        raise ValueError(f"score {score!r} has parameters: pass an object, e.g. score={NEEDS_OBJECT[score]}")
    shared = _SHARED.get(score) if isinstance(score, str) else None
    if shared is None:
        shared = _SHARED[score] = lookup(
            "score", score, NAMED, "attnkit.scores.Score",
            "To score with your own function, subclass attnkit.scores.Score, implement "
            "forward(q (B, H, Tq, D), k (B, H, Tk, D)) -> scores (B, H, Tq, Tk) (the reference backend serves "
            "it; see 'Extending attnkit' in the README for the tile methods the fast ones need); to change "
            "given scores by position, pass a score_mod as bias= instead")()
    return shared


#: one instance per named score: they hold no parameters or state, and building an nn.Module
#: on every call costs more than a short decoder step's attention. The default ones exist from the
#: start: filled on a first call inside ``torch.compile``, the cache would cost a recompile
_SHARED: dict[str, Score] = {"dot": Dot(), "scaled_dot": ScaledDot()}


__all__ = ["Score", "Dot", "ScaledDot", "Cosine", "General", "Additive", "Location", "Kernel", "get", "NAMED"]
