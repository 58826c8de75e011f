"""Luong et al. 2015 ("Effective Approaches to Attention-based NMT", https://arxiv.org/abs/1508.04025)
local attention: the decoder at step t attends to a window ``[p_t - D, p_t + D]`` of source positions.

* local-m (monotonic): ``p_t = t``.
* local-p (predictive): ``p_t = S·σ(v_pᵀ tanh(W_p h_t))`` is predicted by the model
  (:class:`attnkit.nn.LocalAttention` does that); weights are the softmax inside the window,
  then multiplied by ``exp(-(s - p_t)² / 2σ²)`` with ``σ = D/2``, *not* renormalized, as the
  paper does. The Gaussian factor is what carries gradient to ``p_t``.
"""

from __future__ import annotations

import torch

from .._checks import check_finite_tensor, check_positive, shape_str
from .base import Mask
from .basic import SlidingWindow

Tensor = torch.Tensor


def local_m(D: int, align: str = "top_left") -> SlidingWindow:
    """Luong local-m: query ``t`` sees keys ``t-D ... t+D`` (``p_t = t``; top-left aligned, as in
    the paper). Example::

        >>> import attnkit
        >>> attnkit.masks.local_m(1).materialize(3, 4)[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    """
    D = int(check_positive("D", D, integer=True))
    return SlidingWindow(D, D, align)


class LocalP(Mask):
    """Luong local-p window with Gaussian reweighting around predicted centers.

    Args:
        centers: predicted positions ``p_t``, float ``(B, Tq)`` (shared by heads) or ``(B, H, Tq)``.
            Differentiable: gradients reach them through the Gaussian factor.
        D: half-width of the window (> 0); ``σ = D / 2``.
    """

    has_weight_factor = True

    def __init__(self, centers: Tensor, D: int):
        if not isinstance(centers, torch.Tensor) or not centers.is_floating_point():
            raise TypeError("local_p centers must be a float tensor (B, Tq) or (B, H, Tq); got "
                            f"{getattr(centers, 'dtype', type(centers).__name__)}")
        if centers.dim() not in (2, 3):
            raise ValueError(f"local_p centers must have shape (B, Tq) or (B, H, Tq); got {shape_str(centers)}")
        self.D = int(check_positive("D", D, integer=True))
        self.sigma = self.D / 2.0
        self.centers = centers

    def check(self, batch, heads, num_queries, num_keys):
        c = self.centers
        want = (batch, num_queries) if c.dim() == 2 else (batch, heads, num_queries)
        if tuple(c.shape) != want:
            raise ValueError(f"local_p centers have shape {shape_str(c)} but the inputs need {want}")
        check_finite_tensor("local_p centers", c.detach())  # a NaN center would hide every key: no silent zero

    def _center(self, b, h, q_idx):
        c = self.centers.to(q_idx.device)
        return c[b, q_idx] if c.dim() == 2 else c[b, h, q_idx]

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        p = self._center(b, h, q_idx).detach()
        return (kv_idx >= p - self.D) & (kv_idx <= p + self.D)

    def weight_factor(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        p = self._center(b, h, q_idx).double()  # positions need more than float32's 24 bits
        return torch.exp(-((kv_idx - p) ** 2) / (2 * self.sigma ** 2))

    def __repr__(self):
        return f"local_p(centers={shape_str(self.centers)}, D={self.D})"


def local_p(centers: Tensor, D: int) -> LocalP:
    """Luong local-p (see :class:`LocalP`).

    Example::

        >>> import torch, attnkit
        >>> m = attnkit.masks.local_p(torch.tensor([[2.0]]), D=1)
        >>> m.materialize(1, 5)[0, 0].int().tolist()
        [[0, 1, 1, 1, 0]]
    """
    return LocalP(centers, D)
