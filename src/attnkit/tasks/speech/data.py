"""Speech data: spoken dates and numbers synthesized with ``espeak-ng`` (the default: no
download), and two real formats: a folder of ``wav``/``flac`` files with a transcript TSV, and
LibriSpeech's ``*.trans.txt`` layout. No models here: an utterance is its transcript, its
normalized form and its log-mel features (:mod:`.features`).

**The generated corpus.** Each utterance is a date or a number said in words in one of several
languages, by one *speaker* (an ``espeak-ng`` voice variant such as ``m3`` or ``f2``) with one
of the language's accents, at a random rate and pitch, with white noise at a random
signal-to-noise ratio. Two outputs go with it:

================  ===========================================  =======================
kind              transcript (what is said, normalized)        normalized output
================  ===========================================  =======================
date, English     the third of march nineteen ninety eight     ``1998-03-03``
date, French      le premier mai deux mille sept               ``2007-05-01``
date, German      der dritte märz neunzehnhundertachtundneunzig ``1998-03-03``
date, Spanish     el tres de marzo de mil novecientos noventa  ``1990-03-03``
number            four thousand and seventy one                ``4071``
================  ===========================================  =======================

The speakers of the train, validation and test splits are disjoint (:data:`SPEAKERS`): the test
measures voices the model never heard.

Example::

    >>> import random
    >>> u = make_text(random.Random(0), "en", "date")
    >>> u.kind, u.lang, is_iso_date(u.target)
    ('date', 'en', True)
"""

from __future__ import annotations

import datetime
import random
import re
import shutil
import subprocess
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..dates.data import is_iso_date  # one definition of a calendar date written YYYY-MM-DD
from ..io import check_path, read_text_lines
from .features import log_mel

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# What is said
# ---------------------------------------------------------------------------------------------

MONTHS: dict[str, tuple[str, ...]] = {
    "en": ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december"),
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"),
    "de": ("januar", "februar", "märz", "april", "mai", "juni", "juli", "august", "september", "oktober",
           "november", "dezember"),
    "es": ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"),
}
#: the languages and the ``espeak-ng`` accents (voices) each is spoken with. British English and
#: the French of France are named ``en`` and ``fr``, the names of their voice files: espeak-ng 1.51
#: ignores the ``+variant`` of the aliases ``en-gb`` and ``fr-fr`` (every speaker sounds the same)
ACCENTS: dict[str, tuple[str, ...]] = {
    "en": ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc"),
    "fr": ("fr", "fr-be", "fr-ch"),
    "de": ("de",),
    "es": ("es", "es-419"),
}
LANGUAGES = tuple(ACCENTS)
#: the speakers (``espeak-ng`` voice variants, named as their files: a name espeak-ng does not
#: know, such as ``alex`` for ``Alex``, silently gives the default voice) of each split; no speaker
#: is in two splits (nor a variant of a test speaker, such as ``iven2``; robotic, whispering and
#: joke variants are left out)
SPEAKERS: dict[str, tuple[str, ...]] = {
    "train": ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "adam", "Alex", "Andy", "Annie", "benjamin",
              "caleb", "david", "ed", "edward", "john", "linda", "max", "michel", "paul", "pedro", "robert",
              "steph", "travis", "zac", "Alicia", "Andrea", "antonio", "aunty", "belinda", "boris", "Denis", "Diogo",
              "edward2", "Gene", "Gene2", "gustave", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael",
              "miguel", "Mike", "Nguyen", "pablo", "rob", "steph2", "steph3", "Storm", "anika", "grandpa", "grandma",
              "sandro", "klatt2", "klatt3"),
    "valid": ("m8", "f4", "norbert", "shelby"),
    "test": ("m7", "f5", "victor", "quincy", "marcelo", "iven"),
}
KINDS = ("date", "number")
YEARS = (1900, 2099)
NUMBERS = (0, 9999)
RATES = (140, 200)  # words per minute
PITCHES = (30, 70)  # espeak-ng's 0-99
SNR_DB = (15.0, 35.0)


def normalize_transcript(text: str) -> str:
    """Lower case, hyphens and punctuation as spaces (apostrophes kept), one space between words:
    the form transcripts are scored in.

    >>> normalize_transcript("Twenty-first of May, 1998!")
    'twenty first of may 1998'
    """
    text = unicodedata.normalize("NFC", text).lower()
    text = re.sub(r"[^\w' ]+", " ", text.replace("_", " "))
    return " ".join(text.split())


def _words(n: int, lang: str, to: str = "cardinal") -> str:
    from num2words import num2words  # [apps]: the generated corpus only

    return num2words(n, lang=lang, to=to)


def _require_num2words() -> None:
    try:
        import num2words  # noqa: F401
    except ImportError:
        raise ImportError('the generated speech corpus spells numbers with num2words: pip install -e ".[apps]"') from None


