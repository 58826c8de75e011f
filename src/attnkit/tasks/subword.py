"""Tokenizers for the translation task: subwords with SentencePiece (BPE or unigram, trained
in-process, no files written) and whitespace-separated words on :class:`~attnkit.tasks.vocab.Vocab`.

Both share one interface -- ``encode(text) -> ids``, ``decode(ids) -> text``, ``len()`` and the
special ids of :class:`~attnkit.tasks.vocab.Vocab` (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
``<unk>`` 3) -- and serialize to a JSON-able dict (:meth:`to_config`, :func:`from_config`) that a
checkpoint's ``config.json`` stores: the SentencePiece model proto is kept base64-encoded there,
so a checkpoint folder is self-contained.

Example::

    >>> from attnkit.tasks.subword import SentencePieceTokenizer, from_config
    >>> lines = ["a man rides a horse .", "two dogs play in the snow .", "a woman reads a book ."] * 20
    >>> tok = SentencePieceTokenizer.train(lines, vocab_size=60)
    >>> ids = tok.encode("a man reads a book .")
    >>> tok.decode(ids)
    'a man reads a book .'
    >>> from_config(tok.to_config()).encode("a man reads a book .") == ids
    True
"""

from __future__ import annotations

import base64
import io
from typing import Any, Iterable, Protocol, Sequence

from .vocab import BOS, EOS, PAD, UNK, Vocab

__all__ = ["Tokenizer", "SentencePieceTokenizer", "WordTokenizer", "train_tokenizers", "from_config", "KINDS"]

KINDS = ("bpe", "unigram", "word")


class Tokenizer(Protocol):
    """What the translation task needs from a tokenizer."""

    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def __len__(self) -> int: ...

    def to_config(self) -> dict[str, Any]: ...


def _strip(ids: Iterable[int], pad: int, bos: int, eos: int) -> list[int]:
    """Ids up to the first EOS, without PAD/BOS."""
    out = []
    for i in ids:
        i = int(i)
        if i == eos:
            break
        if i not in (pad, bos):
            out.append(i)
    return out


class SentencePieceTokenizer:
    """A SentencePiece model (Kudo & Richardson 2018, https://arxiv.org/abs/1808.06226): BPE
    (Sennrich et al. 2016) or unigram LM subwords.

    Special ids match :class:`~attnkit.tasks.vocab.Vocab`: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3. :meth:`encode` returns the pieces' ids without BOS/EOS; :meth:`decode` stops at
    EOS, skips PAD/BOS and detokenizes (SentencePiece keeps the whitespace in its pieces).
    """

    pad_id, bos_id, eos_id, unk_id = Vocab.pad_id, Vocab.bos_id, Vocab.eos_id, Vocab.unk_id

    def __init__(self, model_proto: bytes, kind: str = "bpe"):
        import sentencepiece as spm

        self.kind = kind  # "bpe" or "unigram": informative only, the proto decides
        if not isinstance(model_proto, (bytes, bytearray)) or not model_proto:
            raise ValueError("model_proto must be the non-empty bytes of a SentencePiece model")
        self.proto = bytes(model_proto)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"model_proto is not a valid SentencePiece model: {e}") from None
        got = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if got != (self.pad_id, self.bos_id, self.eos_id, self.unk_id):
            raise ValueError(f"SentencePiece model has special ids (pad, bos, eos, unk) = {got}; expected (0, 1, 2, 3)")

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int = 8000, *, model_type: str = "bpe",
              character_coverage: float = 1.0, normalization: str = "nmt_nfkc",
              max_sentences: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000) -> "SentencePieceTokenizer":
        """Train on ``lines`` in memory (nothing is written to disk).

        Args:
            lines: training sentences (for a joint model, both languages' lines).
            vocab_size: size of the vocabulary including the 4 specials. It is an upper bound:
                small corpora get fewer pieces rather than an error.
            model_type: ``"bpe"`` or ``"unigram"``.
            character_coverage: fraction of characters covered by single-character pieces.
            normalization: SentencePiece normalization rule (``"nmt_nfkc"``, ``"identity"``, ...).
        """
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram'; got {model_type!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 8:
            raise ValueError(f"vocab_size must be an int >= 8; got {vocab_size!r}")
        lines = [s for s in lines if s.strip()]
        if not lines:
            raise ValueError("cannot train a SentencePiece model on no text (all lines are empty)")
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, normalization_rule_name=normalization,
                pad_id=cls.pad_id, bos_id=cls.bos_id, eos_id=cls.eos_id, unk_id=cls.unk_id,
                pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
                hard_vocab_limit=False, input_sentence_size=max_sentences, shuffle_input_sentence=True,
                seed_sentencepiece_size=seed_sentencepiece_size, num_threads=1, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}, model_type={model_type!r}, "
                             f"{len(lines)} sentences): {e}") from None
        return cls(buf.getvalue(), model_type)

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_batch(self, lines: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.sp.encode(list(lines))]

    def pieces(self, text: str) -> list[str]:
        """The subword pieces of ``text`` (``▁`` marks a preceding space)."""
        return list(self.sp.encode(text, out_type=str))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(_strip(ids, self.pad_id, self.bos_id, self.eos_id))

    def to_config(self) -> dict[str, Any]:
        return {"type": "sentencepiece", "kind": self.kind, "model": base64.b64encode(self.proto).decode("ascii")}


