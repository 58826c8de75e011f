"""The captioning recipe: vocabulary, batches, the Show-Attend-Tell model, its training step (soft:
cross-entropy + the doubly stochastic penalty; hard: cross-entropy + REINFORCE with a moving-average
baseline and an entropy bonus), decoding and the test metrics."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...models.captioner import ShowAttendTell, doubly_stochastic_penalty
from ...normalizers import reinforce_loss
from ..vocab import Vocab, pad_batch
from .data import DEFAULT_MNIST, Scene
from .metrics import attention_correctness, bleu4, cider_d

Tensor = torch.Tensor

#: the model's defaults for the generated scenes
MODEL_DEFAULTS = dict(feature_dim=128, emb_dim=64, hidden_dim=256, att_dim=128, dropout=0.2)


def build_vocab(scenes: Sequence[Scene], min_freq: int = 1) -> Vocab:
    """Every word of the training captions (``min_freq`` for large real corpora)."""
    return Vocab.build((c.words for s in scenes for c in s.captions), min_freq=min_freq)


def build_model(vocab: Vocab, attention: str, image_size: int, config: Optional[dict[str, Any]] = None,
                seed: int = 0) -> ShowAttendTell:
    cfg = {**MODEL_DEFAULTS, **(config or {})}
    gen = torch.Generator().manual_seed(seed + 17) if attention == "hard" else None
    return ShowAttendTell(len(vocab), bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                          attention=attention, image_size=image_size, generator=gen, **cfg)


Batch = tuple[Tensor, Tensor, Tensor]


def batches(scenes: Sequence[Scene], vocab: Vocab, batch_size: int, seed: int, epoch: Optional[int]
            ) -> list[Batch]:
    """``(images (B, 3, S, S), words_in (B, T), targets (B, T))`` batches; while training
    (``epoch`` given) each image comes with one of its captions drawn at random, shuffled by
    ``seed`` and ``epoch``; otherwise in order, with each image's first caption."""
    rng = random.Random(seed * 7919 + (epoch if epoch is not None else -1))
    order = list(range(len(scenes)))
    if epoch is not None:
        rng.shuffle(order)
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        caps = [scenes[i].captions[rng.randrange(len(scenes[i].captions)) if epoch is not None else 0] for i in idx]
        ids = [vocab.encode(c.words, bos=True, eos=True) for c in caps]
        words, _ = pad_batch([x[:-1] for x in ids], vocab.pad_id)
        targets, _ = pad_batch([x[1:] for x in ids], vocab.pad_id)
        images = torch.stack([scenes[i].image for i in idx])
        out.append((images, words, targets))
    return out


@dataclass
class StepState:
    """What a training step keeps between steps: hard attention's moving-average baseline."""

    baseline: Optional[float] = None
    momentum: float = 0.9
    stats: dict[str, float] = field(default_factory=dict)


def make_step(model: ShowAttendTell, *, doubly_stochastic: float = 1.0, entropy_weight: float = 0.01,
              reinforce_weight: float = 1.0, state: Optional[StepState] = None) -> Callable[[Batch], Tensor]:
    """``step(batch) -> loss`` for :func:`attnkit.training.fit`.

    soft: ``CE + doubly_stochastic * penalty``. hard: ``CE + reinforce_weight * REINFORCE`` where the
    reward of a caption is its mean token log-likelihood under the sampled locations, the baseline
    a moving average of the rewards, plus ``entropy_weight`` times the attention's entropy."""
    st = state or StepState()

    def step(batch: Batch) -> Tensor:
        dev = next(model.parameters()).device
        images, words, targets = (t.to(dev) for t in batch)
        out = model(images, words)
        real = targets != model.pad_id
        nll = F.cross_entropy(out.logits.transpose(1, 2), targets, ignore_index=model.pad_id, reduction="none")
        per_caption = (nll * real).sum(1) / real.sum(1).clamp(min=1)  # (B,)
        loss = per_caption.mean()
        if doubly_stochastic > 0:
            loss = loss + doubly_stochastic * doubly_stochastic_penalty(out.alphas, real)
        if out.log_probs is not None:
            reward = -per_caption.detach()
            mean_reward = float(reward.mean())
            b = mean_reward if st.baseline is None else st.baseline
            log_prob = (out.log_probs * real).sum(1)
            entropy = (out.entropy * real).sum(1) / real.sum(1).clamp(min=1)
            loss = loss + reinforce_weight * reinforce_loss(log_prob, reward, b, entropy=entropy,
                                                            entropy_weight=entropy_weight)
            st.baseline = mean_reward if st.baseline is None else st.momentum * st.baseline + (1 - st.momentum) * mean_reward
        return loss

    return step


