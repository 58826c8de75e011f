"""Image classification with attention: scikit-learn's 8×8 digits (embedded, no download) and
MNIST (idx files from ``--data``).

* ``attnkit train digits``: :class:`~attnkit.models.AttentionClassifier` over 2×2 patches
  (16 tokens) of the 1,797 digits that scikit-learn ships (``sklearn.datasets.load_digits``),
  with a seeded stratified split of 1,257 train / 180 valid / 360 test images.
* ``attnkit train mnist``: :class:`~attnkit.models.AttentionMemoryClassifier` (seed 001's
  gated attention memory) reading each image row by row, or ``--model AttentionClassifier``
  (patches). The idx files are read by :func:`read_idx` (gzipped or not); the last 5,000
  training images are held out for validation, the 10,000 test images are the test split.

Both report accuracy; training goes through :func:`attnkit.tasks.classification.train_classifier`.
``attnkit viz CHECKPOINT --index N`` draws where a trained model looks in image ``N`` of a split
(:meth:`DigitsTask.viz_image` -> :func:`image_attention` -> :func:`attnkit.viz.image.image_attention_png`).
"""

from __future__ import annotations

import argparse
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..training import seed_everything
from .base import Task, TrainResult, nonnegative_int, positive_int
from .classification import (COMMON_OPTIONS, Batch, accuracy, add_model_arguments, build_model_config, load_resume,
                             rebuild_model, train_classifier)
from .vocab import batch_indices

Tensor = torch.Tensor


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
# Where the model looks: attention over the image's tokens (attnkit viz)
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageAttention:
    """One image, the model's answer and its attention maps over the image's tokens.

    Attributes:
        image: ``(H, W)`` pixels for display.
        grid: ``(rows, cols)`` of the token grid: ``(H/p, W/p)`` patches (row-major), or ``(H, 1)``
            when the model reads the image row by row.
        maps: ``{label: weights (rows·cols,)}``, each a distribution over the tokens.
        label, prediction, probability: the true class, the predicted one and its probability.
        description: the model and what the maps are, in a few words.
    """

    image: Tensor
    grid: tuple[int, int]
    maps: dict[str, Tensor]
    label: int
    prediction: int
    probability: float
    description: str = ""