class WordTokenizer:
    """Whitespace-separated words, optionally lowercased, on a :class:`~attnkit.tasks.vocab.Vocab`
    (rare words become ``<unk>``). :meth:`decode` joins the words with single spaces.

    Example::

        >>> tok = WordTokenizer.build(["A dog runs .", "a cat sleeps ."], lowercase=True)
        >>> tok.decode(tok.encode("A cat runs"))
        'a cat runs'
        >>> tok.decode(tok.encode("a zebra"))
        'a <unk>'
    """

    pad_id, bos_id, eos_id, unk_id = Vocab.pad_id, Vocab.bos_id, Vocab.eos_id, Vocab.unk_id

    def __init__(self, vocab: Vocab, lowercase: bool = False):
        self.vocab, self.lowercase = vocab, bool(lowercase)

    @classmethod
    def build(cls, lines: Iterable[str], *, lowercase: bool = False, min_freq: int = 1,
              max_size: int | None = None) -> "WordTokenizer":
        tok = cls(Vocab([]), lowercase)
        vocab = Vocab.build((tok.split(s) for s in lines), min_freq=min_freq, max_size=max_size)
        if len(vocab) <= 4:
            raise ValueError("cannot build a word vocabulary from no text (all lines are empty)")
        return cls(vocab, lowercase)

    kind = "word"

    def split(self, text: str) -> list[str]:
        return (text.lower() if self.lowercase else text).split()

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(self.split(text))

    def encode_batch(self, lines: Sequence[str]) -> list[list[int]]:
        return [self.encode(s) for s in lines]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab.decode(ids))

    def to_config(self) -> dict[str, Any]:
        return {"type": "word", "lowercase": self.lowercase, "tokens": self.vocab.to_json()}


def from_config(cfg: dict[str, Any]) -> SentencePieceTokenizer | WordTokenizer:
    """Rebuild a tokenizer from :meth:`to_config`'s dict (``ValueError`` when it is malformed)."""
    if not isinstance(cfg, dict) or cfg.get("type") not in ("sentencepiece", "word"):
        got = cfg.get("type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"tokenizer config must be a dict with type 'sentencepiece' or 'word'; got {got!r}")
    if cfg["type"] == "sentencepiece":
        try:
            proto = base64.b64decode(cfg["model"], validate=True)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"tokenizer config has no valid base64 'model': {e}") from None
        return SentencePieceTokenizer(proto, str(cfg.get("kind", "bpe")))
    return WordTokenizer(Vocab.from_json(cfg.get("tokens")), bool(cfg.get("lowercase", False)))


def train_tokenizers(src_lines: Sequence[str], tgt_lines: Sequence[str], *, kind: str = "bpe",
                     vocab_size: int = 8000, joint: bool = True, lowercase: bool = False,
                     min_freq: int = 1) -> tuple[Tokenizer, Tokenizer]:
    """Source and target tokenizers trained on the training text.

    Args:
        kind: ``"bpe"``, ``"unigram"`` (SentencePiece) or ``"word"``.
        vocab_size: subword vocabulary size (per side, or of the joint model); for words, the
            maximum vocabulary size (rarer words become ``<unk>``).
        joint: one model for both languages (returned twice: it is the same object), which
            allows tying all embeddings; otherwise one per side.
        lowercase, min_freq: word tokenizer options.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer {kind!r}; valid names: {', '.join(repr(k) for k in KINDS)}")
    if kind == "word":
        def build(lines):
            return WordTokenizer.build(lines, lowercase=lowercase, min_freq=min_freq, max_size=vocab_size)
    else:
        def build(lines):
            return SentencePieceTokenizer.train(lines, vocab_size, model_type=kind)
    if joint:
        tok = build(list(src_lines) + list(tgt_lines))
        return tok, tok
    return build(src_lines), build(tgt_lines)
