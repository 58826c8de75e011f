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

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import models
from ..checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from ..models.transformer import Transformer, label_smoothed_cross_entropy
from ..training import fit, format_metrics, rng_state, seed_everything, set_rng_state
from .base import (Task, TrainResult, check_path, fraction, nonnegative_float, nonnegative_int, positive_float,
                   positive_int, read_text_lines, warn)
from .subword import KINDS, from_config, train_tokenizers
from .vocab import pad_batch

Tensor = torch.Tensor

__all__ = ["Multi30kTask", "read_lines", "read_parallel", "resolve_files", "token_batches", "translate_ids",
           "score", "DEFAULT_DATA", "MODEL_NAMES"]

DEFAULT_DATA = Path("..") / "shared" / "data" / "multi30k"
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test",
                 "test2016": "test", "test_2016_flickr": "test"}
MODEL_NAMES = {"transformer": "Transformer", "seq2seq": "Seq2Seq"}
WHERE = ("Multi30k comes from https://github.com/multi30k/dataset (data/task1/raw/*.gz and "
         "data/task1/tok/*.lc.norm.tok.*); give its folder with --data DIR, or give the files with "
         "--train-src/--train-tgt/--valid-src/--valid-tgt/--test-src/--test-tgt")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def read_lines(path: str | Path, option: str = "file") -> list[str]:
    """The lines of a UTF-8 text file, plain or gzipped (without their line ends).

    Raises ``ValueError`` naming ``option`` and the path when the file is missing, unreadable,
    not UTF-8 (with the line), or has no lines. Lines end at ``\\n`` (``\\r\\n`` too), so
    line ``i`` is what editors and ``wc -l`` call line ``i``.
    """
    p = check_path(option, path)
    lines = read_text_lines(p, f"{option}: {str(p)!r}")
    if not lines or all(not s.strip() for s in lines):
        raise ValueError(f"{option}: {str(p)!r} is empty (expected one sentence per line)")
    return lines


def read_parallel(src_path: str | Path, tgt_path: str | Path, split: str = "train") -> tuple[list[str], list[str]]:
    """Aligned source and target lines; ``ValueError`` when their line counts differ."""
    src = read_lines(src_path, f"--{split}-src")
    tgt = read_lines(tgt_path, f"--{split}-tgt")
    if len(src) != len(tgt):
        raise ValueError(f"{split} files are not parallel: source {str(src_path)!r} has {len(src)} lines but target "
                         f"{str(tgt_path)!r} has {len(tgt)} (line i of one must translate line i of the other)")
    return src, tgt


