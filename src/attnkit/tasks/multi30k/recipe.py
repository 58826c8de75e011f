"""The multi30k task's recipe: the model (:func:`build_model`: Transformer or Seq2Seq, one interface
over both in :func:`forward` and :func:`generate`), the training run (:func:`run_training`: Adam
with :func:`inverse_sqrt` warm-up, label smoothing, per-epoch validation loss and BLEU, the
best-BLEU checkpoint tested at the end), batched decoding (:func:`translate_ids`), the metric
(:func:`score`: sacreBLEU's BLEU and chrF) and the model rebuilt from a checkpoint (:func:`rebuild`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ... import models
from ...checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from ...models.transformer import Transformer, label_smoothed_cross_entropy
from ...training import fit, format_metrics, rng_state, seed_everything, set_rng_state
from ..args import option
from ..base import Task, TrainResult, load_resume
from ..subword import from_config, train_tokenizers
from ..vocab import pad_batch
from .data import DEFAULT_DATA, Encoded, encode_split, make_batch, read_parallel, resolve_files, token_batches

Tensor = torch.Tensor

MODEL_NAMES = {"transformer": "Transformer", "seq2seq": "Seq2Seq"}


# ---------------------------------------------------------------------------------------------
# One interface over both models
# ---------------------------------------------------------------------------------------------
def forward(model: torch.nn.Module, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
    """Teacher-forced logits ``(B, T, V)`` of either model."""
    if isinstance(model, Transformer):
        pad = torch.arange(src.shape[1], device=src.device) >= src_lengths.unsqueeze(1)
        return model(src, pad, tgt_in)
    return model(src, src_lengths, tgt_in)


def _context_parallel(model: torch.nn.Module, args, log) -> bool:
    """``--context-parallel``: split every sentence over the ranks (Transformer, several ranks)."""
    from ...distributed import data_parallel as dp

    if not getattr(args, "context_parallel", False):
        return False
    if not isinstance(model, Transformer):
        raise ValueError("--context-parallel splits the Transformer's sentences over the ranks; use --model transformer")
    if not dp.active():
        raise ValueError("--context-parallel needs several processes: run under torchrun --nproc-per-node N")
    model.set_context_parallel(True, "zigzag")
    log(f"context parallel: every sentence split over {dp.dist.get_world_size()} ranks (zigzag)")
    return True


def _context_parallel_step(model, train, args, src_pad: int, pad: int, device):
    """The training step on this rank's shard of every sentence: ``(loss, its target tokens)``."""
    import torch.distributed as dist

    from ...distributed import shard

    multiple = 2 * dist.get_world_size()  # zigzag: 2R chunks

    def padded(x: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, -x.shape[1] % multiple), value=value)

    def step(idx: list[int]) -> tuple[Tensor, Tensor]:
        b = make_batch(train, idx, device)
        src, tgt = padded(b["src"], src_pad), b["tgt"]
        tgt_in, tgt_out = padded(tgt[:, :-1], pad), padded(tgt[:, 1:], pad)
        src_padding = torch.arange(src.shape[1], device=src.device) >= b["src_lengths"].unsqueeze(1)
        part = [shard(x, "zigzag", dim=1) for x in (src, src_padding, tgt_in, tgt_out)]
        logits = model(part[0], part[1], part[2])
        n = (part[3] != pad).sum()
        if not int(n):  # no target token in this shard: a zero loss that still runs the ring's backward
            return logits.sum() * 0.0, n
        return label_smoothed_cross_entropy(logits, part[3], label_smoothing=args.label_smoothing,
                                            ignore_index=pad), n

    return step


@contextlib.contextmanager
def _one_process(model):
    """Evaluate (decode) with the model's context parallelism off, then put it back."""
    group = getattr(model, "context_parallel", None)
    if group is not None:
        model.set_context_parallel(None)
    try:
        yield
    finally:
        if group is not None:
            model.set_context_parallel(group, model.cp_layout)


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
        tie = option(args, "tie", None) or ("all" if joint else "decoder")
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
    name = option(args, "model", "transformer")
    if name not in MODEL_NAMES:
        raise ValueError(f"--model: unknown model {name!r}; valid names: {', '.join(repr(k) for k in MODEL_NAMES)}")
    return name


def rebuild(ckpt: Checkpoint):
    cfg = ckpt.require(("model", "model_config", "src_tokenizer"), "translation")
    model = models.get(cfg["model"])(**cfg["model_config"])
    load_weights(model, ckpt)
    src_tok = from_config(cfg["src_tokenizer"])
    tgt_tok = src_tok if cfg.get("joint", False) else from_config(cfg["tgt_tokenizer"])
    return model, src_tok, tgt_tok


def _logger(args: argparse.Namespace) -> Callable[[str], None]:
    quiet = bool(option(args, "quiet", False))

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stdout, flush=True)
    return log


