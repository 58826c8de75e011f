"""The sst2 task's data: GLUE's SST-2 files read and checked (:func:`resolve_data_dir`,
:func:`read_sst2_tsv`), tokens (:func:`tokenize`, and clauses for HAN: :func:`split_clauses`),
and padded id batches (:func:`encode_batch`, :func:`make_batches`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..io import read_text_lines
from ..vocab import Vocab, batch_indices, pad_batch

if TYPE_CHECKING:  # a type only: the data modules do not import the training code
    from ..classification import Batch

DEFAULT_SST2 = "../shared/data/sst2"
LABELS = {"0": 0, "1": 1}
CLAUSE_BREAKS = frozenset({",", ";", ":", "--"})


def tokenize(text: str) -> list[str]:
    """Lowercase and split on whitespace.

    >>> tokenize("A  Gorgeous , witty film ")
    ['a', 'gorgeous', ',', 'witty', 'film']
    """
    return text.lower().split()


def read_sst2_tsv(path: str | Path) -> tuple[list[list[str]], list[int]]:
    """Read a GLUE-style SST-2 file: a header naming the ``sentence`` and ``label`` columns
    (tab-separated, in any order), then one example per line.

    Returns ``(token lists, labels)``. Raises ``ValueError`` naming the file (and the line number,
    counting the header as line 1) for a missing or empty file, bytes that are not UTF-8, a header
    without those columns, a line with the wrong number of fields, an empty sentence or a label
    other than 0/1.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "train.tsv")
        >>> _ = open(p, "w").write("sentence\\tlabel\\na gorgeous film \\t1\\nflat , dull \\t0\\n")
        >>> read_sst2_tsv(p)
        ([['a', 'gorgeous', 'film'], ['flat', ',', 'dull']], [1, 0])
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"SST-2 file {str(p)!r} does not exist")
    lines = read_text_lines(p, f"SST-2 file {str(p)!r}")
    if not lines or not any(line.strip() for line in lines):
        raise ValueError(f"SST-2 file {str(p)!r} is empty (expected a header 'sentence<TAB>label' and examples)")
    header = lines[0].split("\t")
    cols = [h.strip().lower() for h in header]
    if "sentence" not in cols or "label" not in cols:
        raise ValueError(f"SST-2 file {str(p)!r} line 1: the header must name the columns 'sentence' and 'label' "
                         f"(tab-separated, as GLUE's SST-2 train.tsv/dev.tsv); got {lines[0][:80]!r}")
    i_s, i_l = cols.index("sentence"), cols.index("label")
    sentences, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(cols):
            raise ValueError(f"SST-2 file {str(p)!r} line {n}: expected {len(cols)} tab-separated fields "
                             f"({', '.join(header)}); got {len(fields)}: {line[:80]!r}")
        label = fields[i_l].strip()
        if label not in LABELS:
            raise ValueError(f"SST-2 file {str(p)!r} line {n}: unknown label {label!r}; expected one of 0 (negative), "
                             "1 (positive)")
        tokens = tokenize(fields[i_s])
        if not tokens:
            raise ValueError(f"SST-2 file {str(p)!r} line {n}: the sentence is empty")
        sentences.append(tokens)
        labels.append(LABELS[label])
    if not sentences:
        raise ValueError(f"SST-2 file {str(p)!r} has a header but no examples")
    return sentences, labels


def resolve_data_dir(data: str | Path) -> Path:
    """The folder holding ``train.tsv``/``dev.tsv``: ``data`` itself or ``data/glue``."""
    d = Path(data)
    if d.is_file():
        raise ValueError(f"--data: {str(d)!r} is a file; give the SST-2 folder that holds GLUE's train.tsv and dev.tsv")
    if not d.is_dir():
        raise ValueError(f"--data: SST-2 folder {str(d)!r} does not exist (it should hold GLUE's train.tsv and "
                         "dev.tsv, or a glue/ folder with them)")
    for cand in (d, d / "glue"):
        if (cand / "train.tsv").is_file() or (cand / "dev.tsv").is_file():
            return cand
    raise ValueError(f"--data: no train.tsv or dev.tsv in {str(d)!r} or {str(d / 'glue')!r}")


def split_clauses(tokens: Sequence[str]) -> list[list[str]]:
    """Cut a token list after each clause break (``, ; : --``) for the HAN's sentence level.

    >>> split_clauses("a witty , if slow film ; fine".split())
    [['a', 'witty', ','], ['if', 'slow', 'film', ';'], ['fine']]
    """
    out, cur = [], []
    for t in tokens:
        cur.append(t)
        if t in CLAUSE_BREAKS:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def encode_batch(vocab: Vocab, sentences: Sequence[Sequence[str]], hierarchical: bool) -> torch.Tensor:
    """Token ids padded with ``<pad>`` = 0: ``(B, T)``, or ``(B, S, W)`` clauses for HAN."""
    if not hierarchical:
        return pad_batch([vocab.encode(s) for s in sentences])[0]
    docs = [[vocab.encode(c) for c in split_clauses(s)] for s in sentences]
    S, W = max(len(d) for d in docs), max(len(c) for d in docs for c in d)
    x = torch.zeros(len(docs), S, W, dtype=torch.long)
    for b, d in enumerate(docs):
        for s, c in enumerate(d):
            x[b, s, :len(c)] = torch.tensor(c)
    return x


def make_batches(data: dict, vocab: Vocab, batch_size: int, seed: int, hierarchical: bool
                 ) -> Callable[[str, int | None], list[Batch]]:
    """``batches(split, epoch)`` over ``data`` (``{split: (token lists, labels)}``) for
    :func:`~attnkit.tasks.classification.train_classifier`: training batches of ``batch_size``
    shuffled by ``seed`` and the epoch, evaluation batches (``epoch`` None) of 256 in order,
    encoded once and kept; sentences of similar length share a batch."""
    cache: dict[str, list[Batch]] = {}

    def batches(split: str, epoch: int | None) -> list[Batch]:
        sents, labels = data[split]
        if epoch is None and split in cache:
            return cache[split]
        idx = batch_indices(len(labels), batch_size if epoch is not None else 256, shuffle=epoch is not None,
                            seed=seed * 100_003 + (epoch or 0), lengths=[len(s) for s in sents])
        out = [(encode_batch(vocab, [sents[i] for i in b], hierarchical), torch.tensor([labels[i] for i in b]))
               for b in idx]
        if epoch is None:
            cache[split] = out
        return out
    return batches
