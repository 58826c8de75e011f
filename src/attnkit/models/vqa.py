r"""Visual question answering: the stacked attention network, a relational attention network
(:class:`RelationalAttentionNetwork`: find the object the question names, then relate it to the
others) and a Transformer over image regions and question words.

All three read an image through :class:`GridEncoder` (a small CNN with coordinate channels, to a grid
of ``L`` region vectors ``v_i``) and answer by classifying over a fixed answer set.

**Stacked attention network** (Yang et al. 2016, https://arxiv.org/abs/1511.02274). An LSTM
reads the question into ``u_0``; each of ``K`` hops attends over the regions with the query it
has so far and adds what it found::

    e_ki = w_k^T tanh(W_k u_{k-1} + V_k v_i + b_k)       (additive score, attnkit.nn.AdditiveAttention)
    p_k  = softmax_i(e_k)
    u_k  = u_{k-1} + sum_i p_ki v_i
    p(answer) = softmax(MLP(u_K))

So the second hop can look somewhere the first hop's finding points to ("the object closest to
the red one": hop 1 finds the red object, hop 2 looks near it).

**Transformer** (:class:`VqaTransformer`): one sequence ``[CLS; v_1 … v_L; w_1 … w_T]`` (regions
with learned position embeddings, question words with their own, a type embedding for each
part) through a pre-norm Transformer encoder on :class:`attnkit.nn.MultiheadAttention`; the
answer is read from ``CLS``. Every region attends to every other and to the words, so relations
between objects ("closest", "how many have the same shape") are one layer away.

``forward`` returns :class:`VqaOutput`: the logits and ``maps (B, K, L)``, the attention over the
regions, one map per hop (SAN) or per layer (the Transformer: ``CLS``'s attention over the
regions, averaged over heads, renormalized over the regions).

Example::

    >>> import torch
    >>> m = StackedAttentionNetwork(num_answers=5, vocab_size=20, image_size=32, dim=32, hops=2)
    >>> out = m(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), torch.tensor([[4, 5, 6], [7, 8, 0], [9, 0, 0]]))
    >>> out.logits.shape, out.maps.shape           # 32 px with 4 stride-2 stages: a 2 x 2 grid
    (torch.Size([3, 5]), torch.Size([3, 2, 4]))
    >>> t = VqaTransformer(num_answers=5, vocab_size=20, image_size=32, dim=32, depth=2, num_heads=4)
    >>> t(torch.rand(3, 3, 32, 32), torch.tensor([[4, 5, 6], [7, 8, 0], [9, 0, 0]])).maps.shape
    torch.Size([3, 2, 4])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._checks import check_positive, check_probability, shape_str
from ..functional import attention
from ..nn import AdditiveAttention
from ..nn.rnn import last_state
from .classifier import TransformerEncoder

Tensor = torch.Tensor


@dataclass
class VqaOutput:
    """``logits (B, A)`` over the answers and ``maps (B, K, L)``: the attention over the ``L``
    regions at each hop (or layer); None when the forward was asked for no maps
    (``need_maps=False``, which spares the Transformer computing its attention weights)."""

    logits: Tensor
    maps: Optional[Tensor]


def grid_side(image_size: int, stages: int) -> int:
    """Cells a side after ``stages`` stride-2 convolutions (kernel 3, padding 1).

    >>> grid_side(75, 4), grid_side(64, 4)
    (5, 4)
    """
    side = image_size
    for _ in range(stages):
        side = (side - 1) // 2 + 1
    return side


class GridEncoder(nn.Module):
    """``stages`` conv(3 × 3, stride 2)-BatchNorm-ReLU stages over the image and two coordinate
    channels (x and y in ``[-1, 1]``; CoordConv, Liu et al. 2018), then a linear map of each
    cell's features and its ``(x, y)`` in ``[-1, 1]`` (the Relation Networks paper tags each cell
    with its coordinates the same way) to ``dim``, plus a learned embedding of the cell's position: ``(B, C, S, S) -> (B, L, dim)``, ``L`` =
    :func:`grid_side` ² cells, row-major. ``uint8`` images are scaled to ``[0, 1]``. With 4 stages
    a 75-pixel image gives the 5 × 5 grid of the Relation Networks paper's CNN."""

    def __init__(self, image_size: int, dim: int, channels: int = 3, width: int = 32, stages: int = 4):
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.side = grid_side(image_size, stages)
        layers: list[nn.Module] = []
        c = channels + 2
        for _ in range(stages):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.net = nn.Sequential(*layers)
        self.project = nn.Linear(width + 2, dim)
        self.position = nn.Parameter(torch.randn(self.side * self.side, dim) * 0.02)
        cell = torch.linspace(-1, 1, self.side)
        self.register_buffer("cell_xy", torch.stack([cell.repeat(self.side), cell.repeat_interleave(self.side)], -1),
                             persistent=False)  # (L, 2): x, y of each cell, row-major
        ramp = torch.linspace(-1, 1, image_size)
        self.register_buffer("coords", torch.stack([ramp.expand(image_size, -1), ramp[:, None].expand(-1, image_size)]),
                             persistent=False)

    @property
    def cells(self) -> int:
        return self.side * self.side

    def forward(self, images: Tensor) -> Tensor:
        S, C = self.image_size, self.channels
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (C, S, S):
            got = f"shape {shape_str(images)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be (B, {C}, {S}, {S}); got {got}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.to(self.project.weight.dtype)
        x = torch.cat([x - 0.5, self.coords.to(x.dtype).expand(x.shape[0], -1, -1, -1)], 1)
        f = self.net(x).flatten(2).transpose(1, 2)           # (B, L, width)
        xy = self.cell_xy.to(f.dtype).expand(f.shape[0], -1, -1)
        return self.project(torch.cat([f, xy], -1)) + self.position  # (B, L, dim)