def _find(folder: Path, stem: str, lang: str, raw: bool) -> Path | None:
    if raw:
        names = [f"raw/{stem}.{lang}.gz", f"raw/{stem}.{lang}", f"{stem}.{lang}.gz", f"{stem}.{lang}"]
    else:
        names = [f"tok/{stem}.lc.norm.tok.{lang}", f"tok/{stem}.lc.norm.tok.{lang}.gz", f"{stem}.{lang}",
                 f"{stem}.{lang}.gz"]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def resolve_files(args: argparse.Namespace, splits: Sequence[str] = ("train", "valid", "test"),
                  required: Sequence[str] = ("train", "valid")) -> dict[str, tuple[Path, Path]]:
    """``{split: (source file, target file)}`` from ``--data/--src/--tgt/--raw`` and the explicit
    ``--{split}-src/--{split}-tgt`` options (which win). Splits in ``required`` must be found."""
    src, tgt = _get(args, "src", "en"), _get(args, "tgt", "de")
    raw = bool(_get(args, "raw", False))
    folder = _get(args, "data", None)
    folder = Path(folder) if folder is not None else DEFAULT_DATA
    out: dict[str, tuple[Path, Path]] = {}
    missing_folder = False
    for split in splits:
        explicit = (_get(args, f"{split}_src", None), _get(args, f"{split}_tgt", None))
        if (explicit[0] is None) != (explicit[1] is None):
            given = f"--{split}-src" if explicit[0] is not None else f"--{split}-tgt"
            other = f"--{split}-tgt" if explicit[0] is not None else f"--{split}-src"
            raise ValueError(f"{given} was given without {other}: give both files of the {split} split")
        if explicit[0] is not None:
            for opt, p in zip((f"--{split}-src", f"--{split}-tgt"), explicit):
                check_path(opt, p)
            out[split] = (Path(explicit[0]), Path(explicit[1]))
            continue
        if not folder.is_dir():
            missing_folder = True
            continue
        s, t = _find(folder, SPLITS[split], src, raw), _find(folder, SPLITS[split], tgt, raw)
        if s is not None and t is not None:
            out[split] = (s, t)
        elif split in required:
            layout = (f"raw/{SPLITS[split]}.{{{src},{tgt}}}.gz" if raw
                      else f"tok/{SPLITS[split]}.lc.norm.tok.{{{src},{tgt}}}")
            raise ValueError(f"--data: {str(folder)!r} has no {split} files for --src {src} --tgt {tgt} "
                             f"(looked for {layout}{'' if raw else ' (pass --raw for the raw/ files)'}). {WHERE}")
    for split in required:
        if split not in out:
            if missing_folder:
                raise ValueError(f"--data: no such folder {str(folder)!r} (resolved from {str(Path.cwd())!r}). {WHERE}")
            raise ValueError(f"no {split} files: {WHERE}")
    return out


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
def token_batches(src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int, *,
                  shuffle: bool, seed: int = 0, max_sentences: int | None = None) -> list[list[int]]:
    """Indices cut into batches of sentences of similar length, each holding at most
    ``max_tokens`` padded tokens (``n · max(longest source, longest target)``; a single longer
    pair still gets a batch of its own). With ``shuffle``, equal lengths are ordered at random
    and the batches are shuffled, both from ``seed``.

    Example::

        >>> token_batches([3, 3, 5, 9], [4, 2, 5, 9], max_tokens=10, shuffle=False)
        [[1, 0], [2], [3]]
    """
    import random

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1; got {max_tokens!r}")
    n = len(src_lengths)
    rng = random.Random(seed)
    noise = [rng.random() for _ in range(n)] if shuffle else [0.0] * n
    order = sorted(range(n), key=lambda i: (tgt_lengths[i], src_lengths[i], noise[i]))
    batches, cur, longest = [], [], 0
    for i in order:
        need = max(longest, src_lengths[i], tgt_lengths[i])
        if cur and (need * (len(cur) + 1) > max_tokens or (max_sentences and len(cur) >= max_sentences)):
            batches.append(cur)
            cur, need = [], max(src_lengths[i], tgt_lengths[i])
        cur.append(i)
        longest = need
    if cur:
        batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
    return batches


@dataclass
class Encoded:
    """A split as token ids: ``src[i]`` ends with EOS; ``tgt[i]`` is ``BOS … EOS``."""

    src: list[list[int]]
    tgt: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)


def encode_split(src_lines: Sequence[str], tgt_lines: Sequence[str], src_tok, tgt_tok) -> Encoded:
    src = [ids + [src_tok.eos_id] for ids in src_tok.encode_batch(src_lines)]
    tgt = [[tgt_tok.bos_id] + ids + [tgt_tok.eos_id] for ids in tgt_tok.encode_batch(tgt_lines)]
    return Encoded(src, tgt)


