r"""Transformer encoder-decoder for translation (Vaswani et al. 2017, "Attention Is All You Need",
https://arxiv.org/abs/1706.03762), built from :class:`attnkit.nn.MultiheadAttention`.

::

    src (B, S) ─ embed·√d (+ positions) ─ N × [self-attn, FFN] ──────────── memory (B, S, d)
                                                                                │
    tgt_in (B, T) ─ embed·√d (+ positions) ─ M × [causal self-attn, cross-attn ◄┘, FFN] ─ linear ─ logits (B, T, V)

Each sub-layer is residual. ``norm_first=True`` (pre-norm, Xiong et al. 2020,
https://arxiv.org/abs/2002.04745) computes ``x + f(LayerNorm(x))`` and ends each stack with a
LayerNorm; ``norm_first=False`` is the paper's post-norm ``LayerNorm(x + f(x))``.

Positions: ``"sinusoidal"`` (the paper's fixed table), ``"learned"`` (a table of ``max_len``
rows per side) or ``"rope"`` (rotary embeddings of the self-attention queries and keys, Su et
al. 2021, https://arxiv.org/abs/2104.09864; cross-attention is position-free).

Embedding tying (Press & Wolf 2017, https://arxiv.org/abs/1608.05859): ``"decoder"`` shares
the target embedding with the output projection; ``"all"`` also shares it with the source
embedding (needs one joint vocabulary). Tied parameters are one ``nn.Parameter`` that appears
under several names in ``state_dict``; :meth:`Transformer.load_state_dict` checks that the
copies agree and keeps (re-establishes) the tie, so a checkpoint written by
:func:`attnkit.checkpoint.save_checkpoint` (which stores each name separately) round-trips.

Incremental decoding keeps one :class:`attnkit.nn.KVCache` per self-attention layer (one new
key/value per step) and one per cross-attention layer (the projected memory, computed on the
first step only). :meth:`Transformer.greedy` and :meth:`Transformer.beam_search` use them; the
cached logits equal the uncached ones (tested to 1e-10 in float64).

Token ids follow :class:`attnkit.tasks.vocab.Vocab`: ``pad = 0``, ``bos = 1``, ``eos = 2``
(configurable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive, check_probability, lookup, shape_str
from ..nn import KVCache, MultiheadAttention
from ..positions import LearnedPositionalEmbedding, SinusoidalEmbedding

Tensor = torch.Tensor

__all__ = ["Transformer", "DecoderState", "label_smoothed_cross_entropy"]

POSITIONS = ("sinusoidal", "learned", "rope")
TIES = ("none", "decoder", "all")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def label_smoothed_cross_entropy(logits: Tensor, target: Tensor, *, label_smoothing: float = 0.0,
                                 ignore_index: int = 0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits (B, T, V)`` against ``target (B, T)``, skipping ``ignore_index``
    (padding), with label smoothing ``ε`` (Szegedy et al. 2016): the target distribution puts
    ``1 - ε`` on the gold token and ``ε / V`` on every token (torch's definition).

    ``reduction="mean"`` averages over the non-padding tokens; ``"sum"`` sums them.

    Example::

        >>> import torch
        >>> logits = torch.zeros(1, 2, 4)
        >>> loss = label_smoothed_cross_entropy(logits, torch.tensor([[3, 0]]), label_smoothing=0.1)
        >>> round(loss.item(), 4)        # uniform prediction: log 4, whatever the smoothing
        1.3863
    """
    if logits.dim() != 3 or target.dim() != 2 or logits.shape[:2] != target.shape:
        raise ValueError(f"logits must be (B, T, V) and target (B, T) with the same B, T; got logits "
                         f"{shape_str(logits)} and target {shape_str(target)}")
    label_smoothing = check_probability("label_smoothing", label_smoothing)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax in float32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)


