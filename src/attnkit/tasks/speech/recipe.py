"""The speech recipe: the character vocabulary (with one start token per output: ``<text>`` for
the transcript, ``<norm>`` for the normalized form), length-bucketed batches, the Listen, Attend
and Spell model of :mod:`attnkit.models.las`, its training step (cross-entropy of both outputs
from one encoding), decoding and the metrics of a split."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...models.las import ListenAttendSpell
from ..vocab import Vocab, pad_batch
from .data import LANGUAGES, Utterance
from .metrics import error_rates, exact_match, monotonic_share

Tensor = torch.Tensor

TEXT, NORM = "<text>", "<norm>"

#: the model's defaults
MODEL_DEFAULTS = dict(hidden_dim=128, listener_layers=2, att_dim=128, channels=10, kernel_size=15, emb_dim=64,
                      dropout=0.1)
#: the generated corpus's defaults (``attnkit train speech`` options)
DATA_DEFAULTS = dict(n_train=6000, n_valid=300, n_test=1000, data_seed=1234)
#: ``ctc_weight``: weight of the CTC loss on the listener's first layer; ``guide_weight``: weight of
#: the guided-attention loss on the transcript's alignment (:func:`guided_attention_loss`). Both are
#: added to the speller's cross-entropy: without them the speller first learns the language alone,
#: attending to the utterance's last frame, and finds the alignment only many epochs later.
TRAIN_DEFAULTS = dict(batch_size=64, lr=3e-3, grad_clip=5.0, label_smoothing=0.1, weight_decay=1e-5, ctc_weight=0.3,
                      guide_weight=1.0, guide_width=0.2)
EPOCHS = 16


def build_vocab(utterances: Sequence[Utterance]) -> Vocab:
    """Every character of the training transcripts and normalized outputs, plus the two start
    tokens."""
    return Vocab.build([[TEXT, NORM]] + [list(u.transcript) + list(u.target) for u in utterances])


def build_model(vocab: Vocab, n_mels: int, config: Optional[dict[str, Any]] = None) -> ListenAttendSpell:
    cfg = {**MODEL_DEFAULTS, **(config or {})}
    return ListenAttendSpell(len(vocab), n_mels=n_mels, pad_id=vocab.pad_id, eos_id=vocab.eos_id, **cfg)


@dataclass
class Batch:
    """Padded features ``(B, T, n_mels)`` and ``lengths (B,)``; for each output, the decoder's
    inputs and targets ``(B, L)`` (``norm`` only over ``norm_rows``, the utterances that have a
    normalized form)."""

    feats: Tensor
    lengths: Tensor
    text_in: Tensor
    text_out: Tensor
    norm_rows: Tensor
    norm_in: Tensor
    norm_out: Tensor


def _teacher(seqs: list[list[str]], start: int, vocab: Vocab) -> tuple[Tensor, Tensor]:
    ids = [[start] + vocab.encode(s) + [vocab.eos_id] for s in seqs]
    x, _ = pad_batch([i[:-1] for i in ids], vocab.pad_id)
    y, _ = pad_batch([i[1:] for i in ids], vocab.pad_id)
    return x, y


def pad_features(utts: Sequence[Utterance]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([u.features.shape[0] for u in utts])
    feats = torch.zeros(len(utts), int(lengths.max()), utts[0].features.shape[1])
    for i, u in enumerate(utts):
        feats[i, : u.features.shape[0]] = u.features
    return feats, lengths


def make_batch(utts: Sequence[Utterance], vocab: Vocab) -> Batch:
    feats, lengths = pad_features(utts)
    text_in, text_out = _teacher([list(u.transcript) for u in utts], vocab.stoi[TEXT], vocab)
    rows = [i for i, u in enumerate(utts) if u.target]
    if rows:
        norm_in, norm_out = _teacher([list(utts[i].target) for i in rows], vocab.stoi[NORM], vocab)
    else:
        norm_in = norm_out = torch.zeros(0, 1, dtype=torch.long)
    return Batch(feats, lengths, text_in, text_out, torch.tensor(rows, dtype=torch.long), norm_in, norm_out)


def batches(utts: Sequence[Utterance], vocab: Vocab, batch_size: int, seed: int, epoch: Optional[int]) -> list[Batch]:
    """Batches of utterances of similar length (sorted by frames, cut into ``batch_size``); while
    training (``epoch`` given) the order within a few neighbouring batches and of the batches is
    shuffled by ``seed`` and ``epoch``."""
    order = sorted(range(len(utts)), key=lambda i: utts[i].features.shape[0])
    if epoch is not None:
        rng = random.Random(seed * 7919 + epoch)
        window = 4 * batch_size  # shuffle among neighbours, so batches stay of similar length
        for s in range(0, len(order), window):
            part = order[s:s + window]
            rng.shuffle(part)
            order[s:s + window] = part
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if epoch is not None:
        rng.shuffle(groups)
    return [make_batch([utts[i] for i in g], vocab) for g in groups]


def guided_attention_loss(weights: Tensor, out_lengths: Tensor, in_lengths: Tensor, width: float = 0.2) -> Tensor:
    """Guided attention (Tachibana, Uenoyama and Aihara 2018, https://arxiv.org/abs/1710.08969):
    the mean over output steps of the attention mass far from the diagonal,

    .. math:: \\frac{1}{\\sum_b N_b} \\sum_b \\sum_{n < N_b} \\sum_{t < T_b} \\alpha_{bnt}
              \\left(1 - e^{-(n / N_b - t / T_b)^2 / 2 g^2}\\right)

    for ``weights (B, N, T)`` with ``out_lengths`` ``N_b`` steps and ``in_lengths`` ``T_b`` frames;
    ``width`` is ``g``. A transcript is said in order, so its alignment runs near the diagonal.

    >>> w = torch.eye(4)[None]                                  # exactly diagonal: no penalty
    >>> float(guided_attention_loss(w, torch.tensor([4]), torch.tensor([4])))
    0.0
    """
    B, N, T = weights.shape
    n = torch.arange(N, device=weights.device)[None, :, None] / out_lengths[:, None, None].clamp(min=1)
    t = torch.arange(T, device=weights.device)[None, None, :] / in_lengths[:, None, None].clamp(min=1)
    penalty = 1.0 - torch.exp(-((n - t) ** 2) / (2 * width ** 2))
    live = torch.arange(N, device=weights.device)[None, :] < out_lengths[:, None]
    return (weights * penalty).sum(-1).masked_select(live).sum() / live.sum().clamp(min=1)


def make_step(model: ListenAttendSpell, label_smoothing: float = 0.1, ctc_weight: float = 0.3,
              guide_weight: float = 1.0, guide_width: float = 0.2) -> Callable[[Batch], Tensor]:
    """``step(batch) -> loss``: the mean token cross-entropy of the transcripts plus that of the
    normalized outputs, both decoded from the same encoding; plus ``ctc_weight`` times the CTC loss
    of the transcripts over the listener's first layer (per target character; blank = pad) and
    ``guide_weight`` times the :func:`guided_attention_loss` of the transcripts' alignment."""

    def ce(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=model.pad_id,
                               label_smoothing=label_smoothing)

    def step(batch: Batch) -> Tensor:
        dev = next(model.parameters()).device
        layers = model.listener.layer_outputs(batch.feats.to(dev), batch.lengths.to(dev))
        h, pk, pad = model.attend_over(*layers[-1])
        text_out = batch.text_out.to(dev)
        out = model.teacher_forced((h, pk, pad), batch.text_in.to(dev))
        loss = ce(out.logits, text_out)
        if guide_weight > 0:
            loss = loss + guide_weight * guided_attention_loss(out.weights, (text_out != model.pad_id).sum(1),
                                                               layers[-1][1], guide_width)
        if batch.norm_rows.numel():
            rows = batch.norm_rows.to(dev)
            enc = (h[rows], pk[rows], pad[rows])
            loss = loss + ce(model.teacher_forced(enc, batch.norm_in.to(dev)).logits, batch.norm_out.to(dev))
        if ctc_weight > 0:
            first, n = layers[0]
            log_probs = torch.log_softmax(model.ctc(first).float(), -1).transpose(0, 1)  # (T/4, B, V)
            targets = batch.text_out.to(dev)
            target_lengths = (targets != model.pad_id).sum(1) - 1  # without the end token
            loss = loss + ctc_weight * F.ctc_loss(log_probs, targets, n, target_lengths, blank=model.pad_id,
                                                  reduction="mean", zero_infinity=True)
        return loss

    return step


#: beam search's length normalization of the transcript (see
#: :meth:`~attnkit.models.las.ListenAttendSpell.beam_search`): summed log-probabilities alone let
#: a hypothesis that ends early win (on the validation speakers, CER 5.8% with 0, 3.3% with 1.0)
LENGTH_PENALTY = 1.0


@dataclass
class Decoded:
    """What the model wrote for each utterance: ``transcripts``, ``normalized`` (``""`` when not
    asked for), the transcript's attention ``alignments (T_out, T')`` and ``norm_head`` (the
    normalized output's own best hypothesis, before :func:`choose_dates`)."""

    transcripts: list[str]
    normalized: list[str]
    alignments: list[Tensor]
    norm_head: list[str] = field(default_factory=list)


def sequence_logprobs(model: ListenAttendSpell, encoded: tuple[Tensor, Tensor, Tensor], rows: Sequence[int],
                      start: str, seqs: Sequence[str], vocab: Vocab) -> Tensor:
    """``log P(seq + <eos> | utterance)`` under teacher forcing from the ``start`` token, for each
    ``seqs[i]`` written for the utterance ``rows[i]`` of ``encoded`` (:meth:`ListenAttendSpell.encode`)."""
    inputs, targets = _teacher([list(s) for s in seqs], vocab.stoi[start], vocab)
    dev = encoded[0].device
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=dev)
    logits = model.teacher_forced(tuple(t[idx] for t in encoded), inputs.to(dev)).logits
    targets = targets.to(dev)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != model.pad_id)).sum(-1)


