"""The dates task's recipe: the attention seq2seq (:class:`attnkit.models.Seq2Seq`) and its training
run (:func:`run_training`: Adam under :class:`BudgetSchedule`, per-epoch validation exact match,
a checkpoint after every epoch, ``--resume``), decoding (:func:`decode`, greedy or beam), the
metric (:func:`exact_match`, :func:`summary_line`) and the model rebuilt from a checkpoint
(:func:`rebuild`).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ... import models
from ...checkpoint import Checkpoint, load_weights, save_checkpoint
from ...models.seq2seq import Seq2Seq
from ...training import fit, format_metrics, rng_state, seed_everything, set_rng_state
from ..args import option
from ..base import Task, load_resume
from ..vocab import Vocab, pad_batch
from .data import DATA_DEFAULTS, Example, encode_split, load_splits, tokens, train_batches

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Decoding, metric
# ---------------------------------------------------------------------------------------------

def decode(model: Seq2Seq, sources: Sequence[str], src_vocab: Vocab, tgt_vocab: Vocab, *, beam: int = 1,
           max_len: int = 32, batch_size: int = 500, length_penalty: float = 0.0, device: str = "cpu",
           ) -> tuple[list[str], list[Tensor]]:
    """Normalize ``sources``: ``(predictions, attention weights (T_out, S) per example)``. Batches
    are formed by source length; the model is put in eval mode. Empty sources give ``""``."""
    was = model.training
    model.eval()
    ids = [src_vocab.encode(tokens(s)) for s in sources]
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))
    preds: list[str] = [""] * len(ids)
    weights: list[Tensor] = [torch.zeros(0, 0)] * len(ids)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            src, lengths = pad_batch([ids[i] for i in b])
            src = src.to(device)
            if beam == 1:
                out, ws = model.greedy(src, lengths.to(device), max_len)
            else:
                out, ws = model.beam_search(src, lengths.to(device), beam=beam, max_len=max_len,
                                            length_penalty=length_penalty)
            for i, o, w in zip(b, out, ws):
                preds[i] = "".join(tgt_vocab.decode(o))
                weights[i] = w.cpu()
    model.train(was)
    return preds, weights


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target (NaN for none)."""
    if len(predictions) != len(targets):
        raise ValueError(f"predictions and targets must have the same length; got {len(predictions)} and {len(targets)}")
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets) if targets else float("nan")


def summary_line(value: float, n: int, split: str = "test", beam: int | None = None) -> str:
    """``test exact match: 97.40% (2000 examples, greedy)``: the line ``attnkit eval`` prints too
    (:func:`attnkit.training.format_metrics`)."""
    return format_metrics({f"{split}_exact_match": value, "examples": n, **({"beam": beam} if beam else {})})


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class BudgetSchedule:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine decay to
    ``floor`` as training progresses, where progress is the larger of ``step / total_steps`` and
    (when ``max_seconds`` is set) the fraction of the wall-clock budget spent. Without a time
    budget the schedule depends on the step alone, so runs are reproducible; with one, the
    decay finishes when the budget does. ``"constant"`` keeps the rate after warmup."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, *, warmup: int = 100,
                 max_seconds: float | None = None, floor: float = 0.02, kind: str = "cosine"):
        if kind not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'constant' or 'cosine'; got {kind!r}")
        self.optimizer, self.total_steps, self.warmup = optimizer, max(1, total_steps), warmup
        self.floor, self.kind = floor, kind
        self.max_seconds = max_seconds
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.start = time.perf_counter()
        self._apply()

    def factor(self) -> float:
        warm = min(1.0, (self.step_count + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "constant":
            return warm
        p = self.step_count / self.total_steps
        if self.max_seconds:
            p = max(p, (time.perf_counter() - self.start) / self.max_seconds)
        p = min(1.0, p)
        return warm * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p)))

    def _apply(self) -> None:
        f = self.factor()
        for g, b in zip(self.optimizer.param_groups, self.base):
            g["lr"] = b * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "base": self.base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.base = state["step_count"], state["base"]
        self._apply()


MODEL_DEFAULTS = dict(emb_dim=64, hidden_dim=128, rnn="gru", attention="luong-general", input_feeding=True,
                      num_layers=1, dropout=0.0)
TRAIN_DEFAULTS = dict(batch_size=128, lr=3e-3, epochs=10, warmup=100, grad_clip=1.0, schedule="cosine")


def rebuild(checkpoint: Checkpoint) -> tuple[Seq2Seq, Vocab, Vocab, dict[str, Any]]:
    """Model (weights loaded) and vocabularies from a dates checkpoint."""
    c = checkpoint.require(("model", "model_config", "src_vocab", "tgt_vocab"), "dates")
    model = models.get(c["model"])(**c["model_config"])
    load_weights(model, checkpoint)
    return model, Vocab.from_json(c["src_vocab"]), Vocab.from_json(c["tgt_vocab"]), c


@dataclass
class Run:
    """Everything a finished training run hands to its caller."""

    model: Seq2Seq
    src_vocab: Vocab
    tgt_vocab: Vocab
    splits: dict[str, list[Example]]
    config: dict[str, Any]
    out: Path
    seconds: float
    epochs: int
    stopped: str
    trainer: dict[str, Any] | None