def run_training(task: Task, args: argparse.Namespace) -> TrainResult:
    """Train ``task``'s model as ``args`` say (``attnkit train multi30k``; see the package docstring),
    then test the best-BLEU weights."""
    kind = _check_model_name(args)
    args.model = kind
    for k, v in DEFAULTS[kind].items():
        if option(args, k, None) is None:
            setattr(args, k, v)
    log = _logger(args)
    seed = int(option(args, "seed", 0))
    seed_everything(seed)
    device = option(args, "device", "cpu")
    out = Path(option(args, "out", "attnkit-multi30k"))
    t_start = time.perf_counter()

    resume = load_resume(task, args, out)

    files = resolve_files(args)
    text = {s: read_parallel(*files[s], split=s) for s in files}
    train_src, train_tgt = text["train"]
    if option(args, "max_train", 0) > 0:
        train_src, train_tgt = train_src[: args.max_train], train_tgt[: args.max_train]

    if resume is not None:
        model, src_tok, tgt_tok = rebuild(resume)
        cfg = resume.config
        joint = bool(cfg.get("joint", False))
        log(f"resuming {cfg['model']} from {out} at epoch {resume.trainer_state['next_epoch'] + 1}")
    else:
        joint = bool(option(args, "joint", True))
        t0 = time.perf_counter()
        src_tok, tgt_tok = train_tokenizers(train_src, train_tgt, kind=args.tokenizer, vocab_size=args.vocab_size,
                                            joint=joint, lowercase=option(args, "lowercase", False))
        log(f"tokenizer: {args.tokenizer}, {'joint ' if joint else ''}vocabulary {len(src_tok)}"
            f"{'' if joint else f' / {len(tgt_tok)}'} ({time.perf_counter() - t0:.1f}s)")
        model = build_model(args, len(src_tok), len(tgt_tok), joint)
        cfg = {
            "task": task.name, "model": MODEL_NAMES[kind], "model_config": model.config, "joint": joint,
            "src_tokenizer": src_tok.to_config(),
            "data": {"dir": str(option(args, "data", DEFAULT_DATA)), "src": args.src, "tgt": args.tgt,
                     "raw": bool(args.raw), "files": {s: [str(a.resolve()), str(b.resolve())] for s, (a, b) in files.items()}},
            "recipe": {k: option(args, k, None) for k in (
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
    nv = option(args, "valid_sentences", 0)
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
    epochs = int(option(args, "epochs", DEFAULTS[kind]["epochs"]))
    decode_kw = dict(max_len_a=1.5, max_len_b=10, length_penalty=float(args.length_penalty),
                     batch_tokens=6000, device=device)
    cfg["decode"] = {k: v for k, v in decode_kw.items() if k != "device"}
    tokenize = cfg["bleu_tokenize"]

    def batches(epoch: int):
        return token_batches(src_lens, tgt_lens, args.batch_tokens, shuffle=True, seed=seed * 1000 + epoch)

    def step(idx: list[int]) -> tuple[Tensor, Tensor]:
        b = make_batch(train, idx, device)
        tgt = b["tgt"]
        logits = forward(model, b["src"], b["src_lengths"], tgt[:, :-1])
        loss = label_smoothed_cross_entropy(logits, tgt[:, 1:], label_smoothing=args.label_smoothing,
                                            ignore_index=pad)
        return loss, (tgt[:, 1:] != pad).sum()  # the mean runs over the target tokens

    cp = _context_parallel(model, args, log)
    train_step = _context_parallel_step(model, train, args, src_tok.pad_id, pad, device) if cp else step

    def evaluate(epoch: int) -> dict[str, float]:
        with _one_process(model):
            return _evaluate(epoch)

    def _evaluate(epoch: int) -> dict[str, float]:
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

    hist = fit(model, optimizer, batches, train_step, epochs=epochs, start_epoch=start_epoch,
               max_seconds=option(args, "max_seconds", None), grad_clip=args.grad_clip or None,
               scheduler=scheduler, evaluate=evaluate, on_epoch_end=on_epoch_end,
               progress=bool(option(args, "progress", True)), desc=f"{task.name} {kind}", log=log,
               split="none" if cp else "rows")
    if cp:
        model.set_context_parallel(None)  # decoding runs on each process alone

    # -- final test with the best weights ---------------------------------------------------
    best_dir = out / "best" if (out / "best").is_dir() else out
    if not (best_dir / "model.safetensors").is_file():
        raise ValueError(f"training ran no epoch (start epoch {start_epoch + 1} > --epochs {epochs}), so there is "
                         f"no checkpoint in {str(out)!r} to test")
    best_ck = load_checkpoint(best_dir)
    load_weights(model, best_ck)
    model.to(device)
    result_metrics: dict[str, Any] = {}
    beam = int(option(args, "beam", 1))
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
    what = "test2016" if split == "test" and not option(args, "test_src", None) else split
    summary = format_metrics(  # the format attnkit eval prints
        {f"{what}_bleu": s["bleu"], f"{what}_chrf": s["chrf"], "sentences": len(hyps), "beam": beam},
        notes=[f"{'detokenized, cased' if tokenize == '13a' else 'tokenized'} sacreBLEU",
               f"best valid BLEU {best['bleu']:.2f} at epoch {best['epoch']}", f"checkpoint {best_dir}"])
    return TrainResult(metric=f"{split}_bleu", value=s["bleu"], summary=summary, checkpoint=best_dir,
                       seconds=seconds, extra={"history": history, "metrics": result_metrics,
                                               "stopped": hist.stopped, "hypotheses": hyps})
