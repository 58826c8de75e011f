r"""Show, Attend and Tell (Xu et al. 2015, https://arxiv.org/abs/1502.03044): a CNN turns the
image into a grid of ``L`` annotation vectors ``a_i`` (local features and a learned embedding of
the cell's position; see :class:`Encoder`); an LSTM writes the caption one word at a time,
attending over the grid at every step.

At step ``t``, with the previous state ``h_{t-1}`` and word ``y_{t-1}``::

    e_ti = v^T tanh(W_h h_{t-1} + W_a a_i)          (additive score, attnkit.nn.AdditiveAttention)
    alpha_t = softmax_i(e_ti)
    soft:  z_t = beta_t * sum_i alpha_ti a_i          beta_t = sigmoid(f_beta(h_{t-1}))  (the gating scalar)
    hard:  s_t ~ Categorical(alpha_t),  z_t = beta_t * a_{s_t}                (attnkit.nn.StochasticHardAttention)
    h_t, c_t = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
    p(y_t) = softmax(L_o(E y_{t-1} + L_h h_t + L_z z_t))                     (the deep output layer)

Soft attention trains by backpropagation, with the *doubly stochastic* penalty
``lambda * sum_i (1 - sum_t alpha_ti)^2`` that asks every location to be looked at about once over
the caption (:func:`doubly_stochastic_penalty`). Hard attention's location samples carry no
gradient: its attention trains with REINFORCE (``attnkit.normalizers.reinforce_loss``), the
caption's log-likelihood as the reward, a moving-average baseline and an entropy bonus; the
recipe in :mod:`attnkit.tasks.captioning` puts these together. In eval mode hard attention takes
the most probable location.

Example::

    >>> import torch
    >>> m = ShowAttendTell(vocab_size=12, bos_id=1, eos_id=2, pad_id=0, image_size=32, channels=3)
    >>> images, words = torch.rand(2, 3, 32, 32), torch.randint(3, 12, (2, 5))
    >>> out = m(images, words)
    >>> out.logits.shape, out.alphas.shape        # a 4 x 4 grid of annotations: L = 16
    (torch.Size([2, 5, 12]), torch.Size([2, 5, 16]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._checks import check_positive
from ..nn import AdditiveAttention, StochasticHardAttention

Tensor = torch.Tensor

ATTENTIONS = ("soft", "hard")


@dataclass
class CaptionerOutput:
    """What :meth:`ShowAttendTell.forward` returns: ``logits (B, T, V)``, ``alphas (B, T, L)``
    (the attention distribution at each step), ``betas (B, T)`` (the gate) and, for hard
    attention while training, ``log_probs (B, T)`` of the sampled locations and the
    distributions' ``entropy (B, T)``."""

    logits: Tensor
    alphas: Tensor
    betas: Tensor
    log_probs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None


