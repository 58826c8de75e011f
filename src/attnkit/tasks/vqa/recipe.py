"""The VQA recipe: question vocabulary and answer list, batches (an image with all its questions,
so each image is encoded once per step), the model (the stacked attention network or the
Transformer of :mod:`attnkit.models.vqa`), training with cross-entropy, prediction and the
metrics (accuracy overall and per kind of question, VQA accuracy for VQA v2, and on generated
data where each hop's attention falls)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...models.vqa import MODELS, RelationalAttentionNetwork, StackedAttentionNetwork, VqaTransformer
from ..vocab import Vocab, pad_batch
from .data import VqaSplit

Tensor = torch.Tensor
VqaModel = StackedAttentionNetwork | RelationalAttentionNetwork | VqaTransformer

#: each model's defaults
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "san": dict(dim=128, att_dim=64, emb_dim=64, hops=2, width=32, dropout=0.1),
    "relational": dict(dim=128, att_dim=64, emb_dim=64, width=32, dropout=0.0),
    "transformer": dict(dim=64, depth=4, num_heads=4, width=32, dropout=0.0),
}


def build_vocab(split: VqaSplit, min_freq: int = 1) -> Vocab:
    """Every word of the training questions (``min_freq`` for large real corpora)."""
    return Vocab.build((q.words for q in split.questions), min_freq=min_freq)


def answer_list(split: VqaSplit, max_answers: Optional[int] = None) -> list[str]:
    """The answers a model chooses from: the training split's, most frequent first (ties
    alphabetically); ``max_answers`` keeps the most frequent (VQA v2's usual 1000 or 3000)."""
    counts = Counter(q.answer for q in split.questions)
    return sorted(counts, key=lambda a: (-counts[a], a))[:max_answers]


def build_model(name: str, vocab: Vocab, answers: Sequence[str], image_size: int,
                config: Optional[dict[str, Any]] = None) -> VqaModel:
    cfg = {**MODEL_DEFAULTS[name], **(config or {})}
    return MODELS[name](len(answers), len(vocab), image_size=image_size, pad_id=vocab.pad_id, **cfg)


#: ``(images (n, 3, S, S) uint8, questions (B, T), image_index (B,), answers (B,))``; an answer
#: outside the answer list is -1 (ignored by the loss, wrong in the metrics)
Batch = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class Encoded:
    """A split's questions as ids: ``questions`` (a list of id lists), ``answers (Q,)`` (-1 for
    an answer outside the list) and ``by_image``: the question indices of each image."""

    questions: list[list[int]]
    answers: Tensor
    by_image: list[list[int]]


def encode(split: VqaSplit, vocab: Vocab, answers: Sequence[str]) -> Encoded:
    index = {a: i for i, a in enumerate(answers)}
    by_image: list[list[int]] = [[] for _ in range(len(split.images))]
    for i, q in enumerate(split.questions):
        by_image[q.image].append(i)
    return Encoded([vocab.encode(q.words) for q in split.questions],
                   torch.tensor([index.get(q.answer, -1) for q in split.questions], dtype=torch.long), by_image)


def batches(split: VqaSplit, enc: Encoded, images_per_batch: int, seed: int, epoch: Optional[int]) -> list[Batch]:
    """Batches of ``images_per_batch`` images with all their questions; shuffled by ``seed`` and
    ``epoch`` while training (``epoch`` given), in order otherwise."""
    order = [i for i in range(len(split.images)) if enc.by_image[i]]
    if epoch is not None:
        random.Random(seed * 7919 + epoch).shuffle(order)
    out = []
    for s in range(0, len(order), images_per_batch):
        imgs = order[s:s + images_per_batch]
        qs = [(k, i) for k, img in enumerate(imgs) for i in enc.by_image[img]]
        questions, _ = pad_batch([enc.questions[i] for _, i in qs])
        out.append((split.images[imgs], questions, torch.tensor([k for k, _ in qs]),
                    enc.answers[[i for _, i in qs]]))
    return out


def make_step(model: VqaModel) -> Callable[[Batch], Tensor]:
    """``step(batch) -> loss``: cross-entropy over the answer list (answers outside it ignored)."""

    def step(batch: Batch) -> Tensor:
        dev = next(model.parameters()).device
        images, questions, image_index, answers = (t.to(dev) for t in batch)
        out = model(images, questions, image_index, need_maps=False)
        return F.cross_entropy(out.logits, answers, ignore_index=-1)

    return step


@dataclass
class Predicted:
    """A split's predicted ``answers`` (one per question, in order) and, when asked for, each
    question's attention ``maps (K, L)``."""

    answers: list[str]
    maps: Optional[list[Tensor]] = None


@torch.no_grad()
def predict(model: VqaModel, split: VqaSplit, vocab: Vocab, answers: Sequence[str], *, maps: bool = False,
            images_per_batch: int = 32, questions: Optional[Sequence[int]] = None) -> Predicted:
    """The model's answer to every question of ``split`` (or to the ``questions`` indices)."""
    model.eval()
    dev = next(model.parameters()).device
    if questions is not None:
        sub = VqaSplit(split.images, [split.questions[i] for i in questions], split.objects, split.names)
        return predict(model, sub, vocab, answers, maps=maps, images_per_batch=images_per_batch)
    enc = encode(split, vocab, answers)
    order = [i for k in range(len(split.images)) for i in enc.by_image[k]]
    preds: list[str] = []
    out_maps: list[Tensor] = []
    for images, qs, image_index, _ in batches(split, enc, images_per_batch, 0, None):
        out = model(images.to(dev), qs.to(dev), image_index.to(dev), need_maps=maps)
        preds += [answers[i] for i in out.logits.argmax(-1).tolist()]
        if maps:
            out_maps += list(out.maps.cpu())
    # batches come image by image; put the predictions back in question order
    result: list[str] = [""] * len(order)
    result_maps: list[Tensor] = [torch.empty(0)] * len(order) if maps else []
    for k, i in enumerate(order):
        result[i] = preds[k]
        if maps:
            result_maps[i] = out_maps[k]
    return Predicted(result, result_maps if maps else None)


def hop_grounding(split: VqaSplit, pred: Predicted, grid: tuple[int, int]) -> dict[str, float]:
    """On generated data: the mean attention mass of each hop (or layer) inside the box of the
    object the question names (``subject``) and, for *closest* / *furthest*, inside the box of
    the object that answers it (``target``)."""
    from ..captioning.metrics import mass_in_box

    if pred.maps is None or not split.objects or not split.objects[0]:
        return {}
    size = split.images.shape[-1]
    out: dict[str, float] = {}
    for role in ("subject", "target"):
        sums, n = None, 0
        for q, m in zip(split.questions, pred.maps):
            o = getattr(q, role)
            if o is None:
                continue
            box = split.objects[q.image][o].box
            v = torch.tensor([mass_in_box(m[k], grid, size, box) for k in range(m.shape[0])])
            sums = v if sums is None else sums + v
            n += 1
        if n:
            for k, v in enumerate((sums / n).tolist()):
                out[f"hop{k + 1}_on_{role}"] = v
    return out


def kind_key(kind: str) -> str:
    """A kind of question as a metric key: ``"non-relational"`` → ``"non_relational"``."""
    return kind.replace("/", "_").replace("-", "_").replace(" ", "_")


def evaluate(model: VqaModel, split: VqaSplit, vocab: Vocab, answers: Sequence[str], *,
             grounding: bool = True) -> tuple[dict[str, Any], Predicted]:
    """Accuracy, accuracy per kind of question, VQA accuracy (when the questions carry the
    annotators' answers) and, on generated data, :func:`hop_grounding`."""
    from .metrics import accuracy, accuracy_by_kind, vqa_accuracy

    want_maps = grounding and bool(split.objects) and bool(split.objects[0])
    pred = predict(model, split, vocab, answers, maps=want_maps)
    metrics: dict[str, Any] = {"accuracy": accuracy(pred.answers, split.questions)}
    for kind, (acc, n) in sorted(accuracy_by_kind(pred.answers, split.questions).items()):
        metrics[f"{kind_key(kind)}_accuracy"] = acc
    if any(q.answers for q in split.questions):
        metrics["vqa_accuracy"] = vqa_accuracy(pred.answers, split.questions)
    if want_maps:
        metrics.update(hop_grounding(split, pred, model.grid))
    return metrics, pred


# ---------------------------------------------------------------------------------------------
# A training run (attnkit train vqa)
# ---------------------------------------------------------------------------------------------

#: the data options' defaults (``data``: ``auto`` is easy-VQA when the package is installed,
#: Sort-of-CLEVR otherwise)
DATA_DEFAULTS = dict(data="auto", n_train=10000, n_valid=200, n_test=1000, data_seed=1234)
#: the recipe's defaults: ``images_per_batch`` images with all their questions per step
#: ``curriculum``: the first epochs that train on Sort-of-CLEVR's non-relational questions only
TRAIN_DEFAULTS = dict(images_per_batch=16, lr=1e-3, weight_decay=1e-4, grad_clip=5.0, curriculum=0)
EPOCHS = {"easy-vqa": 20, "sort-of-clevr": 30, "vqa-v2": 10}


def curriculum_stage(split: VqaSplit, epoch: int, curriculum: int) -> VqaSplit:
    """The questions epoch ``epoch`` trains on: only the non-relational ones during the first
    ``curriculum`` epochs (the model first learns to find an object by its colour, then is asked
    about relations), all of them after.

    >>> from attnkit.tasks.vqa.data import generate_sort_of_clevr
    >>> s = generate_sort_of_clevr(2, 1, 1, seed=0)["train"]
    >>> {q.kind for q in curriculum_stage(s, 0, 1).questions}, len(curriculum_stage(s, 1, 1).questions)
    ({'non-relational'}, 40)
    """
    if epoch >= curriculum:
        return split
    return VqaSplit(split.images, [q for q in split.questions if q.kind == "non-relational"], split.objects,
                    split.names)


def resolve_data(name: str) -> str:
    """``auto`` → ``easy-vqa`` when the easy-vqa package is installed, else ``sort-of-clevr``."""
    if name != "auto":
        return name
    import importlib.util

    return "easy-vqa" if importlib.util.find_spec("easy_vqa") is not None else "sort-of-clevr"


def load_splits(data: dict[str, Any]) -> dict[str, VqaSplit]:
    """The splits a run's ``data`` config describes."""
    from .data import generate_sort_of_clevr, read_easy_vqa

    kind = data["data"]
    if kind == "sort-of-clevr":
        return generate_sort_of_clevr(data["n_train"], data["n_valid"], data["n_test"], seed=data["data_seed"])
    if kind == "easy-vqa":
        return read_easy_vqa(data.get("easy_vqa_dir"), limit=data.get("limit"))
    if kind == "vqa-v2":
        from .data import read_vqa_v2

        out = {}
        for split in ("train", "valid", "test"):
            q, a, im = (data.get(f"{split}_{k}") for k in ("questions", "annotations", "images"))
            if q:
                out[split] = read_vqa_v2(q, a, im, size=data["image_size"], limit=data.get("limit"),
                                         options=tuple(f"--{split}-{k}" for k in ("questions", "annotations", "images")))
        return out
    raise ValueError(f"data must be one of auto, easy-vqa, sort-of-clevr, vqa-v2; got {kind!r}")


@dataclass
class Run:
    """A finished training run: the model, its vocabulary and answers, the splits, the config."""

    model: VqaModel
    vocab: Vocab
    answers: list[str]
    splits: dict[str, VqaSplit]
    config: dict[str, Any]
    seconds: float
    stopped: str
    trainer: Optional[dict[str, Any]]


def rebuild(checkpoint) -> tuple[VqaModel, Vocab, list[str], dict[str, Any]]:
    """Model (weights loaded), question vocabulary and answers of a VQA checkpoint."""
    from ...checkpoint import load_weights

    c = checkpoint.require(("model_config", "vocab", "answers", "model_name"), "VQA")
    if c["model_name"] not in MODELS:
        raise ValueError(f"checkpoint {str(checkpoint.path)!r}: unknown VQA model {c['model_name']!r}; "
                         f"expected one of {sorted(MODELS)}")
    vocab, answers = Vocab.from_json(c["vocab"]), list(c["answers"])
    model = MODELS[c["model_name"]](**c["model_config"])
    load_weights(model, checkpoint)
    return model.eval(), vocab, answers, c


def data_config(args: Any) -> dict[str, Any]:
    """The ``data`` entry of a new run's config from the command-line options."""
    from ..args import option

    kind = resolve_data(option(args, "data", "auto"))
    data: dict[str, Any] = {"data": kind}
    if kind == "sort-of-clevr":
        data.update({k: option(args, k, v) for k, v in DATA_DEFAULTS.items() if k != "data"})
    elif kind == "easy-vqa":
        d = option(args, "easy_vqa_dir", None)
        data.update({"easy_vqa_dir": str(Path(d).resolve()) if d else None, "limit": option(args, "limit", None)})
    else:
        for split in ("train", "valid", "test"):
            for k in ("questions", "annotations", "images"):
                v = option(args, f"{split}_{k}", None)
                data[f"{split}_{k}"] = str(Path(v).resolve()) if v else None
        data.update({"image_size": int(option(args, "image_size", 64)), "limit": option(args, "limit", None),
                     "max_answers": int(option(args, "max_answers", 1000))})
    return data


def train(task_name: str, args: Any, resume=None, log: Callable[[str], None] = print) -> Run:
    """Train a VQA model as ``args`` says (see :class:`attnkit.tasks.vqa.task.VqaTask`), saving a
    checkpoint after every epoch; ``resume`` continues a checkpoint's run."""
    from ...training import seed_everything
    from ..args import option
    from ..loop import train_epochs

    seed = int(option(args, "seed", 0))
    seed_everything(seed)
    if resume is not None:
        cfg = resume.config
        data, train_cfg, name = cfg["data"], dict(cfg["train"]), cfg["model_name"]
        splits = load_splits(data)
        model, vocab, answers, _ = rebuild(resume)
        model.train()
    else:
        data = data_config(args)
        splits = load_splits(data)
        if not splits.get("train") or not len(splits["train"]):
            raise ValueError("the training split is empty")
        name = option(args, "model", "san")
        vocab = build_vocab(splits["train"], min_freq=1 if data["data"] != "vqa-v2" else 3)
        answers = answer_list(splits["train"], data.get("max_answers"))
        overrides = {k: option(args, k, None) for k in ("dim", "hops", "depth") if option(args, k, None)}
        if name != "transformer":
            overrides.pop("depth", None)
        if name != "san":
            overrides.pop("hops", None)
        model = build_model(name, vocab, answers, splits["train"].images.shape[-1], overrides)
        train_cfg = {k: option(args, k, v) for k, v in TRAIN_DEFAULTS.items()}
    curriculum = int(train_cfg.get("curriculum", 0))
    if curriculum and data["data"] != "sort-of-clevr":
        raise ValueError(f"--curriculum: only Sort-of-CLEVR has the non-relational questions a curriculum starts "
                         f"with; got --data {data['data']}")
    model.to(option(args, "device", "cpu"))
    # a resumed run keeps its length unless --epochs says otherwise
    epochs = int(option(args, "epochs", train_cfg.get("epochs") or EPOCHS[data["data"]]))
    train_cfg["epochs"] = epochs
    stages = {False: splits["train"]}
    if curriculum:
        stages[True] = curriculum_stage(splits["train"], 0, curriculum)
    encoded = {k: encode(v, vocab, answers) for k, v in stages.items()}
    enc = encoded[False]
    steps_per_epoch = -(-sum(1 for q in enc.by_image if q) // train_cfg["images_per_batch"])
    config: dict[str, Any] = {"task": task_name, "model": type(model).__name__, "model_name": name,
                              "model_config": model.config, "vocab": vocab.to_json(), "answers": answers,
                              "data": data, "train": train_cfg, "sizes": {s: len(v) for s, v in splits.items()}}
    valid = splits.get("valid") or splits.get("test")

    def validate(epoch: int) -> dict[str, float]:
        from .metrics import accuracy

        pred = predict(model, valid, vocab, answers)
        return {"valid accuracy": accuracy(pred.answers, valid.questions)}

    def epoch_batches(e: int) -> list[Batch]:
        first = e < curriculum
        return batches(stages[first], encoded[first], train_cfg["images_per_batch"], seed, e)

    hist, trainer, history = train_epochs(
        model, args, task_name=task_name, config=config, train_cfg=train_cfg, epochs=epochs,
        steps_per_epoch=steps_per_epoch, batches=epoch_batches, step=make_step(model), validate=validate,
        resume=resume, weight_decay=train_cfg["weight_decay"], log=log)
    config["history"] = history
    return Run(model.eval(), vocab, answers, splits, config, hist.seconds, hist.stopped, trainer)
