"""``attnkit train captioning``, ``attnkit eval CKPT`` and ``attnkit viz CKPT --index N`` for the
captioner: options, the final test on the held-out split, the printed lines and the pictures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ...checkpoint import Checkpoint
from ..args import nonnegative_float, nonnegative_int, option, positive_float, positive_int
from ..base import Task, TrainResult, load_resume
from . import recipe
from .data import DEFAULT_MNIST


def _summary(metrics: dict[str, Any], n: int, split: str, beam: int) -> str:
    parts = [f"{split} BLEU-4 {metrics['bleu4']:.3f}"]
    if "cider_d" in metrics:
        parts.append(f"CIDEr-D {metrics['cider_d']:.3f}")
    if metrics.get("attention_correctness") is not None:
        parts.append(f"attention correctness {metrics['attention_correctness']:.3f} "
                     f"({metrics['grounded_words']} grounded words)")
    return ", ".join(parts) + f" ({n} images, beam {beam})"


class CaptioningTask(Task):
    """Image captioning with soft or hard attention (Show, Attend and Tell)."""

    name = "captioning"
    help = ("Caption images with an LSTM that attends over a CNN's grid (Show, Attend and Tell): soft or hard "
            "(REINFORCE) attention. Default data: generated scenes of MNIST digits and coloured shapes (no "
            "download); real data: a Karpathy-split JSON (Flickr8k/30k, COCO). Reports test BLEU-4, CIDEr-D and "
            "attention correctness.")
    writes = ("the checkpoint: model.safetensors, config.json (model, vocabulary, data, history, test metrics), "
              "trainer.json + trainer.safetensors (for --resume) and checkpoint.json; no pictures (attnkit viz draws "
              "them: one attention map per word over the image)")
    viz_args = "--index 0"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("captioning")
        g.add_argument("--attention", choices=["soft", "hard"], default="soft",
                       help="soft (deterministic) or hard (stochastic, trained with REINFORCE) attention (default soft)")
        g.add_argument("--beam", type=positive_int, default=3, help="beam size of the final test (default 3)")
        g.add_argument("--batch-size", type=positive_int, default=None,
                       help=f"images per step (default {recipe.TRAIN_DEFAULTS['batch_size']})")
        g.add_argument("--lr", type=positive_float, default=None,
                       help=f"peak learning rate (default {recipe.TRAIN_DEFAULTS['lr']})")
        g.add_argument("--doubly-stochastic", type=nonnegative_float, default=None,
                       help="weight of the doubly stochastic attention penalty "
                            f"(default {recipe.TRAIN_DEFAULTS['doubly_stochastic']})")
        g.add_argument("--entropy-weight", type=nonnegative_float, default=None,
                       help=f"hard attention's entropy bonus (default {recipe.TRAIN_DEFAULTS['entropy_weight']})")
        d = p.add_argument_group("data (default: generated scenes)")
        d.add_argument("--n-train", type=positive_int, default=None,
                       help=f"generated training scenes (default {recipe.DATA_DEFAULTS['n_train']})")
        d.add_argument("--n-valid", type=positive_int, default=None,
                       help=f"generated validation scenes (default {recipe.DATA_DEFAULTS['n_valid']})")
        d.add_argument("--n-test", type=positive_int, default=None,
                       help=f"generated test scenes (default {recipe.DATA_DEFAULTS['n_test']})")
        d.add_argument("--data-seed", type=nonnegative_int, default=None,
                       help=f"seed of the generated scenes (default {recipe.DATA_DEFAULTS['data_seed']})")
        d.add_argument("--digits", choices=["auto", "mnist", "sklearn"], default=None,
                       help="digits pasted into the scenes: MNIST (--mnist folder), scikit-learn's 8x8 digits, or "
                            "auto: MNIST when the folder exists (default auto)")
        d.add_argument("--mnist", default=DEFAULT_MNIST, help=f"folder with the MNIST idx files (default {DEFAULT_MNIST})")
        d.add_argument("--karpathy-json", default=None,
                       help="real data instead: a Karpathy-split dataset_*.json (Flickr8k/Flickr30k/COCO)")
        d.add_argument("--images", default=None, help="the folder of the images that --karpathy-json names")
        d.add_argument("--image-size", type=positive_int, default=64,
                       help="real images are resized to this many pixels a side (a multiple of 8; default 64)")
        d.add_argument("--limit", type=positive_int, default=None, help="read at most N real images per split")

    def train(self, args: argparse.Namespace) -> TrainResult:
        if option(args, "karpathy_json", None) and not option(args, "images", None):
            raise ValueError("--karpathy-json needs --images, the folder its file names are relative to")
        if option(args, "image_size", 64) % 8:
            raise ValueError(f"--image-size must be a multiple of 8; got {args.image_size}")
        resume = load_resume(self, args)
        run = recipe.train(self.name, args, resume=resume)
        beam = int(option(args, "beam", 3))
        metrics, _ = recipe.evaluate(run.model, run.splits["test"], run.vocab, beam=beam)
        run.config["metrics"] = {f"test_{k}": v for k, v in metrics.items()} | {"beam": beam}
        from ...checkpoint import save_checkpoint

        save_checkpoint(args.out, model=run.model, config=run.config, trainer_state=run.trainer)
        return TrainResult(metric="test bleu4", value=metrics["bleu4"],
                           summary=_summary(metrics, len(run.splits["test"]), "test", beam),
                           checkpoint=Path(args.out), seconds=run.seconds, extra=metrics)

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        split = option(args, "split", "test")
        model, vocab, cfg = recipe.rebuild(checkpoint)
        splits = recipe.load_splits(cfg["data"])
        if split not in splits:
            raise ValueError(f"--split: captioning has splits {', '.join(splits)}; got {split!r}")
        beam = int(option(args, "beam", cfg.get("metrics", {}).get("beam", 3)))
        metrics, _ = recipe.evaluate(model, splits[split], vocab, beam=beam)
        return {f"{split} {k.replace('_', ' ')}": v for k, v in metrics.items()} | {"images": len(splits[split])}

    def viz_files(self, checkpoint: Checkpoint, *, split: str = "test", index: int = 0, out: str | Path,
                  beam: int = 3) -> tuple[list[Path], list[str]]:
        """``attnkit viz CKPT --index N``: the caption of one image with one attention map per word,
        as ``caption_attention.png`` and ``caption_attention.html``; returns the files and the lines
        to print."""
        from ...viz.caption import caption_html, caption_png

        model, vocab, cfg = recipe.rebuild(checkpoint)
        splits = recipe.load_splits(cfg["data"])
        if split not in splits:
            raise ValueError(f"--split must be one of {', '.join(splits)}; got {split!r}")
        scenes = splits[split]
        if not 0 <= index < len(scenes):
            raise ValueError(f"--index: the {split} split has {len(scenes)} images (0-{len(scenes) - 1}); got {index}")
        scene = scenes[index]
        dec = recipe.decode(model, [scene], vocab, beam=beam)
        words, alphas = dec.words[0], dec.alphas[0]
        if not words:
            raise ValueError(f"the model wrote an empty caption for {split} image {index}")
        caption = " ".join(words)
        title = f"{cfg['attention']} attention, {split} image {index}: {caption}"
        out = Path(out)
        png = caption_png(scene.image, words, alphas, model.grid, out / "caption_attention.png", title=title)
        page = caption_html(scene.image, words, alphas, model.grid, out / "caption_attention.html", title=title)
        lines = [f"input:  {split} image {index}" + (f" ({scene.name})" if scene.name else ""),
                 f"output: {caption}",
                 f"  references: {' | '.join(c.text for c in scene.captions)}"]
        if scene.objects:
            from .metrics import attention_correctness

            value, n = attention_correctness([words], [alphas], [scene.objects], model.grid, scene.image.shape[-1])
            if value is not None:
                lines.append(f"  attention correctness on this caption: {value:.3f} ({n} grounded words)")
        return [png, page], lines
