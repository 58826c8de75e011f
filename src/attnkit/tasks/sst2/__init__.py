"""SST-2 binary sentiment classification with attention, from scratch (no pretrained embeddings).

``attnkit train sst2 --data DIR`` reads the GLUE SST-2 files ``DIR/train.tsv`` and
``DIR/dev.tsv`` (a header ``sentence<TAB>label``, then one example per line, label 0 =
negative, 1 = positive; ``DIR/glue/`` is tried too, so the default ``../shared/data/sst2``
works). The GLUE train file holds the 6,920 training sentences *and* their labelled
sub-phrases (67,349 items), the usual "phrases + sentences" setting of Kim 2014.

Text is lowercased and split on whitespace (SST-2 is already PTB-tokenized); the vocabulary
is built from the training file (``--min-freq``). The default model is
:class:`~attnkit.models.AttentionClassifier` over tokens with a bidirectional GRU encoder and
HAN-style (``"mlp"``) attention pooling; ``--encoder transformer`` swaps in a Transformer
encoder. ``--model HierarchicalAttentionNetwork`` runs HAN with each item split into clauses
at ``, ; : --`` (SST-2 items are single sentences, so HAN's sentence level sees clauses).

SST-2's test labels are not public: the dev set (872 sentences) is evaluated after every epoch
and is the reported metric. The reported model is the last epoch's (no selection on dev).
"""

from __future__ import annotations

from typing import Any

from .. import lazy_attribute
from .data import encode_batch, read_sst2_tsv, resolve_data_dir, split_clauses, tokenize

# Imported on first use (it imports the model and training code): name -> module of this package.
_LAZY = {"Sst2Task": "task"}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)


__all__ = ["Sst2Task", "read_sst2_tsv", "tokenize", "split_clauses", "resolve_data_dir", "encode_batch"]
