"""The multi30k task's command line: :class:`Multi30kTask` (``attnkit train multi30k`` and its
options, ``attnkit eval`` and ``attnkit translate`` of its checkpoints).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...checkpoint import Checkpoint
from ..args import fraction, nonnegative_float, nonnegative_int, option, positive_float, positive_int
from ..base import Task, TrainResult
from ..io import warn
from ..subword import KINDS
from .data import DEFAULT_DATA, SPLIT_ALIASES, read_parallel, resolve_files
from .recipe import MODEL_NAMES, rebuild, run_training, score, translate_ids


class Multi30kTask(Task):
    """Translation on Multi30k (or any parallel text files); see the package docstring
    (:mod:`attnkit.tasks.multi30k`)."""

    name = "multi30k"
    help = ("Translate Multi30k En->De (or any plain parallel text) with a Transformer or an attention RNN; "
            "BLEU/chrF with sacreBLEU.")
    translates = True
    writes = ("the last epoch's checkpoint (model.safetensors, config.json, trainer.json + trainer.safetensors for "
              "--resume, checkpoint.json) and best/: the checkpoint of the best validation BLEU, the one tested at "
              "the end (give it to eval, translate, viz); no pictures (attnkit viz OUT/best draws them)")
    viz_args = '--text "A dog runs in the park."'

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        d = p.add_argument_group("data")
        d.add_argument("--data", default=None,
                       help=f"Multi30k folder with raw/ and tok/ (default {DEFAULT_DATA}, relative to the current folder)")
        d.add_argument("--src", default="en", help="source language suffix (default en)")
        d.add_argument("--tgt", default="de", help="target language suffix (default de)")
        d.add_argument("--raw", action="store_true",
                       help="use raw/ (cased, untokenized; detokenized sacreBLEU) instead of tok/ (lowercased, tokenized)")
        for split in ("train", "valid", "test"):
            for side in ("src", "tgt"):
                d.add_argument(f"--{split}-{side}", default=None, help=f"{split} {side} file (overrides --data)")
        d.add_argument("--max-train", type=nonnegative_int, default=0,
                       help="use only the first N training pairs (0: all)")
        d.add_argument("--tokenizer", default="bpe", choices=KINDS, help="bpe (default), unigram or word")
        d.add_argument("--vocab-size", type=positive_int, default=8000, help="subword vocabulary size (default 8000)")
        d.add_argument("--separate-vocab", dest="joint", action="store_false",
                       help="one tokenizer per language (default: one joint tokenizer)")
        d.add_argument("--lowercase", action="store_true", help="word tokenizer: lowercase the text")

        m = p.add_argument_group("model")
        m.add_argument("--model", default="transformer", choices=sorted(MODEL_NAMES), help="transformer or seq2seq")
        m.add_argument("--d-model", type=positive_int, default=256, help="Transformer width (default 256)")
        m.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
        m.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (grouped-query attention)")
        m.add_argument("--encoder-layers", type=positive_int, default=3)
        m.add_argument("--decoder-layers", type=positive_int, default=3)
        m.add_argument("--ff", type=positive_int, default=1024, help="feed-forward size (default 1024)")
        m.add_argument("--norm", default="pre", choices=["pre", "post"], help="pre-norm (default) or post-norm")
        m.add_argument("--positions", default="sinusoidal", choices=["sinusoidal", "learned", "rope"])
        m.add_argument("--tie", default=None, choices=["none", "decoder", "all"],
                       help="embedding tying (default: all with a joint vocabulary, else decoder)")
        m.add_argument("--max-positions", type=positive_int, default=256,
                       help="longest sentence in tokens (longer training pairs are skipped)")
        m.add_argument("--emb-dim", type=positive_int, default=256, help="Seq2Seq embedding size")
        m.add_argument("--hidden-dim", type=positive_int, default=512, help="Seq2Seq hidden size")
        m.add_argument("--rnn", default="gru", choices=["gru", "lstm"], help="Seq2Seq RNN")
        m.add_argument("--attention", default="bahdanau",
                       choices=["bahdanau", "luong-dot", "luong-general", "luong-concat"], help="Seq2Seq attention")
        m.add_argument("--no-input-feeding", dest="input_feeding", action="store_false",
                       help="Seq2Seq (Luong): no input feeding")
        m.add_argument("--rnn-layers", type=positive_int, default=1, help="Seq2Seq RNN layers")
        m.add_argument("--dropout", type=fraction, default=None, help="dropout (default 0.1 transformer, 0.3 seq2seq)")

        t = p.add_argument_group("recipe")
        t.add_argument("--context-parallel", action="store_true",
                       help="under torchrun, Transformer only: split every sentence over the ranks (ring attention) "
                            "instead of splitting the batches")
        t.add_argument("--batch-tokens", type=positive_int, default=2048, help="padded tokens per batch (default 2048)")
        t.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default 7e-4 / 1e-3)")
        t.add_argument("--warmup", type=nonnegative_int, default=None, help="warm-up updates (default 300)")
        t.add_argument("--label-smoothing", type=fraction, default=0.1)
        t.add_argument("--grad-clip", type=nonnegative_float, default=1.0)
        t.add_argument("--valid-sentences", type=nonnegative_int, default=0,
                       help="validation BLEU on the first N sentences (0: all)")
        t.add_argument("--beam", type=positive_int, default=1, help="beam size of the final test decoding (1: greedy)")
        t.add_argument("--length-penalty", type=nonnegative_float, default=0.6,
                       help="GNMT length penalty alpha for beam search")

    # -- training ---------------------------------------------------------------------------------
    def train(self, args: argparse.Namespace) -> TrainResult:
        return run_training(self, args)

    # -- evaluation / translation ---------------------------------------------------------------------
    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        """BLEU/chrF of ``checkpoint`` on ``args.split`` (test, valid or train) of ``args.data``
        (default: the files the model was trained with), decoded with ``args.beam``."""
        model, src_tok, tgt_tok = rebuild(checkpoint)
        device = option(args, "device", "cpu")
        model.to(device)
        split_name = str(option(args, "split", "test"))
        if split_name not in SPLIT_ALIASES:
            raise ValueError(f"--split: unknown split {split_name!r}; valid names: "
                             f"{', '.join(repr(k) for k in sorted(SPLIT_ALIASES))}")
        split = SPLIT_ALIASES[split_name]
        data = checkpoint.config.get("data", {})
        if option(args, "data", None) is not None:
            ns = argparse.Namespace(data=args.data, src=data.get("src", "en"), tgt=data.get("tgt", "de"),
                                    raw=data.get("raw", False))
            files = resolve_files(ns, splits=(split,), required=(split,))
        elif split in data.get("files", {}):
            files = {split: tuple(Path(p) for p in data["files"][split])}
        else:
            raise ValueError(f"--split {split_name}: the checkpoint was trained without {split} files; "
                             "give a data folder with --data")
        srcs, refs = read_parallel(*files[split], split=split)
        beam = int(option(args, "beam", 1))
        dk = checkpoint.config.get("decode", {})
        enc = [ids + [src_tok.eos_id] for ids in src_tok.encode_batch(srcs)]
        hyps = [tgt_tok.decode(ids) for ids in translate_ids(
            model, enc, beam=beam, max_len_a=dk.get("max_len_a", 1.5), max_len_b=dk.get("max_len_b", 10),
            length_penalty=float(option(args, "length_penalty", dk.get("length_penalty", 0.6))), device=device)]
        s = score(hyps, refs, tokenize=checkpoint.config.get("bleu_tokenize", "13a"))
        return {f"{split}_bleu": s["bleu"], f"{split}_chrf": s["chrf"], "sentences": len(hyps), "beam": beam,
                "signature": s["bleu_signature"]}

    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        """Translate ``lines`` (raw sentences for a ``--raw`` model; lowercased, tokenized text for a
        ``tok/`` model): one output per line, in order. Empty lines give empty outputs; a line of more
        tokens than the model was trained on (``--max-positions``, default 256) is cut to them, with a
        warning on stderr naming the line."""
        model, src_tok, tgt_tok = rebuild(checkpoint)
        device = option(args, "device", "cpu")
        model.to(device)
        dk = checkpoint.config.get("decode", {})
        limit = int(checkpoint.config["model_config"].get("max_len", 256)) - 1  # the source's EOS is one
        keep = [i for i, s in enumerate(lines) if s.strip()]
        enc = []
        for i in keep:
            ids = src_tok.encode(lines[i])
            if len(ids) > limit:
                warn(f"input line {i + 1} has {len(ids)} tokens; the model reads at most {limit}, so only "
                     "the first ones are translated")
                ids = ids[:limit]
            enc.append(ids + [src_tok.eos_id])
        outs = translate_ids(model, enc, beam=int(option(args, "beam", 1)), max_len_a=dk.get("max_len_a", 1.5),
                             max_len_b=dk.get("max_len_b", 10),
                             length_penalty=float(option(args, "length_penalty", dk.get("length_penalty", 0.6))),
                             device=device)
        result = [""] * len(lines)
        for i, ids in zip(keep, outs):
            result[i] = tgt_tok.decode(ids)
        return result