def choose_dates(model: ListenAttendSpell, encoded: tuple[Tensor, Tensor, Tensor], texts: list[list[str]],
                 norms: list[list[str]], vocab: Vocab) -> list[str]:
    """The date each utterance says, from both outputs: the candidates are the normalized output's
    beam (its dates) and the dates the transcript's beam reads as (:func:`.reading.read_date`);
    the chosen one maximizes

        log P_norm(date | audio) + log sum over the ways of saying it  P_text(phrase | audio)

    (the phrases in the language the best transcript reads as). An utterance whose normalized
    output's best is not a date (a number) keeps it. ``texts[b]`` and ``norms[b]`` are the beams
    of utterance ``b``, best first."""
    from .data import is_iso_date
    from .reading import read_date, say_all

    chosen = [n[0] if n else "" for n in norms]
    rows, cands, phrases = [], [], []
    for b, (tb, nb) in enumerate(zip(texts, norms)):
        if not nb or not is_iso_date(nb[0]):
            continue
        first = read_date(tb[0]) if tb else None
        seen: list[str] = []
        for c in [n for n in nb if is_iso_date(n)] + [r.iso for r in map(read_date, tb) if r is not None]:
            if c not in seen:
                seen.append(c)
                for ph in say_all(c, [first.lang] if first else LANGUAGES):
                    rows.append(b), cands.append(c), phrases.append(ph)
    if not rows:
        return chosen
    norm_lp = sequence_logprobs(model, encoded, rows, NORM, cands, vocab).tolist()
    text_lp = sequence_logprobs(model, encoded, rows, TEXT, phrases, vocab)
    scores: dict[tuple[int, str], list[Any]] = {}
    for k, (b, c) in enumerate(zip(rows, cands)):
        entry = scores.setdefault((b, c), [norm_lp[k], []])
        entry[1].append(text_lp[k])
    best: dict[int, tuple[float, str]] = {}
    for (b, c), (n_lp, t_lps) in scores.items():
        total = n_lp + float(torch.logsumexp(torch.stack(t_lps), 0))
        if b not in best or total > best[b][0]:
            best[b] = (total, c)
    for b, (_, c) in best.items():
        chosen[b] = c
    return chosen