def image_attention(model: torch.nn.Module, x: Tensor, image: Tensor, label: int = -1) -> ImageAttention:
    """Run one image ``x (1, C, H, W)`` (as the model reads it) through ``model`` and collect its
    attention over the image's tokens, for drawing over ``image (H, W)``:

    * :class:`~attnkit.models.AttentionClassifier` over patches: ``pooling``, the weights with which
      the classifier's pooling query reads the patches (what the logits are computed from); with a
      Transformer encoder also ``pooling · rollout`` (Abnar & Zuidema 2020,
      https://arxiv.org/abs/2005.00928: the pooling traced back through every layer, residual
      included) and, for each head ``h`` of the last layer, ``pooling · A_h``: where the patches
      that the pooling reads were themselves looking in that head;
    * :class:`~attnkit.models.AttentionMemoryClassifier` (rows): the memory's attention at each
      step, their mean, and each gated head's weights.

    Example::

        >>> from attnkit.models import AttentionClassifier
        >>> m = AttentionClassifier(10, input="patches", image_size=8, patch_size=2, dim=16, depth=1, num_heads=2)
        >>> r = image_attention(m.eval(), torch.rand(1, 1, 8, 8), torch.rand(8, 8))
        >>> r.grid, list(r.maps), tuple(r.maps["pooling"].shape)
        ((4, 4), ['pooling', 'pooling · rollout', 'pooling · layer 1 head 1', 'pooling · layer 1 head 2'], (16,))
    """
    from ..models import AttentionClassifier, AttentionMemoryClassifier

    model.eval()
    with torch.no_grad():
        logits, attn = model(x, return_attention=True)
    attn = {k: v.detach().float().cpu() for k, v in attn.items()}
    probs = torch.softmax(logits.float().cpu(), -1)[0]
    pred = int(probs.argmax())
    H, W = image.shape[-2:]
    maps: dict[str, Tensor] = {}
    if isinstance(model, AttentionClassifier):
        cfg = model.config
        if cfg["input"] != "patches":
            raise ValueError("image_attention draws AttentionClassifier models over image patches (input='patches')")
        (ph, pw) = cfg["patch_size"]
        grid = (H // ph, W // pw)
        alpha = attn["pooling"][0]                                              # (T,)
        maps["pooling"] = alpha
        layers = [attn[f"layer{i}"][0] for i in range(cfg["depth"]) if f"layer{i}" in attn]  # each (heads, T, T)
        if layers:
            eye = torch.eye(alpha.numel())
            roll = eye
            for w in layers:  # rollout: the residual as identity, rows renormalized
                a = 0.5 * w.mean(0) + 0.5 * eye
                roll = (a / a.sum(-1, keepdim=True)) @ roll
            maps["pooling · rollout"] = alpha @ roll
            for h, w in enumerate(layers[-1]):
                maps[f"pooling · layer {len(layers)} head {h + 1}"] = alpha @ w
        what = (f"AttentionClassifier over {grid[0]}×{grid[1]} patches of {ph}×{pw} pixels "
                f"({cfg['encoder']} encoder, {cfg['pooling']} pooling)")
    elif isinstance(model, AttentionMemoryClassifier):
        F = attn["memory"][0]                                                   # (steps, rows)
        grid = (F.shape[-1], 1)
        for t, row in enumerate(F):
            maps[f"memory step {t + 1}"] = row
        maps["memory, steps averaged"] = F.mean(0)
        for k, row in enumerate(attn.get("heads", torch.empty(1, 0, 0))[0]):
            maps[f"gated head {k + 1}"] = row
        what = f"AttentionMemoryClassifier reading the {grid[0]} rows ({model.config['num_steps']} memory steps)"
    else:
        raise ValueError(f"image_attention draws AttentionClassifier and AttentionMemoryClassifier models; got "
                         f"{type(model).__name__}")
    return ImageAttention(image=image.float().cpu(), grid=grid, maps=maps, label=label, prediction=pred,
                          probability=float(probs[pred]), description=what)


def _pick(split_name: str, splits: dict[str, tuple[Tensor, Tensor]], index: int) -> tuple[Tensor, int]:
    if split_name not in splits:
        raise ValueError(f"--split must be one of {', '.join(sorted(splits))}; got {split_name!r}")
    x, y = splits[split_name]
    if not 0 <= index < len(y):
        raise ValueError(f"--index {index}: the {split_name} split has images 0 to {len(y) - 1}")
    return x[index], int(y[index])


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
    viz_args = "--index 0"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, sorted(DIGITS_MODELS), "AttentionClassifier")
        g = p.add_argument_group("digits")
        g.add_argument("--patch-size", type=positive_int, default=None,
                       help="patch side (AttentionClassifier; default 2)")
        g.add_argument("--split-seed", type=nonnegative_int, default=0,
                       help="seed of the train/valid/test split (default 0)")
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

    def viz_image(self, checkpoint: Checkpoint, *, split: str = "test", index: int = 0, device: str = "cpu",
                  data: str | None = None) -> ImageAttention:
        """Image ``index`` of ``split`` through the checkpoint's model (``attnkit viz CKPT --index N``)."""
        image, label = _pick(split, load_digits_splits(checkpoint.config["data"]["split_seed"]), index)  # (1, 8, 8)
        model = rebuild_model(checkpoint, device)
        return image_attention(model, image.unsqueeze(0).to(device), image[0], label)


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
    viz_args = "--index 0"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, sorted(MNIST_MODELS), "AttentionMemoryClassifier")
        g = p.add_argument_group("mnist")
        g.add_argument("--data", default=DEFAULT_MNIST,
                       help=f"folder with the 4 MNIST idx files (default {DEFAULT_MNIST})")
        g.add_argument("--patch-size", type=positive_int, default=None,
                       help="patch side (AttentionClassifier; default 7)")
        g.add_argument("--memory-dim", type=positive_int, default=None, help="memory width (AttentionMemoryClassifier)")
        g.add_argument("--steps", type=positive_int, default=None, help="memory steps (AttentionMemoryClassifier)")
        g.add_argument("--gated-heads", type=nonnegative_int, default=None,
                       help="GatedAttentionHeads heads pooled beside the memory (AttentionMemoryClassifier; 0 = none)")
        g.add_argument("--augment", action="store_true", help="random ±1 pixel shifts of the training images")
        g.add_argument("--train-limit", type=positive_int, default=None, help="use only the first N training images")
        g.add_argument("--valid-size", type=positive_int, default=5000,
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

    def viz_image(self, checkpoint: Checkpoint, *, split: str = "test", index: int = 0, device: str = "cpu",
                  data: str | None = None) -> ImageAttention:
        """Image ``index`` of ``split`` (from ``data``, default the folder the model was trained
        on) through the checkpoint's model (``attnkit viz CKPT --index N``)."""
        cfg = checkpoint.config.get("data", {})
        directory = data or cfg.get("dir") or DEFAULT_MNIST
        image, label = _pick(split, load_mnist_splits(directory, cfg.get("valid_size", 5000)), index)  # (H, W) uint8
        model = rebuild_model(checkpoint, device)
        return image_attention(model, _normalize(image.unsqueeze(0)).to(device), image.float() / 255.0, label)


__all__ = ["DigitsTask", "MnistTask", "ImageAttention", "image_attention", "read_idx", "read_mnist",
           "load_mnist_splits", "load_digits_splits", "random_shift"]
