"""The classification training loop shared by the image and text tasks.

:func:`train_classifier`: AdamW with linear warmup and cosine decay, per-epoch validation, an
atomic checkpoint with the trainer state after every epoch, ``--resume`` (which continues
bit-exactly where the checkpoint left off), reproducible from ``--seed``; and the helpers the
tasks share to build a model from command-line options and to rebuild it from a checkpoint.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import models
from ..checkpoint import Checkpoint, load_weights, save_checkpoint
from ..training import fit, format_metrics, rng_state, set_rng_state
from .args import fraction, nonnegative_float, positive_float, positive_int
from .base import Task, TrainResult

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]


def accuracy(model: torch.nn.Module, batches: Sequence[Batch], device: str = "cpu") -> tuple[float, int]:
    """``(fraction correct, number of examples)`` of ``model`` over ``batches`` of ``(x, y)``
    (eval mode, no grad)."""
    was = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            pred = model(x.to(device)).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    model.train(was)
    return (correct / total if total else float("nan")), total


def _schedule(total_steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup then cosine decay to 0 (a multiplier of the base learning rate)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return f


def train_classifier(task: Task, args: argparse.Namespace, *, model_name: str, model_config: dict[str, Any],
                     batches: Callable[[str, int | None], Sequence[Batch]], task_config: dict[str, Any],
                     resume: Checkpoint | None, epochs: int, lr: float, weight_decay: float,
                     valid_split: str = "valid", final_split: str = "test", warmup_frac: float = 0.05,
                     label_smoothing: float = 0.0, grad_clip: float | None = 1.0,
                     augment: Callable[[Tensor], Tensor] | None = None) -> TrainResult:
    """Train a classifier and report accuracy on ``final_split``.

    Args:
        batches: ``batches(split, epoch)`` -> list of ``(x, y)``; ``epoch`` is None for evaluation
            (no shuffling), else the training epoch (shuffle seeded by it). It must not draw from
            the global RNG (it is also called to count the steps of an epoch).
        augment: applied to each training batch's ``x`` in the step (it may draw from torch's
            global RNG, which checkpoints save and ``--resume`` restores).
        task_config: what ``evaluate`` needs to rebuild the data (saved in ``config.json``).
        resume: the checkpoint to continue (read with its trainer state), or None.
        epochs: the task's default; ``--epochs`` overrides it, and a resumed run without
            ``--epochs`` trains to the total it was started with.
    """
    out, device = Path(args.out), getattr(args, "device", "cpu")
    if getattr(args, "epochs", None):
        epochs = args.epochs
    elif resume is not None:  # --resume alone finishes the run that was started
        epochs = int(resume.trainer_state.get("epochs", epochs))
    model = models.get(model_name)(**model_config).to(device)
    if resume is not None:
        load_weights(model, resume)
    steps_per_epoch = len(batches("train", start_epoch_of(resume)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, max(1, int(warmup_frac * total))))
    start_epoch, history = 0, {"loss": [], valid_split + "_accuracy": []}
    if resume is not None:
        state = resume.trainer_state
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        set_rng_state(state["rng"])
        if start_epoch >= epochs:
            print(f"checkpoint {str(out)!r} has already trained {start_epoch} epochs (--epochs {epochs}); "
                  "evaluating it without training")
    config = {"task": task.name, "model": model_name, "model_config": model_config, **task_config}

    def step(batch: Batch) -> Tensor:
        x, y = batch
        if augment is not None:
            x = augment(x)
        return torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=label_smoothing)

    def evaluate(epoch: int) -> dict[str, float]:
        acc, _ = accuracy(model, batches(valid_split, None), device)
        return {f"{valid_split} accuracy": acc}

    last = {"trainer": None if resume is None else resume.trainer_state}

    def save(epoch: int, hist) -> None:
        history["loss"].append(hist.losses[-1])
        history[valid_split + "_accuracy"].append(hist.metrics[-1][f"{valid_split} accuracy"])
        last["trainer"] = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                           "epochs": epochs, "history": history, "rng": rng_state(), "seed": getattr(args, "seed", 0)}
        save_checkpoint(out, model=model, config={**config, "history": history}, trainer_state=last["trainer"])

    hist = fit(model, opt, lambda e: batches("train", e), step, epochs=epochs, start_epoch=start_epoch,
               max_seconds=getattr(args, "max_seconds", None), grad_clip=grad_clip, scheduler=sched,
               evaluate=evaluate, on_epoch_end=save, progress=getattr(args, "progress", True), desc=task.name)
    acc, n = accuracy(model, batches(final_split, None), device)
    config.update(history=history, metrics={f"{final_split}_accuracy": acc, f"{final_split}_examples": n})
    # The checkpoint again, now with the final metric in config.json (same weights and trainer state).
    save_checkpoint(out, model=model, config=config, trainer_state=last["trainer"])
    summary = format_metrics({f"{final_split} accuracy": acc, "examples": n})  # as attnkit eval prints it
    return TrainResult(metric=f"{final_split} accuracy", value=acc, summary=summary, checkpoint=out,
                       seconds=hist.seconds, extra={"history": history, "epochs": len(history["loss"]),
                                                    "stopped": hist.stopped})


class ClassifierTask(Task):
    """A task whose model :func:`train_classifier` trains (digits, mnist, sst2). Subclasses set the
    recipe's defaults, which ``--epochs``, ``--lr``, ``--weight-decay`` and ``--label-smoothing``
    override (``batch_size`` is the default of ``--batch-size``, which the task's data reads)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float

    def fit_classifier(self, args: argparse.Namespace, **kwargs: Any) -> TrainResult:
        """:func:`train_classifier` of this task, with its defaults for the options ``args`` leaves unset."""
        return train_classifier(
            self, args, epochs=self.epochs, lr=args.lr or self.lr,
            weight_decay=self.weight_decay if args.weight_decay is None else args.weight_decay,
            label_smoothing=self.label_smoothing if args.label_smoothing is None else args.label_smoothing, **kwargs)


def start_epoch_of(resume: Checkpoint | None) -> int:
    return 0 if resume is None else int(resume.trainer_state["epoch"])


def build_model_config(args: argparse.Namespace, defaults: dict[str, dict[str, Any]], fixed: dict[str, Any],
                       options: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """``(model name, config)``: the model's defaults, overridden by the command-line options that
    were given (``options`` maps an args attribute to a config key), then by ``fixed``."""
    name = args.model
    if name not in defaults:
        raise ValueError(f"--model: this task supports {', '.join(sorted(defaults))}; got {name!r}")
    cfg = dict(defaults[name])
    for attr, key in options.items():
        v = getattr(args, attr, None)
        if v is not None:
            if key not in cfg:
                raise ValueError(f"--{attr.replace('_', '-')} does not apply to --model {name}")
            cfg[key] = v
    cfg.update(fixed)
    return name, cfg


def add_model_arguments(p: argparse.ArgumentParser, models_: Sequence[str], default: str) -> None:
    g = p.add_argument_group("model (defaults depend on --model)")
    g.add_argument("--model", default=default, choices=list(models_), help=f"model (default {default})")
    g.add_argument("--dim", type=positive_int, default=None, help="embedding / encoder width")
    g.add_argument("--depth", type=positive_int, default=None, help="encoder layers")
    g.add_argument("--heads", type=positive_int, default=None, help="attention heads of the Transformer encoder")
    g.add_argument("--encoder", default=None, choices=["transformer", "gru", "none"], help="sequence encoder")
    g.add_argument("--pooling", default=None, choices=["query", "mlp"], help="attention pooling (AttentionClassifier)")
    g.add_argument("--dropout", type=fraction, default=None, help="dropout")
    g.add_argument("--batch-size", type=positive_int, default=None, help="training batch size")
    g.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (AdamW, warmup + cosine decay)")
    g.add_argument("--weight-decay", type=nonnegative_float, default=None, help="AdamW weight decay")
    g.add_argument("--label-smoothing", type=fraction, default=None, help="label smoothing of the cross-entropy")


COMMON_OPTIONS = {"dim": "dim", "depth": "depth", "heads": "num_heads", "encoder": "encoder",
                   "pooling": "pooling", "dropout": "dropout"}


def rebuild_model(checkpoint: Checkpoint, device: str = "cpu") -> torch.nn.Module:
    """The checkpoint's model with its weights, in eval mode."""
    cfg = checkpoint.require(("model", "model_config"), "classification")
    model = models.get(cfg["model"])(**cfg["model_config"])
    return load_weights(model, checkpoint).to(device).eval()


__all__ = ["train_classifier", "ClassifierTask", "accuracy", "rebuild_model", "build_model_config",
           "add_model_arguments", "start_epoch_of", "COMMON_OPTIONS", "Batch"]
