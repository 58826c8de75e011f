"""Attention-pooling classifier (seed 000 §5): embed → encode → attention pooling → linear head.

The input is either a batch of token ids (text) or a batch of images cut into patches
(ViT-style, Dosovitskiy et al. 2021, https://arxiv.org/abs/2010.11929). An optional encoder
contextualizes the sequence -- a small pre-norm Transformer encoder built from
:class:`attnkit.nn.MultiheadAttention` (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762;
pre-norm as Xiong et al. 2020, https://arxiv.org/abs/2002.04745) or a bidirectional GRU -- and
:class:`attnkit.nn.AttentionPooling` summarizes it into one vector for the classifier::

    tokens (B, T) ──embed──┐                                   ┌─ "query": softmax(qᵀ h_i)
                           ├─ + positions ─ encoder ─ h (B,T,E)┤                           ─ z (B,E) ─ linear ─ logits
    images (B,C,H,W) ─patch┘                                   └─ "mlp":   softmax(u_wᵀ tanh(W h_i + b))

Padding (token input) is masked in every attention and in the pooling, and packed away from
the GRU, so padded positions get weight exactly 0 and never change the logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._checks import check_positive, check_probability, lookup, shape_str
from ..nn import AttentionPooling, MultiheadAttention
from ..nn.rnn import run_rnn
from ..positions import LearnedPositionalEmbedding

Tensor = torch.Tensor

INPUTS = ("tokens", "patches")
ENCODERS = ("transformer", "gru", "none")
POOLINGS = ("query", "mlp")


class TransformerEncoderLayer(nn.Module):
    """One pre-norm Transformer encoder layer on :class:`attnkit.nn.MultiheadAttention`::

        x = x + Dropout(SelfAttention(LayerNorm(x)))
        x = x + Dropout(W_2 GELU(W_1 LayerNorm(x)))

    Shapes: ``x (B, T, E)``, ``key_padding_mask (B, T)`` bool with True = padding (torch's
    convention) → ``(B, T, E)`` and, with ``need_weights``, the weights ``(B, H, T, T)``.

    Example::

        >>> import torch
        >>> layer = TransformerEncoderLayer(dim=16, num_heads=4)
        >>> y, w = layer(torch.randn(2, 5, 16), need_weights=True)
        >>> y.shape, w.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 4, 5, 5]))
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.norm1(x)
        a, w = self.attn(h, key_padding_mask=key_padding_mask, need_weights=need_weights,
                         average_attn_weights=False)
        x = x + self.drop(a)
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x, w


