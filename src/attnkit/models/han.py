"""Hierarchical attention network for document classification (Yang et al. 2016,
https://aclanthology.org/N16-1174/): words → sentence vectors → document vector → classes.

A document is a ``(S, W)`` grid of token ids: ``S`` sentences of at most ``W`` words, padded
with ``pad_id``. Word embeddings go through :class:`attnkit.nn.HierarchicalAttention` (a
bidirectional GRU and attention pooling over the words of each sentence, then over the
sentences) and a linear layer gives the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive, check_probability, shape_str
from ..nn import HierarchicalAttention

Tensor = torch.Tensor


class HierarchicalAttentionNetwork(nn.Module):
    r"""HAN classifier: ``logits = W v + b`` with ``v`` the HAN document vector.

    Args:
        vocab_size: token vocabulary size.
        num_classes: number of classes ``C``.
        embed_dim: word embedding size.
        word_hidden: hidden units of each direction of the word GRU.
        sent_hidden: hidden units of each direction of the sentence GRU.
        dropout: dropout on the word embeddings and on the document vector.
        pad_id: the padding token id (its positions are masked out of every attention and GRU).

    Forward:
        ``forward(x, return_attention=False)`` with token ids ``x (B, S, W)`` (``(B, W)`` is
        read as one sentence per document).

    Returns:
        ``logits (B, C)``; with ``return_attention=True``, ``(logits, attention)`` with
        ``"words" (B, S, W)`` (word weights within each sentence; 0 on padding) and
        ``"sentences" (B, S)`` (0 on empty sentences).

    Example::

        >>> import torch
        >>> from attnkit.models import HierarchicalAttentionNetwork
        >>> m = HierarchicalAttentionNetwork(vocab_size=30, num_classes=2, embed_dim=8, word_hidden=6, sent_hidden=5)
        >>> docs = torch.tensor([[[4, 5, 6], [7, 8, 0]], [[9, 10, 0], [0, 0, 0]]])  # 2 docs, 2 sentences of 3 words
        >>> logits, attn = m(docs, return_attention=True)
        >>> logits.shape, attn["sentences"][1].tolist(), attn["words"][0, 1, 2].item()
        (torch.Size([2, 2]), [1.0, 0.0], 0.0)
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 100, word_hidden: int = 50,
                 sent_hidden: int = 50, dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("num_classes", num_classes), ("embed_dim", embed_dim),
                        ("word_hidden", word_hidden), ("sent_hidden", sent_hidden)):
            check_positive(name, v, integer=True)
        dropout = check_probability("dropout", dropout)
        if not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be an int in [0, vocab_size = {vocab_size}); got {pad_id!r}")
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, embed_dim=embed_dim,
                           word_hidden=word_hidden, sent_hidden=sent_hidden, dropout=dropout, pad_id=pad_id)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.drop = nn.Dropout(dropout)
        self.han = HierarchicalAttention(embed_dim, word_hidden, sent_hidden)
        self.head = nn.Linear(self.han.output_dim, num_classes)

    def forward(self, x: Tensor, return_attention: bool = False):
        if isinstance(x, Tensor) and x.dim() == 2:
            x = x.unsqueeze(1)                                    # (B, W) -> (B, 1, W): one sentence
        if not isinstance(x, Tensor) or x.dim() != 3 or x.is_floating_point():
            got = f"shape {shape_str(x)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be token ids (B, S, W) (documents of S sentences of W words); got {got}")
        word_mask = x != self.config["pad_id"]                    # (B, S, W), True = real word
        doc, a_w, a_s = self.han(self.drop(self.embed(x)), word_mask)  # (B, 2*sent_hidden), (B, S, W), (B, S)
        logits = self.head(self.drop(doc))
        if not return_attention:
            return logits
        return logits, {"words": a_w, "sentences": a_s}


__all__ = ["HierarchicalAttentionNetwork"]