@dataclass
class Decoded:
    """Decoded captions of a split: ``words`` per image, the attention ``alphas (T, L)`` that
    produced each word."""

    words: list[list[str]]
    alphas: list[Tensor]


def decode(model: ShowAttendTell, scenes: Sequence[Scene], vocab: Vocab, *, beam: int = 1, max_len: int = 20,
           batch_size: int = 100) -> Decoded:
    words: list[list[str]] = []
    alphas: list[Tensor] = []
    for s in range(0, len(scenes), batch_size):
        images = torch.stack([x.image for x in scenes[s:s + batch_size]]).to(next(model.parameters()).device)
        ids, maps = model.beam_search(images, beam=beam, max_len=max_len)
        words += [vocab.decode(x) for x in ids]
        alphas += [m.cpu() for m in maps]
    return Decoded(words, alphas)


def evaluate(model: ShowAttendTell, scenes: Sequence[Scene], vocab: Vocab, *, beam: int = 1,
             cider: bool = True) -> tuple[dict[str, Any], Decoded]:
    """BLEU-4, CIDEr-D and (for scenes with boxes) attention correctness of the decoded captions."""
    dec = decode(model, scenes, vocab, beam=beam)
    hyps = [" ".join(w) for w in dec.words]
    refs = [[c.text for c in s.captions] for s in scenes]
    metrics: dict[str, Any] = {"bleu4": bleu4(hyps, refs)}
    if cider:
        metrics["cider_d"] = cider_d(hyps, refs)[0]
    if scenes and scenes[0].objects:
        size = scenes[0].image.shape[-1]
        value, n = attention_correctness(dec.words, dec.alphas, [s.objects for s in scenes], model.grid, size)
        metrics["attention_correctness"] = value
        metrics["grounded_words"] = n
    return metrics, dec


# ---------------------------------------------------------------------------------------------
# A training run (attnkit train captioning)
# ---------------------------------------------------------------------------------------------

#: the generated corpus and the recipe's defaults (``attnkit train captioning`` options)
DATA_DEFAULTS = dict(n_train=6000, n_valid=300, n_test=1000, data_seed=1234, digits="auto")
#: ``doubly_stochastic`` is 0 by default: each caption here names two small objects of a mostly empty
#: image, and the penalty (which asks every cell for one unit of attention over the caption) spreads
#: the attention away from them (docs/benchmarks.md has both runs)
#: hard attention: the share of steps that use the expected context starts at 1 (the attention and
#: the decoder first learn as with soft attention) and falls linearly to ``expected_share`` (Xu et
#: al.'s 0.5) over the first half of the epochs
TRAIN_DEFAULTS = dict(batch_size=64, lr=2e-3, grad_clip=5.0, doubly_stochastic=0.0, entropy_weight=0.01,
                      max_len=20, expected_share=0.5)


