"""Hierarchical attention (word → sentence → document), Yang et al. 2016,
https://aclanthology.org/N16-1174/ (HAN)."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import shape_str
from .additive import _check_dims, _check_input, _choice
from .pooling import AttentionPooling
from .rnn import run_rnn

Tensor = torch.Tensor

RNNS = {"gru": nn.GRU, "lstm": nn.LSTM}


class HierarchicalAttention(nn.Module):
    r"""Hierarchical attention network encoder of Yang et al. 2016, https://aclanthology.org/N16-1174/.

    .. math::
        h_{it} = [\overrightarrow{\mathrm{GRU}}(x_{it}); \overleftarrow{\mathrm{GRU}}(x_{it})],\quad
        u_{it} = \tanh(W_w h_{it} + b_w),\quad
        \alpha_{it} = \mathrm{softmax}_t(u_{it}^\top u_w),\quad s_i = \sum_t \alpha_{it} h_{it}

        h_i = [\overrightarrow{\mathrm{GRU}}(s_i); \overleftarrow{\mathrm{GRU}}(s_i)],\quad
        u_i = \tanh(W_s h_i + b_s),\quad
        \alpha_i = \mathrm{softmax}_i(u_i^\top u_s),\quad v = \sum_i \alpha_i h_i

    Both attention layers are :class:`AttentionPooling` ``(mode="mlp")``, hence
    :func:`attnkit.attention`. Padded words and fully padded sentences never reach the RNNs
    (they are packed away), get weight 0, and do not change the output; a document with no real
    word gives a zero vector.

    Args:
        embed_dim: ``E``, features of the word embeddings.
        word_hidden: hidden size of each direction of the word RNN.
        sent_hidden: hidden size of each direction of the sentence RNN.
        rnn: ``"gru"`` (the paper) or ``"lstm"``.
        word_attn_dim, sent_attn_dim: sizes of ``u_w`` and ``u_s`` (default ``2*word_hidden``,
            ``2*sent_hidden``).

    Forward:
        ``x (B, S, W, E)`` word embeddings (``S`` sentences of ``W`` words); ``word_mask`` bool
        ``(B, S, W)`` with **True = real word** (a keep-mask, the opposite of ``key_padding_mask``);
        None means every word is real.

    Returns:
        ``document (B, 2*sent_hidden)``, word weights ``(B, S, W)``, sentence weights ``(B, S)``.

    Example::

        >>> import torch, attnkit
        >>> han = attnkit.nn.HierarchicalAttention(embed_dim=8, word_hidden=5, sent_hidden=6)
        >>> mask = torch.ones(2, 3, 4, dtype=torch.bool); mask[1, 2] = False  # doc 1: 2 sentences
        >>> doc, a_w, a_s = han(torch.randn(2, 3, 4, 8), mask)
        >>> doc.shape, a_w.shape, a_s[1, 2].item()
        (torch.Size([2, 12]), torch.Size([2, 3, 4]), 0.0)
    """

    def __init__(self, embed_dim: int, word_hidden: int, sent_hidden: int, rnn: str = "gru", *,
                 word_attn_dim: int | None = None, sent_attn_dim: int | None = None):
        super().__init__()
        _check_dims(embed_dim=embed_dim, word_hidden=word_hidden, sent_hidden=sent_hidden)
        cls = RNNS[_choice("rnn", rnn, RNNS)]
        self.embed_dim, self.word_hidden, self.sent_hidden, self.rnn = embed_dim, word_hidden, sent_hidden, rnn
        self.word_rnn = cls(embed_dim, word_hidden, batch_first=True, bidirectional=True)
        self.word_attention = AttentionPooling(2 * word_hidden, word_attn_dim or 2 * word_hidden, mode="mlp")
        self.sent_rnn = cls(2 * word_hidden, sent_hidden, batch_first=True, bidirectional=True)
        self.sent_attention = AttentionPooling(2 * sent_hidden, sent_attn_dim or 2 * sent_hidden, mode="mlp")

    @property
    def output_dim(self) -> int:
        return 2 * self.sent_hidden

    def forward(self, x: Tensor, word_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        _check_input("x", x, (4,), self.embed_dim, "(B, S, W, E)")
        dtype = self.word_rnn.weight_ih_l0.dtype
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the module's parameters are {dtype}; "
                            f"convert one of them (e.g. module.to({x.dtype}))")
        B, S, W, E = x.shape
        if word_mask is None:
            word_mask = torch.ones(B, S, W, dtype=torch.bool, device=x.device)
        elif not isinstance(word_mask, torch.Tensor) or word_mask.dtype != torch.bool:
            raise TypeError("word_mask must be a bool tensor (B, S, W) with True = real word; got "
                            f"{word_mask.dtype if isinstance(word_mask, torch.Tensor) else type(word_mask).__name__}")
        elif tuple(word_mask.shape) != (B, S, W):
            raise ValueError(f"word_mask must have shape ({B}, {S}, {W}) (B, S, W), True = real word; "
                             f"got shape {shape_str(word_mask)}")

        # words -> sentence vectors
        keep = word_mask.reshape(B * S, W)
        h = run_rnn(self.word_rnn, x.reshape(B * S, W, E), keep)            # (B*S, W, 2*word_hidden)
        s, a_w = self.word_attention(h, key_padding_mask=~keep)              # (B*S, 2*wh), (B*S, W)
        # sentences -> document vector
        sent_keep = word_mask.any(-1)                                         # (B, S)
        hs = run_rnn(self.sent_rnn, s.view(B, S, -1), sent_keep)            # (B, S, 2*sent_hidden)
        doc, a_s = self.sent_attention(hs, key_padding_mask=~sent_keep)      # (B, 2*sh), (B, S)
        return doc, a_w.view(B, S, W), a_s

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, word_hidden={self.word_hidden}, sent_hidden={self.sent_hidden}, "
                f"rnn={self.rnn!r}")


__all__ = ["HierarchicalAttention", "run_rnn"]
