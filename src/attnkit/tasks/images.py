"""Image classification with attention: scikit-learn's 8×8 digits (embedded, no download) and
MNIST (idx files from ``--data``).

* ``attnkit train digits``: :class:`~attnkit.models.AttentionClassifier` over 2×2 patches
  (16 tokens) of the 1,797 digits that scikit-learn ships (``sklearn.datasets.load_digits``),
  with a seeded stratified split of 1,257 train / 180 valid / 360 test images.
* ``attnkit train mnist``: :class:`~attnkit.models.AttentionMemoryClassifier` (seed 001's
  gated attention memory) reading each image row by row, or ``--model AttentionClassifier``
  (patches). The idx files are read by :func:`read_idx` (gzipped or not); the last 5,000
  training images are held out for validation, the 10,000 test images are the test split.

Both report accuracy. This module also holds the classification training loop that the text
task shares (:func:`train_classifier`): AdamW with warmup and cosine decay, per-epoch
validation, an atomic checkpoint with the trainer state after every epoch, ``--resume``
(which continues bit-exactly where the checkpoint left off), reproducible from ``--seed``.
"""

from __future__ import annotations

import argparse
import gzip
import math
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import models
from ..checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from ..training import fit, rng_state, seed_everything, set_rng_state
from .base import Task, TrainResult
from .vocab import batch_indices

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------
# Shared classification training loop
# ---------------------------------------------------------------------------------------------

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
    summary = f"{final_split} accuracy: {100 * acc:.1f}% ({n} examples)"
    return TrainResult(metric=f"{final_split} accuracy", value=acc, summary=summary, checkpoint=out,
                       seconds=hist.seconds, extra={"history": history, "epochs": len(history["loss"]),
                                                    "stopped": hist.stopped})


def start_epoch_of(resume: Checkpoint | None) -> int:
    return 0 if resume is None else int(resume.trainer_state["epoch"])


def load_resume(task: Task, args: argparse.Namespace) -> Checkpoint | None:
    """The checkpoint in ``--out`` with its trainer state when ``--resume`` is given, else None
    (and then ``--out`` must not hold another task's checkpoint)."""
    if not getattr(args, "resume", False):
        return None
    ckpt = load_checkpoint(args.out, with_trainer=True)
    if ckpt.config.get("task") != task.name:
        raise ValueError(f"--resume: checkpoint {str(args.out)!r} is for task {ckpt.config.get('task')!r}, "
                         f"not {task.name!r}")
    return ckpt


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
    g.add_argument("--dim", type=int, default=None, help="embedding / encoder width")
    g.add_argument("--depth", type=int, default=None, help="encoder layers")
    g.add_argument("--heads", type=int, default=None, help="attention heads of the Transformer encoder")
    g.add_argument("--encoder", default=None, choices=["transformer", "gru", "none"], help="sequence encoder")
    g.add_argument("--pooling", default=None, choices=["query", "mlp"], help="attention pooling (AttentionClassifier)")
    g.add_argument("--dropout", type=float, default=None, help="dropout")
    g.add_argument("--batch-size", type=int, default=None, help="training batch size")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW, warmup + cosine decay)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    g.add_argument("--label-smoothing", type=float, default=None, help="label smoothing of the cross-entropy")


COMMON_OPTIONS = {"dim": "dim", "depth": "depth", "heads": "num_heads", "encoder": "encoder",
                   "pooling": "pooling", "dropout": "dropout"}


def _image_batches(images: Tensor, labels: Tensor, batch_size: int, seed: int, epoch: int | None) -> list[Batch]:
    idx = batch_indices(len(labels), batch_size, shuffle=epoch is not None, seed=seed * 100_003 + (epoch or 0))
    return [(images[b], labels[b]) for b in idx]


def random_shift(x: Tensor, max_shift: int = 1) -> Tensor:
    """Translate each image ``(B, C, H, W)`` by a random integer offset in
    ``[-max_shift, max_shift]`` along each axis, filling with the background value (the image
    minimum). Uses torch's global RNG (so ``--seed``/``--resume`` reproduce it).

    Example::

        >>> x = torch.zeros(1, 1, 4, 4); x[0, 0, 1, 1] = 1
        >>> int(random_shift(x).sum())
        1
    """
    B, C, H, W = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s), value=float(x.min()))
    dy = torch.randint(0, 2 * s + 1, (B,))
    dx = torch.randint(0, 2 * s + 1, (B,))
    rows = (dy.view(B, 1) + torch.arange(H)).view(B, 1, H, 1).expand(B, C, H, W + 2 * s)
    out = padded.gather(2, rows)
    cols = (dx.view(B, 1) + torch.arange(W)).view(B, 1, 1, W).expand(B, C, H, W)
    return out.gather(3, cols)


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)
# ---------------------------------------------------------------------------------------------