def _regions(encoder: GridEncoder, images: Tensor, questions: Tensor, image_index: Optional[Tensor]) -> Tensor:
    """The regions ``(B, L, D)`` of each question's image: ``images`` are encoded once, then
    ``image_index (B,)`` (the image row of each question) picks them; without it, image ``b``
    goes with question ``b``."""
    v = encoder(images)
    if image_index is None:
        _check_questions(questions, images.shape[0])
        return v
    _check_questions(questions, questions.shape[0] if isinstance(questions, Tensor) else -1)
    if (not isinstance(image_index, Tensor) or image_index.dim() != 1 or image_index.is_floating_point()
            or image_index.dtype == torch.bool or image_index.shape[0] != questions.shape[0]):
        got = (f"shape {shape_str(image_index)} dtype {image_index.dtype}" if isinstance(image_index, Tensor)
               else type(image_index).__name__)
        raise ValueError(f"image_index must be a ({questions.shape[0]},) integer tensor, the image row of each "
                         f"question; got {got}")
    if not torch.compiler.is_compiling() and image_index.numel() and (
            int(image_index.min()) < 0 or int(image_index.max()) >= images.shape[0]):
        raise ValueError(f"image_index must be in [0, {images.shape[0]}) (rows of images); got values in "
                         f"[{int(image_index.min())}, {int(image_index.max())}]")
    return v[image_index]


def _check_questions(questions: Tensor, batch: int) -> None:
    if not isinstance(questions, Tensor) or questions.dim() != 2 or questions.dtype not in (torch.long, torch.int32):
        got = f"shape {shape_str(questions)} dtype {questions.dtype}" if isinstance(questions, Tensor) else \
            type(questions).__name__
        raise ValueError(f"questions must be token ids, a (B, T) integer tensor; got {got}")
    if questions.shape[0] != batch:
        raise ValueError(f"images and questions must have the same batch size; got {batch} images and "
                         f"{questions.shape[0]} questions")


