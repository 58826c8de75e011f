"""``attnkit train vqa``, ``attnkit eval CKPT``, ``attnkit translate CKPT`` (answer questions) and
``attnkit viz CKPT --index N`` for visual question answering: options, the final test on the
held-out split, the printed lines and the pictures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ...checkpoint import Checkpoint
from ...training import format_metrics
from ..args import nonnegative_int, option, positive_float, positive_int
from ..base import Task, TrainResult, load_resume
from . import recipe

DATA_CHOICES = ("auto", "easy-vqa", "sort-of-clevr", "vqa-v2")


def _shown(metrics: dict[str, Any], split: str, n: int) -> dict[str, Any]:
    """The metrics as ``attnkit eval`` prints them (and ``attnkit train`` ends with)."""
    return {f"{split} {k.replace('_', ' ')}": v for k, v in metrics.items()} | {"questions": n}


class VqaTask(Task):
    """Visual question answering with stacked attention (SAN) or a Transformer."""

    name = "vqa"
    help = ("Answer questions about images: the stacked attention network (2 hops of question-guided attention "
            "over image regions) or a Transformer over image regions and question words. Default data: easy-VQA "
            "when the easy-vqa package is installed (pip install -e \".[apps]\"), else generated Sort-of-CLEVR "
            "(relational and non-relational questions); real data: VQA v2 JSON with COCO images. Reports test "
            "accuracy per kind of question.")
    translates = True
    writes = ("the checkpoint: model.safetensors, config.json (model, vocabulary, answers, data, history, test "
              "metrics), trainer.json + trainer.safetensors (for --resume) and checkpoint.json; no pictures "
              "(attnkit viz draws them: the image with one attention map per hop)")
    viz_args = "--index 0"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("vqa")
        g.add_argument("--model", choices=sorted(recipe.MODEL_DEFAULTS), default="san",
                       help="san: the stacked attention network; relational: a dot-product hop that finds the "
                            "question's object, an additive hop and a relation term over (object, region) pairs "
                            "(for Sort-of-CLEVR's relational questions); transformer: one encoder over image regions "
                            "and question words (default san)")
        g.add_argument("--dim", type=positive_int, default=None, help="model width (default: the model's)")
        g.add_argument("--hops", type=positive_int, default=None, help="SAN's attention hops (default 2)")
        g.add_argument("--depth", type=positive_int, default=None, help="the Transformer's layers (default 4)")
        g.add_argument("--images-per-batch", type=positive_int, default=None,
                       help="images per step, each with all its questions "
                            f"(default {recipe.TRAIN_DEFAULTS['images_per_batch']})")
        g.add_argument("--lr", type=positive_float, default=None,
                       help=f"peak learning rate (default {recipe.TRAIN_DEFAULTS['lr']})")
        g.add_argument("--curriculum", type=nonnegative_int, default=None,
                       help="train the first N epochs on Sort-of-CLEVR's non-relational questions only, so that the "
                            "model learns to find an object by its colour before it is asked about relations "
                            f"(default {recipe.TRAIN_DEFAULTS['curriculum']})")
        d = p.add_argument_group("data")
        d.add_argument("--data", choices=DATA_CHOICES, default="auto",
                       help="auto: easy-VQA when the easy-vqa package is installed, else Sort-of-CLEVR; vqa-v2 needs "
                            "--train-questions, --train-annotations, --train-images (and the same for test)")
        d.add_argument("--easy-vqa-dir", default=None,
                       help="easy-VQA's data folder (train/, test/; default: the one the easy-vqa package ships)")
        d.add_argument("--n-train", type=positive_int, default=None,
                       help=f"Sort-of-CLEVR training images, 20 questions each (default {recipe.DATA_DEFAULTS['n_train']})")
        d.add_argument("--n-valid", type=positive_int, default=None,
                       help=f"Sort-of-CLEVR validation images (default {recipe.DATA_DEFAULTS['n_valid']})")
        d.add_argument("--n-test", type=positive_int, default=None,
                       help=f"Sort-of-CLEVR test images (default {recipe.DATA_DEFAULTS['n_test']})")
        d.add_argument("--data-seed", type=nonnegative_int, default=None,
                       help=f"seed of the generated images (default {recipe.DATA_DEFAULTS['data_seed']})")
        for split in ("train", "valid", "test"):
            d.add_argument(f"--{split}-questions", default=None, help=f"VQA v2: the {split} questions JSON")
            d.add_argument(f"--{split}-annotations", default=None, help=f"VQA v2: the {split} annotations JSON")
            d.add_argument(f"--{split}-images", default=None, help=f"VQA v2: the folder of the {split} COCO images")
        d.add_argument("--image-size", type=positive_int, default=64,
                       help="VQA v2 images are resized to this many pixels a side (default 64)")
        d.add_argument("--max-answers", type=positive_int, default=1000,
                       help="VQA v2: the most frequent training answers to choose from (default 1000)")
        d.add_argument("--limit", type=positive_int, default=None, help="read at most N real images per split")

    def train(self, args: argparse.Namespace) -> TrainResult:
        if recipe.resolve_data(option(args, "data", "auto")) == "vqa-v2":
            for split in ("train", "test"):
                missing = [f"--{split}-{k}" for k in ("questions", "annotations", "images")
                           if not option(args, f"{split}_{k}", None)]
                if missing:
                    raise ValueError(f"--data vqa-v2 needs {', '.join(missing)}")
        data = recipe.resolve_data(option(args, "data", "auto"))
        if option(args, "curriculum", 0) and data != "sort-of-clevr":
            raise ValueError(f"--curriculum: only Sort-of-CLEVR has the non-relational questions a curriculum starts "
                             f"with; got --data {data}")
        resume = load_resume(self, args)
        run = recipe.train(self.name, args, resume=resume)
        metrics, _ = recipe.evaluate(run.model, run.splits["test"], run.vocab, run.answers)
        run.config["metrics"] = {f"test_{k}": v for k, v in metrics.items()}
        from ...checkpoint import save_checkpoint

        save_checkpoint(args.out, model=run.model, config=run.config, trainer_state=run.trainer)
        return TrainResult(metric="test accuracy", value=metrics["accuracy"],
                           summary=format_metrics(_shown(metrics, "test", len(run.splits["test"]))),
                           checkpoint=Path(args.out), seconds=run.seconds, extra=metrics)

    def _split(self, cfg: dict[str, Any], split: str):
        splits = recipe.load_splits(cfg["data"])
        if split not in splits:
            raise ValueError(f"--split: this VQA run has splits {', '.join(splits)}; got {split!r}")
        return splits[split]

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        split = option(args, "split", "test")
        model, vocab, answers, cfg = recipe.rebuild(checkpoint)
        data = self._split(cfg, split)
        metrics, _ = recipe.evaluate(model, data, vocab, answers)
        return _shown(metrics, split, len(data))

    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        """Each line is ``IMAGE<TAB>QUESTION``: IMAGE is an image file, or ``test:N`` (image N of the
        run's test split); the answer is printed for each line."""
        import torch

        from .data import Question, VqaSplit, load_image, tokenize

        model, vocab, answers, cfg = recipe.rebuild(checkpoint)
        size = model.config["image_size"]
        out = []
        cache: dict[str, Any] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():  # an empty line answers with an empty line
                out.append("")
                continue
            if "\t" not in line:
                raise ValueError(f"line {n}: expected IMAGE<TAB>QUESTION (an image file or test:N, a tab, the "
                                 f"question); got {line!r}")
            image, text = line.split("\t", 1)
            words = tokenize(text)
            if not words:
                raise ValueError(f"line {n}: the question is empty")
            if image.startswith(("test:", "train:", "valid:")):
                split, _, k = image.partition(":")
                if split not in cache:
                    cache[split] = self._split(cfg, split)
                data = cache[split]
                if not k.isdigit() or not 0 <= int(k) < len(data.images):
                    raise ValueError(f"line {n}: {image!r}: the {split} split has images 0-{len(data.images) - 1}")
                pixels = data.images[int(k)]
            else:
                pixels = torch.from_numpy(load_image(Path(image), f"line {n}", size))
            one = VqaSplit(pixels[None], [Question(words, "", 0, "")])
            out.append(recipe.predict(model, one, vocab, answers).answers[0])
        return out

    def viz_files(self, checkpoint: Checkpoint, *, split: str = "test", index: int = 0, out: str | Path,
                  beam: int = 1) -> tuple[list[Path], list[str]]:
        """``attnkit viz CKPT --index N``: test question N over its image with one attention map per
        hop (SAN) or layer (Transformer), as ``vqa_attention.png`` and ``vqa_attention.html``;
        returns the files and the lines to print."""
        from ...viz.caption import caption_html, caption_png

        model, vocab, answers, cfg = recipe.rebuild(checkpoint)
        data = self._split(cfg, split)
        if not 0 <= index < len(data.questions):
            raise ValueError(f"--index: the {split} split has {len(data.questions)} questions "
                             f"(0-{len(data.questions) - 1}); got {index}")
        q = data.questions[index]
        pred = recipe.predict(model, data, vocab, answers, maps=True, questions=[index])
        maps = pred.maps[0]
        unit = "layer" if cfg["model_name"] == "transformer" else "hop"
        labels = [f"{unit} {k + 1}" for k in range(maps.shape[0])]
        image = data.images[q.image].float() / 255.0
        title = f"{q.text}? → {pred.answers[0]} (truth: {q.answer})"
        out = Path(out)
        png = caption_png(image, labels, maps, model.grid, out / "vqa_attention.png", title=title)
        page = caption_html(image, labels, maps, model.grid, out / "vqa_attention.html", title=title)
        lines = [f"input:  {split} question {index} about image {q.image}"
                 + (f" ({data.names[q.image]})" if data.names else "") + f": {q.text}?",
                 f"output: {pred.answers[0]}  (truth: {q.answer}; {q.kind})"]
        if data.objects and data.objects[q.image]:
            from ..captioning.metrics import mass_in_box

            for role in ("subject", "target"):
                o = getattr(q, role)
                if o is not None:
                    obj = data.objects[q.image][o]
                    shares = ", ".join(f"{lab} {mass_in_box(maps[k], model.grid, image.shape[-1], obj.box):.2f}"
                                       for k, lab in enumerate(labels))
                    lines.append(f"  attention on the {obj.colour} {obj.shape} ({role}): {shares}")
        return [png, page], lines