def say_date(date: datetime.date, lang: str, rng: random.Random) -> str:
    """``date`` in words in ``lang`` (one of the language's usual forms, drawn with ``rng``)."""
    month, d, y = MONTHS[lang][date.month - 1], date.day, date.year
    if lang == "en":
        year = _words(y, "en", "year")
        day = _words(d, "en", "ordinal")
        form = rng.randrange(3)
        text = (f"the {day} of {month} {year}", f"{month} {day} {year}", f"{day} {month} {year}")[form]
    elif lang == "fr":
        day = "premier" if d == 1 else _words(d, "fr")
        text = f"{'le ' if rng.random() < 0.5 else ''}{day} {month} {_words(y, 'fr')}"
    elif lang == "de":
        text = f"{'der ' if rng.random() < 0.5 else ''}{_words(d, 'de', 'ordinal')} {month} {_words(y, 'de', 'year')}"
    elif lang == "es":
        day = "primero" if d == 1 and rng.random() < 0.5 else _words(d, "es")
        text = f"{'el ' if rng.random() < 0.5 else ''}{day} de {month} de {_words(y, 'es')}"
    else:
        raise ValueError(f"lang must be one of {', '.join(LANGUAGES)}; got {lang!r}")
    return normalize_transcript(text)


@dataclass
class Text:
    """What one generated utterance says: ``transcript`` (normalized words), ``target`` (the ISO
    date or the digits), ``kind`` (``date`` / ``number``) and ``lang``."""

    transcript: str
    target: str
    kind: str
    lang: str


def make_text(rng: random.Random, lang: str, kind: str) -> Text:
    """A random date (years :data:`YEARS`) or number (:data:`NUMBERS`) said in ``lang``."""
    _require_num2words()
    if lang not in ACCENTS:
        raise ValueError(f"lang must be one of {', '.join(LANGUAGES)}; got {lang!r}")
    if kind == "date":
        first = datetime.date(YEARS[0], 1, 1).toordinal()
        date = datetime.date.fromordinal(rng.randint(first, datetime.date(YEARS[1], 12, 31).toordinal()))
        return Text(say_date(date, lang, rng), date.isoformat(), kind, lang)
    if kind == "number":
        n = rng.randint(*NUMBERS)
        return Text(normalize_transcript(_words(n, lang)), str(n), kind, lang)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")


# ---------------------------------------------------------------------------------------------
# How it is said: espeak-ng
# ---------------------------------------------------------------------------------------------

ESPEAK = "espeak-ng"
ESPEAK_MISSING = ("espeak-ng is not installed; the generated speech corpus needs it (Debian/Ubuntu: "
                  "apt-get install espeak-ng); or train on real audio with --train/--valid/--test")


def have_espeak() -> bool:
    return shutil.which(ESPEAK) is not None


@dataclass
class Voice:
    """How an utterance is synthesized: ``accent`` (an espeak-ng voice), ``speaker`` (a variant),
    ``rate`` (words per minute), ``pitch`` (0-99), ``snr_db`` of the added white noise, and the
    ``noise_seed`` that draws it."""

    accent: str
    speaker: str
    rate: int
    pitch: int
    snr_db: float
    noise_seed: int