def load_digits_splits(split_seed: int = 0, test_fraction: float = 0.2, valid_fraction: float = 0.1
                       ) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's 8×8 digits as ``{"train"|"valid"|"test": (images (N, 1, 8, 8) in [0, 1], labels (N,))}``,
    split with stratification by ``split_seed``: 20% test (360), 10% valid (180), the rest train (1,257).

    Example::

        >>> s = load_digits_splits()
        >>> {k: len(v[1]) for k, v in s.items()}
        {'train': 1257, 'valid': 180, 'test': 360}
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), pixels 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=d.target, random_state=split_seed)
    train, valid = train_test_split(rest, test_size=valid_fraction / (1 - test_fraction),
                                    stratify=d.target[rest], random_state=split_seed)
    return {name: (x[torch.as_tensor(i)], y[torch.as_tensor(i)])
            for name, i in (("train", train), ("valid", valid), ("test", test))}


DIGITS_MODELS = {
    "AttentionClassifier": dict(num_classes=10, input="patches", image_size=[8, 8], patch_size=[2, 2], channels=1,
                                dim=64, depth=2, num_heads=4, encoder="transformer", pooling="query", dropout=0.0),
    "AttentionMemoryClassifier": dict(num_classes=10, row_dim=8, num_rows=8, dim=64, memory_dim=64, num_steps=4,
                                      encoder="gru", depth=1, gated_heads=0, dropout=0.0),
}


class DigitsTask(Task):
    """8×8 handwritten digits (scikit-learn's copy of the UCI set), embedded: no download."""

    name = "digits"
    help = ("Classify scikit-learn's 8x8 digits (1,797 images, embedded) with an attention-pooling classifier "
            "over 2x2 patches; reports test accuracy on a seeded stratified 360-image test split.")
    epochs, batch_size, lr, weight_decay, label_smoothing = 30, 32, 2e-3, 0.3, 0.0

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, sorted(DIGITS_MODELS), "AttentionClassifier")
        g = p.add_argument_group("digits")
        g.add_argument("--patch-size", type=int, default=None, help="patch side (AttentionClassifier; default 2)")
        g.add_argument("--split-seed", type=int, default=0, help="seed of the train/valid/test split (default 0)")
        g.add_argument("--augment", action="store_true",
                       help="random ±1 pixel shifts of the training images (off by default: on 8x8 images a "
                            "1-pixel shift is large and slows 2x2-patch models down)")

    def _batches(self, splits, batch_size: int, seed: int):
        def batches(split: str, epoch: int | None) -> list[Batch]:
            x, y = splits[split]
            return _image_batches(x, y, batch_size, seed, epoch)
        return batches

    def train(self, args: argparse.Namespace) -> TrainResult:
        seed_everything(args.seed)
        resume = load_resume(self, args)
        if resume is not None:
            cfg = resume.config
            name, model_config, tcfg = cfg["model"], cfg["model_config"], cfg["data"]
        else:
            fixed = {}
            if getattr(args, "patch_size", None) is not None:
                fixed["patch_size"] = [args.patch_size, args.patch_size]
            name, model_config = build_model_config(args, DIGITS_MODELS, fixed, COMMON_OPTIONS)
            tcfg = {"seed": args.seed, "split_seed": args.split_seed, "augment": args.augment,
                    "batch_size": args.batch_size or self.batch_size}
        splits = load_digits_splits(tcfg["split_seed"])
        return train_classifier(
            self, args, model_name=name, model_config=model_config,
            batches=self._batches(splits, tcfg["batch_size"], tcfg["seed"]),  # shuffles follow the run's seed
            augment=random_shift if tcfg["augment"] else None,
            task_config={"data": tcfg}, resume=resume, epochs=self.epochs,
            lr=args.lr or self.lr, weight_decay=self.weight_decay if args.weight_decay is None else args.weight_decay,
            label_smoothing=self.label_smoothing if args.label_smoothing is None else args.label_smoothing)

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        split = getattr(args, "split", "test") or "test"
        splits = load_digits_splits(checkpoint.config["data"]["split_seed"])
        if split not in splits:
            raise ValueError(f"--split: digits has splits {', '.join(splits)}; got {split!r}")
        model = rebuild_model(checkpoint, getattr(args, "device", "cpu"))
        x, y = splits[split]
        acc, n = accuracy(model, _image_batches(x, y, 256, 0, None), getattr(args, "device", "cpu"))
        return {f"{split} accuracy": acc, "examples": n}


def rebuild_model(checkpoint: Checkpoint, device: str = "cpu") -> torch.nn.Module:
    """The checkpoint's model with its weights, in eval mode."""
    cfg = checkpoint.config
    if "model" not in cfg or "model_config" not in cfg:
        raise ValueError(f"checkpoint {str(checkpoint.path)!r}: config.json has no model / model_config")
    model = models.get(cfg["model"])(**cfg["model_config"])
    return load_weights(model, checkpoint).to(device).eval()


