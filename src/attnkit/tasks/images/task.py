"""The image tasks' command line: :class:`DigitsTask` (``attnkit train digits``) and
:class:`MnistTask` (``attnkit train mnist``), their models' defaults, ``attnkit eval`` and the
image that ``attnkit viz CHECKPOINT --index N`` draws (``viz_image``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...checkpoint import Checkpoint
from ...training import seed_everything
from ..args import nonnegative_int, positive_int
from ..base import TrainResult, load_resume
from ..classification import (COMMON_OPTIONS, ClassifierTask, accuracy, add_model_arguments, build_model_config,
                              rebuild_model)
from .data import (DEFAULT_MNIST, digits_batches, image_batches, load_digits_splits, load_mnist_splits, mnist_batches,
                   normalize, pick_image, random_shift)
from .recipe import ImageAttention, image_attention


DIGITS_MODELS = {
    "AttentionClassifier": dict(num_classes=10, input="patches", image_size=[8, 8], patch_size=[2, 2], channels=1,
                                dim=64, depth=2, num_heads=4, encoder="transformer", pooling="query", dropout=0.0),
    "AttentionMemoryClassifier": dict(num_classes=10, row_dim=8, num_rows=8, dim=64, memory_dim=64, num_steps=4,
                                      encoder="gru", depth=1, gated_heads=0, dropout=0.0),
}


class DigitsTask(ClassifierTask):
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
        return self.fit_classifier(
            args, model_name=name, model_config=model_config,
            batches=digits_batches(splits, tcfg["batch_size"], tcfg["seed"]),  # shuffles follow the run's seed
            augment=random_shift if tcfg["augment"] else None,
            task_config={"data": tcfg}, resume=resume)

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        split = getattr(args, "split", "test") or "test"
        splits = load_digits_splits(checkpoint.config["data"]["split_seed"])
        if split not in splits:
            raise ValueError(f"--split: digits has splits {', '.join(splits)}; got {split!r}")
        model = rebuild_model(checkpoint, getattr(args, "device", "cpu"))
        x, y = splits[split]
        acc, n = accuracy(model, image_batches(x, y, 256, 0, None), getattr(args, "device", "cpu"))
        return {f"{split} accuracy": acc, "examples": n}

    def viz_image(self, checkpoint: Checkpoint, *, split: str = "test", index: int = 0, device: str = "cpu",
                  data: str | None = None) -> ImageAttention:
        """Image ``index`` of ``split`` through the checkpoint's model (``attnkit viz CKPT --index N``)."""
        image, label = pick_image(split, load_digits_splits(checkpoint.config["data"]["split_seed"]), index)  # (1, 8, 8)
        model = rebuild_model(checkpoint, device)
        return image_attention(model, image.unsqueeze(0).to(device), image[0], label)


MNIST_MODELS = {
    "AttentionMemoryClassifier": dict(num_classes=10, row_dim=28, num_rows=28, dim=128, memory_dim=128,
                                      num_steps=4, encoder="gru", depth=1, num_heads=4, gated_heads=0,
                                      readout="last", dropout=0.1),
    "AttentionClassifier": dict(num_classes=10, input="patches", image_size=[28, 28], patch_size=[7, 7],
                                channels=1, dim=64, depth=4, num_heads=4, encoder="transformer", pooling="query",
                                dropout=0.1),
}


class MnistTask(ClassifierTask):
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
        return self.fit_classifier(
            args, model_name=name, model_config=model_config,
            batches=mnist_batches(splits, tcfg["batch_size"], tcfg["seed"]),  # shuffles follow the run's seed
            augment=random_shift if tcfg["augment"] else None,
            task_config={"data": tcfg}, resume=resume)

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        split = getattr(args, "split", "test") or "test"
        if split not in ("train", "valid", "test"):
            raise ValueError(f"--split: mnist has splits train, valid, test; got {split!r}")
        data = checkpoint.config.get("data", {})
        directory = getattr(args, "data", None) or data.get("dir") or DEFAULT_MNIST
        x, y = load_mnist_splits(directory, data.get("valid_size", 5000))[split]
        model = rebuild_model(checkpoint, getattr(args, "device", "cpu"))
        acc, n = accuracy(model, mnist_batches({split: (x, y)}, 500, 0)(split, None),
                          getattr(args, "device", "cpu"))
        return {f"{split} accuracy": acc, "examples": n}

    def viz_image(self, checkpoint: Checkpoint, *, split: str = "test", index: int = 0, device: str = "cpu",
                  data: str | None = None) -> ImageAttention:
        """Image ``index`` of ``split`` (from ``data``, default the folder the model was trained
        on) through the checkpoint's model (``attnkit viz CKPT --index N``)."""
        cfg = checkpoint.config.get("data", {})
        directory = data or cfg.get("dir") or DEFAULT_MNIST
        image, label = pick_image(split, load_mnist_splits(directory, cfg.get("valid_size", 5000)), index)  # (H, W) uint8
        model = rebuild_model(checkpoint, device)
        return image_attention(model, normalize(image.unsqueeze(0)).to(device), image.float() / 255.0, label)