def run_training(task: Task, args: argparse.Namespace, *, epochs_default: int,
                 log: Callable[[str], None] = print) -> Run:
    """Train (or, with ``--resume``, continue) ``task``'s model as ``args`` say, saving the
    checkpoint into ``args.out`` after every epoch; the caller runs the final test."""
    out = Path(args.out)
    device = getattr(args, "device", "cpu")
    seed = int(getattr(args, "seed", 0) or 0)
    seed_everything(seed)  # the model's initialization depends on --seed alone, whoever calls
    resume = load_resume(task, args, out)
    if resume is not None:  # the data, vocabularies, model and recipe of the checkpoint
        cfg = resume.config
        data, train_cfg = cfg["data"], dict(cfg["train"])
        splits = load_splits(data)
        model, src_vocab, tgt_vocab, _ = rebuild(resume)
        model_cfg = cfg["model_config"]
    else:
        data_path = getattr(args, "data", None)
        if data_path:
            data = {"path": str(Path(data_path).resolve()), "seed": option(args, "data_seed", DATA_DEFAULTS["seed"])}
        else:
            data = {"path": None, **{k: int(option(args, k, v)) for k, v in DATA_DEFAULTS.items() if k != "seed"},
                    "seed": int(option(args, "data_seed", DATA_DEFAULTS["seed"]))}
            if getattr(args, "templates", None):  # API only: a corpus of some surface forms
                data["templates"] = list(args.templates)
        splits = load_splits(data)
        if not splits["train"]:
            raise ValueError("the training split is empty")
        src_vocab = Vocab.build(tokens(e.source) for e in splits["train"])
        tgt_vocab = Vocab.build(tokens(e.target) for e in splits["train"])
        model_cfg = {k: option(args, k, v) for k, v in MODEL_DEFAULTS.items()}
        if getattr(args, "no_input_feeding", False):
            model_cfg["input_feeding"] = False
        model_cfg.update(src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), pad_id=Vocab.pad_id,
                         bos_id=Vocab.bos_id, eos_id=Vocab.eos_id)
        model = models.get("Seq2Seq")(**model_cfg)
        train_cfg = {k: option(args, k, v) for k, v in TRAIN_DEFAULTS.items() if k != "epochs"}
        train_cfg["max_len"] = max(len(e.target) for e in splits["train"]) + 6
    model.to(device)
    epochs = int(option(args, "epochs", epochs_default))
    max_seconds = getattr(args, "max_seconds", None)
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1; got {epochs}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0; got {max_seconds}")
    if not train_cfg["lr"] > 0:
        raise ValueError(f"--lr must be > 0; got {train_cfg['lr']}")
    enc = {s: encode_split(splits[s], src_vocab, tgt_vocab) for s in ("train", "valid")}
    steps_per_epoch = math.ceil(len(enc["train"].src) / train_cfg["batch_size"])
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg["lr"])
    sched = BudgetSchedule(opt, epochs * steps_per_epoch, warmup=train_cfg["warmup"], max_seconds=max_seconds,
                           kind=train_cfg["schedule"])
    start_epoch, history = 0, {"loss": [], "valid_exact_match": []}
    if resume is not None:
        state = resume.trainer_state
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history, seed = state["epoch"], state["history"], state.get("seed", seed)
        set_rng_state(state["rng"])
        log(f"resuming {str(out)!r} after epoch {start_epoch}")
        if start_epoch >= epochs:
            log(f"checkpoint {str(out)!r} has already trained {start_epoch} epochs (--epochs {epochs}); "
                "evaluating it without training")
    config: dict[str, Any] = {
        "task": task.name, "model": "Seq2Seq", "model_config": model_cfg, "src_vocab": src_vocab.to_json(),
        "tgt_vocab": tgt_vocab.to_json(), "data": data, "train": train_cfg,
        "sizes": {s: len(v) for s, v in splits.items()},
    }
    valid_limit = getattr(args, "valid_limit", None)
    valid = splits["valid"][:valid_limit] if valid_limit else splits["valid"]

    def step(batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        src, lengths, tgt_in, tgt_out = (t.to(device) for t in batch)
        logits = model(src, lengths, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=Vocab.pad_id)
        return loss, (tgt_out != Vocab.pad_id).sum()  # the mean runs over the target tokens

    def evaluate(epoch: int) -> dict[str, float]:
        preds, _ = decode(model, [e.source for e in valid], src_vocab, tgt_vocab, max_len=train_cfg["max_len"],
                          device=device)
        return {"valid exact match": exact_match(preds, [e.target for e in valid])}

    last: dict[str, Any] = {"trainer": None if resume is None else resume.trainer_state}

    def save(epoch: int, hist: Any) -> None:
        history["loss"].append(hist.losses[-1])
        history["valid_exact_match"].append(hist.metrics[-1]["valid exact match"])
        last["trainer"] = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                           "epochs": epochs, "history": history, "rng": rng_state(), "seed": seed}
        save_checkpoint(out, model=model, config={**config, "history": history}, trainer_state=last["trainer"])

    hist = fit(model, opt, lambda e: train_batches(enc["train"], train_cfg["batch_size"], seed * 100_003 + e), step,
               epochs=epochs, start_epoch=start_epoch, max_seconds=max_seconds, grad_clip=train_cfg["grad_clip"],
               scheduler=sched, evaluate=evaluate, on_epoch_end=save, progress=getattr(args, "progress", True),
               desc=task.name, log=log)
    config["history"] = history
    return Run(model, src_vocab, tgt_vocab, splits, config, out, hist.seconds, len(history["loss"]), hist.stopped,
                last["trainer"])


def final_test(run: Run, beam: int, device: str = "cpu") -> tuple[float, int, list[str], list[Tensor]]:
    test = run.splits["test"]
    preds, weights = decode(run.model, [e.source for e in test], run.src_vocab, run.tgt_vocab, beam=beam,
                            max_len=run.config["train"]["max_len"], device=device)
    em = exact_match(preds, [e.target for e in test])
    run.config["metrics"] = {"test_exact_match": em, "test_examples": len(test), "beam": beam}
    save_checkpoint(run.out, model=run.model, config=run.config, trainer_state=run.trainer)
    return em, len(test), preds, weights