class StackedAttentionNetwork(nn.Module):
    """The stacked attention network (see the module docstring for the equations).

    Args:
        num_answers: ``A``, the answer classes.
        vocab_size: question words, ``pad_id`` included.
        image_size, channels: the square images it reads.
        dim: ``D``, region vectors, question vector and LSTM width; ``att_dim``: each hop's
            scoring MLP; ``emb_dim``: word embeddings.
        hops: ``K`` attention hops (the paper's best is 2).
        stages, width: the :class:`GridEncoder`.
        dropout: before the answer MLP.
        pad_id: the padding id of ``questions`` (right padding).

    Forward: ``images (N, C, S, S)`` (uint8 or float in ``[0, 1]``), ``questions (B, T)`` ids,
    ``image_index (B,)`` the image row of each question (default: ``N = B``, one image per
    question; with it, an image asked several questions is encoded once) → :class:`VqaOutput`
    with ``maps (B, hops, L)``.
    """

    def __init__(self, num_answers: int, vocab_size: int, *, image_size: int, channels: int = 3, dim: int = 128,
                 att_dim: int = 64, emb_dim: int = 64, hops: int = 2, stages: int = 4, width: int = 32,
                 dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        for name, value in (("num_answers", num_answers), ("vocab_size", vocab_size), ("image_size", image_size),
                            ("dim", dim), ("att_dim", att_dim), ("emb_dim", emb_dim), ("hops", hops),
                            ("stages", stages), ("width", width)):
            check_positive(name, value, integer=True)
        check_probability("dropout", dropout)
        self.config = dict(num_answers=num_answers, vocab_size=vocab_size, image_size=image_size, channels=channels,
                           dim=dim, att_dim=att_dim, emb_dim=emb_dim, hops=hops, stages=stages, width=width,
                           dropout=dropout, pad_id=pad_id)
        self.pad_id = pad_id
        self.encoder = GridEncoder(image_size, dim, channels, width, stages)
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(emb_dim, dim, batch_first=True)
        self.hops = nn.ModuleList(AdditiveAttention(query_dim=dim, key_dim=dim, hidden_dim=att_dim)
                                  for _ in range(hops))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_answers))

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.side, self.encoder.side

    def question_vector(self, questions: Tensor) -> Tensor:
        """``u_0 (B, D)``: the LSTM's last state over each question's real words."""
        lengths = (questions != self.pad_id).sum(1).clamp(min=1)
        return last_state(self.lstm, self.embed(questions), lengths)

    def forward(self, images: Tensor, questions: Tensor, image_index: Optional[Tensor] = None, *,
                need_maps: bool = True) -> VqaOutput:
        v = _regions(self.encoder, images, questions, image_index)  # (B, L, D)
        u = self.question_vector(questions)      # (B, D)
        maps = []
        for attend in self.hops:
            found, p = attend(u, v, v)           # (B, D), (B, L)
            u = u + found
            maps.append(p)
        return VqaOutput(self.head(u), torch.stack(maps, 1) if need_maps else None)