# ---------------------------------------------------------------------------------------------
# MNIST (idx files)
# ---------------------------------------------------------------------------------------------

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzipped or not, into a numpy array.

    The header is big-endian: two zero bytes, a type code (``0x08`` = uint8, ``0x09`` int8,
    ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dims
    ``n``, then ``n`` uint32 sizes; the data follow, and the file must hold exactly
    ``prod(sizes)`` items. MNIST images have magic ``2051`` (``0x00000803``: uint8, 3 dims) and
    labels ``2049`` (``0x00000801``: uint8, 1 dim).

    Raises ``ValueError`` naming the file for a missing file, a bad magic number, a wrong number
    of dims (``expect_ndim``), a truncated file, trailing bytes or a corrupt gzip stream.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
        >>> _ = open(p, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
        >>> read_idx(p).tolist()
        [7, 2, 1]
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"idx file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"idx file {str(p)!r} is not a valid gzip file (truncated or corrupt): {e}") from None
    if len(raw) < 4:
        raise ValueError(f"idx file {str(p)!r} is too short ({len(raw)} bytes) to hold an idx header")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or code not in IDX_DTYPES or ndim == 0:
        raise ValueError(f"idx file {str(p)!r} has magic number {magic} (0x{magic:08x}), which is not an idx "
                         "header (expected 0x0000TTNN: type code TT in 08/09/0B/0C/0D/0E, NN >= 1 dims; "
                         "MNIST images are 2051, labels 2049)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(f"idx file {str(p)!r} has magic number {magic} ({ndim} dims); expected "
                         f"{0x800 + expect_ndim} ({expect_ndim} dims)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {str(p)!r} is truncated: {len(raw)} bytes, the header alone needs {header}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < want:
        raise ValueError(f"idx file {str(p)!r} is truncated: its header says shape {shape} "
                         f"({want} data bytes) but it holds {have}")
    if have > want:
        raise ValueError(f"idx file {str(p)!r} has {have - want} bytes after the {want} data bytes that its header "
                         f"(shape {shape}) announces")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEFAULT_MNIST = "../shared/data/mnist"


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"--data {str(directory)!r}: no {stem} or {stem}.gz in it (MNIST needs "
                     f"{', '.join(s for pair in MNIST_FILES.values() for s in pair)}, gzipped or not)")


def read_mnist(directory: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W) uint8, labels (N,) int64)`` of MNIST's ``part`` (``"train"``: 60,000,
    ``"test"``: 10,000) from the idx files in ``directory``; checks that they agree."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"--data: MNIST folder {str(d)!r} does not exist (it should hold the four idx files "
                         "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                         "t10k-labels-idx1-ubyte.gz)")
    img_path, lab_path = (_find(d, s) for s in MNIST_FILES[part])
    images, labels = read_idx(img_path, expect_ndim=3), read_idx(lab_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"MNIST idx files must hold uint8 data; got {images.dtype} in {str(img_path)!r} and "
                         f"{labels.dtype} in {str(lab_path)!r}")
    if len(images) != len(labels):
        raise ValueError(f"{str(img_path)!r} holds {len(images)} images but {str(lab_path)!r} holds "
                         f"{len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{str(lab_path)!r} holds label {int(labels.max())}; MNIST labels are 0-9")
    return images, labels.astype(np.int64)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist_splits(directory: str | Path, valid_size: int = 5000) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train", "valid", "test"}`` -> ``(images (N, 28, 28) uint8, labels (N,))``: the last
    ``valid_size`` training images are the validation split."""
    tr_x, tr_y = read_mnist(directory, "train")
    te_x, te_y = read_mnist(directory, "test")
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise ValueError(f"MNIST train images are {tr_x.shape[1:]} but test images are {te_x.shape[1:]}")
    if not 0 < valid_size < len(tr_y):
        raise ValueError(f"valid_size must be in (0, {len(tr_y)}); got {valid_size}")
    n = len(tr_y) - valid_size
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return {"train": (t(tr_x[:n]), t(tr_y[:n])), "valid": (t(tr_x[n:]), t(tr_y[n:])), "test": (t(te_x), t(te_y))}


def _normalize(x: Tensor) -> Tensor:
    """uint8 pixels (N, H, W) -> float (N, 1, H, W), standardized with MNIST's mean and std."""
    return ((x.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


MNIST_MODELS = {
    "AttentionMemoryClassifier": dict(num_classes=10, row_dim=28, num_rows=28, dim=128, memory_dim=128,
                                      num_steps=4, encoder="gru", depth=1, num_heads=4, gated_heads=0,
                                      readout="last", dropout=0.1),
    "AttentionClassifier": dict(num_classes=10, input="patches", image_size=[28, 28], patch_size=[7, 7],
                                channels=1, dim=64, depth=4, num_heads=4, encoder="transformer", pooling="query",
                                dropout=0.1),
}


class MnistTask(Task):
    """MNIST from idx files; seed 001's attention memory reads each image row by row."""

    name = "mnist"
    help = ("Classify MNIST (idx files in --data) with seed 001's gated attention memory over the image rows "
            "(or --model AttentionClassifier over patches); last 5k train images = valid; reports test accuracy.")
    epochs, batch_size, lr, weight_decay, label_smoothing = 12, 128, 2e-3, 0.01, 0.0

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, sorted(MNIST_MODELS), "AttentionMemoryClassifier")
        g = p.add_argument_group("mnist")
        g.add_argument("--data", default=DEFAULT_MNIST,
                       help=f"folder with the 4 MNIST idx files (default {DEFAULT_MNIST})")
        g.add_argument("--patch-size", type=int, default=None, help="patch side (AttentionClassifier; default 7)")
        g.add_argument("--memory-dim", type=int, default=None, help="memory width (AttentionMemoryClassifier)")
        g.add_argument("--steps", type=int, default=None, help="memory steps (AttentionMemoryClassifier)")
        g.add_argument("--gated-heads", type=int, default=None,
                       help="GatedAttentionHeads heads pooled beside the memory (AttentionMemoryClassifier; 0 = none)")
        g.add_argument("--augment", action="store_true", help="random ±1 pixel shifts of the training images")
        g.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
        g.add_argument("--valid-size", type=int, default=5000,
                       help="hold out the last N training images for validation (default 5000)")

    def _batches(self, splits, batch_size: int, seed: int):
        def batches(split: str, epoch: int | None) -> list[Batch]:
            x, y = splits[split]
            return [(_normalize(xb), yb) for xb, yb in _image_batches(x, y, batch_size, seed, epoch)]
        return batches

    def train(self, args: argparse.Namespace) -> TrainResult:
        seed_everything(args.seed)
        resume = load_resume(self, args)
        if resume is not None:
            cfg = resume.config
            name, model_config, tcfg = cfg["model"], cfg["model_config"], dict(cfg["data"])
        else:
            tcfg = {"seed": args.seed, "batch_size": args.batch_size or self.batch_size, "augment": args.augment,
                    "train_limit": args.train_limit, "valid_size": args.valid_size}
        splits = load_mnist_splits(args.data, tcfg["valid_size"])
        tcfg["dir"] = str(Path(args.data).resolve())
        if tcfg["train_limit"]:
            x, y = splits["train"]
            splits["train"] = (x[: tcfg["train_limit"]], y[: tcfg["train_limit"]])
        if resume is None:
            H, W = splits["train"][0].shape[1:]  # 28 x 28 for MNIST; the model follows the files
            p = args.patch_size
            fixed = ({"row_dim": W, "num_rows": H} if args.model == "AttentionMemoryClassifier" else
                     {"image_size": [H, W], **({"patch_size": [p, p]} if p is not None else {})})
            opts = dict(COMMON_OPTIONS, memory_dim="memory_dim", steps="num_steps", gated_heads="gated_heads")
            name, model_config = build_model_config(args, MNIST_MODELS, fixed, opts)
        print(f"mnist: {len(splits['train'][1])} train, {len(splits['valid'][1])} valid, "
              f"{len(splits['test'][1])} test images from {tcfg['dir']}; model {name}")
        return train_classifier(
            self, args, model_name=name, model_config=model_config,
            batches=self._batches(splits, tcfg["batch_size"], tcfg["seed"]),  # shuffles follow the run's seed
            augment=random_shift if tcfg["augment"] else None,
            task_config={"data": tcfg}, resume=resume, epochs=self.epochs,
            lr=args.lr or self.lr, weight_decay=self.weight_decay if args.weight_decay is None else args.weight_decay,
            label_smoothing=self.label_smoothing if args.label_smoothing is None else args.label_smoothing)

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        split = getattr(args, "split", "test") or "test"
        if split not in ("train", "valid", "test"):
            raise ValueError(f"--split: mnist has splits train, valid, test; got {split!r}")
        data = checkpoint.config.get("data", {})
        directory = getattr(args, "data", None) or data.get("dir") or DEFAULT_MNIST
        x, y = load_mnist_splits(directory, data.get("valid_size", 5000))[split]
        model = rebuild_model(checkpoint, getattr(args, "device", "cpu"))
        acc, n = accuracy(model, self._batches({split: (x, y)}, 500, 0)(split, None),
                          getattr(args, "device", "cpu"))
        return {f"{split} accuracy": acc, "examples": n}


__all__ = ["DigitsTask", "MnistTask", "read_idx", "read_mnist", "load_mnist_splits", "load_digits_splits",
           "train_classifier", "accuracy", "random_shift"]
