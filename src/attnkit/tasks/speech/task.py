"""``attnkit train speech``, ``attnkit eval CKPT``, ``attnkit translate CKPT`` (transcribe audio
files) and ``attnkit viz CKPT --index N`` for speech recognition: options, the final test on the
held-out speakers, the printed lines and the pictures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ...checkpoint import Checkpoint
from ...training import format_metrics
from ..args import nonnegative_int, option, positive_float, positive_int
from ..base import Task, TrainResult, load_resume
from . import recipe
from .data import LANGUAGES


def _shown(metrics: dict[str, Any], split: str, n: int, beam: int) -> dict[str, Any]:
    """The metrics as ``attnkit eval`` prints them (and ``attnkit train`` ends with)."""
    counts = {k: v for k, v in metrics.items() if k in ("dates", "numbers")}
    rates = {f"{split} {k.replace('_', ' ')}": v for k, v in metrics.items() if k not in counts}
    return rates | {"utterances": n} | counts | {"beam": beam}


class SpeechTask(Task):
    """Speech recognition with Listen, Attend and Spell and location-aware attention."""

    name = "speech"
    help = ("Recognize speech with Listen, Attend and Spell (a pyramidal BiLSTM listener, a speller with "
            "location-aware attention, beam search). Default data: dates and numbers in English, French, German "
            "and Spanish synthesized with espeak-ng (apt-get install espeak-ng), test speakers never heard in "
            "training; real data: a transcript TSV or LibriSpeech's layout. Writes the character transcript "
            "(CER, WER) and the normalized form (a date as YYYY-MM-DD; exact match).")
    translates = True
    writes = ("the checkpoint: model.safetensors, config.json (model, vocabulary, data, history, test metrics), "
              "trainer.json + trainer.safetensors (for --resume) and checkpoint.json; no pictures (attnkit viz "
              "draws them: the spectrogram with the alignment of every character)")
    viz_args = "--index 0"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("speech")
        g.add_argument("--beam", type=positive_int, default=None, help="beam size of the final test (default 4)")
        g.add_argument("--hidden-dim", type=positive_int, default=None,
                       help=f"listener and speller size (default {recipe.MODEL_DEFAULTS['hidden_dim']})")
        g.add_argument("--batch-size", type=positive_int, default=None,
                       help=f"utterances per step (default {recipe.TRAIN_DEFAULTS['batch_size']})")
        g.add_argument("--lr", type=positive_float, default=None,
                       help=f"peak learning rate (default {recipe.TRAIN_DEFAULTS['lr']})")
        d = p.add_argument_group("data (default: generated with espeak-ng)")
        d.add_argument("--n-train", type=positive_int, default=None,
                       help=f"generated training utterances (default {recipe.DATA_DEFAULTS['n_train']})")
        d.add_argument("--n-valid", type=positive_int, default=None,
                       help=f"generated validation utterances (default {recipe.DATA_DEFAULTS['n_valid']})")
        d.add_argument("--n-test", type=positive_int, default=None,
                       help=f"generated test utterances (default {recipe.DATA_DEFAULTS['n_test']})")
        d.add_argument("--data-seed", type=nonnegative_int, default=None,
                       help=f"seed of the generated corpus (default {recipe.DATA_DEFAULTS['data_seed']})")
        d.add_argument("--languages", nargs="+", choices=LANGUAGES, default=None,
                       help=f"languages of the generated corpus (default all: {' '.join(LANGUAGES)})")
        for split in ("train", "valid", "test"):
            d.add_argument(f"--{split}", default=None,
                           help=f"real data: the {split} split, a TSV of FILE<TAB>TRANSCRIPT[<TAB>NORMALIZED] lines "
                                "(files relative to it) or a folder in LibriSpeech's layout (*.trans.txt + flac)")
        d.add_argument("--limit", type=positive_int, default=None, help="read at most N real utterances per split")

    def train(self, args: argparse.Namespace) -> TrainResult:
        resume = load_resume(self, args)
        run = recipe.train(self.name, args, resume=resume)
        beam = int(option(args, "beam", 4))
        test = run.splits["test"]
        metrics, _ = recipe.evaluate(run.model, test, run.vocab, beam=beam, max_len=run.config["train"]["max_len"])
        run.config["metrics"] = {f"test_{k}": v for k, v in metrics.items()} | {"beam": beam}
        from ...checkpoint import save_checkpoint

        save_checkpoint(args.out, model=run.model, config=run.config, trainer_state=run.trainer)
        key = "date_exact_match" if "date_exact_match" in metrics else "cer"
        return TrainResult(metric=f"test {key.replace('_', ' ')}", value=metrics[key],
                           summary=format_metrics(_shown(metrics, "test", len(test), beam)),
                           checkpoint=Path(args.out), seconds=run.seconds, extra=metrics)

    def _split(self, cfg: dict[str, Any], split: str):
        if split not in ("train", "valid", "test"):
            raise ValueError(f"--split must be one of train, valid, test; got {split!r}")
        data = dict(cfg["data"])
        if not data.get("train"):  # generated: synthesize only the split asked for
            data = data | {s: 0 for s in ("n_train", "n_valid", "n_test") if s != f"n_{split}"}
        return recipe.load_splits(data)[split]

    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        split = option(args, "split", "test")
        model, vocab, cfg = recipe.rebuild(checkpoint)
        utts = self._split(cfg, split)
        beam = int(option(args, "beam", cfg.get("metrics", {}).get("beam", 4)))
        metrics, _ = recipe.evaluate(model, utts, vocab, beam=beam, max_len=cfg["train"]["max_len"])
        return _shown(metrics, split, len(utts), beam)

    def _utterance(self, cfg: dict[str, Any], line: str, n: int, cache: dict[str, Any]):
        from .data import _utterance

        if line.startswith(("test:", "train:", "valid:")):
            split, _, k = line.partition(":")
            if split not in cache:
                cache[split] = self._split(cfg, split)
            utts = cache[split]
            if not k.isdigit() or not 0 <= int(k) < len(utts):
                raise ValueError(f"line {n}: {line!r}: the {split} split has utterances 0-{len(utts) - 1}")
            return utts[int(k)]
        return _utterance(Path(line), "", "", "", f"line {n}")

    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        """Each line is an audio file (``.wav`` or ``.flac``) or ``test:N`` (utterance N of the run's
        test split); prints ``TRANSCRIPT<TAB>NORMALIZED`` for each."""
        model, vocab, cfg = recipe.rebuild(checkpoint)
        beam = int(option(args, "beam", cfg.get("metrics", {}).get("beam", 4)))
        out, cache = [], {}
        for n, line in enumerate(lines, 1):
            if not line.strip():  # an empty line answers with an empty line
                out.append("")
                continue
            u = self._utterance(cfg, line.strip(), n, cache)
            dec = recipe.decode(model, [u], vocab, beam=beam, max_len=cfg["train"]["max_len"])
            out.append(f"{dec.transcripts[0]}\t{dec.normalized[0]}")
        return out

    def viz_files(self, checkpoint: Checkpoint, *, split: str = "test", index: int = 0, out: str | Path,
                  beam: int = 4) -> tuple[list[Path], list[str]]:
        """``attnkit viz CKPT --index N``: utterance N's spectrogram with the attention of every
        character of the transcript over the listener's frames, as ``speech_alignment.png`` and
        ``speech_alignment.html``; returns the files and the lines to print."""
        from ...viz.html import alignment_html
        from ...viz.speech import frame_times, speech_png
        from .metrics import monotonic_steps

        model, vocab, cfg = recipe.rebuild(checkpoint)
        utts = self._split(cfg, split)
        if not 0 <= index < len(utts):
            raise ValueError(f"--index: the {split} split has {len(utts)} utterances (0-{len(utts) - 1}); got {index}")
        u = utts[index]
        dec = recipe.decode(model, [u], vocab, beam=beam, max_len=cfg["train"]["max_len"])
        text, norm, align = dec.transcripts[0], dec.normalized[0], dec.alignments[0]
        chars = list(text)
        who = f"speaker {u.speaker}" + (f", {u.lang}" if u.lang else "")
        title = f"{split} utterance {index} ({who}): {text}"
        out = Path(out)
        png = speech_png(u.features, chars, align, out / "speech_alignment.png", title=title)
        times = [f"{t:.2f}s" for t in frame_times(u.features.shape[0], align.shape[1])]
        page = out / "speech_alignment.html"
        alignment_html(align, times, ["␣" if c == " " else c for c in chars], page, title=title,
                       caption=f"reference: {u.transcript}")
        back, steps = monotonic_steps([align])
        lines = [f"input:  {split} utterance {index} ({who}" + (f", {u.path}" if u.path else "") + ")",
                 f"output: {text}" + (f"  →  {norm}" if norm else ""),
                 f"  reference: {u.transcript}" + (f"  →  {u.target}" if u.target else ""),
                 f"  attention peak moves backwards at {back} of {steps} steps"]
        return [png, page], lines