class RelationalAttentionNetwork(nn.Module):
    r"""Two attention hops and a relation term, for questions about one object's relations to
    the others ("the shape of the object closest to the red one", "how many objects have the
    same shape as the red one")::

        u_0 = LSTM(words) + W_b mean(word embeddings)                  (question)
        p_1 = softmax_i((W_q u_0) · (W_k v_i) / sqrt(d))                (hop 1: find the subject)
        s_1 = sum_i p_1i v_i,   a = sum_i p_1i c_i,   u_1 = u_0 + s_1   (c_i: region i's (x, y))
        g_i = [c_i - a ; |c_i - a|²]                                    (where region i is from the subject)
        p_2 = softmax_i(w^T tanh(W u_1 + V [v_i; g_i] + b)),  s_2 = sum_i p_2i v_i   (hop 2)
        r   = (1/L) sum_i f([u_1; s_1; v_i; g_i])                       (relation term)
        p(answer) = softmax(MLP([u_0; s_1; s_2; r]))

    Hop 1 scores by a scaled dot product, so a colour word in the question matches the colour
    features of a region by one product; the bag-of-words term gives the question's words a
    direct path to ``u_0`` (through the LSTM alone a stacked attention network takes several times
    longer to learn to find an object by its colour). Hop 2 is the stacked attention network's
    additive hop with the subject in its query and each region's offset and squared distance from
    the subject in its keys ("closest" and "furthest" are then one score away). ``r`` is the
    Relation Network's pairwise function ``f`` (Santoro et al. 2017,
    https://arxiv.org/abs/1706.01427) summed over the pairs (subject, region) instead of all
    region pairs: ``L`` pairs instead of ``L²``, enough for "how many". (That is the design; a
    trained network need not follow it: on Sort-of-CLEVR hop 1 often stays near uniform and hop 2
    lands on the named object. Look with ``attnkit viz``.)

    Args: as :class:`StackedAttentionNetwork` (``att_dim``: the width of hop 1's products and of
    hop 2's scoring MLP). Forward → :class:`VqaOutput` with ``maps (B, 2, L)``: ``p_1`` and ``p_2``.

    Example::

        >>> m = RelationalAttentionNetwork(num_answers=5, vocab_size=20, image_size=32, dim=32)
        >>> out = m(torch.rand(3, 3, 32, 32), torch.tensor([[4, 5, 6], [7, 8, 0], [9, 0, 0]]))
        >>> out.logits.shape, out.maps.shape, bool(torch.allclose(out.maps.sum(-1), torch.ones(3, 2)))
        (torch.Size([3, 5]), torch.Size([3, 2, 4]), True)
    """

    def __init__(self, num_answers: int, vocab_size: int, *, image_size: int, channels: int = 3, dim: int = 128,
                 att_dim: int = 64, emb_dim: int = 64, stages: int = 4, width: int = 32, dropout: float = 0.0,
                 pad_id: int = 0):
        super().__init__()
        for name, value in (("num_answers", num_answers), ("vocab_size", vocab_size), ("image_size", image_size),
                            ("dim", dim), ("att_dim", att_dim), ("emb_dim", emb_dim), ("stages", stages),
                            ("width", width)):
            check_positive(name, value, integer=True)
        check_probability("dropout", dropout)
        self.config = dict(num_answers=num_answers, vocab_size=vocab_size, image_size=image_size, channels=channels,
                           dim=dim, att_dim=att_dim, emb_dim=emb_dim, stages=stages, width=width, dropout=dropout,
                           pad_id=pad_id)
        self.pad_id = pad_id
        self.encoder = GridEncoder(image_size, dim, channels, width, stages)
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(emb_dim, dim, batch_first=True)
        self.bag = nn.Linear(emb_dim, dim)
        self.find_q, self.find_k = nn.Linear(dim, att_dim), nn.Linear(dim, att_dim)
        self.relate = AdditiveAttention(query_dim=dim, key_dim=dim + 3, hidden_dim=att_dim)
        self.f = nn.Sequential(nn.Linear(3 * dim + 3, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * dim, dim), nn.ReLU(),
                                  nn.Linear(dim, num_answers))

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.side, self.encoder.side

    def question_vector(self, questions: Tensor) -> Tensor:
        """``u_0 (B, D)``: the LSTM's last state plus a map of the mean word embedding."""
        real = questions != self.pad_id
        e = self.embed(questions)
        lengths = real.sum(1).clamp(min=1)
        mean = (e * real.unsqueeze(-1)).sum(1) / lengths.unsqueeze(-1).to(e.dtype)
        return last_state(self.lstm, e, lengths) + self.bag(mean)

    def forward(self, images: Tensor, questions: Tensor, image_index: Optional[Tensor] = None, *,
                need_maps: bool = True) -> VqaOutput:
        v = _regions(self.encoder, images, questions, image_index)      # (B, L, D)
        B, L, D = v.shape
        u0 = self.question_vector(questions)                            # (B, D)
        q = self.find_q(u0)[:, None, None]                              # (B, 1, 1, d)
        s1, p1 = attention(q, self.find_k(v)[:, None], v[:, None], return_weights=True)
        s1, p1 = s1[:, 0, 0], p1[:, 0, 0]                               # (B, D), (B, L)
        u1 = u0 + s1
        xy = self.encoder.cell_xy.to(v.dtype)                           # (L, 2)
        offset = xy - (p1 @ xy)[:, None]                                # (B, L, 2): c_i - a
        g = torch.cat([offset, offset.square().sum(-1, keepdim=True)], -1)
        s2, p2 = self.relate(u1, torch.cat([v, g], -1), v)
        pairs = torch.cat([u1[:, None].expand(B, L, D), s1[:, None].expand(B, L, D), v, g], -1)
        r = self.f(pairs).mean(1)
        logits = self.head(torch.cat([u0, s1, s2, r], -1))
        return VqaOutput(logits, torch.stack([p1, p2], 1) if need_maps else None)


