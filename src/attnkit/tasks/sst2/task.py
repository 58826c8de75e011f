"""The sst2 task's command line: :class:`Sst2Task` (``attnkit train sst2``, its models' defaults
and ``attnkit eval``); training goes through the shared classifier recipe
(:func:`attnkit.tasks.classification.train_classifier`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...checkpoint import Checkpoint
from ...training import seed_everything
from ..args import positive_int
from ..base import TrainResult, load_resume
from ..classification import (COMMON_OPTIONS, ClassifierTask, accuracy, add_model_arguments, build_model_config,
                              rebuild_model)
from ..vocab import Vocab
from .data import DEFAULT_SST2, make_batches, read_sst2_tsv, resolve_data_dir

SST2_MODELS = {
    "AttentionClassifier": dict(num_classes=2, input="tokens", dim=128, depth=1, num_heads=4, encoder="gru",
                                pooling="mlp", dropout=0.3, max_len=512, pad_id=0),
    "HierarchicalAttentionNetwork": dict(num_classes=2, embed_dim=200, word_hidden=100, sent_hidden=100,
                                         dropout=0.3, pad_id=0),
}


class Sst2Task(ClassifierTask):
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
        batches = make_batches({"train": train, "dev": dev}, vocab, tcfg["batch_size"], tcfg["seed"],
                                name == "HierarchicalAttentionNetwork")
        return self.fit_classifier(
            args, model_name=name, model_config=model_config, batches=batches,
            task_config={"data": tcfg, "vocab": vocab.to_json()}, resume=resume, valid_split="dev", final_split="dev")

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
        batches = make_batches({split: (sents, labels)}, vocab, 256, 0, cfg["model"] == "HierarchicalAttentionNetwork")
        acc, n = accuracy(model, batches(split, None), getattr(args, "device", "cpu"))
        return {f"{split} accuracy": acc, "examples": n}