def decode(model: ListenAttendSpell, utts: Sequence[Utterance], vocab: Vocab, *, beam: int = 1,
           max_len: int = 200, norm_len: int = 16, normalized: bool = True, batch_size: int = 64,
           length_penalty: float = LENGTH_PENALTY, joint: bool = True) -> Decoded:
    """Beam search of both outputs (``beam=1`` is greedy), from one encoding per batch; with
    ``joint`` a date is chosen from both outputs' beams (:func:`choose_dates`), else it is the
    normalized output's best."""
    dev = next(model.parameters()).device
    order = sorted(range(len(utts)), key=lambda i: utts[i].features.shape[0])
    texts: dict[int, str] = {}
    norms: dict[int, str] = {}
    heads: dict[int, str] = {}
    aligns: dict[int, Tensor] = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                feats, lengths = pad_features([utts[i] for i in idx])
                enc = model.encode(feats.to(dev), lengths.to(dev))
                tbest = model.nbest(feats, lengths, vocab.stoi[TEXT], beam=beam, max_len=max_len, encoded=enc,
                                    length_penalty=length_penalty)
                tbeams = [["".join(vocab.decode(x)) for x, _, _ in hyps] for hyps in tbest]
                for j, i in enumerate(idx):
                    texts[i], aligns[i] = tbeams[j][0], tbest[j][0][2]
                if normalized:
                    nbest = model.nbest(feats, lengths, vocab.stoi[NORM], beam=beam, max_len=norm_len, encoded=enc)
                    beams = [["".join(vocab.decode(x)) for x, _, _ in hyps] for hyps in nbest]
                    for j, i in enumerate(idx):
                        heads[i] = norms[i] = beams[j][0] if beams[j] else ""
                    if joint:
                        for j, date in enumerate(choose_dates(model, enc, tbeams, beams, vocab)):
                            norms[idx[j]] = date
    finally:
        model.train(was)
    return Decoded([texts[i] for i in range(len(utts))], [norms.get(i, "") for i in range(len(utts))],
                   [aligns[i] for i in range(len(utts))], [heads.get(i, "") for i in range(len(utts))])


