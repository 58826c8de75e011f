"""Token vocabularies and batching shared by the text tasks.

Example::

    >>> from attnkit.tasks.vocab import Vocab
    >>> v = Vocab.build([["a", "b", "a"], ["c"]], min_freq=1)
    >>> v.encode(["a", "z"], bos=True, eos=True)
    [1, 4, 3, 2]
    >>> v.decode([1, 4, 3, 2])
    ['a', '<unk>']
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterable, Sequence

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocab:
    """A token <-> id map with ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIALS:
            tokens = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.itos = tokens
        self.stoi = {t: i for i, t in enumerate(tokens)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], *, min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        """Most frequent tokens first (ties broken alphabetically, so the result is deterministic)."""
        counts = Counter(t for s in sentences for t in s)
        items = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            items = items[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + items)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int], *, strip: bool = True) -> list[str]:
        """Tokens of ``ids``; with ``strip``, stop at ``</s>`` and drop ``<s>``/``<pad>``."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == self.eos_id:
                break
            if strip and i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return out

    def to_json(self) -> list[str]:
        return list(self.itos)

    @classmethod
    def from_json(cls, tokens: list[str]) -> "Vocab":
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("vocabulary in the checkpoint config must be a list of strings")
        return cls(tokens)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` long tensor right-padded with ``pad_id``, and the lengths ``(B,)``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


def batch_indices(n: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Indices ``0..n-1`` cut into batches. With ``lengths``, examples of similar length are
    batched together (sorted within shuffled pools of 50 batches) to waste less padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    idx = list(range(n))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(idx)
    if lengths is not None:
        pool = batch_size * 50
        idx = [i for s in range(0, n, pool) for i in sorted(idx[s:s + pool], key=lambda i: lengths[i])]
    batches = [idx[s:s + batch_size] for s in range(0, n, batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
