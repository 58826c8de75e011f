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

import argparse
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import Checkpoint
from ..training import seed_everything
from .base import Task, TrainResult, positive_int, read_text_lines
from .classification import (COMMON_OPTIONS, Batch, accuracy, add_model_arguments, build_model_config, load_resume,
                             rebuild_model, train_classifier)
from .vocab import Vocab, batch_indices, pad_batch

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


SST2_MODELS = {
    "AttentionClassifier": dict(num_classes=2, input="tokens", dim=128, depth=1, num_heads=4, encoder="gru",
                                pooling="mlp", dropout=0.3, max_len=512, pad_id=0),
    "HierarchicalAttentionNetwork": dict(num_classes=2, embed_dim=200, word_hidden=100, sent_hidden=100,
                                         dropout=0.3, pad_id=0),
}


class Sst2Task(Task):
    """SST-2 sentiment (GLUE tsv files from --data), attention classifier trained from scratch."""

    name = "sst2"
    help = ("Binary sentiment on SST-2 (GLUE train.tsv/dev.tsv in --data) with an attention classifier trained "
            "from scratch (BiGRU + attention pooling by default); reports dev accuracy.")
    epochs, batch_size, lr, weight_decay, label_smoothing = 4, 64, 2e-3, 0.01, 0.0
    viz_args = '--text "a gripping, funny film"'

    def viz_command(self, checkpoint, config):
        # attnkit viz draws the AttentionClassifier (one pooling over words), not the HAN
        return super().viz_command(checkpoint, config) if config.get("model") == "AttentionClassifier" else None

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, sorted(SST2_MODELS), "AttentionClassifier")
        g = p.add_argument_group("sst2")
        g.add_argument("--data", default=DEFAULT_SST2,
                       help=f"folder with GLUE SST-2 train.tsv and dev.tsv, or a glue/ subfolder (default {DEFAULT_SST2})")
        g.add_argument("--min-freq", type=positive_int, default=2,
                       help="keep training words seen at least this often (default 2)")
        g.add_argument("--train-limit", type=positive_int, default=None, help="use only the first N training items")

    def _batches(self, data: dict, vocab: Vocab, batch_size: int, seed: int, hierarchical: bool):
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

    def train(self, args: argparse.Namespace) -> TrainResult:
        seed_everything(args.seed)
        resume = load_resume(self, args)
        d = resolve_data_dir(args.data)
        train = read_sst2_tsv(d / "train.tsv")
        dev = read_sst2_tsv(d / "dev.tsv")
        if resume is not None:
            cfg = resume.config
            name, model_config, tcfg = cfg["model"], cfg["model_config"], dict(cfg["data"])
            vocab = Vocab.from_json(cfg["vocab"])
        else:
            tcfg = {"seed": args.seed, "batch_size": args.batch_size or self.batch_size, "min_freq": args.min_freq,
                    "train_limit": args.train_limit}
            if args.min_freq < 1:
                raise ValueError(f"--min-freq must be >= 1; got {args.min_freq}")
            limited = train[0][: args.train_limit] if args.train_limit else train[0]
            vocab = Vocab.build(limited, min_freq=args.min_freq)
            opts = COMMON_OPTIONS if args.model == "AttentionClassifier" else {"dim": "embed_dim", "dropout": "dropout"}
            name, model_config = build_model_config(args, SST2_MODELS, {"vocab_size": len(vocab)}, opts)
        if tcfg.get("train_limit"):
            train = (train[0][: tcfg["train_limit"]], train[1][: tcfg["train_limit"]])
        tcfg["dir"] = str(d.resolve())
        longest = max(len(s) for s in train[0] + dev[0])
        if name == "AttentionClassifier" and longest > model_config["max_len"]:
            model_config["max_len"] = longest
        print(f"sst2: {len(train[1])} train items, {len(dev[1])} dev sentences from {tcfg['dir']}; "
              f"vocabulary {len(vocab)} words (min_freq {tcfg['min_freq']}); model {name}")
        batches = self._batches({"train": train, "dev": dev}, vocab, tcfg["batch_size"], tcfg["seed"],
                                name == "HierarchicalAttentionNetwork")
        return train_classifier(
            self, args, model_name=name, model_config=model_config, batches=batches,
            task_config={"data": tcfg, "vocab": vocab.to_json()}, resume=resume, epochs=self.epochs,
            lr=args.lr or self.lr, weight_decay=self.weight_decay if args.weight_decay is None else args.weight_decay,
            label_smoothing=self.label_smoothing if args.label_smoothing is None else args.label_smoothing,
            valid_split="dev", final_split="dev")

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        """Accuracy on ``--split`` (train/dev; ``test`` reads ``test.tsv`` if the folder has a
        labelled one, else dev) of ``--data`` (a folder, or one labelled .tsv file)."""
        cfg = checkpoint.config
        split = getattr(args, "split", None) or "dev"
        data = Path(getattr(args, "data", None) or cfg.get("data", {}).get("dir") or DEFAULT_SST2)
        if data.is_file():
            path, split = data, data.stem
        else:
            d = resolve_data_dir(data)
            if split not in ("train", "dev", "test"):
                raise ValueError(f"--split: sst2 has splits train, dev (and test if you have its labels); "
                                 f"got {split!r}")
            if split == "test" and not (d / "test.tsv").is_file():
                split = "dev"  # SST-2's test labels are not public; say which split was scored
            path = d / f"{split}.tsv"
        sents, labels = read_sst2_tsv(path)
        vocab = Vocab.from_json(cfg["vocab"])
        model = rebuild_model(checkpoint, getattr(args, "device", "cpu"))
        batches = self._batches({split: (sents, labels)}, vocab, 256, 0, cfg["model"] == "HierarchicalAttentionNetwork")
        acc, n = accuracy(model, batches(split, None), getattr(args, "device", "cpu"))
        return {f"{split} accuracy": acc, "examples": n}


__all__ = ["Sst2Task", "read_sst2_tsv", "tokenize", "split_clauses", "resolve_data_dir", "encode_batch"]