def expected_share(epoch: int, epochs: int, final: float) -> float:
    """Hard attention's share of expected-context steps in ``epoch`` (see :data:`TRAIN_DEFAULTS`).

    >>> [round(expected_share(e, 8, 0.5), 3) for e in range(8)]
    [1.0, 0.875, 0.75, 0.625, 0.5, 0.5, 0.5, 0.5]
    """
    ramp = max(1, epochs // 2)
    return final + (1.0 - final) * max(0.0, 1.0 - epoch / ramp)
#: epochs by attention kind: hard attention's REINFORCE gradient is noisier, and with 12 epochs its
#: validation BLEU-4 was still rising at the last epoch in every stored run (docs/benchmarks.md)
EPOCHS = {"soft": 12, "hard": 20}


def load_splits(data: dict[str, Any]) -> dict[str, list[Scene]]:
    """The splits a run's ``data`` config describes: generated scenes, or a Karpathy JSON."""
    from .data import generate_scenes, read_karpathy

    if data.get("karpathy_json"):
        return read_karpathy(data["karpathy_json"], data["images"], size=data["image_size"], limit=data.get("limit"))
    return generate_scenes(data["n_train"], data["n_valid"], data["n_test"], seed=data["data_seed"],
                           digits=data["digits"], mnist_dir=data["mnist_dir"])


@dataclass
class Run:
    """A finished training run: the model, its vocabulary, the splits, the config, timing."""

    model: ShowAttendTell
    vocab: Vocab
    splits: dict[str, list[Scene]]
    config: dict[str, Any]
    seconds: float
    stopped: str
    trainer: Optional[dict[str, Any]]


def rebuild(checkpoint) -> tuple[ShowAttendTell, Vocab, dict[str, Any]]:
    """Model (weights loaded) and vocabulary of a captioning checkpoint."""
    from ...checkpoint import load_weights

    c = checkpoint.require(("model_config", "vocab", "attention"), "captioning")
    vocab = Vocab.from_json(c["vocab"])
    model = ShowAttendTell(len(vocab), bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                           attention=c["attention"], **c["model_config"])
    load_weights(model, checkpoint)
    return model.eval(), vocab, c


def train(task_name: str, args: Any, resume=None, log: Callable[[str], None] = print) -> Run:
    """Train a captioner as ``args`` says (see :class:`attnkit.tasks.captioning.task.CaptioningTask`),
    saving a checkpoint after every epoch; ``resume`` continues a checkpoint's run."""
    from ...training import seed_everything
    from ..args import option
    from ..loop import train_epochs

    seed = int(option(args, "seed", 0))
    seed_everything(seed)
    if resume is not None:
        cfg = resume.config
        data, train_cfg, attention = cfg["data"], dict(cfg["train"]), cfg["attention"]
        splits = load_splits(data)
        model, vocab, _ = rebuild(resume)
        model.train()
        model_cfg = cfg["model_config"]
    else:
        if option(args, "karpathy_json", None):
            data = {"karpathy_json": str(Path(args.karpathy_json).resolve()),
                    "images": str(Path(option(args, "images", ".")).resolve()),
                    "image_size": int(option(args, "image_size", 64)), "limit": option(args, "limit", None)}
        else:
            data = {k: option(args, k, v) for k, v in DATA_DEFAULTS.items()}
            data["mnist_dir"] = str(option(args, "mnist", DEFAULT_MNIST))
            if data["digits"] == "auto":  # resolved now: the checkpoint says which digits it saw
                data["digits"] = "mnist" if Path(data["mnist_dir"]).is_dir() else "sklearn"
        splits = load_splits(data)
        if not splits["train"]:
            raise ValueError("the training split is empty")
        attention = option(args, "attention", "soft")
        vocab = build_vocab(splits["train"], min_freq=1 if not data.get("karpathy_json") else 5)
        model_cfg = {**MODEL_DEFAULTS, "image_size": splits["train"][0].image.shape[-1]}
        model = build_model(vocab, attention, model_cfg["image_size"], seed=seed)
        train_cfg = {k: option(args, k, v) for k, v in TRAIN_DEFAULTS.items()}
    model.to(option(args, "device", "cpu"))
    # a resumed run keeps its length unless --epochs says otherwise
    epochs = int(option(args, "epochs", train_cfg.get("epochs") or EPOCHS[attention]))
    train_cfg["epochs"] = epochs
    state = StepState()
    config: dict[str, Any] = {"task": task_name, "model": "ShowAttendTell", "attention": attention,
                              "model_config": model_cfg, "vocab": vocab.to_json(), "data": data, "train": train_cfg,
                              "sizes": {s: len(v) for s, v in splits.items()}}
    step = make_step(model, doubly_stochastic=train_cfg["doubly_stochastic"],
                     entropy_weight=train_cfg["entropy_weight"], state=state)
    valid = splits["valid"]

    def validate(epoch: int) -> dict[str, float]:
        m, _ = evaluate(model, valid, vocab, beam=1, cider=False)
        return {"valid bleu4": m["bleu4"]}

    def epoch_batches(e: int) -> list[Batch]:
        model.expected_share = expected_share(e, epochs, train_cfg.get("expected_share", 0.5))
        return batches(splits["train"], vocab, train_cfg["batch_size"], seed, e)

    def restore(saved: dict[str, Any]) -> None:
        state.baseline = saved.get("baseline")

    hist, trainer, history = train_epochs(
        model, args, task_name=task_name, config=config, train_cfg=train_cfg, epochs=epochs,
        steps_per_epoch=-(-len(splits["train"]) // train_cfg["batch_size"]), batches=epoch_batches, step=step,
        validate=validate, resume=resume, state=lambda: {"baseline": state.baseline}, restore=restore, log=log)
    config["history"] = history
    return Run(model.eval(), vocab, splits, config, hist.seconds, hist.stopped, trainer)