def evaluate(model: ListenAttendSpell, utts: Sequence[Utterance], vocab: Vocab, *, beam: int = 1,
             max_len: int = 200, joint: bool = True) -> tuple[dict[str, Any], Decoded]:
    """CER and WER of the transcripts, exact match of the normalized outputs (overall and per kind:
    ``date_exact_match``, ``number_exact_match``; with ``joint`` also
    ``norm_output_date_exact_match``: the normalized output's own best, without the transcript's
    help), and the share of transcript steps whose attention peak does not move backwards
    (``monotonic``)."""
    has_norm = any(u.target for u in utts)
    dec = decode(model, utts, vocab, beam=beam, max_len=max_len, normalized=has_norm, joint=joint)
    metrics: dict[str, Any] = error_rates([u.transcript for u in utts], dec.transcripts)
    if has_norm:
        rows = [i for i, u in enumerate(utts) if u.target]
        metrics["exact_match"] = exact_match([dec.normalized[i] for i in rows], [utts[i].target for i in rows])
        for kind in sorted({utts[i].kind for i in rows}):
            sel = [i for i in rows if utts[i].kind == kind]
            metrics[f"{kind}_exact_match"] = exact_match([dec.normalized[i] for i in sel], [utts[i].target for i in sel])
            metrics[f"{kind}s"] = len(sel)
        dates = [i for i in rows if utts[i].kind == "date"]
        if joint and dates:
            metrics["norm_output_date_exact_match"] = exact_match([dec.norm_head[i] for i in dates],
                                                                  [utts[i].target for i in dates])
    metrics["monotonic"] = monotonic_share(dec.alignments)
    return metrics, dec


# ---------------------------------------------------------------------------------------------
# A training run (attnkit train speech)
# ---------------------------------------------------------------------------------------------


def data_config(args: Any) -> dict[str, Any]:
    """The ``data`` entry of a run's config from the command line's options."""
    from ..args import option

    if option(args, "train", None):
        missing = [f"--{s}" for s in ("valid", "test") if not option(args, s, None)]
        if missing:
            raise ValueError(f"--train needs {' and '.join(missing)} too (a TSV file or a LibriSpeech folder each)")
        return {s: str(Path(getattr(args, s)).resolve()) for s in ("train", "valid", "test")} | {
            "limit": option(args, "limit", None)}
    langs = option(args, "languages", None) or list(LANGUAGES)
    data = {k: option(args, k, v) for k, v in DATA_DEFAULTS.items()}
    return data | {"languages": list(langs), "workers": int(option(args, "threads", None) or 2)}


