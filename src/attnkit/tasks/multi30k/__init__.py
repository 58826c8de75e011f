r"""Machine translation on plain parallel text (Multi30k by default): ``attnkit train multi30k``.

Data: one sentence a line, line ``i`` of the source file and line ``i`` of the target file form
a pair; plain UTF-8 or gzipped (``.gz``). Either a Multi30k folder (``--data DIR``, default
``../shared/data/multi30k`` relative to the current directory) laid out as the official
repository (https://github.com/multi30k/dataset, ``data/task1``)::

    DIR/raw/{train,val,test_2016_flickr}.{en,de}.gz            --raw: original casing, untokenized
    DIR/tok/{train,val,test_2016_flickr}.lc.norm.tok.{en,de}   default: lowercased, Moses-tokenized

(``DIR/{train,val,test_2016_flickr}.{src,tgt}[.gz]`` works too), or explicit files
(``--train-src/--train-tgt/--valid-src/--valid-tgt/--test-src/--test-tgt``).

Tokens: SentencePiece BPE (default, joint 8k vocabulary), unigram, or words
(:mod:`attnkit.tasks.subword`), trained on the training text in-process and stored in the
checkpoint's ``config.json``.

Models: ``--model transformer`` (:class:`attnkit.models.Transformer`) or ``--model seq2seq``
(:class:`attnkit.models.Seq2Seq`, RNN with Bahdanau or Luong attention).

Recipe: Adam (β = 0.9, 0.98) with linear warm-up then inverse-square-root decay, label-smoothed
cross-entropy, batches of about ``--batch-tokens`` (padded) tokens of sentences of similar
length, gradient clipping, per-epoch validation loss and BLEU (greedy), a checkpoint after every
epoch (``--out``, resumable with ``--resume``; a run cut by ``--max-seconds`` resumes at the start
of the interrupted epoch) and the best-BLEU weights in ``--out/best``, which the final test uses.

Metric: BLEU and chrF from sacreBLEU (Post 2018, https://aclanthology.org/W18-6319) on
detokenized output against the reference lines: with ``--raw`` the standard sacreBLEU (``13a``
tokenization, cased); on the ``tok/`` files the text is already tokenized and lowercased, so BLEU
uses ``tokenize="none"`` -- the "tokenized BLEU" most Multi30k papers report.
"""

from __future__ import annotations

from typing import Any

from .. import lazy_attribute
from .data import DEFAULT_DATA, read_lines, read_parallel, resolve_files, token_batches

# Imported on first use (they import the model and training code): name -> module of this package.
_LAZY = {"MODEL_NAMES": "recipe", "score": "recipe", "translate_ids": "recipe", "Multi30kTask": "task"}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)


__all__ = ["Multi30kTask", "read_lines", "read_parallel", "resolve_files", "token_batches", "translate_ids",
           "score", "DEFAULT_DATA", "MODEL_NAMES"]
