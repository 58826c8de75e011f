"""Seed 001's gated attention memory as a sequence classifier (e.g. MNIST read row by row).

Each input vector ``x_i`` (one row of an image: ``row_dim`` pixels) is projected to ``dim``
features and, optionally, contextualized by an encoder over the rows (a bidirectional GRU or
a small pre-norm Transformer, as in :mod:`attnkit.models.classifier`). The attention memory
:class:`attnkit.nn.AttentionMemory` then runs ``num_steps`` steps: at step ``t`` it attends over
the rows with scores built from each row, the mean row and its previous output ``y_{t-1}``,
writes a gated update into its memory cell and emits ``y_t = σ(W_o m_t + b_o)`` (the
equations are in ``docs/gated_attention.md``). The classifier reads the final output ``y_T``
(``readout="last"``, the default) or all outputs ``[y_1; …; y_T]`` (``readout="concat"``).
Optionally, :class:`attnkit.nn.GatedAttentionHeads` (seed 001's gated heads) pool the rows
too, and their gated output is concatenated to the memory's readout::

    rows (B, n, row_dim) ─ Linear (+ positions) ─ encoder ─ h (B, n, E) ─┬─ AttentionMemory ─ y_T (B, M) ─┐
                                                                        └─ GatedAttentionHeads ─ (B, M) ─┴─ ...

    ... ─ [y_T; g] ─ LayerNorm ─ Dropout ─ Linear ─ logits (B, C)

Without an encoder the memory's context ``c_t = Σ_i F_ti h_i`` is a weighted sum of
independently embedded rows; the learned row positions tell it which row is which.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive, check_probability, lookup, shape_str
from ..nn import AttentionMemory, GatedAttentionHeads
from ..positions import LearnedPositionalEmbedding
from .classifier import ENCODERS, BiGRUEncoder, TransformerEncoder

Tensor = torch.Tensor

READOUTS = ("last", "concat")


class AttentionMemoryClassifier(nn.Module):
    r"""Classify a sequence of vectors (the rows of an image) with seed 001's attention memory.

    .. math::
        h = \mathrm{Encoder}(X W_e + b_e + P),\qquad
        (y_1..y_T, F) = \mathrm{AttentionMemory}(h),\qquad
        \mathrm{logits} = W\,\mathrm{Dropout}(\mathrm{LayerNorm}([y_T;\ g])) + b

    where ``g`` is the output of the optional :class:`attnkit.nn.GatedAttentionHeads` (absent
    when ``gated_heads=0``) and ``y_T`` is replaced by ``[y_1; …; y_T]`` with ``readout="concat"``.

    Args:
        num_classes: number of classes ``C``.
        row_dim: features of each input vector ``x_i`` (28 for an MNIST row).
        num_rows: the longest sequence accepted (learned positions; 28 for MNIST).
        dim: ``E``, width of the row embeddings and of the encoder.
        memory_dim: ``M``, width of the memory cell and of ``y_t``.
        attn_dim: hidden size of the memory's additive scorer (default ``memory_dim``).
        num_steps: ``T``, memory steps.
        encoder: ``"gru"`` (bidirectional, ``dim // 2`` units each way), ``"transformer"``
            (pre-norm, :class:`attnkit.nn.MultiheadAttention`) or ``"none"``.
        depth: encoder layers.
        num_heads: heads of the Transformer encoder.
        gated_heads: number ``K`` of :class:`attnkit.nn.GatedAttentionHeads` heads (0 = none).
        head_dim: key/query width of each gated head.
        readout: ``"last"`` (``y_T``) or ``"concat"`` (``y_1..y_T``).
        dropout: dropout on the row embeddings, inside the encoder and before the head.

    Forward:
        ``forward(x, key_padding_mask=None, return_attention=False)`` with ``x (B, n, row_dim)``
        -- or images ``(B, H, W)`` / ``(B, 1, H, W)`` with ``W == row_dim``, read row by row --
        and ``key_padding_mask (B, n)`` bool, True = padding.

    Returns:
        ``logits (B, C)``; with ``return_attention=True``, ``(logits, attention)`` where
        ``attention`` holds ``"memory"``: the attention matrix ``F (B, T, n)`` (row ``t`` =
        step ``t``), ``"gates"``: the control gates ``(B, T, M)``, ``"heads"``: the gated heads'
        weights ``(B, K, n)`` (if any) and ``"layer{i}" (B, H, n, n)`` (Transformer encoder).

    Example::

        >>> import torch
        >>> from attnkit.models import AttentionMemoryClassifier
        >>> m = AttentionMemoryClassifier(10, row_dim=8, num_rows=8, dim=16, memory_dim=12, num_steps=3, gated_heads=2)
        >>> logits, attn = m(torch.rand(5, 8, 8), return_attention=True)
        >>> logits.shape, attn["memory"].shape, attn["heads"].shape
        (torch.Size([5, 10]), torch.Size([5, 3, 8]), torch.Size([5, 2, 8]))
    """

    def __init__(self, num_classes: int, row_dim: int, num_rows: int = 28, dim: int = 128, memory_dim: int = 128,
                 attn_dim: int | None = None, num_steps: int = 4, encoder: str = "gru", depth: int = 1,
                 num_heads: int = 4, gated_heads: int = 0, head_dim: int = 32, readout: str = "last",
                 dropout: float = 0.1):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("row_dim", row_dim), ("num_rows", num_rows), ("dim", dim),
                        ("memory_dim", memory_dim), ("num_steps", num_steps), ("num_heads", num_heads),
                        ("head_dim", head_dim)):
            check_positive(name, v, integer=True)
        check_positive("gated_heads", gated_heads, integer=True, allow_zero=True)
        check_positive("depth", depth, integer=True, allow_zero=encoder == "none")
        if attn_dim is not None:
            check_positive("attn_dim", attn_dim, integer=True)
        lookup("encoder", encoder, dict.fromkeys(ENCODERS))
        lookup("readout", readout, dict.fromkeys(READOUTS))
        dropout = check_probability("dropout", dropout)
        if encoder == "transformer" and dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads; got dim = {dim} and num_heads = {num_heads}")
        self.config = dict(num_classes=num_classes, row_dim=row_dim, num_rows=num_rows, dim=dim,
                           memory_dim=memory_dim, attn_dim=attn_dim, num_steps=num_steps, encoder=encoder,
                           depth=depth, num_heads=num_heads, gated_heads=gated_heads, head_dim=head_dim,
                           readout=readout, dropout=dropout)

        self.embed = nn.Linear(row_dim, dim)
        self.positions = LearnedPositionalEmbedding(num_rows, dim) if encoder != "gru" else None
        self.embed_drop = nn.Dropout(dropout)
        if encoder == "transformer":
            self.encoder: nn.Module | None = TransformerEncoder(dim, depth, num_heads, dropout=dropout)
        elif encoder == "gru":
            self.encoder = BiGRUEncoder(dim, depth, dropout)
        else:
            self.encoder = None
        self.memory = AttentionMemory(dim, memory_dim, attn_dim, num_steps)
        self.heads = (GatedAttentionHeads(dim, memory_dim, gated_heads, head_dim) if gated_heads else None)
        features = memory_dim * (num_steps if readout == "concat" else 1) + (memory_dim if gated_heads else 0)
        self.norm = nn.LayerNorm(features)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def _rows(self, x: Tensor) -> Tensor:
        cfg = self.config
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == 1:
            x = x[:, 0]                                                   # (B, 1, H, W) -> (B, H, W)
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != cfg["row_dim"]:
            got = f"shape {shape_str(x)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a sequence of rows (B, n, row_dim = {cfg['row_dim']}) or images "
                             f"(B, [1,] H, {cfg['row_dim']}); got {got}")
        if x.shape[1] > cfg["num_rows"]:
            raise ValueError(f"x has {x.shape[1]} rows but the model was built with num_rows = {cfg['num_rows']}")
        return x.to(self.embed.weight.dtype)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, return_attention: bool = False):
        x = self._rows(x)                                                 # (B, n, row_dim)
        h = self.embed(x)                                                 # (B, n, E)
        if self.positions is not None:
            h = self.positions(h)
        h = self.embed_drop(h)
        attention: dict[str, Tensor] = {}
        if isinstance(self.encoder, TransformerEncoder):
            h, weights = self.encoder(h, key_padding_mask, need_weights=return_attention)
            attention.update({f"layer{i}": w for i, w in enumerate(weights)})
        elif self.encoder is not None:
            h = self.encoder(h, key_padding_mask)
        ys, F, gates = self.memory(h, key_padding_mask, return_gates=True)  # (B, T, M), (B, T, n), (B, T, M)
        features = [ys[:, -1] if self.config["readout"] == "last" else ys.flatten(1)]
        if self.heads is not None:
            g, w_heads = self.heads(h, key_padding_mask)                  # (B, M), (B, K, n)
            features.append(g)
            attention["heads"] = w_heads
        logits = self.head(self.norm(torch.cat(features, dim=-1)))        # (B, C)
        if not return_attention:
            return logits
        return logits, {"memory": F, "gates": gates, **attention}


__all__ = ["AttentionMemoryClassifier", "READOUTS"]