class Encoder(nn.Module):
    """Three conv-BatchNorm-ReLU-pool stages: ``(B, C, S, S) -> (B, L, D)`` annotations with
    ``L = (S / 8)²`` (row-major cells of ``8 × 8`` pixels). Each cell sees about ``22 × 22`` pixels
    around it (about one object of the generated scenes) and nothing of where it is: its last
    ``pos_dim`` features are a learned embedding of its position, appended after the convolutions.
    So the mean of the annotations is a bag of what is in the image, with no positions: to say
    where an object is (``left of``, ``above``), the decoder has to attend to it."""

    def __init__(self, channels: int, dim: int, cells: int, pos_dim: int = 32):
        super().__init__()
        if not 0 < pos_dim < dim:
            raise ValueError(f"pos_dim must be in (0, feature_dim); got {pos_dim} with feature_dim {dim}")
        conv = dim - pos_dim
        widths = [channels, conv // 3, (2 * conv) // 3, conv]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*layers)
        self.position = nn.Parameter(torch.randn(cells, pos_dim) * 0.5)

    def forward(self, images: Tensor) -> Tensor:
        f = self.net(images).flatten(2).transpose(1, 2)                       # (B, L, D - P)
        return torch.cat([f, self.position.expand(f.shape[0], -1, -1)], -1)  # (B, L, D)


def doubly_stochastic_penalty(alphas: Tensor, mask: Tensor) -> Tensor:
    r"""``mean_b sum_i (1 - sum_t alpha_{b,t,i})^2`` over the real (``mask`` True) steps: Xu et
    al.'s regularizer that every location receive about one unit of attention over the caption.
    ``alphas (B, T, L)``, ``mask (B, T)`` bool."""
    total = (alphas * mask.unsqueeze(-1).to(alphas.dtype)).sum(1)  # (B, L)
    return (1.0 - total).pow(2).sum(-1).mean()


class ShowAttendTell(nn.Module):
    """The captioner (see the module docstring for the equations).

    Args:
        vocab_size: words, including the ``pad_id``, ``bos_id`` and ``eos_id`` specials.
        attention: ``"soft"`` (deterministic) or ``"hard"`` (stochastic, REINFORCE).
        image_size, channels: the images it reads (``image_size`` divisible by 8).
        feature_dim: ``D``, the annotation size; ``emb_dim``, ``hidden_dim``, ``att_dim``: word
            embedding, LSTM and attention MLP sizes; ``dropout`` before the output layer.
        init_from_image: start the LSTM from the mean annotation, as the paper does; off by
            default, where a scene of two objects would fit in that summary and the decoder
            could caption it without attending.
        generator: for hard attention's samples (reproducible training).
    """

    def __init__(self, vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int = 0, attention: str = "soft",
                 image_size: int = 64, channels: int = 3, feature_dim: int = 128, emb_dim: int = 64,
                 hidden_dim: int = 256, att_dim: int = 128, dropout: float = 0.2, init_from_image: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}; got {attention!r}")
        for name, value in (("vocab_size", vocab_size), ("image_size", image_size), ("channels", channels),
                            ("feature_dim", feature_dim), ("emb_dim", emb_dim), ("hidden_dim", hidden_dim),
                            ("att_dim", att_dim)):
            check_positive(name, value, integer=True)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8; got {image_size}")
        self.vocab_size, self.attention_kind, self.init_from_image = vocab_size, attention, bool(init_from_image)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.grid = (image_size // 8, image_size // 8)
        self.encoder = Encoder(channels, feature_dim, self.grid[0] * self.grid[1])
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        if attention == "soft":
            self.attend = AdditiveAttention(hidden_dim, feature_dim, att_dim)
        else:
            self.attend = StochasticHardAttention(hidden_dim, feature_dim, att_dim, score="additive",
                                                  generator=generator)
        self.f_beta = nn.Linear(hidden_dim, 1)
        self.lstm = nn.LSTMCell(emb_dim + feature_dim, hidden_dim)
        self.L_h = nn.Linear(hidden_dim, emb_dim)
        self.L_z = nn.Linear(feature_dim, emb_dim)
        self.L_o = nn.Linear(emb_dim, vocab_size)
        self.drop = nn.Dropout(dropout)
        #: hard attention while training: the share of steps that use the expected context
        #: (alpha-weighted) instead of a sample, Xu et al.'s variance reduction (0.5 in the paper)
        self.expected_share = 0.5

    # -- pieces ----------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Annotations ``(B, L, D)`` and the LSTM's initial state: from their mean with
        ``init_from_image`` (the paper), else the same learned state for every image, so that
        everything the decoder learns about the image comes through attention."""
        a = self.encoder(images)
        mean = a.mean(1) if self.init_from_image else torch.zeros_like(a[:, 0])
        return a, (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def step(self, a: Tensor, y_prev: Tensor, state: tuple[Tensor, Tensor], sample: bool = False,
             expected: bool = False):
        """One decoding step: ``(logits (B, V), state, alpha (B, L), beta (B,), log_prob, entropy)``.
        Hard attention reads the sampled location (``sample``, training), the expected context
        ``sum_i alpha_i a_i`` (``expected``) or, in eval mode, the most probable location;
        ``log_prob`` and ``entropy`` are None unless it samples."""
        h, c = state
        log_prob = entropy = None
        if self.attention_kind == "soft":
            ctx, alpha = self.attend(h, a, a)                       # (B, D), (B, L)
        else:
            ctx, _, s = self.attend(h.unsqueeze(1), a, a)          # one query per image
            alpha, ctx = s.probs.squeeze(1), ctx.squeeze(1)
            if expected:
                ctx = torch.bmm(alpha.unsqueeze(1), a).squeeze(1)
            elif sample:
                log_prob, entropy = s.log_prob.squeeze(1), s.entropy.squeeze(1)
        beta = torch.sigmoid(self.f_beta(h)).squeeze(-1)            # (B,)
        z = beta.unsqueeze(-1) * ctx
        e = self.embed(y_prev)
        h, c = self.lstm(torch.cat([e, z], -1), (h, c))
        logits = self.L_o(self.drop(e + self.L_h(h) + self.L_z(z)))
        return logits, (h, c), alpha, beta, log_prob, entropy

    def forward(self, images: Tensor, words_in: Tensor) -> CaptionerOutput:
        """Teacher forcing: ``images (B, C, S, S)``, ``words_in (B, T)`` (``bos`` then the caption)
        -> :class:`CaptionerOutput`."""
        a, state = self.encode(images)
        sample = self.attention_kind == "hard" and self.training
        out: dict[str, list[Tensor]] = {"logits": [], "alphas": [], "betas": [], "log_probs": [], "entropy": []}
        for t in range(words_in.shape[1]):
            expected = sample and torch.rand((), generator=self.attend.generator).item() < self.expected_share
            logits, state, alpha, beta, lp, ent = self.step(a, words_in[:, t], state, sample=sample, expected=expected)
            if expected:  # no sample: no REINFORCE term
                lp = ent = torch.zeros(images.shape[0], device=images.device)
            for k, v in (("logits", logits), ("alphas", alpha), ("betas", beta), ("log_probs", lp),
                         ("entropy", ent)):
                if v is not None:
                    out[k].append(v)
        stack = {k: (torch.stack(v, 1) if v else None) for k, v in out.items()}
        return CaptionerOutput(**stack)

    # -- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def beam_search(self, images: Tensor, beam: int = 3, max_len: int = 20
                    ) -> tuple[list[list[int]], list[Tensor]]:
        """Best caption per image by beam search (``beam=1`` is greedy decoding): ``(word ids
        without bos/eos, per image its attention maps (T', L))``. Scores are summed
        log-probabilities; a finished hypothesis keeps its score."""
        check_positive("beam", beam, integer=True)
        check_positive("max_len", max_len, integer=True)
        was = self.training
        self.eval()
        try:
            return self._beam(images, beam, max_len)
        finally:
            self.train(was)

    def _beam(self, images: Tensor, K: int, max_len: int):
        B = images.shape[0]
        a, (h, c) = self.encode(images)
        L, D = a.shape[1], a.shape[2]
        a = a.unsqueeze(1).expand(B, K, L, D).reshape(B * K, L, D)
        h = h.unsqueeze(1).expand(B, K, -1).reshape(B * K, -1)
        c = c.unsqueeze(1).expand(B, K, -1).reshape(B * K, -1)
        dev = images.device
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0                                       # one live hypothesis to start
        y = torch.full((B * K,), self.bos_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        words = torch.zeros(B, K, 0, dtype=torch.long, device=dev)
        alphas = torch.zeros(B, K, 0, L, device=dev)
        for _ in range(max_len):
            logits, (h, c), alpha, _, _, _ = self.step(a, y, (h, c))
            logp = torch.log_softmax(logits.float(), -1).view(B, K, -1)
            V = logp.shape[-1]
            # a finished hypothesis extends only by eos, at no cost
            fin = torch.full_like(logp, float("-inf"))
            fin[..., self.eos_id] = 0.0
            logp = torch.where(done.unsqueeze(-1), fin, logp)
            total = (scores.unsqueeze(-1) + logp).view(B, K * V)
            scores, idx = total.topk(K, dim=-1)                   # (B, K)
            src, tok = idx // V, idx % V
            pick = (torch.arange(B, device=dev).unsqueeze(1) * K + src).view(-1)
            h, c = h[pick], c[pick]
            words = torch.cat([words.gather(1, src.unsqueeze(-1).expand(-1, -1, words.shape[-1])), tok.unsqueeze(-1)], -1)
            alphas = torch.cat([alphas.gather(1, src.view(B, K, 1, 1).expand(-1, -1, alphas.shape[2], L)),
                                alpha.view(B, K, 1, L).gather(1, src.view(B, K, 1, 1).expand(-1, -1, 1, L))], 2)
            done = done.gather(1, src) | (tok == self.eos_id)
            y = tok.view(-1)
            if bool(done.all()):
                break
        best = scores.argmax(-1)                                  # (B,)
        out_words, out_alphas = [], []
        for b in range(B):
            seq = words[b, best[b]].tolist()
            n = seq.index(self.eos_id) if self.eos_id in seq else len(seq)
            out_words.append(seq[:n])
            out_alphas.append(alphas[b, best[b], :n].clone())
        return out_words, out_alphas

    @torch.no_grad()
    def greedy(self, images: Tensor, max_len: int = 20) -> tuple[list[list[int]], list[Tensor]]:
        """Greedy decoding, step by step (the reference :meth:`beam_search` with ``beam=1`` must match)."""
        was = self.training
        self.eval()
        try:
            a, state = self.encode(images)
            B = images.shape[0]
            y = torch.full((B,), self.bos_id, dtype=torch.long, device=images.device)
            seqs: list[list[int]] = [[] for _ in range(B)]
            maps: list[list[Tensor]] = [[] for _ in range(B)]
            alive = [True] * B
            for _ in range(max_len):
                logits, state, alpha, _, _, _ = self.step(a, y, state)
                y = logits.argmax(-1)
                for b in range(B):
                    if alive[b]:
                        if int(y[b]) == self.eos_id:
                            alive[b] = False
                        else:
                            seqs[b].append(int(y[b]))
                            maps[b].append(alpha[b])
                if not any(alive):
                    break
            L = self.grid[0] * self.grid[1]
            return seqs, [torch.stack(m) if m else torch.zeros(0, L, device=images.device) for m in maps]
        finally:
            self.train(was)


__all__ = ["ShowAttendTell", "CaptionerOutput", "Encoder", "doubly_stochastic_penalty", "ATTENTIONS"]