def _wav_samples(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """16-bit PCM samples of a RIFF/WAVE byte string (espeak-ng's ``--stdout`` leaves the size
    fields unset, so the ``data`` chunk runs to the end)."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{where}: not a WAV file")
    rate = int.from_bytes(data[24:28], "little")
    bits = int.from_bytes(data[34:36], "little")
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"data":
            body = data[pos + 8:pos + 8 + size] if size < 0x7FFF0000 else data[pos + 8:]
            break
        pos += 8 + size + (size & 1)
    else:
        raise ValueError(f"{where}: WAV file without a data chunk")
    if bits != 16:
        raise ValueError(f"{where}: {bits}-bit WAV; expected 16-bit PCM")
    body = body[: len(body) // 2 * 2]
    return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0, rate


def synthesize(text: str, voice: Voice) -> tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng with ``voice``, noise added: ``(samples float32 in [-1, 1],
    sample_rate)``."""
    if not have_espeak():
        raise RuntimeError(ESPEAK_MISSING)
    cmd = [ESPEAK, "-v", f"{voice.accent}+{voice.speaker}", "-s", str(voice.rate), "-p", str(voice.pitch),
           "--stdout", text]
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0 or not done.stdout:
        raise RuntimeError(f"espeak-ng failed on {text!r} with voice {voice.accent}+{voice.speaker}: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    wave, rate = _wav_samples(done.stdout, "espeak-ng output")
    noise = np.random.default_rng(voice.noise_seed).standard_normal(len(wave)).astype(np.float32)
    power = float(np.mean(wave ** 2)) or 1e-8
    wave = wave + noise * np.sqrt(power / 10 ** (voice.snr_db / 10))
    return wave, rate


# ---------------------------------------------------------------------------------------------
# Utterances and splits
# ---------------------------------------------------------------------------------------------


@dataclass
class Utterance:
    """One utterance: ``features (T, n_mels)`` log-mel frames (10 ms apart), ``transcript``
    (normalized words), ``target`` (the normalized output: an ISO date, digits, or ``""`` when the
    data has none), ``kind`` (``date`` / ``number`` / ``speech``), ``lang``, ``speaker``, and where
    it came from: ``voice`` for generated ones, ``path`` for read ones."""

    features: Tensor
    transcript: str
    target: str = ""
    kind: str = "speech"
    lang: str = ""
    speaker: str = ""
    voice: Optional[Voice] = None
    path: Optional[str] = None

    def waveform(self) -> tuple[np.ndarray, int]:
        """The samples again (synthesized anew, or read from ``path``) for pictures."""
        if self.voice is not None:
            return synthesize(self.transcript, self.voice)
        if self.path is not None:
            return load_audio(self.path)
        raise ValueError("this utterance has neither a voice nor a path")


def plan_split(split: str, n: int, seed: int, languages: Sequence[str] = LANGUAGES,
               date_share: float = 0.7) -> list[tuple[Text, Voice]]:
    """The texts and voices of ``n`` generated utterances of ``split`` (its own speakers), drawn
    from ``seed``; synthesis is a separate step (:func:`generate`)."""
    if split not in SPEAKERS:
        raise ValueError(f"split must be one of {', '.join(SPEAKERS)}; got {split!r}")
    for lang in languages:
        if lang not in ACCENTS:
            raise ValueError(f"--languages: expected some of {', '.join(LANGUAGES)}; got {lang!r}")
    if not languages:
        raise ValueError("--languages: expected at least one language")
    rng = random.Random(f"{seed}:{split}")
    out = []
    for _ in range(n):
        lang = rng.choice(list(languages))
        text = make_text(rng, lang, "date" if rng.random() < date_share else "number")
        voice = Voice(rng.choice(ACCENTS[lang]), rng.choice(SPEAKERS[split]), rng.randint(*RATES),
                      rng.randint(*PITCHES), round(rng.uniform(*SNR_DB), 2), rng.randrange(2 ** 31))
        out.append((text, voice))
    return out


def generate(n_train: int = 6000, n_valid: int = 300, n_test: int = 1000, *, seed: int = 1234,
             languages: Sequence[str] = LANGUAGES, workers: int = 2,
             progress: Optional[Callable[[int], None]] = None) -> dict[str, list[Utterance]]:
    """The generated corpus: ``{"train", "valid", "test"}`` lists of :class:`Utterance`, speakers
    disjoint between the splits. ``workers`` espeak-ng processes run at once; ``progress(k)`` is
    called as utterances are done."""
    if not have_espeak():
        raise RuntimeError(ESPEAK_MISSING)
    out: dict[str, list[Utterance]] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        plan = plan_split(split, n, seed, languages)

        def one(item: tuple[Text, Voice], split: str = split) -> Utterance:
            text, voice = item
            wave, rate = synthesize(text.transcript, voice)
            return Utterance(log_mel(torch.from_numpy(wave), rate), text.transcript, text.target, text.kind,
                             text.lang, voice.speaker, voice=voice)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            utts = []
            for u in pool.map(one, plan):
                utts.append(u)
                if progress is not None:
                    progress(1)
        out[split] = utts
    return out


# ---------------------------------------------------------------------------------------------
# Real audio: a transcript TSV, or LibriSpeech's layout
# ---------------------------------------------------------------------------------------------

AUDIO_SUFFIXES = (".wav", ".flac")


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono samples in ``[-1, 1]`` and the sample rate of a WAV (16-bit PCM, read with the standard
    library) or FLAC file (read with ``soundfile``, in the ``[apps]`` extra). Several channels are
    averaged. Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such audio file {str(p)!r}")
    if p.suffix.lower() == ".wav":
        import wave

        try:
            with wave.open(str(p)) as w:
                channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
                frames = w.readframes(w.getnframes())
        except (OSError, EOFError, wave.Error) as e:
            raise ValueError(f"cannot read audio file {str(p)!r}: {e}") from None
        if width != 2:
            raise ValueError(f"audio file {str(p)!r}: {8 * width}-bit WAV; expected 16-bit PCM")
        x = np.frombuffer(frames[: len(frames) // (2 * channels) * 2 * channels], dtype="<i2").astype(np.float32)
        x = x.reshape(-1, channels).mean(axis=1) / 32768.0
        return x, rate
    if p.suffix.lower() == ".flac":
        try:
            import soundfile
        except ImportError:
            raise ImportError(f'reading {str(p)!r} needs soundfile: pip install -e ".[apps]"') from None
        try:
            x, rate = soundfile.read(str(p), dtype="float32", always_2d=True)
        except Exception as e:  # soundfile.LibsndfileError and friends
            raise ValueError(f"cannot read audio file {str(p)!r}: {e}") from None
        return x.mean(axis=1), int(rate)
    raise ValueError(f"audio file {str(p)!r}: expected one of {', '.join(AUDIO_SUFFIXES)}")


def _utterance(path: Path, transcript: str, target: str, speaker: str, where: str) -> Utterance:
    try:
        wave, rate = load_audio(path)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if len(wave) < rate // 10:
        raise ValueError(f"{where}: audio file {str(path)!r} is shorter than 0.1 s")
    kind = "date" if is_iso_date(target) else "speech"
    return Utterance(log_mel(torch.from_numpy(np.ascontiguousarray(wave)), rate), normalize_transcript(transcript),
                     target, kind, "", speaker, path=str(path))


def read_tsv(path: str | Path, option: str = "--train", limit: Optional[int] = None) -> list[Utterance]:
    """A transcript TSV: one utterance per line, ``FILE<TAB>TRANSCRIPT`` or
    ``FILE<TAB>TRANSCRIPT<TAB>NORMALIZED`` (e.g. the ISO date), ``FILE`` relative to the TSV's
    folder; an optional first line ``path<TAB>transcript...`` is a header. The speaker is the
    file's folder name. Errors name the option, the file and the line."""
    p = check_path(option, path)
    where = f"{option}: {str(p)!r}"
    out = []
    for i, line in enumerate(read_text_lines(p, where), 1):
        if not line.strip() or (i == 1 and line.lower().startswith(("path\t", "file\t"))):
            continue
        cols = line.split("\t")
        if len(cols) not in (2, 3) or not cols[0].strip() or not cols[1].strip():
            raise ValueError(f"{where} line {i}: expected FILE<TAB>TRANSCRIPT[<TAB>NORMALIZED]; got {line!r}")
        audio = (p.parent / cols[0].strip())
        out.append(_utterance(audio, cols[1], cols[2].strip() if len(cols) == 3 else "", audio.parent.name,
                              f"{where} line {i}"))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{where}: no utterances")
    return out


def read_librispeech(root: str | Path, option: str = "--train", limit: Optional[int] = None) -> list[Utterance]:
    """LibriSpeech's layout under ``root``: ``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` with lines
    ``ID TRANSCRIPT`` and the audio ``ID.flac`` (or ``ID.wav``) beside it."""
    r = check_path(option, root, kind="dir")
    files = sorted(r.rglob("*.trans.txt"))
    if not files:
        raise ValueError(f"{option}: {str(r)!r} has no *.trans.txt files (expected LibriSpeech's layout)")
    out = []
    for f in files:
        where = f"{option}: {str(f)!r}"
        for i, line in enumerate(read_text_lines(f, where), 1):
            if not line.strip():
                continue
            uid, _, text = line.partition(" ")
            if not text.strip():
                raise ValueError(f"{where} line {i}: expected 'ID TRANSCRIPT'; got {line!r}")
            audio = next((f.parent / (uid + s) for s in AUDIO_SUFFIXES if (f.parent / (uid + s)).is_file()),
                         f.parent / (uid + ".flac"))
            out.append(_utterance(audio, text, "", uid.split("-")[0], f"{where} line {i}"))
            if limit is not None and len(out) >= limit:
                return out
    return out


def read_split(path: str | Path, option: str, limit: Optional[int] = None) -> list[Utterance]:
    """A folder is read as LibriSpeech's layout, a file as a transcript TSV."""
    return (read_librispeech if Path(path).is_dir() else read_tsv)(path, option, limit)


def load_splits(data: dict[str, Any], *, progress: Optional[Callable[[int], None]] = None
                ) -> dict[str, list[Utterance]]:
    """The splits a run's ``data`` config describes: generated, or read from ``train``/``valid``/
    ``test`` paths."""
    if data.get("train"):
        return {s: read_split(data[s], f"--{s}", data.get("limit")) for s in ("train", "valid", "test")}
    return generate(data["n_train"], data["n_valid"], data["n_test"], seed=data["data_seed"],
                    languages=data["languages"], workers=data.get("workers", 2), progress=progress)


__all__ = ["ACCENTS", "KINDS", "LANGUAGES", "MONTHS", "SPEAKERS", "Text", "Utterance", "Voice", "generate",
           "have_espeak", "is_iso_date", "load_audio", "load_splits", "make_text", "normalize_transcript",
           "plan_split", "read_librispeech", "read_split", "read_tsv", "say_date", "synthesize"]