class TransformerEncoder(nn.Module):
    """``depth`` :class:`TransformerEncoderLayer` s and a final LayerNorm.

    Returns ``(B, T, E)`` and a list with each layer's weights ``(B, H, T, T)`` (empty unless
    ``need_weights``).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, ffn_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        weights = []
        for layer in self.layers:
            x, w = layer(x, key_padding_mask, need_weights)
            if need_weights:
                weights.append(w)
        return self.norm(x), weights


class BiGRUEncoder(nn.Module):
    """A bidirectional GRU (``dim // 2`` units each way, ``depth`` layers) whose outputs are
    concatenated back to ``dim`` features. Padded positions are packed away (they never reach
    the GRU) and come out as zeros.

    Shapes: ``x (B, T, E)``, ``key_padding_mask (B, T)`` (True = padding) → ``(B, T, E)``.
    """

    def __init__(self, dim: int, depth: int = 1, dropout: float = 0.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even for the bidirectional GRU encoder (dim // 2 units each way); got {dim}")
        self.rnn = nn.GRU(dim, dim // 2, num_layers=depth, batch_first=True, bidirectional=True,
                          dropout=dropout if depth > 1 else 0.0)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if key_padding_mask is None:
            return self.rnn(x)[0]
        return run_rnn(self.rnn, x, ~key_padding_mask)


def _pair(name: str, v: int | Sequence[int] | None) -> list[int] | None:
    if v is None:
        return None
    is_int = lambda a: isinstance(a, int) and not isinstance(a, bool)  # noqa: E731
    vals = [v, v] if is_int(v) else list(v) if isinstance(v, (list, tuple)) else None
    if vals is None or len(vals) != 2 or not all(is_int(a) and a > 0 for a in vals):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints; got {v!r}")
    return vals


class AttentionClassifier(nn.Module):
    r"""Classify a token sequence or an image with attention pooling over an encoded sequence.

    .. math::
        h = \mathrm{Encoder}(\mathrm{Embed}(x) + P),\qquad
        z, \alpha = \mathrm{AttentionPooling}(h),\qquad
        \mathrm{logits} = W\,\mathrm{Dropout}(\mathrm{LayerNorm}(z)) + b

    Args:
        num_classes: number of classes ``C``.
        input: ``"tokens"`` (ids ``(B, T)``; needs ``vocab_size``) or ``"patches"`` (images
            ``(B, channels, H, W)``; needs ``image_size`` and ``patch_size``, which must divide it).
        vocab_size: token vocabulary size (``input="tokens"``).
        image_size: ``H`` or ``(H, W)`` (``input="patches"``).
        patch_size: ``p`` or ``(p_h, p_w)``: the image is cut into ``(H/p_h)·(W/p_w)`` patches,
            each flattened and projected to ``dim``.
        channels: image channels.
        dim: ``E``, width of the embeddings and of the encoder.
        depth: Transformer layers, or GRU layers.
        num_heads: attention heads of the Transformer encoder.
        encoder: ``"transformer"`` (pre-norm, :class:`attnkit.nn.MultiheadAttention`), ``"gru"``
            (bidirectional, ``dim // 2`` units each way) or ``"none"`` (pool the embeddings).
        pooling: ``"query"`` (learned query) or ``"mlp"`` (HAN's ``u_w``) attention pooling.
        dropout: dropout on embeddings, attention weights, residual branches and before the head.
        max_len: number of learned positions for token input (the longest sequence accepted).
        ffn_dim: hidden width of the Transformer feed-forward blocks (default ``4 * dim``).
        pad_id: token id of padding (token input): when ``key_padding_mask`` is not given,
            positions equal to ``pad_id`` are padding. None: no automatic padding mask.

    Forward:
        ``forward(x, key_padding_mask=None, return_attention=False)``; ``x`` is ``(B, T)``
        long (tokens) or ``(B, channels, H, W)`` float (patches; ``(B, H, W)`` is accepted
        when ``channels == 1``); ``key_padding_mask (B, T)`` bool, True = padding.

    Returns:
        ``logits (B, C)``; with ``return_attention=True``, ``(logits, attention)`` where
        ``attention`` is a dict: ``"pooling" (B, T)`` and, for the Transformer encoder,
        ``"layer{i}" (B, H, T, T)``. Padded positions get weight exactly 0.

    Example::

        >>> import torch
        >>> from attnkit.models import AttentionClassifier
        >>> m = AttentionClassifier(3, input="tokens", vocab_size=20, dim=16, depth=1, num_heads=2)
        >>> x = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])  # 0 = padding
        >>> logits, attn = m(x, return_attention=True)
        >>> logits.shape, attn["pooling"][1, 2:].tolist(), attn["layer0"].shape
        (torch.Size([2, 3]), [0.0, 0.0], torch.Size([2, 2, 4, 4]))
        >>> img = AttentionClassifier(10, input="patches", image_size=8, patch_size=2, dim=16, depth=1, num_heads=2)
        >>> img(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int, input: str = "tokens", vocab_size: int | None = None,
                 image_size: int | Sequence[int] | None = None, patch_size: int | Sequence[int] | None = None,
                 channels: int = 1, dim: int = 64, depth: int = 2, num_heads: int = 4, encoder: str = "transformer",
                 pooling: str = "query", dropout: float = 0.1, max_len: int = 512, ffn_dim: int | None = None,
                 pad_id: int | None = 0):
        super().__init__()
        num_classes = int(check_positive("num_classes", num_classes, integer=True))
        lookup("input", input, dict.fromkeys(INPUTS))
        lookup("encoder", encoder, dict.fromkeys(ENCODERS))
        lookup("pooling", pooling, dict.fromkeys(POOLINGS))
        dim = int(check_positive("dim", dim, integer=True))
        depth = int(check_positive("depth", depth, integer=True, allow_zero=encoder == "none"))
        num_heads = int(check_positive("num_heads", num_heads, integer=True))
        dropout = check_probability("dropout", dropout)
        if encoder == "transformer" and dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads; got dim = {dim} and num_heads = {num_heads}")
        image_size, patch_size = _pair("image_size", image_size), _pair("patch_size", patch_size)

        if input == "tokens":
            if vocab_size is None:
                raise ValueError("vocab_size is required with input='tokens'")
            vocab_size = int(check_positive("vocab_size", vocab_size, integer=True))
            if image_size is not None or patch_size is not None:
                raise ValueError("image_size and patch_size are only used with input='patches'")
            if pad_id is not None and not 0 <= pad_id < vocab_size:
                raise ValueError(f"pad_id must be in [0, vocab_size = {vocab_size}) or None; got {pad_id}")
            max_len = int(check_positive("max_len", max_len, integer=True))
            self.embed = nn.Embedding(vocab_size, dim)
            num_positions = max_len
        else:
            if image_size is None or patch_size is None:
                raise ValueError(f"image_size and patch_size are required with input='patches'; got "
                                 f"image_size={image_size}, patch_size={patch_size}")
            if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
                raise ValueError(f"patch_size must divide image_size; got image_size={image_size}, "
                                 f"patch_size={patch_size}")
            channels = int(check_positive("channels", channels, integer=True))
            vocab_size, pad_id = None, None
            num_positions = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
            self.embed = nn.Linear(channels * patch_size[0] * patch_size[1], dim)  # patch embedding
        self.config = dict(num_classes=num_classes, input=input, vocab_size=vocab_size, image_size=image_size,
                           patch_size=patch_size, channels=channels, dim=dim, depth=depth, num_heads=num_heads,
                           encoder=encoder, pooling=pooling, dropout=dropout, max_len=max_len, ffn_dim=ffn_dim,
                           pad_id=pad_id)

        self.positions = LearnedPositionalEmbedding(num_positions, dim) if encoder != "gru" else None
        self.embed_drop = nn.Dropout(dropout)
        if encoder == "transformer":
            self.encoder: nn.Module | None = TransformerEncoder(dim, depth, num_heads, ffn_dim, dropout)
        elif encoder == "gru":
            self.encoder = BiGRUEncoder(dim, depth, dropout)
        else:
            self.encoder = None
        self.pool = AttentionPooling(dim, mode=pooling, hidden_dim=dim if pooling == "mlp" else None)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    # -- input -> (B, T, E) ----------------------------------------------------------------
    def patches(self, images: Tensor) -> Tensor:
        """Cut ``images (B, C, H, W)`` into flattened patches ``(B, N, C·p_h·p_w)``, row-major."""
        (ph, pw), C = self.config["patch_size"], self.config["channels"]
        B, _, H, W = images.shape
        x = images.reshape(B, C, H // ph, ph, W // pw, pw)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // ph) * (W // pw), C * ph * pw)

    def _embed(self, x: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        cfg = self.config
        if cfg["input"] == "tokens":
            if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64):
                got = f"shape {shape_str(x)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"x must be token ids, a (B, T) integer tensor; got {got}")
            B, T = x.shape
            if T > cfg["max_len"]:
                raise ValueError(f"x has {T} tokens but the model was built with max_len = {cfg['max_len']}")
            if key_padding_mask is None and cfg["pad_id"] is not None:
                key_padding_mask = x == cfg["pad_id"]
            h = self.embed(x)
        else:
            H, W = cfg["image_size"]
            if isinstance(x, Tensor) and x.dim() == 3 and cfg["channels"] == 1:
                x = x.unsqueeze(1)
            if not isinstance(x, Tensor) or tuple(x.shape[1:]) != (cfg["channels"], H, W):
                raise ValueError(f"x must be images (B, {cfg['channels']}, {H}, {W}); got "
                                 + (f"shape {shape_str(x)}" if isinstance(x, Tensor) else type(x).__name__))
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is only for token input; images have no padding")
            h = self.embed(self.patches(x.to(self.embed.weight.dtype)))
            B, T = h.shape[:2]
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool \
                    or tuple(key_padding_mask.shape) != (B, T):
                got = (f"shape {shape_str(key_padding_mask)} dtype {key_padding_mask.dtype}"
                       if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__)
                raise ValueError(f"key_padding_mask must be a bool tensor ({B}, {T}) with True = padding; got {got}")
        if self.positions is not None:
            h = self.positions(h)
        return self.embed_drop(h), key_padding_mask

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, return_attention: bool = False):
        h, pad = self._embed(x, key_padding_mask)                  # (B, T, E)
        attention: dict[str, Tensor] = {}
        if isinstance(self.encoder, TransformerEncoder):
            h, weights = self.encoder(h, pad, need_weights=return_attention)
            attention.update({f"layer{i}": w for i, w in enumerate(weights)})
        elif self.encoder is not None:
            h = self.encoder(h, pad)
        z, alpha = self.pool(h, key_padding_mask=pad)              # (B, E), (B, T)
        logits = self.head(self.norm(z))                           # (B, C)
        if not return_attention:
            return logits
        return logits, {"pooling": alpha, **attention}


__all__ = ["AttentionClassifier", "TransformerEncoder", "TransformerEncoderLayer", "BiGRUEncoder"]