def _feed_forward(d_model: int, dim_feedforward: int, dropout: float, activation: str) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, dim_feedforward), ACTIVATIONS[activation](), nn.Dropout(dropout),
                         nn.Linear(dim_feedforward, d_model))


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward sub-layers, pre- or post-norm.

    Shapes: ``x (B, S, d)``, ``key_padding_mask (B, S)`` bool, True = padding → ``(B, S, d)`` and
    the self-attention weights ``(B, H, S, S)`` when ``need_weights`` (else None).
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, *, norm_first: bool,
                 num_kv_heads: Optional[int], rope: bool, activation: str):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout=dropout, num_kv_heads=num_kv_heads, rope=rope,
                                            batch_first=True)
        self.ff = _feed_forward(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def _sa(self, x: Tensor, kpm: Optional[Tensor], need_weights: bool) -> tuple[Tensor, Optional[Tensor]]:
        a, w = self.self_attn(x, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=False)
        return self.drop(a), w

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self.norm_first:
            a, w = self._sa(self.norm1(x), key_padding_mask, need_weights)
            x = x + a
            x = x + self.drop(self.ff(self.norm2(x)))
        else:
            a, w = self._sa(x, key_padding_mask, need_weights)
            x = self.norm1(x + a)
            x = self.norm2(x + self.drop(self.ff(x)))
        return x, w


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the memory, and feed-forward, pre- or post-norm.

    ``forward(x (B, T, d), memory (B, S, d), memory_key_padding_mask (B, S), self_cache=None,
    cross_cache=None, need_weights=False)`` → ``(B, T, d)``, self weights ``(B, H, T, T')`` and
    cross weights ``(B, H, T, S)`` (None unless ``need_weights``). With caches, ``x`` holds only
    the new positions: their keys/values are appended to ``self_cache``, and the memory is
    projected into ``cross_cache`` on the first call only.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, *, norm_first: bool,
                 num_kv_heads: Optional[int], rope: bool, activation: str):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout=dropout, num_kv_heads=num_kv_heads, rope=rope,
                                            batch_first=True)
        self.cross_attn = MultiheadAttention(d_model, num_heads, dropout=dropout, num_kv_heads=num_kv_heads,
                                             batch_first=True)
        self.ff = _feed_forward(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def _sa(self, x, cache, need_weights):
        a, w = self.self_attn(x, is_causal=True, cache=cache, need_weights=need_weights, average_attn_weights=False)
        return self.drop(a), w

    def _ca(self, x, memory, kpm, cache, need_weights):
        if cache is not None and cache.length > 0:
            memory = memory[:, :0]  # keys/values of the memory are cached: add none
        a, w = self.cross_attn(x, memory, key_padding_mask=kpm, cache=cache, need_weights=need_weights,
                               average_attn_weights=False)
        return self.drop(a), w

    def forward(self, x: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                self_cache: Optional[KVCache] = None, cross_cache: Optional[KVCache] = None,
                need_weights: bool = False) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        kpm = memory_key_padding_mask
        if self.norm_first:
            a, ws = self._sa(self.norm1(x), self_cache, need_weights)
            x = x + a
            a, wc = self._ca(self.norm2(x), memory, kpm, cross_cache, need_weights)
            x = x + a
            x = x + self.drop(self.ff(self.norm3(x)))
        else:
            a, ws = self._sa(x, self_cache, need_weights)
            x = self.norm1(x + a)
            a, wc = self._ca(x, memory, kpm, cross_cache, need_weights)
            x = self.norm2(x + a)
            x = self.norm3(x + self.drop(self.ff(x)))
        return x, ws, wc


@dataclass
class DecoderState:
    """What incremental decoding carries from step to step: the encoder memory ``(B, S, d)`` and
    its padding mask ``(B, S)``, one self-attention and one cross-attention
    :class:`~attnkit.nn.KVCache` per decoder layer, and the number of target positions decoded
    (``offset``). Make one with :meth:`Transformer.init_state`."""

    memory: Tensor
    memory_key_padding_mask: Optional[Tensor]
    self_caches: list[KVCache]
    cross_caches: list[KVCache]
    offset: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def reorder(self, indices: Tensor, *, memory: bool = True) -> None:
        """Keep batch rows ``indices (B',)`` (beam search: each hypothesis's parent).

        ``memory=False`` reorders only the self-attention caches: correct when every row and the
        row it is replaced by share one source sentence (beam search within a sentence), and it
        saves copying the memory and the cross-attention caches."""
        for c in self.self_caches:
            c.reorder(indices)
        if not memory:
            return
        for c in self.cross_caches:
            c.reorder(indices)
        self.memory = self.memory.index_select(0, indices)
        if self.memory_key_padding_mask is not None:
            self.memory_key_padding_mask = self.memory_key_padding_mask.index_select(0, indices)


class Transformer(nn.Module):
    r"""Encoder-decoder Transformer (https://arxiv.org/abs/1706.03762) on :class:`attnkit.nn.MultiheadAttention`.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        d_model: model width ``d``; ``d % num_heads == 0``.
        num_heads: attention heads ``H`` (self and cross).
        num_encoder_layers, num_decoder_layers: depths (``>= 1``).
        dim_feedforward: inner size of the feed-forward sub-layers.
        dropout: on embeddings, sub-layer outputs, attention weights and the FFN hidden layer.
        norm_first: pre-norm (True, default; trains without warm-up tricks) or post-norm (the paper).
        tie_embeddings: ``"none"``, ``"decoder"`` (target embedding = output projection) or
            ``"all"`` (also = source embedding; needs ``src_vocab == tgt_vocab``).
        positions: ``"sinusoidal"``, ``"learned"`` or ``"rope"``.
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        max_len: rows of the learned position tables (``positions="learned"``: the longest source
            or target, and a cap on generated lengths); stored but unused by the other positions.
        activation: ``"relu"`` (the paper) or ``"gelu"``.
        pad_id, bos_id, eos_id: special token ids.
        context_parallel: a ``torch.distributed`` process group (``True``: the default one) over
            which the source and target sequences are split (see :meth:`set_context_parallel`).
        cp_layout: the split's layout, ``"zigzag"`` (default) or ``"contiguous"``.

    ``self.config`` holds these arguments (not the process group), so ``attnkit.models.get("Transformer")(**model.config)``
    rebuilds the model.

    Shapes: ``forward(src (B, S), src_key_padding_mask (B, S) bool True = padding or None (then
    ``src == pad_id``), tgt_in (B, T))`` → logits ``(B, T, tgt_vocab)``.

    Example::

        >>> import torch
        >>> m = Transformer(11, 13, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
        ...                 dim_feedforward=32, dropout=0.0)
        >>> src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
        >>> m(src, src == 0, torch.tensor([[1, 4, 5], [1, 6, 0]])).shape
        torch.Size([2, 3, 13])
        >>> out = m.greedy(src, src == 0, max_len=4)
        >>> out == m.beam_search(src, src == 0, beam=1, max_len=4)
        True
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, num_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, *, norm_first: bool = True, tie_embeddings: str = "decoder",
                 positions: str = "sinusoidal", num_kv_heads: Optional[int] = None, max_len: int = 1024,
                 activation: str = "relu", pad_id: int = 0, bos_id: int = 1, eos_id: int = 2,
                 context_parallel=None, cp_layout: str = "zigzag"):
        super().__init__()
        for name, v in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("d_model", d_model),
                        ("num_heads", num_heads), ("num_encoder_layers", num_encoder_layers),
                        ("num_decoder_layers", num_decoder_layers), ("dim_feedforward", dim_feedforward),
                        ("max_len", max_len)):
            check_positive(name, v, integer=True)
        dropout = check_probability("dropout", dropout)
        if not isinstance(norm_first, bool):
            raise TypeError(f"norm_first must be a bool; got {type(norm_first).__name__}")
        lookup("tie_embeddings", tie_embeddings, dict.fromkeys(TIES))
        lookup("positions", positions, dict.fromkeys(POSITIONS))
        lookup("activation", activation, ACTIVATIONS)
        if d_model % num_heads != 0:
            raise ValueError(f"d_model must be divisible by num_heads; got d_model = {d_model}, num_heads = {num_heads}")
        if tie_embeddings == "all" and src_vocab != tgt_vocab:
            raise ValueError(f"tie_embeddings='all' shares one embedding between source and target, so src_vocab "
                             f"must equal tgt_vocab; got {src_vocab} and {tgt_vocab} (use 'decoder' or 'none')")
        for name, v in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            check_positive(name, v, integer=True, allow_zero=True)
            if v >= tgt_vocab:
                raise ValueError(f"{name} must be < tgt_vocab = {tgt_vocab}; got {v}")
        self.config: dict[str, Any] = dict(
            src_vocab=src_vocab, tgt_vocab=tgt_vocab, d_model=d_model, num_heads=num_heads,
            num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward, dropout=dropout, norm_first=norm_first, tie_embeddings=tie_embeddings,
            positions=positions, num_kv_heads=num_kv_heads, max_len=max_len, activation=activation,
            pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        self.d_model, self.pad_id, self.bos_id, self.eos_id = d_model, pad_id, bos_id, eos_id
        self.max_len, self.positions, self.norm_first = max_len, positions, norm_first

        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id)
        self.generator = nn.Linear(d_model, tgt_vocab, bias=False)
        for emb in (self.src_embed, self.tgt_embed):  # N(0, d^-1/2): after the √d scale, unit variance
            nn.init.normal_(emb.weight, std=d_model ** -0.5)
            with torch.no_grad():
                emb.weight[pad_id].zero_()
        if positions == "sinusoidal":
            self.src_pos = self.tgt_pos = SinusoidalEmbedding(d_model)  # parameter-free, shared
        elif positions == "learned":
            self.src_pos = LearnedPositionalEmbedding(max_len, d_model)
            self.tgt_pos = LearnedPositionalEmbedding(max_len, d_model)
        else:
            self.src_pos = self.tgt_pos = None
        kw = dict(norm_first=norm_first, num_kv_heads=num_kv_heads, rope=positions == "rope", activation=activation)
        self.encoder_layers = nn.ModuleList(EncoderLayer(d_model, num_heads, dim_feedforward, dropout, **kw)
                                            for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d_model, num_heads, dim_feedforward, dropout, **kw)
                                            for _ in range(num_decoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self._tie()
        self.context_parallel, self.cp_layout = None, cp_layout
        if context_parallel is not None and context_parallel is not False:
            self.set_context_parallel(context_parallel, cp_layout)

    # -- tying -------------------------------------------------------------------------------
    def tied_names(self) -> list[tuple[str, str]]:
        """Pairs of ``state_dict`` names that hold one shared parameter."""
        tie = self.config["tie_embeddings"]
        pairs = []
        if tie in ("decoder", "all"):
            pairs.append(("generator.weight", "tgt_embed.weight"))
        if tie == "all":
            pairs.append(("src_embed.weight", "tgt_embed.weight"))
        return pairs

    def _tie(self) -> None:
        tie = self.config["tie_embeddings"]
        if tie in ("decoder", "all"):
            self.generator.weight = self.tgt_embed.weight
        if tie == "all":
            self.src_embed.weight = self.tgt_embed.weight

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`, and for tied embeddings: the copies of a
        tied parameter must be equal (``ValueError`` otherwise), and the tie is kept even with
        ``assign=True``."""
        for a, b in self.tied_names():
            if a in state_dict and b in state_dict and not torch.equal(state_dict[a], state_dict[b]):
                raise ValueError(f"state_dict entries {a!r} and {b!r} are one tied parameter in this model "
                                 f"(tie_embeddings={self.config['tie_embeddings']!r}) but hold different values")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._tie()
        return result

    # -- encoder / decoder ---------------------------------------------------------------------
    def _check_tokens(self, name: str, x: Tensor, vocab: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point() or x.dtype == torch.bool:
            got = shape_str(x) + f" {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a (B, T) tensor of token ids; got {got}")
        if torch.compiler.is_compiling():  # reading the ids' values would break a compiled graph
            return
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise ValueError(f"{name} ids must lie in [0, {vocab}); got min {int(x.min())}, max {int(x.max())}")

    def set_context_parallel(self, group=True, layout: str = "zigzag") -> "Transformer":
        """Split every sequence over the ranks of ``group`` (``True``: the default process group;
        ``None``: stop splitting): each rank then passes its shard of ``src``, of the padding mask
        and of ``tgt_in`` in ``layout`` (:func:`attnkit.distributed.shard`, along dim 1) and gets
        its shard of the logits, equal to the whole sequence's (every attention runs as
        :func:`attnkit.distributed.ring_attention`; positions are the shard's global ones).
        Decoding runs on one process. Returns the model.

        Example (on every rank of an initialized group)::

            model.set_context_parallel(True)
            logits = model(shard(src, "zigzag", dim=1), shard(pad, "zigzag", dim=1), shard(tgt_in, "zigzag", dim=1))
        """
        from ..distributed.layout import check_layout

        layout = check_layout(layout, "set_context_parallel")
        self.context_parallel, self.cp_layout = (None if group is False else group), layout
        for m in self.modules():
            if isinstance(m, MultiheadAttention):
                m.context_parallel, m.cp_layout = self.context_parallel, layout
        return self

    def _embed(self, emb: nn.Embedding, pos: Optional[nn.Module], tokens: Tensor, offset: int = 0) -> Tensor:
        x = emb(tokens) * math.sqrt(self.d_model)
        if pos is not None and self.context_parallel is not None:
            import torch.distributed as dist

            from ..distributed import shard_positions

            group = None if self.context_parallel is True else self.context_parallel
            world = dist.get_world_size(group)
            x = pos(x, positions=shard_positions(self.cp_layout, tokens.shape[1] * world, dist.get_rank(group), world,
                                                 device=tokens.device))
        elif pos is not None:
            x = pos(x, offset=offset)
        return self.drop(x)

    def _source_mask(self, src: Tensor, src_key_padding_mask: Optional[Tensor]) -> Tensor:
        if src_key_padding_mask is None:
            return src == self.pad_id
        if not isinstance(src_key_padding_mask, torch.Tensor) or src_key_padding_mask.dtype != torch.bool \
                or src_key_padding_mask.shape != src.shape:
            got = (f"{shape_str(src_key_padding_mask)} {src_key_padding_mask.dtype}"
                   if isinstance(src_key_padding_mask, torch.Tensor) else type(src_key_padding_mask).__name__)
            raise ValueError(f"src_key_padding_mask must be a bool tensor (B, S) = {tuple(src.shape)} with True = "
                             f"padding; got {got}")
        return src_key_padding_mask

    def encode(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
               need_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encoder memory ``(B, S, d)`` of ``src (B, S)``; with ``need_weights`` also each layer's
        self-attention weights ``(B, H, S, S)``."""
        self._check_tokens("src", src, self.config["src_vocab"])
        kpm = self._source_mask(src, src_key_padding_mask)
        x = self._embed(self.src_embed, self.src_pos, src)
        weights = []
        for layer in self.encoder_layers:
            x, w = layer(x, kpm, need_weights)
            weights.append(w)
        x = self.encoder_norm(x)
        return (x, weights) if need_weights else x

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
               state: Optional[DecoderState] = None, need_weights: bool = False):
        """Logits ``(B, T, V)`` of ``tgt_in (B, T)`` given ``memory (B, S, d)``.

        With a ``state`` (see :meth:`init_state`), ``tgt_in`` holds only the new positions: they
        attend to the cached ones, and the state advances by ``T``. With ``need_weights``, returns
        ``(logits, self_weights, cross_weights)``: lists over layers of ``(B, H, T, T')`` and
        ``(B, H, T, S)``.
        """
        self._check_tokens("tgt_in", tgt_in, self.config["tgt_vocab"])
        offset = 0 if state is None else state.offset
        x = self._embed(self.tgt_embed, self.tgt_pos, tgt_in, offset)
        self_w, cross_w = [], []
        for i, layer in enumerate(self.decoder_layers):
            sc = None if state is None else state.self_caches[i]
            cc = None if state is None else state.cross_caches[i]
            x, ws, wc = layer(x, memory, memory_key_padding_mask, sc, cc, need_weights)
            self_w.append(ws)
            cross_w.append(wc)
        if state is not None:
            state.offset += tgt_in.shape[1]
        logits = self.generator(self.decoder_norm(x))
        return (logits, self_w, cross_w) if need_weights else logits

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor], tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, tgt_vocab)``; see the class docstring."""
        kpm = self._source_mask(src, src_key_padding_mask)
        return self.decode(tgt_in, self.encode(src, kpm), kpm)

    def attention_weights(self, src: Tensor, src_key_padding_mask: Optional[Tensor],
                          tgt_in: Tensor) -> dict[str, list[Tensor]]:
        """Every attention map of a teacher-forced pass (taken before attention dropout; use eval
        mode for those of the deterministic model):
        ``{"encoder": [(B, H, S, S)], "decoder": [(B, H, T, T)], "cross": [(B, H, T, S)]}``, one
        entry per layer. Padded source positions get weight exactly 0."""
        kpm = self._source_mask(src, src_key_padding_mask)
        memory, enc_w = self.encode(src, kpm, need_weights=True)
        _, self_w, cross_w = self.decode(tgt_in, memory, kpm, need_weights=True)
        return {"encoder": enc_w, "decoder": self_w, "cross": cross_w}

    # -- incremental decoding --------------------------------------------------------------------
    def init_state(self, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                   max_len: Optional[int] = None) -> DecoderState:
        """A fresh :class:`DecoderState` for decoding against ``memory (B, S, d)``; ``max_len``
        preallocates the self-attention caches."""
        S = memory.shape[1]
        n = len(self.decoder_layers)
        return DecoderState(memory, memory_key_padding_mask, [KVCache(max_length=max_len) for _ in range(n)],
                            [KVCache(max_length=max(S, 1)) for _ in range(n)])

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Logits ``(B, T, V)`` for the new target tokens ``(B, T)`` (usually ``T = 1``), using
        and extending the caches in ``state``."""
        return self.decode(tokens, state.memory, state.memory_key_padding_mask, state=state)

    def _decoding_length(self, S: int, max_len: Optional[int]) -> int:
        if max_len is None:
            max_len = 2 * S + 10
        max_len = int(check_positive("max_len", max_len, integer=True))
        if self.positions == "learned":
            max_len = min(max_len, self.max_len - 1)  # BOS takes position 0
        return max_len

    @torch.no_grad()
    def greedy(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
               max_len: Optional[int] = None) -> list[list[int]]:
        """Greedy decoding with the KV cache (in eval mode; the mode is restored afterwards).

        Returns one list of token ids per sentence, without BOS and EOS; at most ``max_len``
        tokens (default ``2 S + 10``).
        """
        was = self.training
        self.eval()
        try:
            kpm = self._source_mask(src, src_key_padding_mask)
            memory = self.encode(src, kpm)
            B, S = src.shape
            max_len = self._decoding_length(S, max_len)
            state = self.init_state(memory, kpm, max_len)
            tok = torch.full((B, 1), self.bos_id, dtype=torch.long, device=src.device)
            out = torch.full((B, max_len), self.pad_id, dtype=torch.long, device=src.device)
            done = torch.zeros(B, dtype=torch.bool, device=src.device)
            lengths = torch.full((B,), max_len, dtype=torch.long, device=src.device)
            for t in range(max_len):
                logits = self.decode_step(tok, state)[:, -1]  # (B, V)
                nxt = logits.argmax(-1)
                newly = ~done & (nxt == self.eos_id)
                lengths[newly] = t
                done |= newly
                out[:, t] = nxt
                if bool(done.all()):
                    break
                tok = nxt.unsqueeze(1)
            return [out[b, : int(lengths[b])].tolist() for b in range(B)]
        finally:
            self.train(was)

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None, beam: int = 4,
                    max_len: Optional[int] = None, length_penalty: float = 0.6,
                    return_scores: bool = False):
        r"""Beam search with the KV cache (in eval mode; the mode is restored afterwards).

        Every step expands each of the ``beam`` live hypotheses of a sentence, ranks the
        ``2·beam`` best continuations by total log-probability, moves those among the first
        ``beam`` that end in EOS to the finished list, and keeps the ``beam`` best that do not.
        A sentence stops when it has ``beam`` finished hypotheses and the worst of them scores at
        least the best live hypothesis (normalized at its current length); at ``max_len`` the live
        ones are finished as they are. The winner maximizes ``log p / lp`` with the GNMT length
        penalty ``lp = ((5 + L) / 6) ** length_penalty`` (Wu et al. 2016,
        https://arxiv.org/abs/1609.08144), ``L`` counting the generated tokens and EOS.
        ``beam = 1`` gives exactly :meth:`greedy`'s output.

        Returns one list of token ids per sentence (without BOS and EOS), and with
        ``return_scores`` also the list of their normalized scores.
        """
        beam = int(check_positive("beam", beam, integer=True))
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
            raise TypeError(f"length_penalty must be a number; got {type(length_penalty).__name__}")
        was = self.training
        self.eval()
        try:
            kpm = self._source_mask(src, src_key_padding_mask)
            B, S = src.shape
            K = beam
            max_len = self._decoding_length(S, max_len)
            dev = src.device
            memory = self.encode(src, kpm)
            # every sentence's memory repeated K times: row b*K + k is beam k of sentence b
            rows = torch.arange(B, device=dev).repeat_interleave(K)
            state = self.init_state(memory.index_select(0, rows), kpm.index_select(0, rows), max_len)
            scores = torch.zeros(B, K, device=dev, dtype=memory.dtype)
            scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first
            hyps = torch.full((B, K, 0), self.bos_id, dtype=torch.long, device=dev)
            tok = torch.full((B * K, 1), self.bos_id, dtype=torch.long, device=dev)
            finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
            done = [False] * B
            base = (torch.arange(B, device=dev) * K).unsqueeze(1)  # (B, 1)

            def lp(n: int) -> float:
                return ((5.0 + n) / 6.0) ** length_penalty

            for t in range(max_len):
                logits = self.decode_step(tok, state)[:, -1]  # (B*K, V)
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                logp = torch.log_softmax(logits, dim=-1)
                V = logp.shape[-1]
                cand = (scores.unsqueeze(-1) + logp.view(B, K, V).to(scores.dtype)).view(B, K * V)
                n_cand = min(2 * K, K * V)
                top, idx = cand.topk(n_cand, dim=1)            # (B, 2K), sorted best first
                parent, token = idx // V, idx % V
                is_eos = token == self.eos_id
                # finished: EOS among the K best candidates (each sentence keeps its K best)
                eos_rows, eos_cols = torch.nonzero(is_eos[:, :K] & torch.isfinite(top[:, :K]), as_tuple=True)
                for b, c in zip(eos_rows.tolist(), eos_cols.tolist()):
                    if not done[b]:
                        finished[b].append((float(top[b, c]) / lp(t + 1), hyps[b, int(parent[b, c])].tolist()))
                # live: the K best candidates that are not EOS (stable order)
                order = (is_eos.long() * n_cand + torch.arange(n_cand, device=dev)).argsort(dim=1)[:, :K]
                if order.shape[1] < K:  # tiny vocabularies: pad with dead beams
                    order = torch.cat([order, order[:, -1:].expand(B, K - order.shape[1])], dim=1)
                scores = top.gather(1, order)
                scores = scores.masked_fill(is_eos.gather(1, order), float("-inf"))
                par, nxt = parent.gather(1, order), token.gather(1, order)           # (B, K)
                hyps = torch.cat([hyps.gather(1, par.unsqueeze(-1).expand(-1, -1, hyps.shape[2])),
                                  nxt.unsqueeze(-1)], dim=2)
                best_live = scores.max(dim=1).values.tolist()
                for b in range(B):
                    if done[b] or len(finished[b]) < K:
                        continue
                    finished[b] = sorted(finished[b], key=lambda f: -f[0])[:K]  # stable: earlier wins ties
                    # stop once no live hypothesis, at its current length, beats the K-th finished one
                    if finished[b][-1][0] >= best_live[b] / lp(t + 1):
                        done[b] = True
                if all(done):
                    break
                state.reorder((base + par).view(-1), memory=False)  # parents share the sentence's memory
                tok = nxt.view(B * K, 1)
            else:  # max_len reached: the live hypotheses end here
                for b in range(B):
                    if done[b]:
                        continue
                    for k in range(K):
                        if math.isfinite(float(scores[b, k])):
                            finished[b].append((float(scores[b, k]) / lp(max_len), hyps[b, k].tolist()))
            best = []
            for b in range(B):
                if finished[b]:
                    best.append(max(finished[b], key=lambda f: f[0]))  # first of equals wins
                else:
                    best.append((float("-inf"), []))
            seqs = [s for _, s in best]
            return (seqs, [sc for sc, _ in best]) if return_scores else seqs
        finally:
            self.train(was)
