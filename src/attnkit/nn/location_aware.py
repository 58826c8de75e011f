"""Location-aware attention of Chorowski et al. 2015, https://arxiv.org/abs/1506.07503: additive
attention whose score also sees where the previous step attended, through a convolution of the
previous weights. Speech recognizers use it (Listen, Attend and Spell; :mod:`attnkit.models.las`)
because it keeps the alignment moving forward over frames that sound alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive, shape_str
from .additive import AdditiveAttention, _check_input, _linear

Tensor = torch.Tensor


class LocationAwareAttention(nn.Module):
    r"""Location-aware attention (Chorowski, Bahdanau, Serdyuk, Cho and Bengio 2015,
    https://arxiv.org/abs/1506.07503, eq. 8-9).

    .. math::
        f_i = F * \alpha_{i-1},\qquad
        e_{ij} = v^\top \tanh(W s_i + V h_j + U f_{ij} + b),\qquad
        \alpha_{ij} = \frac{\exp e_{ij}}{\sum_{j'} \exp e_{ij'}},\qquad
        c_i = \sum_j \alpha_{ij} h_j

    ``F`` is a 1-D convolution with ``channels`` filters of width ``kernel_size`` (odd, ``same``
    padding) over the previous step's weights ``α_{i-1} (B, Tk)``, ``U`` a linear map from its
    channels to the hidden layer. Everything after adding ``U f_ij`` to the projected keys is
    :class:`AdditiveAttention` (``self.additive``): masks, the all-padding row and the weights
    follow its rules.

    Args:
        query_dim: ``dq``, features of the decoder state ``s_i``.
        key_dim: ``dk``, features of the encoder annotations ``h_j``.
        hidden_dim: size of the scoring MLP's hidden layer.
        channels: filters of the location convolution ``F``.
        kernel_size: width of ``F`` (odd).
        value_dim: ``dv`` when the values are not the keys (not checked if None).

    Forward (one decoder step):
        ``query (B, dq)``, ``key (B, Tk, dk)``, ``value (B, Tk, dv)``, ``previous_weights (B, Tk)``
        (:meth:`initial_weights` at the first step), ``key_padding_mask`` bool ``(B, Tk)`` with
        ``True`` = padding, ``projected_key`` = :meth:`project_keys` of ``key`` computed once.

    Returns:
        ``(context (B, dv), weights (B, Tk))``; pass ``weights`` as the next step's
        ``previous_weights``.

    Equivalent PyTorch::

        f = conv1d(prev[:, None], F, padding=K // 2).transpose(1, 2)             # (B, Tk, channels)
        e = torch.tanh(s @ W.T [:, None] + h @ V.T + b + f @ U.T) @ v             # (B, Tk)
        w = torch.softmax(e.masked_fill(key_padding_mask, -inf), -1); c = (w[:, :, None] * value).sum(1)

    Example::

        >>> import torch, attnkit
        >>> att = attnkit.nn.LocationAwareAttention(query_dim=4, key_dim=6, hidden_dim=8)
        >>> h = torch.randn(2, 5, 6)
        >>> w = att.initial_weights(h)
        >>> for _ in range(3):
        ...     ctx, w = att(torch.randn(2, 4), h, h, w)
        >>> ctx.shape, w.shape, bool(torch.allclose(w.sum(-1), torch.ones(2)))
        (torch.Size([2, 6]), torch.Size([2, 5]), True)
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, channels: int = 10, kernel_size: int = 31,
                 value_dim: int | None = None):
        super().__init__()
        check_positive("channels", channels, integer=True)
        check_positive("kernel_size", kernel_size, integer=True)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding); got {kernel_size}")
        self.additive = AdditiveAttention(query_dim, key_dim, hidden_dim, value_dim)
        self.query_dim, self.key_dim, self.hidden_dim = query_dim, key_dim, hidden_dim
        self.channels, self.kernel_size = channels, kernel_size
        self.location_conv = nn.Conv1d(1, channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.location_proj = nn.Linear(channels, hidden_dim, bias=False)

    def project_keys(self, key: Tensor) -> Tensor:
        """``V key + b`` ``(B, Tk, hidden)``, computed once for all decoder steps over ``key``."""
        return self.additive.project_keys(key)

    @staticmethod
    def initial_weights(key: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``α_0 (B, Tk)``: all the weight on the first frame (the alignment starts at the start).
        ``key_padding_mask`` is accepted for symmetry; the first frame is never padding."""
        w = key.new_zeros(key.shape[0], key.shape[1])
        w[:, 0] = 1.0
        return w

    def location_features(self, previous_weights: Tensor) -> Tensor:
        """``U (F * α_{i-1})`` ``(B, Tk, hidden)``."""
        w = self.location_conv.weight.to(previous_weights.dtype)
        f = F.conv1d(previous_weights.unsqueeze(1), w, padding=self.kernel_size // 2).transpose(1, 2)
        return _linear(f, self.location_proj)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, previous_weights: Tensor,
                key_padding_mask: Tensor | None = None, projected_key: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        _check_input("query", query, (2,), self.query_dim, "(B, dq): one decoder step")
        _check_input("key", key, (3,), self.key_dim, "(B, Tk, dk)")
        if not isinstance(previous_weights, torch.Tensor) or tuple(previous_weights.shape) != tuple(key.shape[:2]):
            got = shape_str(previous_weights) if isinstance(previous_weights, torch.Tensor) else type(previous_weights).__name__
            raise ValueError(f"previous_weights must be (B, Tk) = {tuple(key.shape[:2])} (initial_weights(key) at the "
                             f"first step); got {got}")
        pk = self.project_keys(key) if projected_key is None else projected_key
        if pk.shape[:2] != key.shape[:2]:
            raise ValueError(f"projected_key must be (B, Tk, hidden) for key {shape_str(key)}; got {shape_str(pk)}")
        pk = pk + self.location_features(previous_weights.to(pk.dtype))
        ctx, w = self.additive(query, key, value, key_padding_mask, need_weights=True, projected_key=pk)
        assert w is not None
        return ctx, w

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


__all__ = ["LocationAwareAttention"]
