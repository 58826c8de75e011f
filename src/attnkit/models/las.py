"""Listen, Attend and Spell (Chan, Jaitly, Le and Vinyals 2016, https://arxiv.org/abs/1508.01211)
with location-aware attention (Chorowski et al. 2015, :class:`attnkit.nn.LocationAwareAttention`).

* :class:`Listener`: log-mel frames ``(B, T, n_mels)`` → two stride-2 convolutions (``T/4``) →
  ``layers`` bidirectional LSTMs; every layer after the first is *pyramidal*: it reads pairs of
  frames concatenated, halving the time again (``T/8`` with two layers).
* :class:`ListenAttendSpell`: an optional CTC head on the listener's first layer (its loss, in
  the recipe, makes each frame's annotation about the sounds at that frame, which the attention
  then finds early in training); the speller is an LSTM cell over ``[y_{i-1}; c_{i-1}]``; its state
  ``s_i`` attends over the listener's annotations (location-aware) to give ``c_i``, and
  ``P(y_i) = softmax(W [s_i; c_i])``. The first input token names the output wanted (the recipe
  in :mod:`attnkit.tasks.speech` uses one for the transcript and one for the normalized form),
  so one model writes both from one encoding.

Example::

    >>> import torch
    >>> from attnkit.models.las import ListenAttendSpell
    >>> model = ListenAttendSpell(vocab_size=12, n_mels=8, hidden_dim=16, att_dim=16, emb_dim=8)
    >>> feats, lengths = torch.randn(2, 40, 8), torch.tensor([40, 33])
    >>> out = model(feats, lengths, torch.tensor([[4, 5, 6], [4, 7, 0]]))
    >>> out.logits.shape, out.weights.shape
    (torch.Size([2, 3, 12]), torch.Size([2, 3, 5]))
    >>> ids, maps = model.beam_search(feats, lengths, start_id=4, beam=2, max_len=5)
    >>> len(ids), maps[0].shape[-1]
    (2, 5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive
from ..nn.location_aware import LocationAwareAttention
from ..nn.rnn import padded_rnn

Tensor = torch.Tensor


def conv_lengths(lengths: Tensor) -> Tensor:
    """Frames left after one stride-2 convolution of width 3 with padding 1: ``ceil(T / 2)``."""
    return (lengths + 1) // 2


class Listener(nn.Module):
    """The encoder: ``(feats (B, T, n_mels), lengths (B,))`` → ``(annotations (B, T', 2 hidden),
    lengths' (B,))`` with ``T' = ceil(ceil(T/2)/2) // 2**(layers-1)``. Padding frames never reach
    a real frame's annotation (the LSTMs run on packed sequences)."""

    def __init__(self, n_mels: int = 40, hidden_dim: int = 128, layers: int = 2, conv_channels: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        for name, v in (("n_mels", n_mels), ("hidden_dim", hidden_dim), ("layers", layers),
                        ("conv_channels", conv_channels)):
            check_positive(name, v, integer=True)
        self.n_mels, self.hidden_dim, self.layers = n_mels, hidden_dim, layers
        self.conv1 = nn.Conv1d(n_mels, conv_channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(conv_channels, conv_channels, 3, stride=2, padding=1)
        self.rnns = nn.ModuleList(
            nn.LSTM(conv_channels if i == 0 else 4 * hidden_dim, hidden_dim, batch_first=True, bidirectional=True)
            for i in range(layers))
        self.dropout = nn.Dropout(dropout)

    @property
    def out_dim(self) -> int:
        return 2 * self.hidden_dim

    def out_lengths(self, lengths: Tensor) -> Tensor:
        n = conv_lengths(conv_lengths(lengths))
        return n // 2 ** (self.layers - 1)

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer_outputs(feats, lengths)[-1]

    def layer_outputs(self, feats: Tensor, lengths: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's ``(annotations, lengths)``, first to last (the speech recipe puts a CTC loss
        on the first layer's, at ``T/4`` frames)."""
        if feats.dim() != 3 or feats.shape[-1] != self.n_mels:
            raise ValueError(f"feats must be (B, T, {self.n_mels}); got {tuple(feats.shape)}")
        lengths = lengths.to(torch.long).cpu()
        if not torch.compiler.is_compiling() and bool((self.out_lengths(lengths) < 1).any()):
            raise ValueError(f"every utterance needs at least {4 * 2 ** (self.layers - 1)} frames "
                             f"({self.layers} listener layers); got lengths {lengths.tolist()}")
        mask = torch.arange(feats.shape[1])[None] < lengths[:, None]
        x = feats * mask.to(feats.device, feats.dtype)[..., None]  # padding frames are zeros, whatever they held
        x = F.relu(self.conv1(x.transpose(1, 2)))
        n = conv_lengths(lengths)
        x = x * (torch.arange(x.shape[-1])[None] < n[:, None]).to(x.device, x.dtype)[:, None]
        x = F.relu(self.conv2(x)).transpose(1, 2)  # (B, T/4, C)
        n = conv_lengths(n)
        outs = []
        for i, rnn in enumerate(self.rnns):
            if i > 0:  # pyramid: concatenate frames 2t and 2t+1
                n = n // 2
                x = x[:, : 2 * (x.shape[1] // 2)]
                x = x.reshape(x.shape[0], x.shape[1] // 2, 2 * x.shape[2])
            # eagerly packed, cut to the longest utterance; traced, padded with T kept (nn/rnn.py)
            x = padded_rnn(rnn, self.dropout(x), n,
                           total_length=None if torch.compiler.is_compiling() else int(n.max()))
            outs.append((x, n.to(feats.device)))
        return outs


@dataclass
class LasOutput:
    """``logits (B, T, V)`` of the next tokens, ``weights (B, T, T')`` the attention of each step."""

    logits: Tensor
    weights: Tensor


class ListenAttendSpell(nn.Module):
    """The listener and the attending speller (see the module's docstring).

    Args:
        vocab_size: characters plus the special tokens (``pad_id`` and ``eos_id`` among them).
        n_mels: features per frame.
        hidden_dim: listener LSTM size per direction, and the speller's state size.
        listener_layers: listener layers (each after the first halves the frames).
        att_dim, channels, kernel_size: the location-aware attention's hidden layer, filters, width.
        emb_dim: character embedding size.
        dropout: on the listener's inputs and on the speller's output layer input.
    """

    def __init__(self, vocab_size: int, *, n_mels: int = 40, hidden_dim: int = 128, listener_layers: int = 2,
                 att_dim: int = 128, channels: int = 10, kernel_size: int = 15, emb_dim: int = 64,
                 dropout: float = 0.1, pad_id: int = 0, eos_id: int = 2):
        super().__init__()
        check_positive("vocab_size", vocab_size, integer=True)
        self.vocab_size, self.pad_id, self.eos_id = vocab_size, pad_id, eos_id
        self.config = dict(vocab_size=vocab_size, n_mels=n_mels, hidden_dim=hidden_dim, listener_layers=listener_layers,
                           att_dim=att_dim, channels=channels, kernel_size=kernel_size, emb_dim=emb_dim,
                           dropout=dropout, pad_id=pad_id, eos_id=eos_id)
        self.listener = Listener(n_mels, hidden_dim, listener_layers, dropout=dropout)
        d = self.listener.out_dim
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.cell = nn.LSTMCell(emb_dim + d, hidden_dim)
        self.attention = LocationAwareAttention(hidden_dim, d, att_dim, channels=channels, kernel_size=kernel_size)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim + d, vocab_size)
        #: per-frame character logits over the listener's first layer (``T/4`` frames), for an
        #: auxiliary CTC loss (Kim, Hori and Watanabe 2017) that makes the encoder's frames local,
        #: so that the attention finds its alignment early; blank = ``pad_id``
        self.ctc = nn.Linear(d, vocab_size)

    def encode(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(annotations (B, T', d), projected keys (B, T', att_dim), padding mask (B, T'), True =
        padding)``."""
        return self.attend_over(*self.listener(feats, lengths))

    def attend_over(self, h: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`encode` from the listener's output ``(h, lengths)``."""
        pad = torch.arange(h.shape[1], device=h.device)[None] >= lengths[:, None]
        return h, self.attention.project_keys(h), pad

    def init_state(self, h: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor]:
        B = h.shape[0]
        z = h.new_zeros(B, self.cell.hidden_size)
        return (z, z.clone()), h.new_zeros(B, h.shape[-1]), self.attention.initial_weights(h)

    def step(self, y: Tensor, state: tuple[Tensor, Tensor], ctx: Tensor, prev_w: Tensor, h: Tensor, pk: Tensor,
             pad: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor, Tensor]:
        """One speller step: ``(logits (B, V), state, context (B, d), weights (B, T'))``."""
        s, c = self.cell(torch.cat([self.embed(y), ctx], -1), state)
        ctx, w = self.attention(s, h, h, prev_w, key_padding_mask=pad, projected_key=pk)
        return self.out(self.drop(torch.cat([s, ctx], -1))), (s, c), ctx, w

    def forward(self, feats: Tensor, lengths: Tensor, inputs: Tensor) -> LasOutput:
        """Teacher forcing: ``inputs (B, T)`` are the tokens fed in (the start token first); returns
        the logits of the tokens that follow each."""
        return self.teacher_forced(self.encode(feats, lengths), inputs)

    def teacher_forced(self, encoded: tuple[Tensor, Tensor, Tensor], inputs: Tensor) -> LasOutput:
        """:meth:`forward` from an :meth:`encode` result (several outputs from one encoding)."""
        h, pk, pad = encoded
        state, ctx, w = self.init_state(h)
        logits, weights = [], []
        for t in range(inputs.shape[1]):
            lg, state, ctx, w = self.step(inputs[:, t], state, ctx, w, h, pk, pad)
            logits.append(lg)
            weights.append(w)
        return LasOutput(torch.stack(logits, 1), torch.stack(weights, 1))

    @torch.no_grad()
    def beam_search(self, feats: Tensor, lengths: Tensor, start_id: int, beam: int = 4, max_len: int = 100,
                    encoded: Optional[tuple[Tensor, Tensor, Tensor]] = None, length_penalty: float = 0.0
                    ) -> tuple[list[list[int]], list[Tensor]]:
        """Best output per utterance by beam search from ``start_id`` (``beam=1`` is greedy): ``(token
        ids without the end token, per utterance its attention weights (T_out, T'))``. Scores are
        summed log-probabilities; a finished hypothesis keeps its score. The best of the final beam
        is the one with the highest ``score / ((5 + length) / 6) ** length_penalty`` (Wu et al.,
        2016; 0 compares summed scores, which favours stopping early). ``encoded`` reuses
        :meth:`encode`'s result (to write two outputs from one encoding)."""
        toks, maps, scores = self._search(feats, lengths, start_id, beam, max_len, encoded, length_penalty)
        best = scores.argmax(-1)
        out_ids, out_maps = [], []
        for b in range(toks.shape[0]):
            seq = self._strip(toks[b, best[b]].tolist())
            out_ids.append(seq)
            out_maps.append(maps[b, best[b], :len(seq)].cpu().clone())
        return out_ids, out_maps

    @torch.no_grad()
    def nbest(self, feats: Tensor, lengths: Tensor, start_id: int, beam: int = 4, max_len: int = 100,
              encoded: Optional[tuple[Tensor, Tensor, Tensor]] = None, length_penalty: float = 0.0
              ) -> list[list[tuple[list[int], float, Tensor]]]:
        """The whole final beam of :meth:`beam_search`, per utterance ``[(token ids, score, attention
        weights (T_out, T')), ...]``, best first (scores length-normalized as there; at most ``beam``
        hypotheses; the first is :meth:`beam_search`'s)."""
        toks, maps, scores = self._search(feats, lengths, start_id, beam, max_len, encoded, length_penalty)
        out = []
        for b in range(toks.shape[0]):
            hyps = []
            for k in scores[b].argsort(descending=True, stable=True).tolist():
                if scores[b, k] > float("-inf"):
                    seq = self._strip(toks[b, k].tolist())
                    hyps.append((seq, float(scores[b, k]), maps[b, k, :len(seq)].cpu().clone()))
            out.append(hyps)
        return out

    def _strip(self, seq: list[int]) -> list[int]:
        return seq[:seq.index(self.eos_id)] if self.eos_id in seq else seq

    def _search(self, feats: Tensor, lengths: Tensor, start_id: int, beam: int, max_len: int,
                encoded: Optional[tuple[Tensor, Tensor, Tensor]], length_penalty: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Beam search: ``(tokens (B, K, L), attention weights (B, K, L, T'), length-normalized scores (B, K))``."""
        check_positive("beam", beam, integer=True)
        check_positive("max_len", max_len, integer=True)
        if not length_penalty >= 0:
            raise ValueError(f"length_penalty must be >= 0; got {length_penalty!r}")
        was = self.training
        self.eval()
        try:
            h, pk, pad = self.encode(feats, lengths) if encoded is None else encoded
            B, K, T = h.shape[0], beam, h.shape[1]

            def tile(x: Tensor) -> Tensor:
                return x.unsqueeze(1).expand(B, K, *x.shape[1:]).reshape(B * K, *x.shape[1:])

            h, pk, pad = tile(h), tile(pk), tile(pad)
            state, ctx, w = self.init_state(h)
            dev = h.device
            scores = torch.full((B, K), float("-inf"), device=dev)
            scores[:, 0] = 0.0  # one live hypothesis to start
            y = torch.full((B * K,), int(start_id), dtype=torch.long, device=dev)
            done = torch.zeros(B, K, dtype=torch.bool, device=dev)
            toks = torch.zeros(B, K, 0, dtype=torch.long, device=dev)
            maps = torch.zeros(B, K, 0, T, device=dev)
            for _ in range(max_len):
                logits, state, ctx, w = self.step(y, state, ctx, w, h, pk, pad)
                logp = torch.log_softmax(logits.float(), -1).view(B, K, -1)
                V = logp.shape[-1]
                fin = torch.full_like(logp, float("-inf"))
                fin[..., self.eos_id] = 0.0  # a finished hypothesis extends only by eos, at no cost
                logp = torch.where(done.unsqueeze(-1), fin, logp)
                scores, idx = (scores.unsqueeze(-1) + logp).view(B, K * V).topk(K, dim=-1)
                src, tok = idx // V, idx % V
                pick = (torch.arange(B, device=dev).unsqueeze(1) * K + src).view(-1)
                state, ctx, w = (state[0][pick], state[1][pick]), ctx[pick], w[pick]
                toks = torch.cat([toks.gather(1, src.unsqueeze(-1).expand(-1, -1, toks.shape[-1])),
                                  tok.unsqueeze(-1)], -1)
                maps = torch.cat([maps.gather(1, src.view(B, K, 1, 1).expand(-1, -1, maps.shape[2], T)),
                                  w.view(B, K, 1, T)], 2)
                done = done.gather(1, src) | (tok == self.eos_id)
                y = tok.view(-1)
                if bool(done.all()):
                    break
            ended = toks == self.eos_id
            n_out = torch.where(ended.any(-1), ended.float().argmax(-1), toks.new_tensor(toks.shape[-1]))
            return toks, maps, scores / ((5.0 + n_out.float()) / 6.0) ** length_penalty
        finally:
            self.train(was)


__all__ = ["LasOutput", "Listener", "ListenAttendSpell", "conv_lengths"]