class VqaTransformer(nn.Module):
    """A Transformer encoder over ``[CLS; regions; question words]`` (see the module docstring).

    Args:
        num_answers, vocab_size, image_size, channels, stages, width, pad_id: as
            :class:`StackedAttentionNetwork`.
        dim, depth, num_heads, ffn_dim: the encoder (:class:`attnkit.models.classifier.TransformerEncoder`).
        max_words: the longest question accepted.
        dropout: in the encoder and before the answer layer.

    Forward: ``images (N, C, S, S)``, ``questions (B, T)``, ``image_index (B,)`` as
    :class:`StackedAttentionNetwork` → :class:`VqaOutput` with
    ``maps (B, depth, L)`` (``CLS``'s attention over the regions at each layer; padded words get
    weight 0 in every attention).
    """

    def __init__(self, num_answers: int, vocab_size: int, *, image_size: int, channels: int = 3, dim: int = 64,
                 depth: int = 4, num_heads: int = 4, ffn_dim: int | None = None, stages: int = 4, width: int = 32,
                 max_words: int = 32, dropout: float = 0.0, pad_id: int = 0):
        super().__init__()
        for name, value in (("num_answers", num_answers), ("vocab_size", vocab_size), ("image_size", image_size),
                            ("dim", dim), ("depth", depth), ("num_heads", num_heads), ("stages", stages),
                            ("width", width), ("max_words", max_words)):
            check_positive(name, value, integer=True)
        check_probability("dropout", dropout)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads; got dim = {dim} and num_heads = {num_heads}")
        self.config = dict(num_answers=num_answers, vocab_size=vocab_size, image_size=image_size, channels=channels,
                           dim=dim, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim, stages=stages, width=width,
                           max_words=max_words, dropout=dropout, pad_id=pad_id)
        self.pad_id, self.max_words = pad_id, max_words
        self.encoder = GridEncoder(image_size, dim, channels, width, stages)
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.word_position = nn.Parameter(torch.randn(max_words, dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.types = nn.Parameter(torch.randn(3, dim) * 0.02)  # CLS, region, word
        self.transformer = TransformerEncoder(dim, depth, num_heads, ffn_dim, dropout)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_answers))

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.side, self.encoder.side

    def forward(self, images: Tensor, questions: Tensor, image_index: Optional[Tensor] = None, *,
                need_maps: bool = True) -> VqaOutput:
        regions = _regions(self.encoder, images, questions, image_index) + self.types[1]  # (B, L, D)
        B, T = questions.shape
        if T > self.max_words:
            raise ValueError(f"questions have {T} words but the model was built with max_words = {self.max_words}")
        words = self.embed(questions) + self.word_position[:T] + self.types[2]           # (B, T, D)
        x = torch.cat([(self.cls + self.types[0]).expand(B, -1, -1), regions, words], 1)  # (B, 1 + L + T, D)
        L = regions.shape[1]
        pad = torch.cat([questions.new_zeros(B, 1 + L, dtype=torch.bool), questions == self.pad_id], 1)
        h, weights = self.transformer(x, pad, need_weights=need_maps)
        if not need_maps:
            return VqaOutput(self.head(h[:, 0]), None)
        maps = torch.stack([w[:, :, 0, 1:1 + L].mean(1) for w in weights], 1)             # (B, depth, L)
        maps = maps / maps.sum(-1, keepdim=True).clamp(min=1e-12)
        return VqaOutput(self.head(h[:, 0]), maps)


MODELS = {"san": StackedAttentionNetwork, "relational": RelationalAttentionNetwork, "transformer": VqaTransformer}

__all__ = ["GridEncoder", "RelationalAttentionNetwork", "StackedAttentionNetwork", "VqaOutput", "VqaTransformer", "grid_side", "MODELS"]
