r"""RNN encoder-decoder with attention: Bahdanau et al. 2015 (https://arxiv.org/abs/1409.0473)
or Luong et al. 2015 (https://arxiv.org/abs/1508.04025) with input feeding.

Encoder: embeddings → bidirectional GRU/LSTM (``hidden_dim // 2`` units per direction,
concatenated to ``hidden_dim`` as in OpenNMT; padding never reaches a real position), giving the
memory ``m (B, S, hidden_dim)`` and the decoder's initial state (the final forward and backward
states, concatenated).

Decoder step ``t`` (``y_{t-1}`` the previous target token, ``e = E y_{t-1}``):

* ``bahdanau``: ``c_t, a_t = AdditiveAttention(h_{t-1}, m)``; ``h_t = RNN([e; c_t], h_{t-1})``;
  ``h̃_t = tanh(W_c [c_t; h_t])``.
* ``luong-dot|general|concat``: ``h_t = RNN([e; h̃_{t-1}], h_{t-1})`` with input feeding (``RNN(e, …)``
  without); ``h̃_t, a_t = LuongAttention(h_t, m)`` with ``h̃_t = tanh(W_c [c_t; h_t])``.

and ``logits_t = W_o h̃_t``. The attention is :class:`attnkit.nn.AdditiveAttention` or
:class:`attnkit.nn.LuongAttention`; padded source positions are masked (``key_padding_mask``) and
get exactly zero weight. Luong attention without input feeding runs the decoder RNN and the
attention over all target positions at once during teacher forcing (same result as the step loop).

Example::

    >>> import torch
    >>> from attnkit.models import get
    >>> m = Seq2Seq(src_vocab=12, tgt_vocab=9, emb_dim=8, hidden_dim=16, attention="luong-general")
    >>> src, lengths = torch.randint(4, 12, (2, 5)), torch.tensor([5, 3])
    >>> logits, w = m(src, lengths, torch.randint(4, 9, (2, 4)), need_weights=True)
    >>> logits.shape, w.shape, bool((w[1, :, 3:] == 0).all())  # example 1's padding gets no attention
    (torch.Size([2, 4, 9]), torch.Size([2, 4, 5]), True)
    >>> get("Seq2Seq")(**m.config).config == m.config  # the JSON-able config rebuilds the architecture
    True
    >>> tokens, attn = m.greedy(src, lengths, max_len=6)
    >>> len(tokens), attn[1].shape[1]
    (2, 3)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as ak_nn
from .._checks import check_positive, check_probability, check_tensor, lookup, shape_str

Tensor = torch.Tensor

RNNS = ("gru", "lstm")
ATTENTIONS = ("bahdanau", "luong-dot", "luong-general", "luong-concat")


class Seq2Seq(nn.Module):
    """Attention encoder-decoder (see the module docstring for the equations).

    Args:
        src_vocab: source vocabulary size.
        tgt_vocab: target vocabulary size.
        emb_dim: embedding size (source and target).
        hidden_dim: decoder state size = encoder memory size (even: ``hidden_dim // 2`` per direction).
        rnn: ``"gru"`` or ``"lstm"``.
        attention: ``"bahdanau"``, ``"luong-dot"``, ``"luong-general"`` or ``"luong-concat"``.
        input_feeding: feed ``h̃_{t-1}`` into the decoder input (Luong §3.3); Bahdanau's decoder
            always reads its context ``c_t`` and ignores this flag.
        num_layers: RNN layers in the encoder and the decoder.
        dropout: dropout on embeddings, between RNN layers and before the output layer.
        pad_id, bos_id, eos_id: special token ids (those of :class:`attnkit.tasks.vocab.Vocab` by default).

    ``self.config`` holds these arguments (JSON-able): ``Seq2Seq(**model.config)`` rebuilds the model.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, emb_dim: int = 64, hidden_dim: int = 128, rnn: str = "gru",
                 attention: str = "bahdanau", input_feeding: bool = True, num_layers: int = 1,
                 dropout: float = 0.0, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        for n, v in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("emb_dim", emb_dim),
                     ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            check_positive(n, v, integer=True)
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (hidden_dim // 2 units per encoder direction); got {hidden_dim}")
        lookup("rnn", rnn, {r: r for r in RNNS})
        lookup("attention", attention, {a: a for a in ATTENTIONS})
        if not isinstance(input_feeding, bool):
            raise TypeError(f"input_feeding must be a bool; got {type(input_feeding).__name__}")
        check_probability("dropout", dropout)
        for n, v in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            check_positive(n, v, integer=True, allow_zero=True)
            if v >= tgt_vocab:
                raise ValueError(f"{n} must be < tgt_vocab = {tgt_vocab}; got {v}")
        self.config: dict[str, Any] = dict(
            src_vocab=src_vocab, tgt_vocab=tgt_vocab, emb_dim=emb_dim, hidden_dim=hidden_dim, rnn=rnn,
            attention=attention, input_feeding=input_feeding, num_layers=num_layers, dropout=float(dropout),
            pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.hidden_dim, self.num_layers, self.rnn_kind = hidden_dim, num_layers, rnn
        self.bahdanau = attention == "bahdanau"
        self.input_feeding = input_feeding and not self.bahdanau
        rnn_cls = nn.GRU if rnn == "gru" else nn.LSTM
        inner = dropout if num_layers > 1 else 0.0  # between decoder layers

        self.src_embed = nn.Embedding(src_vocab, emb_dim, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab, emb_dim, padding_idx=pad_id)
        enc_in = [emb_dim] + [hidden_dim] * (num_layers - 1)
        self.enc_fwd = nn.ModuleList(rnn_cls(d, hidden_dim // 2, batch_first=True) for d in enc_in)
        self.enc_bwd = nn.ModuleList(rnn_cls(d, hidden_dim // 2, batch_first=True) for d in enc_in)
        dec_in = emb_dim + (hidden_dim if (self.bahdanau or self.input_feeding) else 0)
        self.decoder = rnn_cls(dec_in, hidden_dim, num_layers=num_layers, batch_first=True, dropout=inner)
        if self.bahdanau:
            self.attention = ak_nn.AdditiveAttention(hidden_dim, hidden_dim, hidden_dim, value_dim=hidden_dim)
            self.combine = nn.Linear(2 * hidden_dim, hidden_dim, bias=False)  # h~ = tanh(W_c [c; h])
        else:
            self.attention = ak_nn.LuongAttention(hidden_dim, hidden_dim, score=attention.split("-")[1])
            self.combine = None  # LuongAttention returns h~ itself
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, tgt_vocab)

    # -- encoder --------------------------------------------------------------------------
    def _check_src(self, src: Tensor, src_lengths: Tensor) -> None:
        check_tensor("src", src, 2, "(B, S) of token ids")
        check_tensor("src_lengths", src_lengths, 1, "(B,)")
        if src.dtype != torch.long or src_lengths.dtype != torch.long:
            raise TypeError(f"src and src_lengths must be torch.long; got {src.dtype} and {src_lengths.dtype}")
        if src_lengths.shape[0] != src.shape[0]:
            raise ValueError(f"src_lengths must have shape ({src.shape[0]},) for src {shape_str(src)}; "
                             f"got {shape_str(src_lengths)}")
        if torch.compiler.is_compiling():  # reading the lengths' values would break a compiled graph
            return
        if src.shape[0] and (int(src_lengths.min()) < 1 or int(src_lengths.max()) > src.shape[1]):
            raise ValueError(f"src_lengths must be in [1, {src.shape[1]}] (the padded length of src); "
                             f"got {src_lengths.tolist()}")

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor, Any]:
        """``memory (B, S, hidden)`` (zero at padding), ``key_padding_mask (B, S)`` (True = padding)
        and the decoder's initial state: per layer, the forward state after the last token and
        the backward state after the first, concatenated (``h (L, B, hidden)``; an LSTM's cell
        state starts at zero: ``(h, zeros)``).

        Each direction runs as a plain (unpacked) RNN: the backward one over every sequence
        reversed within its length, so padding never reaches a real position's state. (Packed
        sequences give the same result but their CPU backward pass is several times slower.)
        """
        self._check_src(src, src_lengths)
        B, S = src.shape
        lengths = src_lengths.to(src.device)
        t = torch.arange(S, device=src.device)[None, :]
        pad = t >= lengths[:, None]
        rev = torch.where(pad, t, lengths[:, None] - 1 - t)  # reverse the first L_b positions of row b
        last = (lengths - 1).clamp(min=0)
        x = self.drop(self.src_embed(src))
        finals = []
        for i, (fwd, bwd) in enumerate(zip(self.enc_fwd, self.enc_bwd)):
            if i:
                x = self.drop(x)
            f, _ = fwd(x)
            b, _ = bwd(x.gather(1, rev[:, :, None].expand_as(x)))
            b = b.gather(1, rev[:, :, None].expand_as(b))
            x = torch.cat([f, b], -1)
            finals.append(torch.cat([f[torch.arange(B, device=src.device), last], b[:, 0]], -1))
        memory = x.masked_fill(pad[:, :, None], 0.0)
        h = torch.stack(finals, 0)  # (L, B, hidden)
        return memory, pad, ((h, torch.zeros_like(h)) if self.rnn_kind == "lstm" else h)

    # -- decoder --------------------------------------------------------------------------
    def _top(self, state: Any) -> Tensor:
        h = state[0] if isinstance(state, tuple) else state
        return h[-1]

    def _keys(self, memory: Tensor) -> Tensor | None:
        """Bahdanau's key projection ``W_k m + b``, computed once for all decoder steps."""
        return self.attention.project_keys(memory) if self.bahdanau else None

    def _step(self, y: Tensor, state: Any, feed: Tensor, memory: Tensor, pad: Tensor,
              need_weights: bool, keys: Tensor | None = None) -> tuple[Tensor, Any, Tensor, Tensor | None]:
        """One decoder step: token ids ``y (B,)`` → ``logits (B, V)``, new state, ``h̃_t (B, hidden)``
        and the attention weights ``(B, S)``. ``keys``: :meth:`_keys` of ``memory`` (Bahdanau)."""
        e = self.drop(self.tgt_embed(y))
        if self.bahdanau:
            ctx, w = self.attention(self._top(state), memory, memory, key_padding_mask=pad, need_weights=need_weights,
                                    projected_key=keys)
            out, state = self.decoder(torch.cat([e, ctx], -1).unsqueeze(1), state)
            h_tilde = torch.tanh(self.combine(torch.cat([ctx, out[:, 0]], -1)))
        else:
            x = torch.cat([e, feed], -1) if self.input_feeding else e
            out, state = self.decoder(x.unsqueeze(1), state)
            h_tilde, w = self.attention(out[:, 0], memory, memory, key_padding_mask=pad, need_weights=need_weights)
        return self.out(self.drop(h_tilde)), state, h_tilde, w

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing.

        Args:
            src: source ids ``(B, S)``, right-padded with ``pad_id``.
            src_lengths: ``(B,)`` true lengths.
            tgt_in: decoder inputs ``(B, T)`` (``<s> y_1 … y_{T-1}``).
            need_weights: also return the attention weights ``(B, T, S)``.

        Returns:
            ``logits (B, T, tgt_vocab)`` (and the weights).
        """
        check_tensor("tgt_in", tgt_in, 2, "(B, T) of token ids")
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"tgt_in must have batch {src.shape[0]} like src; got shape {shape_str(tgt_in)}")
        memory, pad, state = self.encode(src, src_lengths)
        if not self.bahdanau and not self.input_feeding:  # every step at once
            out, _ = self.decoder(self.drop(self.tgt_embed(tgt_in)), state)
            h_tilde, w = self.attention(out, memory, memory, key_padding_mask=pad, need_weights=need_weights)
            logits = self.out(self.drop(h_tilde))
            return (logits, w) if need_weights else logits
        feed = memory.new_zeros(src.shape[0], self.hidden_dim)
        logits, weights = [], []
        keys = self._keys(memory)
        for t in range(tgt_in.shape[1]):
            lg, state, feed, w = self._step(tgt_in[:, t], state, feed, memory, pad, need_weights, keys)
            logits.append(lg)
            weights.append(w)
        logits_t = torch.stack(logits, 1)
        return (logits_t, torch.stack(weights, 1)) if need_weights else logits_t

    # -- decoding -------------------------------------------------------------------------
    def _log_probs(self, logits: Tensor) -> Tensor:
        """Output log-probabilities for decoding: ``<pad>`` and ``<s>`` are never generated."""
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[[self.pad_id, self.bos_id]] = True
        return F.log_softmax(logits.masked_fill(banned, -math.inf), -1)

    @staticmethod
    def _best(logp: Tensor) -> tuple[Tensor, Tensor]:
        """Best entry of each row (``max``; ties go to the lowest id). Shared by greedy and beam
        search so that a beam of 1 reproduces greedy decoding exactly."""
        return logp.max(dim=-1)

    @torch.no_grad()
    def greedy(self, src: Tensor, src_lengths: Tensor, max_len: int) -> tuple[list[list[int]], list[Tensor]]:
        """Greedy decoding.

        Returns:
            ``tokens``: for each example, its output ids without ``<s>``/``</s>`` (at most ``max_len``);
            ``weights``: for each example, ``(T_i, S_i)`` attention weights of its output steps
            (``T_i`` = its tokens plus the ``</s>`` step when one was produced; ``S_i`` its source length).
        """
        check_positive("max_len", max_len, integer=True)
        memory, pad, state = self.encode(src, src_lengths)
        B = src.shape[0]
        y = torch.full((B,), self.bos_id, dtype=torch.long, device=src.device)
        feed = memory.new_zeros(B, self.hidden_dim)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        steps_ids, steps_w = [], []
        keys = self._keys(memory)
        for _ in range(max_len):
            logits, state, feed, w = self._step(y, state, feed, memory, pad, True, keys)
            _, y = self._best(self._log_probs(logits))
            steps_ids.append(y)
            steps_w.append(w)
            done = done | (y == self.eos_id)
            if bool(done.all()):
                break
        ids = torch.stack(steps_ids, 1).tolist()
        ws = torch.stack(steps_w, 1)  # (B, T, S)
        tokens, weights = [], []
        for b in range(B):
            seq = ids[b]
            n = seq.index(self.eos_id) if self.eos_id in seq else len(seq)
            tokens.append(seq[:n])
            weights.append(ws[b, : min(n + 1, len(seq)), : int(src_lengths[b])].clone())
        return tokens, weights

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_lengths: Tensor, beam: int = 5, max_len: int = 50,
                    length_penalty: float = 0.0) -> tuple[list[list[int]], list[Tensor]]:
        """Batched beam search; returns what :meth:`greedy` returns (``beam=1`` gives exactly greedy's output).

        Hypotheses are ranked at the end by ``log p / lp`` with the GNMT length penalty
        ``lp = ((5 + |y|) / 6) ** length_penalty`` (``|y|`` counts ``</s>``); 0 disables it.
        A finished hypothesis keeps its score and stays in the beam.
        """
        check_positive("beam", beam, integer=True)
        check_positive("max_len", max_len, integer=True)
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or length_penalty < 0:
            raise ValueError(f"length_penalty must be a number >= 0; got {length_penalty!r}")
        memory, pad, state = self.encode(src, src_lengths)
        B, K, dev = src.shape[0], beam, src.device
        rep = lambda x, dim=0: x.repeat_interleave(K, dim=dim)  # noqa: E731
        memory, pad = rep(memory), rep(pad)
        state = tuple(rep(s, 1) for s in state) if isinstance(state, tuple) else rep(state, 1)
        feed = memory.new_zeros(B * K, self.hidden_dim)
        y = torch.full((B * K,), self.bos_id, dtype=torch.long, device=dev)
        scores = torch.full((B, K), -math.inf, device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one alive
        done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, K, dtype=torch.long, device=dev)
        hist = torch.zeros(B, K, 0, dtype=torch.long, device=dev)
        attn = memory.new_zeros(B, K, 0, memory.shape[1])
        base = (torch.arange(B, device=dev) * K)[:, None]
        keys = self._keys(memory)
        for _ in range(max_len):
            logits, state, feed, w = self._step(y, state, feed, memory, pad, True, keys)
            logp = self._log_probs(logits).view(B, K, -1)
            V = logp.shape[-1]
            # a finished hypothesis can only be extended by <pad>, at no cost
            frozen = torch.full_like(logp[0, 0], -math.inf)
            frozen[self.pad_id] = 0.0
            logp = torch.where(done[..., None], frozen, logp)
            if K == 1:
                best, tok = self._best(logp[:, 0])
                cand, src_beam, tok = (scores[:, 0] + best)[:, None], torch.zeros_like(tok)[:, None], tok[:, None]
            else:
                cand, idx = (scores[..., None] + logp).view(B, K * V).topk(K, dim=-1)
                src_beam, tok = idx // V, idx % V
            flat = (base + src_beam).view(-1)
            state = tuple(s[:, flat] for s in state) if isinstance(state, tuple) else state[:, flat]
            feed = feed[flat]
            prev_done = done.gather(1, src_beam)
            scores = cand
            lengths = lengths.gather(1, src_beam) + (~prev_done).long()
            done = prev_done | (tok == self.eos_id)
            hist = torch.cat([hist.gather(1, src_beam[..., None].expand(-1, -1, hist.shape[2])), tok[..., None]], 2)
            attn = attn.view(B * K, -1, memory.shape[1])[flat].view(B, K, -1, memory.shape[1])
            attn = torch.cat([attn, w.view(B * K, 1, -1)[flat].view(B, K, 1, -1)], 2)
            y = tok.reshape(-1)
            if bool(done.all()):
                break
        final = scores / (((5.0 + lengths.float()) / 6.0) ** length_penalty) if length_penalty else scores
        pick = final.argmax(-1)  # ties -> the higher-scoring (earlier) beam
        tokens, weights = [], []
        for b in range(B):
            k = int(pick[b])
            seq = hist[b, k].tolist()
            n = seq.index(self.eos_id) if self.eos_id in seq else len(seq)
            tokens.append(seq[:n])
            weights.append(attn[b, k, : min(n + 1, len(seq)), : int(src_lengths[b])].clone())
        return tokens, weights


__all__ = ["ATTENTIONS", "RNNS", "Seq2Seq"]