def load_splits(data: dict[str, Any], progress: bool = False) -> dict[str, list[Utterance]]:
    """The splits of a run's ``data`` config (generated ones with a progress bar when asked)."""
    from .data import load_splits as _load

    if data.get("train") or not progress:
        return _load(data)
    from tqdm.auto import tqdm

    total = data["n_train"] + data["n_valid"] + data["n_test"]
    with tqdm(total=total, desc="synthesizing speech", leave=False, dynamic_ncols=True) as bar:
        return _load(data, progress=bar.update)


def max_output_len(utts: Sequence[Utterance]) -> int:
    """A decoding length limit: 1.5 times the longest training transcript, plus 10."""
    return int(math.ceil(1.5 * max((len(u.transcript) for u in utts), default=50))) + 10


@dataclass
class Run:
    """A finished training run."""

    model: ListenAttendSpell
    vocab: Vocab
    splits: dict[str, list[Utterance]]
    config: dict[str, Any]
    seconds: float
    stopped: str
    trainer: Optional[dict[str, Any]]


def rebuild(checkpoint) -> tuple[ListenAttendSpell, Vocab, dict[str, Any]]:
    """Model (weights loaded) and vocabulary of a speech checkpoint."""
    from ...checkpoint import load_weights

    c = checkpoint.require(("model_config", "vocab", "n_mels"), "speech")
    vocab = Vocab.from_json(c["vocab"])
    model = build_model(vocab, c["n_mels"], c["model_config"])
    load_weights(model, checkpoint)
    return model.eval(), vocab, c


def train(task_name: str, args: Any, resume=None, log: Callable[[str], None] = print) -> Run:
    """Train a speech recognizer as ``args`` says (see :class:`attnkit.tasks.speech.task.SpeechTask`),
    saving a checkpoint after every epoch; ``resume`` continues a checkpoint's run."""
    from ...training import seed_everything
    from ..args import option
    from ..loop import train_epochs

    seed = int(option(args, "seed", 0))
    seed_everything(seed)
    progress = bool(option(args, "progress", True))
    if resume is not None:
        cfg = resume.config
        data, train_cfg = cfg["data"], dict(cfg["train"])
        splits = load_splits(data, progress)
        model, vocab, _ = rebuild(resume)
        model.train()
        model_cfg = cfg["model_config"]
    else:
        data = data_config(args)
        splits = load_splits(data, progress)
        if not splits["train"]:
            raise ValueError("the training split is empty")
        vocab = build_vocab(splits["train"])
        model_cfg = {**MODEL_DEFAULTS, **{k: option(args, k, None) for k in ("hidden_dim",) if option(args, k, None)}}
        model = build_model(vocab, splits["train"][0].features.shape[1], model_cfg)
        train_cfg = {k: option(args, k, v) for k, v in TRAIN_DEFAULTS.items()}
        train_cfg["max_len"] = max_output_len(splits["train"])
    model.to(option(args, "device", "cpu"))
    epochs = int(option(args, "epochs", train_cfg.get("epochs") or EPOCHS))
    train_cfg["epochs"] = epochs
    config: dict[str, Any] = {"task": task_name, "model": "ListenAttendSpell", "model_config": model_cfg,
                              "n_mels": splits["train"][0].features.shape[1], "vocab": vocab.to_json(),
                              "data": data, "train": train_cfg, "sizes": {s: len(v) for s, v in splits.items()}}
    valid = splits["valid"]

    def validate(epoch: int) -> dict[str, float]:
        m, _ = evaluate(model, valid, vocab, beam=1, max_len=train_cfg["max_len"], joint=False)
        return {"valid cer": m["cer"]} | ({"valid exact match": m["exact_match"]} if "exact_match" in m else {})

    hist, trainer, history = train_epochs(
        model, args, task_name=task_name, config=config, train_cfg=train_cfg, epochs=epochs,
        steps_per_epoch=-(-len(splits["train"]) // train_cfg["batch_size"]),
        batches=lambda e: batches(splits["train"], vocab, train_cfg["batch_size"], seed, e),
        step=make_step(model, train_cfg["label_smoothing"], train_cfg.get("ctc_weight", 0.0),
                       train_cfg.get("guide_weight", 0.0), train_cfg.get("guide_width", 0.2)), validate=validate, resume=resume,
        weight_decay=train_cfg["weight_decay"], log=log)
    config["history"] = history
    return Run(model.eval(), vocab, splits, config, hist.seconds, hist.stopped, trainer)