def make_batch(data: Encoded, idx: Sequence[int], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    src, src_len = pad_batch([data.src[i] for i in idx])
    tgt, _ = pad_batch([data.tgt[i] for i in idx])
    return {"src": src.to(device), "src_lengths": src_len.to(device), "tgt": tgt.to(device)}


# ---------------------------------------------------------------------------------------------
# One interface over both models
# ---------------------------------------------------------------------------------------------
def forward(model: torch.nn.Module, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
    """Teacher-forced logits ``(B, T, V)`` of either model."""
    if isinstance(model, Transformer):
        pad = torch.arange(src.shape[1], device=src.device) >= src_lengths.unsqueeze(1)
        return model(src, pad, tgt_in)
    return model(src, src_lengths, tgt_in)


def generate(model: torch.nn.Module, src: Tensor, src_lengths: Tensor, *, beam: int = 1, max_len: int = 50,
             length_penalty: float = 0.6) -> list[list[int]]:
    """Output ids (without BOS/EOS) of either model, greedy (``beam = 1``) or beam search."""
    model.eval()
    with torch.no_grad():
        if isinstance(model, Transformer):
            pad = torch.arange(src.shape[1], device=src.device) >= src_lengths.unsqueeze(1)
            if beam == 1:
                return model.greedy(src, pad, max_len=max_len)
            return model.beam_search(src, pad, beam=beam, max_len=max_len, length_penalty=length_penalty)
        if beam == 1:
            return model.greedy(src, src_lengths, max_len=max_len)[0]
        return model.beam_search(src, src_lengths, beam=beam, max_len=max_len, length_penalty=length_penalty)[0]


def translate_ids(model: torch.nn.Module, sources: Sequence[Sequence[int]], *, beam: int = 1,
                  max_len_a: float = 1.5, max_len_b: int = 10, length_penalty: float = 0.6,
                  batch_tokens: int = 6000, device: str | torch.device = "cpu") -> list[list[int]]:
    """Translate tokenized sources (each ending with EOS), batched by length; outputs are in the
    input order. At most ``max_len_a · S + max_len_b`` tokens are generated for a batch whose
    longest source has ``S`` tokens."""
    lengths = [len(s) for s in sources]
    out: list[list[int]] = [[] for _ in sources]
    budget = max(1, batch_tokens // max(1, beam))
    for idx in token_batches(lengths, lengths, budget, shuffle=False):
        src, src_len = pad_batch([sources[i] for i in idx])
        max_len = int(max_len_a * src.shape[1] + max_len_b)
        for i, ids in zip(idx, generate(model, src.to(device), src_len.to(device), beam=beam, max_len=max_len,
                                        length_penalty=length_penalty)):
            out[i] = ids
    return out


def score(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a") -> dict[str, Any]:
    """Corpus BLEU and chrF (sacreBLEU) of detokenized ``hypotheses`` against ``references``.

    Example::

        >>> r = score(["a small cat sat on the mat ."], ["a small cat sat on the mat ."])
        >>> round(r["bleu"], 1), round(r["chrf"], 1)
        (100.0, 100.0)
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses and references must have the same length; got {len(hypotheses)} "
                         f"and {len(references)}")
    bleu_metric, chrf_metric = BLEU(tokenize=tokenize), CHRF()
    bleu = bleu_metric.corpus_score(list(hypotheses), [list(references)])
    chrf = chrf_metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(bleu.score), "chrf": float(chrf.score), "bleu_signature": str(bleu_metric.get_signature()),
            "bleu_detail": str(bleu),
            "sentences": len(hypotheses)}


# ---------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------
def _get(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, default)
    return default if v is None else v


DEFAULTS = {
    "transformer": dict(lr=7e-4, warmup=300, dropout=0.1, epochs=30),
    "seq2seq": dict(lr=1e-3, warmup=300, dropout=0.3, epochs=20),
}


def inverse_sqrt(warmup: int) -> Callable[[int], float]:
    """LR factor of update ``step`` (0-based): linear warm-up to 1 over ``warmup`` updates, then
    ``sqrt(warmup / step)`` (Vaswani et al. 2017, with the peak as the learning rate)."""
    def f(step: int) -> float:
        s = step + 1
        return min(s / warmup, math.sqrt(warmup / s)) if warmup > 0 else 1.0 / math.sqrt(s)
    return f


def build_model(args: argparse.Namespace, src_vocab: int, tgt_vocab: int, joint: bool) -> torch.nn.Module:
    kind = args.model
    if kind == "transformer":
        tie = _get(args, "tie", None) or ("all" if joint else "decoder")
        return Transformer(src_vocab, tgt_vocab, d_model=args.d_model, num_heads=args.heads,
                           num_encoder_layers=args.encoder_layers, num_decoder_layers=args.decoder_layers,
                           dim_feedforward=args.ff, dropout=args.dropout, norm_first=args.norm == "pre",
                           tie_embeddings=tie, positions=args.positions, num_kv_heads=args.kv_heads,
                           max_len=args.max_positions)
    cls = models.get("Seq2Seq")
    return cls(src_vocab, tgt_vocab, emb_dim=args.emb_dim, hidden_dim=args.hidden_dim, rnn=args.rnn,
               attention=args.attention, input_feeding=args.input_feeding, num_layers=args.rnn_layers,
               dropout=args.dropout)


def _check_model_name(args: argparse.Namespace) -> str:
    name = _get(args, "model", "transformer")
    if name not in MODEL_NAMES:
        raise ValueError(f"--model: unknown model {name!r}; valid names: {', '.join(repr(k) for k in MODEL_NAMES)}")
    return name


def _rebuild(ckpt: Checkpoint):
    cfg = ckpt.config
    for key in ("model", "model_config", "src_tokenizer"):
        if key not in cfg:
            raise ValueError(f"checkpoint {str(ckpt.path)!r}: config.json has no {key!r} (not a translation checkpoint)")
    model = models.get(cfg["model"])(**cfg["model_config"])
    load_weights(model, ckpt)
    src_tok = from_config(cfg["src_tokenizer"])
    tgt_tok = src_tok if cfg.get("joint", False) else from_config(cfg["tgt_tokenizer"])
    return model, src_tok, tgt_tok


class Multi30kTask(Task):
    """Translation on Multi30k (or any parallel text files); see the module docstring."""

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
        kind = _check_model_name(args)
        args.model = kind
        for k, v in DEFAULTS[kind].items():
            if _get(args, k, None) is None:
                setattr(args, k, v)
        log = _logger(args)
        seed = int(_get(args, "seed", 0))
        seed_everything(seed)
        device = _get(args, "device", "cpu")
        out = Path(_get(args, "out", "attnkit-multi30k"))
        t_start = time.perf_counter()

        resume = None
        if _get(args, "resume", False):
            resume = load_checkpoint(out, with_trainer=True)
            if resume.config.get("task") != self.name:
                raise ValueError(f"--resume: checkpoint {str(out)!r} is for task {resume.config.get('task')!r}, "
                                 f"not {self.name!r}")

        files = resolve_files(args)
        text = {s: read_parallel(*files[s], split=s) for s in files}
        train_src, train_tgt = text["train"]
        if _get(args, "max_train", 0) > 0:
            train_src, train_tgt = train_src[: args.max_train], train_tgt[: args.max_train]

        if resume is not None:
            model, src_tok, tgt_tok = _rebuild(resume)
            cfg = resume.config
            joint = bool(cfg.get("joint", False))
            log(f"resuming {cfg['model']} from {out} at epoch {resume.trainer_state['next_epoch'] + 1}")
        else:
            joint = bool(_get(args, "joint", True))
            t0 = time.perf_counter()
            src_tok, tgt_tok = train_tokenizers(train_src, train_tgt, kind=args.tokenizer, vocab_size=args.vocab_size,
                                                joint=joint, lowercase=_get(args, "lowercase", False))
            log(f"tokenizer: {args.tokenizer}, {'joint ' if joint else ''}vocabulary {len(src_tok)}"
                f"{'' if joint else f' / {len(tgt_tok)}'} ({time.perf_counter() - t0:.1f}s)")
            model = build_model(args, len(src_tok), len(tgt_tok), joint)
            cfg = {
                "task": self.name, "model": MODEL_NAMES[kind], "model_config": model.config, "joint": joint,
                "src_tokenizer": src_tok.to_config(),
                "data": {"dir": str(_get(args, "data", DEFAULT_DATA)), "src": args.src, "tgt": args.tgt,
                         "raw": bool(args.raw), "files": {s: [str(a.resolve()), str(b.resolve())] for s, (a, b) in files.items()}},
                "recipe": {k: _get(args, k, None) for k in (
                    "tokenizer", "vocab_size", "batch_tokens", "lr", "warmup", "label_smoothing", "grad_clip",
                    "dropout", "seed", "max_train", "beam", "length_penalty")},
            }
            if not joint:
                cfg["tgt_tokenizer"] = tgt_tok.to_config()
        cfg["bleu_tokenize"] = "13a" if cfg["data"]["raw"] else "none"
        model.to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {cfg['model']} {n_params / 1e6:.2f}M parameters; "
            + ", ".join(f"{k}={v}" for k, v in cfg["model_config"].items()))

        train = encode_split(train_src, train_tgt, src_tok, tgt_tok)
        limit = int(cfg["model_config"].get("max_len", args.max_positions))
        keep = [i for i in range(len(train)) if len(train.src[i]) <= limit and len(train.tgt[i]) <= limit
                and len(train.src[i]) > 1 and len(train.tgt[i]) > 2]
        if len(keep) < len(train):
            log(f"skipping {len(train) - len(keep)} training pairs that are empty or longer than {limit} tokens")
            train = Encoded([train.src[i] for i in keep], [train.tgt[i] for i in keep])
        if not len(train):
            raise ValueError("no training pairs left after removing empty and too long sentences")
        valid_src, valid_tgt = text["valid"]
        nv = _get(args, "valid_sentences", 0)
        if nv and nv > 0:
            valid_src, valid_tgt = valid_src[:nv], valid_tgt[:nv]
        valid = encode_split(valid_src, valid_tgt, src_tok, tgt_tok)
        src_lens = [len(s) for s in train.src]
        tgt_lens = [len(t) - 1 for t in train.tgt]
        n_tokens = sum(tgt_lens)
        log(f"data: {len(train)} training pairs ({n_tokens} target tokens), {len(valid)} validation pairs; "
            f"files {', '.join(f'{s}: {a.name}/{b.name}' for s, (a, b) in files.items())}")

        pad = tgt_tok.pad_id
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt(args.warmup))
        history: list[dict[str, Any]] = []
        best = {"bleu": -1.0, "epoch": -1}
        start_epoch = 0
        if resume is not None:
            st = resume.trainer_state
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"])
            history, best, start_epoch = list(st["history"]), dict(st["best"]), int(st["next_epoch"])
        epochs = int(_get(args, "epochs", DEFAULTS[kind]["epochs"]))
        decode_kw = dict(max_len_a=1.5, max_len_b=10, length_penalty=float(args.length_penalty),
                         batch_tokens=6000, device=device)
        cfg["decode"] = {k: v for k, v in decode_kw.items() if k != "device"}
        tokenize = cfg["bleu_tokenize"]

        def batches(epoch: int):
            return token_batches(src_lens, tgt_lens, args.batch_tokens, shuffle=True, seed=seed * 1000 + epoch)

        def step(idx: list[int]) -> Tensor:
            b = make_batch(train, idx, device)
            tgt = b["tgt"]
            logits = forward(model, b["src"], b["src_lengths"], tgt[:, :-1])
            return label_smoothed_cross_entropy(logits, tgt[:, 1:], label_smoothing=args.label_smoothing,
                                                ignore_index=pad)

        def evaluate(epoch: int) -> dict[str, float]:
            total, count = 0.0, 0
            for idx in token_batches([len(s) for s in valid.src], [len(t) - 1 for t in valid.tgt], 8000,
                                     shuffle=False):
                b = make_batch(valid, idx, device)
                logits = forward(model, b["src"], b["src_lengths"], b["tgt"][:, :-1])
                total += label_smoothed_cross_entropy(logits, b["tgt"][:, 1:], ignore_index=pad,
                                                      reduction="sum").item()
                count += int((b["tgt"][:, 1:] != pad).sum())
            t0 = time.perf_counter()
            hyps = [tgt_tok.decode(ids) for ids in translate_ids(model, valid.src, beam=1, **decode_kw)]
            s = score(hyps, valid_tgt, tokenize=tokenize)
            return {"valid_loss": total / max(count, 1), "valid_ppl": math.exp(min(total / max(count, 1), 50)),
                    "valid_bleu": s["bleu"], "valid_chrf": s["chrf"], "decode_s": time.perf_counter() - t0}

        epoch_clock = {"t": time.perf_counter()}

        def on_epoch_end(epoch: int, hist) -> None:
            now = time.perf_counter()
            metrics = hist.metrics[-1]
            partial = hist.stopped == "time"
            rec = {"epoch": epoch + 1, "loss": hist.losses[-1], **metrics, "seconds": now - epoch_clock["t"],
                   "lr": optimizer.param_groups[0]["lr"], "updates": int(scheduler.last_epoch), "partial": partial}
            epoch_clock["t"] = now
            history.append(rec)
            cfg["history"] = history
            improved = metrics.get("valid_bleu", -1.0) > best["bleu"]
            if improved:
                best.update(bleu=metrics["valid_bleu"], epoch=epoch + 1)
            cfg["best"] = dict(best)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                     "history": history, "best": dict(best), "next_epoch": epoch if partial else epoch + 1}
            save_checkpoint(out, model=model, config=cfg, trainer_state=state)
            if improved:
                save_checkpoint(out / "best", model=model, config=cfg)
            log(f"epoch {epoch + 1}: {rec['seconds']:.0f}s (decoding {metrics.get('decode_s', 0):.0f}s), "
                f"{rec['updates']} updates, lr {rec['lr']:.2e}{' (stopped early: --max-seconds)' if partial else ''}"
                f"{'  * best valid BLEU' if improved else ''}")

        hist = fit(model, optimizer, batches, step, epochs=epochs, start_epoch=start_epoch,
                   max_seconds=_get(args, "max_seconds", None), grad_clip=args.grad_clip or None,
                   scheduler=scheduler, evaluate=evaluate, on_epoch_end=on_epoch_end,
                   progress=bool(_get(args, "progress", True)), desc=f"{self.name} {kind}", log=log)

        # -- final test with the best weights ---------------------------------------------------
        best_dir = out / "best" if (out / "best").is_dir() else out
        if not (best_dir / "model.safetensors").is_file():
            raise ValueError(f"training ran no epoch (start epoch {start_epoch + 1} > --epochs {epochs}), so there is "
                             f"no checkpoint in {str(out)!r} to test")
        best_ck = load_checkpoint(best_dir)
        load_weights(model, best_ck)
        model.to(device)
        result_metrics: dict[str, Any] = {}
        beam = int(_get(args, "beam", 1))
        split = "test" if "test" in text else "valid"
        srcs, refs = text[split]
        t0 = time.perf_counter()
        enc = [ids + [src_tok.eos_id] for ids in src_tok.encode_batch(srcs)]
        hyps = [tgt_tok.decode(ids) for ids in translate_ids(model, enc, beam=beam, **decode_kw)]
        s = score(hyps, refs, tokenize=tokenize)
        dec_s = time.perf_counter() - t0
        result_metrics = {f"{split}_bleu": s["bleu"], f"{split}_chrf": s["chrf"], "beam": beam,
                          "bleu_signature": s["bleu_signature"], "best_epoch": best["epoch"], "decode_s": dec_s}
        best_ck.config["metrics"] = result_metrics
        save_checkpoint(best_dir, model=model, config=best_ck.config)
        for src_line, hyp, ref in list(zip(srcs, hyps, refs))[:3]:
            log(f"  src: {src_line}\n  out: {hyp}\n  ref: {ref}")
        seconds = time.perf_counter() - t_start
        what = "test2016" if split == "test" and not _get(args, "test_src", None) else split
        summary = format_metrics(  # the format attnkit eval prints
            {f"{what}_bleu": s["bleu"], f"{what}_chrf": s["chrf"], "sentences": len(hyps), "beam": beam},
            notes=[f"{'detokenized, cased' if tokenize == '13a' else 'tokenized'} sacreBLEU",
                   f"best valid BLEU {best['bleu']:.2f} at epoch {best['epoch']}", f"checkpoint {best_dir}"])
        return TrainResult(metric=f"{split}_bleu", value=s["bleu"], summary=summary, checkpoint=best_dir,
                           seconds=seconds, extra={"history": history, "metrics": result_metrics,
                                                   "stopped": hist.stopped, "hypotheses": hyps})

    # -- evaluation / translation ---------------------------------------------------------------------
    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        """BLEU/chrF of ``checkpoint`` on ``args.split`` (test, valid or train) of ``args.data``
        (default: the files the model was trained with), decoded with ``args.beam``."""
        model, src_tok, tgt_tok = _rebuild(checkpoint)
        device = _get(args, "device", "cpu")
        model.to(device)
        split_name = str(_get(args, "split", "test"))
        if split_name not in SPLIT_ALIASES:
            raise ValueError(f"--split: unknown split {split_name!r}; valid names: "
                             f"{', '.join(repr(k) for k in sorted(SPLIT_ALIASES))}")
        split = SPLIT_ALIASES[split_name]
        data = checkpoint.config.get("data", {})
        if _get(args, "data", None) is not None:
            ns = argparse.Namespace(data=args.data, src=data.get("src", "en"), tgt=data.get("tgt", "de"),
                                    raw=data.get("raw", False))
            files = resolve_files(ns, splits=(split,), required=(split,))
        elif split in data.get("files", {}):
            files = {split: tuple(Path(p) for p in data["files"][split])}
        else:
            raise ValueError(f"--split {split_name}: the checkpoint was trained without {split} files; "
                             "give a data folder with --data")
        srcs, refs = read_parallel(*files[split], split=split)
        beam = int(_get(args, "beam", 1))
        dk = checkpoint.config.get("decode", {})
        enc = [ids + [src_tok.eos_id] for ids in src_tok.encode_batch(srcs)]
        hyps = [tgt_tok.decode(ids) for ids in translate_ids(
            model, enc, beam=beam, max_len_a=dk.get("max_len_a", 1.5), max_len_b=dk.get("max_len_b", 10),
            length_penalty=float(_get(args, "length_penalty", dk.get("length_penalty", 0.6))), device=device)]
        s = score(hyps, refs, tokenize=checkpoint.config.get("bleu_tokenize", "13a"))
        return {f"{split}_bleu": s["bleu"], f"{split}_chrf": s["chrf"], "sentences": len(hyps), "beam": beam,
                "signature": s["bleu_signature"]}

    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        """Translate ``lines`` (raw sentences for a ``--raw`` model; lowercased, tokenized text for a
        ``tok/`` model): one output per line, in order. Empty lines give empty outputs; a line of more
        tokens than the model was trained on (``--max-positions``, default 256) is cut to them, with a
        warning on stderr naming the line."""
        model, src_tok, tgt_tok = _rebuild(checkpoint)
        device = _get(args, "device", "cpu")
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
        outs = translate_ids(model, enc, beam=int(_get(args, "beam", 1)), max_len_a=dk.get("max_len_a", 1.5),
                             max_len_b=dk.get("max_len_b", 10),
                             length_penalty=float(_get(args, "length_penalty", dk.get("length_penalty", 0.6))),
                             device=device)
        result = [""] * len(lines)
        for i, ids in zip(keep, outs):
            result[i] = tgt_tok.decode(ids)
        return result


def _logger(args: argparse.Namespace) -> Callable[[str], None]:
    quiet = bool(_get(args, "quiet", False))

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stdout, flush=True)
    return log
