r"""Date normalization: many surface forms of a date, in several languages, → ISO ``YYYY-MM-DD``.

``"3 March 2019"``, ``"March 3rd, 2019"``, ``"03/03/19"``, ``"3.3.2019"``, ``"le 3 mars 2019"``,
``"3 de marzo de 2019"``, ``"Sonntag, 3. März 2019"``, ``"2019年3月3日"``, ``"2019년 3월 3일"`` …
all become ``"2019-03-03"``. A classic small task for attention: the alignment of output digits
to source characters is easy to read in the pictures.

The embedded corpus (:func:`generate`) is generated from a seed, needs no download, and has
disjoint splits (no source string occurs in two splits). Conventions that keep it unambiguous:
slashes are month/day/year (US) unless the year comes first, dots are day.month.year unless the
year comes first, and two-digit years 50–99 mean 19xx, 00–49 mean 20xx. Real data comes from
``--data FILE``: ``source<TAB>target`` lines (see :func:`read_pairs`).

Tokens are characters (source and target). The model is :class:`attnkit.models.Seq2Seq`; the
metric is exact match of the whole output string.

``attnkit translate CKPT`` prints one line per input line: the model's output, marked when it is
not a calendar date (``31/31/2020`` may give ``2020-31-31  [not a valid date]``; see
:func:`is_iso_date`). An empty line gives an empty line; a line is read up to
:data:`MAX_SOURCE_CHARS` characters (longer ones are cut, with a warning).

Example::

    >>> splits = generate(n_train=5, n_valid=2, n_test=2, seed=0)
    >>> [len(splits[s]) for s in ("train", "valid", "test")]
    [5, 2, 2]
    >>> ex = render(datetime.date(2019, 3, 3), template("en:{do} of {MMMM}, {yyyy}"), random.Random(0))
    >>> ex.source, ex.target, ex.field_spans("year")
    ('3rd of March, 2019', '2019-03-03', [(14, 18)])
"""

from __future__ import annotations

import argparse
import datetime
import math
import random
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .. import models
from ..models.seq2seq import ATTENTIONS, Seq2Seq
from ..checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from ..training import fit, format_metrics, rng_state, seed_everything, set_rng_state, set_threads
from .base import (Task, TrainResult, check_path, fraction, positive_float, positive_int, read_text_lines,
                   warn)
from .vocab import Vocab, batch_indices, pad_batch

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# The embedded corpus
# ---------------------------------------------------------------------------------------------

MONTHS: dict[str, list[str]] = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"],
    "it": ["gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio", "agosto", "settembre", "ottobre",
           "novembre", "dicembre"],
    "pt": ["janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho", "agosto", "setembro", "outubro",
           "novembro", "dezembro"],
}
MONTH_ABBREVIATIONS: dict[str, list[str]] = {
    "en": ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"],
    "fr": ["janv.", "févr.", "mars", "avr.", "mai", "juin", "juil.", "août", "sept.", "oct.", "nov.", "déc."],
    "es": ["ene", "feb", "mar", "abr", "may", "jun", "jul", "ago", "sept", "oct", "nov", "dic"],
    "de": ["Jan.", "Feb.", "März", "Apr.", "Mai", "Juni", "Juli", "Aug.", "Sept.", "Okt.", "Nov.", "Dez."],
}
# Monday first, as datetime.date.weekday() counts.
WEEKDAYS: dict[str, list[str]] = {
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "fr": ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "it": ["lunedì", "martedì", "mercoledì", "giovedì", "venerdì", "sabato", "domenica"],
    "pt": ["segunda-feira", "terça-feira", "quarta-feira", "quinta-feira", "sexta-feira", "sábado", "domingo"],
    "zh": ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"],
    "ja": ["月", "火", "水", "木", "金", "土", "日"],
    "ko": ["월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"],
}
WEEKDAY_ABBREVIATIONS: dict[str, list[str]] = {"en": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}

# "lang:pattern". Fields: {d} day, {dd} zero-padded day, {do} English ordinal day (3rd), {d1}
# French day (1er for the first), {m}/{mm} month number, {MMMM} month name, {MMM} abbreviation,
# {yyyy}/{yy} year, {W} weekday, {Wa} weekday abbreviation. "num" patterns have no language.
TEMPLATES: tuple[str, ...] = (
    # English
    "en:{d} {MMMM} {yyyy}", "en:{MMMM} {d}, {yyyy}", "en:{MMMM} {do}, {yyyy}", "en:{do} {MMMM} {yyyy}",
    "en:the {do} of {MMMM} {yyyy}", "en:{do} of {MMMM}, {yyyy}", "en:{W}, {MMMM} {d}, {yyyy}",
    "en:{W} {d} {MMMM} {yyyy}", "en:{Wa} {d} {MMM} {yyyy}", "en:{Wa}, {MMM} {d}, {yyyy}", "en:{MMM} {d}, {yyyy}",
    "en:{d} {MMM} {yyyy}", "en:{MMM} {do} {yyyy}", "en:{dd}-{MMM}-{yyyy}", "en:{dd}-{MMM}-{yy}",
    "en:{MMM} {d} '{yy}", "en:{d} {MMM} '{yy}",
    # numbers only
    "num:{yyyy}-{mm}-{dd}", "num:{yyyy}-{m}-{d}", "num:{yyyy}/{mm}/{dd}", "num:{yyyy}/{m}/{d}", "num:{yyyy}.{mm}.{dd}",
    "num:{yyyy}{mm}{dd}", "num:{mm}/{dd}/{yyyy}", "num:{m}/{d}/{yyyy}", "num:{mm}/{dd}/{yy}", "num:{m}/{d}/{yy}",
    "num:{d}.{m}.{yyyy}", "num:{dd}.{mm}.{yyyy}", "num:{dd}.{mm}.{yy}", "num:{d}.{m}.{yy}",
    # French
    "fr:{d1} {MMMM} {yyyy}", "fr:le {d1} {MMMM} {yyyy}", "fr:{W} {d1} {MMMM} {yyyy}", "fr:le {W} {d1} {MMMM} {yyyy}",
    "fr:{d} {MMM} {yyyy}",
    # Spanish
    "es:{d} de {MMMM} de {yyyy}", "es:el {d} de {MMMM} de {yyyy}", "es:{W}, {d} de {MMMM} de {yyyy}",
    "es:{d} {MMM} {yyyy}", "es:{d}-{MMM}-{yyyy}",
    # German
    "de:{d}. {MMMM} {yyyy}", "de:am {d}. {MMMM} {yyyy}", "de:{W}, {d}. {MMMM} {yyyy}",
    "de:{W}, den {d}. {MMMM} {yyyy}", "de:{d}. {MMM} {yyyy}",
    # Italian, Portuguese
    "it:{d} {MMMM} {yyyy}", "it:{W} {d} {MMMM} {yyyy}",
    "pt:{d} de {MMMM} de {yyyy}", "pt:{W}, {d} de {MMMM} de {yyyy}",
    # Chinese, Japanese, Korean
    "zh:{yyyy}年{m}月{d}日", "zh:{yyyy}年{mm}月{dd}日", "zh:{yyyy}年{m}月{d}日{W}", "zh:{yyyy}年{m}月{d}日 {W}",
    "ja:{yyyy}年{m}月{d}日({W})", "ko:{yyyy}년 {m}월 {d}일", "ko:{yyyy}년 {m}월 {d}일 {W}",
)

_FIELD = re.compile(r"\{(\w+)\}")
_FIELD_KIND = {"d": "day", "dd": "day", "do": "day", "d1": "day", "m": "month", "mm": "month", "MMMM": "month",
               "MMM": "month", "yyyy": "year", "yy": "year", "W": "weekday", "Wa": "weekday"}
# Two-digit years: 50-99 -> 19xx, 00-49 -> 20xx, so dates with a {yy} field lie in 1950-2049.
YEARS = (1000, 2999)  # four-digit years: wide, so that the model learns to copy every digit
YEARS_2DIGIT = (1950, 2049)


@dataclass(frozen=True)
class Template:
    """One surface form: ``name`` is ``"lang:pattern"`` (e.g. ``"en:{d} {MMMM} {yyyy}"``)."""

    name: str
    lang: str
    pattern: str

    @property
    def two_digit_year(self) -> bool:
        return "{yy}" in self.pattern

    @property
    def has_letters(self) -> bool:
        return self.lang != "num"


def template(name: str) -> Template:
    """The template called ``name`` (one of :data:`TEMPLATES`; unknown names list the valid ones)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown date template {name!r}; valid names: {', '.join(repr(t) for t in TEMPLATES)}")
    lang, pattern = name.split(":", 1)
    return Template(name, lang, pattern)


@dataclass(frozen=True)
class Example:
    """A ``source`` → ``target`` pair; ``kind`` names its template (``"file"`` for real data) and
    ``spans`` gives ``(field, start, end)`` character ranges of the source (day, month, year, weekday)."""

    source: str
    target: str
    kind: str = "file"
    spans: tuple[tuple[str, int, int], ...] = field(default=(), compare=False)

    def field_spans(self, name: str) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` of the source characters of field ``name`` (``"day"``, ``"month"``,
        ``"year"`` or ``"weekday"``)."""
        return [(s, e) for f, s, e in self.spans if f == name]


def _ordinal_en(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def render(date: datetime.date, tpl: Template, rng: random.Random | None = None, case: str | None = None) -> Example:
    """Write ``date`` in the surface form ``tpl``. ``case`` is ``"as-is"``, ``"lower"`` or ``"upper"``
    (default: drawn from ``rng``, as-is 70%, lower 15%, upper 15%, for forms with letters)."""
    if case is None and rng is None:
        raise ValueError("render needs rng (a random.Random) to draw the case, or case='as-is'|'lower'|'upper'")
    if case is not None and case not in ("as-is", "lower", "upper"):
        raise ValueError(f"case must be 'as-is', 'lower' or 'upper'; got {case!r}")
    lang = tpl.lang
    values = {
        "d": str(date.day), "dd": f"{date.day:02d}", "do": _ordinal_en(date.day),
        "d1": "1er" if date.day == 1 else str(date.day),
        "m": str(date.month), "mm": f"{date.month:02d}", "yyyy": f"{date.year:04d}", "yy": f"{date.year % 100:02d}",
    }
    if lang in MONTHS:
        values["MMMM"] = MONTHS[lang][date.month - 1]
    if lang in MONTH_ABBREVIATIONS:
        values["MMM"] = MONTH_ABBREVIATIONS[lang][date.month - 1]
    if lang in WEEKDAYS:
        values["W"] = WEEKDAYS[lang][date.weekday()]
    if lang in WEEKDAY_ABBREVIATIONS:
        values["Wa"] = WEEKDAY_ABBREVIATIONS[lang][date.weekday()]
    out, spans, pos = [], [], 0
    for m in _FIELD.finditer(tpl.pattern):
        out.append(tpl.pattern[pos:m.start()])
        start = sum(len(s) for s in out)
        text = values[m.group(1)]
        out.append(text)
        spans.append((_FIELD_KIND[m.group(1)], start, start + len(text)))
        pos = m.end()
    out.append(tpl.pattern[pos:])
    source = "".join(out)
    if case is None:
        case = "as-is"
        if tpl.has_letters:
            r = rng.random()
            case = "lower" if r < 0.15 else "upper" if r < 0.30 else "as-is"
    cased = {"lower": source.lower(), "upper": source.upper(), "as-is": source}[case]
    if len(cased) == len(source):  # keep the spans valid (no letter here changes length when cased)
        source = cased
    return Example(source, date.isoformat(), tpl.name, tuple(spans))


def _random_date(rng: random.Random, years: tuple[int, int]) -> datetime.date:
    first = datetime.date(years[0], 1, 1).toordinal()
    last = datetime.date(years[1], 12, 31).toordinal()
    return datetime.date.fromordinal(rng.randint(first, last))


def generate(n_train: int = 20_000, n_valid: int = 1_000, n_test: int = 2_000, seed: int = 1234,
             templates: Sequence[str] = TEMPLATES) -> dict[str, list[Example]]:
    """The embedded corpus: ``{"train", "valid", "test"}`` lists of :class:`Example`.

    Each example draws a template uniformly and a date uniformly in 1000–2999 (1950–2049 for
    two-digit years). Duplicated sources are dropped, so no source string occurs twice, in one
    split or across splits; the first ``n_test`` distinct examples form the test split, the next
    ``n_valid`` the validation split, the rest the training split. Deterministic for a ``seed``.
    """
    for name, n in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0; got {n!r}")
    tpls = [template(t) for t in templates]
    if not tpls:
        raise ValueError("templates must name at least one template")
    rng = random.Random(seed)
    total = n_train + n_valid + n_test
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < total:
        attempts += 1
        if attempts > 20 * total + 1000:
            raise ValueError(f"could not draw {total} distinct dates from {len(tpls)} templates; ask for fewer")
        tpl = tpls[rng.randrange(len(tpls))]
        ex = render(_random_date(rng, YEARS_2DIGIT if tpl.two_digit_year else YEARS), tpl, rng)
        if ex.source not in seen:
            seen.add(ex.source)
            examples.append(ex)
    return {"test": examples[:n_test], "valid": examples[n_test:n_test + n_valid],
            "train": examples[n_test + n_valid:]}


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------

def read_pairs(path: str | Path, option: str = "--data") -> list[Example]:
    """Read ``source<TAB>target`` lines (UTF-8), the target an ISO date ``YYYY-MM-DD``. Blank lines
    are skipped. An empty file, bytes that are not UTF-8, and a line without exactly one tab, with
    an empty side or with a target that is not a date raise ``ValueError`` naming the option, the
    file and the line."""
    p = check_path(option, path)
    where = f"{option}: {str(p)!r}"
    out = []
    for i, line in enumerate(read_text_lines(p, where), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{where} line {i} has no tab; expected 'source<TAB>target', got {line[:60]!r}")
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{where} line {i}: expected 2 tab-separated columns (source, target); got "
                             f"{len(fields)}: {line[:60]!r}")
        src, tgt = (f.strip() for f in fields)
        if not src or not tgt:
            raise ValueError(f"{where} line {i} has an empty {'source' if not src else 'target'}; "
                             f"expected 'source<TAB>target', got {line[:60]!r}")
        if not is_iso_date(tgt):
            swapped = " (are the columns swapped?)" if is_iso_date(src) else ""
            raise ValueError(f"{where} line {i}: the target {tgt[:40]!r} is not a date written YYYY-MM-DD"
                             f"{swapped}; expected 'source<TAB>target' such as '3 March 2019<TAB>2019-03-03'")
        out.append(Example(src, tgt))
    if not out:
        raise ValueError(f"{where} is empty; expected lines 'source<TAB>target'")
    return out


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def is_iso_date(text: str) -> bool:
    """Whether ``text`` is a calendar date written ``YYYY-MM-DD`` (what the model should output).

    >>> is_iso_date("2020-02-29"), is_iso_date("2019-02-29"), is_iso_date("2020-31-31"), is_iso_date("20200101")
    (True, False, False, False)
    """
    if not _ISO_DATE.fullmatch(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def split_pairs(pairs: Sequence[Example], seed: int = 1234, valid_fraction: float = 0.05,
                test_fraction: float = 0.1) -> dict[str, list[Example]]:
    """Split real data into disjoint train/valid/test splits (by distinct source; the first
    target seen for a source wins), shuffled by ``seed``: 10% test and 5% valid (at least one each)."""
    unique = list({ex.source: ex for ex in reversed(pairs)}.values())[::-1]
    if len(unique) < 3:
        raise ValueError(f"--data needs at least 3 distinct sources to make train/valid/test splits; "
                         f"got {len(unique)}")
    random.Random(seed).shuffle(unique)
    n_test = max(1, int(round(test_fraction * len(unique))))
    n_valid = max(1, int(round(valid_fraction * len(unique))))
    return {"test": unique[:n_test], "valid": unique[n_test:n_test + n_valid], "train": unique[n_test + n_valid:]}


def load_splits(data: dict[str, Any]) -> dict[str, list[Example]]:
    """The splits described by a checkpoint's ``data`` settings (embedded corpus or ``--data`` file)."""
    if data.get("path"):
        return split_pairs(read_pairs(data["path"]), seed=data["seed"])
    return generate(data["train_size"], data["valid_size"], data["test_size"], seed=data["seed"],
                    templates=data.get("templates") or TEMPLATES)


# ---------------------------------------------------------------------------------------------
# Batching, decoding, metric
# ---------------------------------------------------------------------------------------------

def tokens(text: str) -> list[str]:
    """Character tokens."""
    return list(text)


@dataclass
class Encoded:
    """A split as id lists: ``src`` (no specials) and ``tgt`` (``<s> … </s>``)."""

    examples: list[Example]
    src: list[list[int]]
    tgt: list[list[int]]


def encode_split(examples: Sequence[Example], src_vocab: Vocab, tgt_vocab: Vocab) -> Encoded:
    return Encoded(list(examples), [src_vocab.encode(tokens(e.source)) for e in examples],
                   [tgt_vocab.encode(tokens(e.target), bos=True, eos=True) for e in examples])


def train_batches(data: Encoded, batch_size: int, seed: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Shuffled (by ``seed``), length-bucketed batches ``(src, src_lengths, tgt_in, tgt_out)``."""
    idx = batch_indices(len(data.src), batch_size, shuffle=True, seed=seed, lengths=[len(s) for s in data.src])
    out = []
    for b in idx:
        src, lengths = pad_batch([data.src[i] for i in b])
        tgt, _ = pad_batch([data.tgt[i] for i in b])
        out.append((src, lengths, tgt[:, :-1], tgt[:, 1:]))
    return out


def decode(model: Seq2Seq, sources: Sequence[str], src_vocab: Vocab, tgt_vocab: Vocab, *, beam: int = 1,
           max_len: int = 32, batch_size: int = 500, length_penalty: float = 0.0, device: str = "cpu",
           ) -> tuple[list[str], list[Tensor]]:
    """Normalize ``sources``: ``(predictions, attention weights (T_out, S) per example)``. Batches
    are formed by source length; the model is put in eval mode. Empty sources give ``""``."""
    was = model.training
    model.eval()
    ids = [src_vocab.encode(tokens(s)) for s in sources]
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))
    preds: list[str] = [""] * len(ids)
    weights: list[Tensor] = [torch.zeros(0, 0)] * len(ids)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            src, lengths = pad_batch([ids[i] for i in b])
            src = src.to(device)
            if beam == 1:
                out, ws = model.greedy(src, lengths.to(device), max_len)
            else:
                out, ws = model.beam_search(src, lengths.to(device), beam=beam, max_len=max_len,
                                            length_penalty=length_penalty)
            for i, o, w in zip(b, out, ws):
                preds[i] = "".join(tgt_vocab.decode(o))
                weights[i] = w.cpu()
    model.train(was)
    return preds, weights


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target (NaN for none)."""
    if len(predictions) != len(targets):
        raise ValueError(f"predictions and targets must have the same length; got {len(predictions)} and {len(targets)}")
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets) if targets else float("nan")


def summary_line(value: float, n: int, split: str = "test", beam: int | None = None) -> str:
    """``test exact match: 97.40% (2000 examples, greedy)``: the line ``attnkit eval`` prints too
    (:func:`attnkit.training.format_metrics`)."""
    return format_metrics({f"{split}_exact_match": value, "examples": n, **({"beam": beam} if beam else {})})


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class BudgetSchedule:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine decay to
    ``floor`` as training progresses, where progress is the larger of ``step / total_steps`` and
    (when ``max_seconds`` is set) the fraction of the wall-clock budget spent. Without a time
    budget the schedule depends on the step alone, so runs are reproducible; with one, the
    decay finishes when the budget does. ``"constant"`` keeps the rate after warmup."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, *, warmup: int = 100,
                 max_seconds: float | None = None, floor: float = 0.02, kind: str = "cosine"):
        if kind not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'constant' or 'cosine'; got {kind!r}")
        self.optimizer, self.total_steps, self.warmup = optimizer, max(1, total_steps), warmup
        self.floor, self.kind = floor, kind
        self.max_seconds = max_seconds
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.start = time.perf_counter()
        self._apply()

    def factor(self) -> float:
        warm = min(1.0, (self.step_count + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "constant":
            return warm
        p = self.step_count / self.total_steps
        if self.max_seconds:
            p = max(p, (time.perf_counter() - self.start) / self.max_seconds)
        p = min(1.0, p)
        return warm * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p)))

    def _apply(self) -> None:
        f = self.factor()
        for g, b in zip(self.optimizer.param_groups, self.base):
            g["lr"] = b * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "base": self.base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.base = state["step_count"], state["base"]
        self._apply()


MODEL_DEFAULTS = dict(emb_dim=64, hidden_dim=128, rnn="gru", attention="luong-general", input_feeding=True,
                      num_layers=1, dropout=0.0)
TRAIN_DEFAULTS = dict(batch_size=128, lr=3e-3, epochs=10, warmup=100, grad_clip=1.0, schedule="cosine")
DATA_DEFAULTS = dict(train_size=20_000, valid_size=1_000, test_size=2_000, seed=1234)


def _get(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, None)
    return default if v is None else v


def _rebuild(checkpoint: Checkpoint) -> tuple[Seq2Seq, Vocab, Vocab, dict[str, Any]]:
    """Model (weights loaded) and vocabularies from a dates checkpoint."""
    c = checkpoint.config
    for key in ("model", "model_config", "src_vocab", "tgt_vocab"):
        if key not in c:
            raise ValueError(f"checkpoint {str(checkpoint.path)!r}: config.json has no {key!r} (not a dates checkpoint?)")
    model = models.get(c["model"])(**c["model_config"])
    load_weights(model, checkpoint)
    return model, Vocab.from_json(c["src_vocab"]), Vocab.from_json(c["tgt_vocab"]), c


@dataclass
class _Run:
    """Everything a finished training run hands to its caller."""

    model: Seq2Seq
    src_vocab: Vocab
    tgt_vocab: Vocab
    splits: dict[str, list[Example]]
    config: dict[str, Any]
    out: Path
    seconds: float
    epochs: int
    stopped: str
    trainer: dict[str, Any] | None


def _train(task: "DatesTask", args: argparse.Namespace, *, epochs_default: int,
           log: Callable[[str], None] = print) -> _Run:
    out = Path(args.out)
    device = getattr(args, "device", "cpu")
    seed = int(getattr(args, "seed", 0) or 0)
    seed_everything(seed)  # the model's initialization depends on --seed alone, whoever calls
    resume = None
    if getattr(args, "resume", False):
        resume = load_checkpoint(out, with_trainer=True)
        if resume.config.get("task") != task.name:
            raise ValueError(f"--resume: checkpoint {str(out)!r} is for task {resume.config.get('task')!r}, "
                             f"not {task.name!r}")
    if resume is not None:  # the data, vocabularies, model and recipe of the checkpoint
        cfg = resume.config
        data, train_cfg = cfg["data"], dict(cfg["train"])
        splits = load_splits(data)
        model, src_vocab, tgt_vocab, _ = _rebuild(resume)
        model_cfg = cfg["model_config"]
    else:
        data_path = getattr(args, "data", None)
        if data_path:
            data = {"path": str(Path(data_path).resolve()), "seed": _get(args, "data_seed", DATA_DEFAULTS["seed"])}
        else:
            data = {"path": None, **{k: int(_get(args, k, v)) for k, v in DATA_DEFAULTS.items() if k != "seed"},
                    "seed": int(_get(args, "data_seed", DATA_DEFAULTS["seed"]))}
            if getattr(args, "templates", None):  # API only: a corpus of some surface forms
                data["templates"] = list(args.templates)
        splits = load_splits(data)
        if not splits["train"]:
            raise ValueError("the training split is empty")
        src_vocab = Vocab.build(tokens(e.source) for e in splits["train"])
        tgt_vocab = Vocab.build(tokens(e.target) for e in splits["train"])
        model_cfg = {k: _get(args, k, v) for k, v in MODEL_DEFAULTS.items()}
        if getattr(args, "no_input_feeding", False):
            model_cfg["input_feeding"] = False
        model_cfg.update(src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), pad_id=Vocab.pad_id,
                         bos_id=Vocab.bos_id, eos_id=Vocab.eos_id)
        model = models.get("Seq2Seq")(**model_cfg)
        train_cfg = {k: _get(args, k, v) for k, v in TRAIN_DEFAULTS.items() if k != "epochs"}
        train_cfg["max_len"] = max(len(e.target) for e in splits["train"]) + 6
    model.to(device)
    epochs = int(_get(args, "epochs", epochs_default))
    max_seconds = getattr(args, "max_seconds", None)
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1; got {epochs}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0; got {max_seconds}")
    if not train_cfg["lr"] > 0:
        raise ValueError(f"--lr must be > 0; got {train_cfg['lr']}")
    enc = {s: encode_split(splits[s], src_vocab, tgt_vocab) for s in ("train", "valid")}
    steps_per_epoch = math.ceil(len(enc["train"].src) / train_cfg["batch_size"])
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg["lr"])
    sched = BudgetSchedule(opt, epochs * steps_per_epoch, warmup=train_cfg["warmup"], max_seconds=max_seconds,
                           kind=train_cfg["schedule"])
    start_epoch, history = 0, {"loss": [], "valid_exact_match": []}
    if resume is not None:
        state = resume.trainer_state
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history, seed = state["epoch"], state["history"], state.get("seed", seed)
        set_rng_state(state["rng"])
        log(f"resuming {str(out)!r} after epoch {start_epoch}")
        if start_epoch >= epochs:
            log(f"checkpoint {str(out)!r} has already trained {start_epoch} epochs (--epochs {epochs}); "
                "evaluating it without training")
    config: dict[str, Any] = {
        "task": task.name, "model": "Seq2Seq", "model_config": model_cfg, "src_vocab": src_vocab.to_json(),
        "tgt_vocab": tgt_vocab.to_json(), "data": data, "train": train_cfg,
        "sizes": {s: len(v) for s, v in splits.items()},
    }
    valid_limit = getattr(args, "valid_limit", None)
    valid = splits["valid"][:valid_limit] if valid_limit else splits["valid"]

    def step(batch: tuple[Tensor, ...]) -> Tensor:
        src, lengths, tgt_in, tgt_out = (t.to(device) for t in batch)
        logits = model(src, lengths, tgt_in)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=Vocab.pad_id)

    def evaluate(epoch: int) -> dict[str, float]:
        preds, _ = decode(model, [e.source for e in valid], src_vocab, tgt_vocab, max_len=train_cfg["max_len"],
                          device=device)
        return {"valid exact match": exact_match(preds, [e.target for e in valid])}

    last: dict[str, Any] = {"trainer": None if resume is None else resume.trainer_state}

    def save(epoch: int, hist: Any) -> None:
        history["loss"].append(hist.losses[-1])
        history["valid_exact_match"].append(hist.metrics[-1]["valid exact match"])
        last["trainer"] = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                           "epochs": epochs, "history": history, "rng": rng_state(), "seed": seed}
        save_checkpoint(out, model=model, config={**config, "history": history}, trainer_state=last["trainer"])

    hist = fit(model, opt, lambda e: train_batches(enc["train"], train_cfg["batch_size"], seed * 100_003 + e), step,
               epochs=epochs, start_epoch=start_epoch, max_seconds=max_seconds, grad_clip=train_cfg["grad_clip"],
               scheduler=sched, evaluate=evaluate, on_epoch_end=save, progress=getattr(args, "progress", True),
               desc=task.name, log=log)
    config["history"] = history
    return _Run(model, src_vocab, tgt_vocab, splits, config, out, hist.seconds, len(history["loss"]), hist.stopped,
                last["trainer"])


def _final_test(run: _Run, beam: int, device: str = "cpu") -> tuple[float, int, list[str], list[Tensor]]:
    test = run.splits["test"]
    preds, weights = decode(run.model, [e.source for e in test], run.src_vocab, run.tgt_vocab, beam=beam,
                            max_len=run.config["train"]["max_len"], device=device)
    em = exact_match(preds, [e.target for e in test])
    run.config["metrics"] = {"test_exact_match": em, "test_examples": len(test), "beam": beam}
    save_checkpoint(run.out, model=run.model, config=run.config, trainer_state=run.trainer)
    return em, len(test), preds, weights


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------

# attnkit translate: longer lines are cut (the longest date in the embedded corpus has about 45
# characters); the cut keeps a pasted paragraph from running the encoder over thousands of steps.
MAX_SOURCE_CHARS = 256
NOT_A_DATE = "  [not a valid date]"  # appended to a translation that is not a calendar date

DEMO_KINDS = ("en:{d} {MMMM} {yyyy}", "zh:{yyyy}年{m}月{d}日", "num:{mm}/{dd}/{yy}", "fr:le {d1} {MMMM} {yyyy}")


def display_tokens(toks: Sequence[str]) -> list[str]:
    """Token labels for pictures: a space shows as ``␣``."""
    return ["␣" if t == " " else t for t in toks]


class DatesTask(Task):
    """``attnkit train dates``: date normalization with an attention seq2seq; metric: exact match."""

    name = "dates"
    help = ("Normalize dates written in many forms and languages to ISO YYYY-MM-DD with an attention "
            "encoder-decoder (character level). Embedded generated corpus, or --data FILE of 'source<TAB>target' "
            "lines. "
            f"attnkit translate marks an output that is not a calendar date with '{NOT_A_DATE.strip()}'.")
    translates = True
    viz_args = '--text "14 juillet 1789"'

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("data")
        g.add_argument("--data", default=None, help="tab-separated 'source<TAB>target' file (default: the embedded "
                                                     "generated corpus); split 85/5/10 into train/valid/test")
        g.add_argument("--data-seed", type=int, default=None, help=f"corpus/split seed (default {DATA_DEFAULTS['seed']})")
        g.add_argument("--train-size", type=positive_int, default=None,
                       help="embedded corpus: training examples (default 20000)")
        g.add_argument("--valid-size", type=positive_int, default=None,
                       help="embedded corpus: validation examples (default 1000)")
        g.add_argument("--test-size", type=positive_int, default=None,
                       help="embedded corpus: test examples (default 2000)")
        m = parser.add_argument_group("model")
        m.add_argument("--attention", default=None, choices=list(ATTENTIONS),
                       help=f"attention (default {MODEL_DEFAULTS['attention']})")
        m.add_argument("--rnn", default=None, choices=["gru", "lstm"], help="recurrent cell (default gru)")
        m.add_argument("--no-input-feeding", action="store_true", help="Luong attention without input feeding")
        m.add_argument("--emb-dim", type=positive_int, default=None,
                       help=f"embedding size (default {MODEL_DEFAULTS['emb_dim']})")
        m.add_argument("--hidden-dim", type=positive_int, default=None,
                       help=f"hidden size (default {MODEL_DEFAULTS['hidden_dim']})")
        m.add_argument("--num-layers", type=positive_int, default=None, help="RNN layers (default 1)")
        m.add_argument("--dropout", type=fraction, default=None, help="dropout (default 0)")
        t = parser.add_argument_group("optimization")
        t.add_argument("--batch-size", type=positive_int, default=None,
                       help=f"batch size (default {TRAIN_DEFAULTS['batch_size']})")
        t.add_argument("--lr", type=positive_float, default=None,
                       help=f"peak Adam learning rate (default {TRAIN_DEFAULTS['lr']})")
        t.add_argument("--schedule", default=None, choices=["cosine", "constant"],
                       help="learning-rate schedule after warmup (default cosine)")
        t.add_argument("--beam", type=positive_int, default=1,
                       help="beam size for the final test evaluation (default 1)")

    # -- attnkit train dates ----------------------------------------------------------------
    def train(self, args: argparse.Namespace) -> TrainResult:
        run = _train(self, args, epochs_default=TRAIN_DEFAULTS["epochs"])
        beam = int(getattr(args, "beam", 1) or 1)
        em, n, _, _ = _final_test(run, beam, getattr(args, "device", "cpu"))
        return TrainResult(metric="test exact match", value=em, summary=summary_line(em, n, beam=beam),
                           checkpoint=run.out,
                           seconds=run.seconds, extra={"epochs": run.epochs, "stopped": run.stopped})

    # -- attnkit eval CKPT ------------------------------------------------------------------
    def evaluate(self, checkpoint: Checkpoint, args: argparse.Namespace) -> dict[str, float]:
        model, src_vocab, tgt_vocab, cfg = _rebuild(checkpoint)
        device = getattr(args, "device", "cpu")
        model.to(device)
        if getattr(args, "data", None):
            examples, split = read_pairs(args.data), "data"
        else:
            split = getattr(args, "split", "test") or "test"
            if split not in ("train", "valid", "test"):
                raise ValueError(f"--split must be one of 'test', 'train', 'valid'; got {split!r}")
            examples = load_splits(cfg["data"])[split]
        beam = int(getattr(args, "beam", 1) or 1)
        max_len = cfg.get("train", {}).get("max_len", 32)
        preds, _ = decode(model, [e.source for e in examples], src_vocab, tgt_vocab, beam=beam, max_len=max_len,
                          device=device)
        return {f"{split}_exact_match": exact_match(preds, [e.target for e in examples]), "examples": len(examples),
                "beam": beam}

    # -- attnkit translate CKPT ---------------------------------------------------------------
    def translate(self, checkpoint: Checkpoint, lines: list[str], args: argparse.Namespace) -> list[str]:
        """One output per input line, in order: the model's ``YYYY-MM-DD``, followed by
        :data:`NOT_A_DATE` when it is not a calendar date (e.g. ``2020-31-31  [not a valid date]``).
        An empty line gives an empty output; a line longer than :data:`MAX_SOURCE_CHARS` is cut to
        that length, with a warning on stderr naming the line."""
        model, src_vocab, tgt_vocab, cfg = _rebuild(checkpoint)
        model.to(getattr(args, "device", "cpu"))
        sources = [line.strip() for line in lines]
        for i, src in enumerate(sources):
            if len(src) > MAX_SOURCE_CHARS:
                warn(f"input line {i + 1} has {len(src)} characters; the date model reads only the first "
                     f"{MAX_SOURCE_CHARS}")
                sources[i] = src[:MAX_SOURCE_CHARS]
        preds, _ = decode(model, sources, src_vocab, tgt_vocab,
                          beam=int(getattr(args, "beam", 1) or 1), max_len=cfg.get("train", {}).get("max_len", 32),
                          device=getattr(args, "device", "cpu"))
        return [p if not src or is_iso_date(p) else f"{p}{NOT_A_DATE}" for src, p in zip(sources, preds)]

    # -- attnkit demo -------------------------------------------------------------------------
    def demo(self, args: argparse.Namespace) -> int:
        """Train on the embedded corpus within ``--max-seconds`` (default 150) of training, then
        print the test exact match and examples, and write the checkpoint, PNG heatmaps and an
        HTML page of attention alignments into ``--out`` (default ``./attnkit-demo``). The last
        printed line is ``test exact match: XX.XX% (N examples, greedy)``. Returns the exit code (0)."""
        t0 = time.perf_counter()
        out = Path(getattr(args, "out", None) or "attnkit-demo")
        # One thread unless asked: the model is small (GRU 128), so a second thread gains little,
        # and when the cores are shared OpenMP threads spin against each other and the run loses
        # most of its time budget (measured: 1 epoch in 150 s with 2 threads at load 4, against 8
        # epochs and 100% exact match with 1 thread at load 5).
        threads = getattr(args, "threads", None)
        set_threads(1 if threads is None else threads)
        seed_everything(int(getattr(args, "seed", 0) or 0))
        budget = getattr(args, "max_seconds", None)
        budget = 150.0 if budget is None else float(budget)
        targs = argparse.Namespace(
            out=str(out), seed=int(getattr(args, "seed", 0) or 0), device=getattr(args, "device", "cpu"),
            epochs=getattr(args, "epochs", None) or 1000, max_seconds=budget, resume=False,
            progress=getattr(args, "progress", True), data=None,
            train_size=getattr(args, "train_size", None), valid_size=getattr(args, "valid_size", None),
            test_size=getattr(args, "test_size", None), data_seed=getattr(args, "data_seed", None),
            valid_limit=getattr(args, "valid_limit", 500), templates=getattr(args, "templates", None))
        for k, v in DEMO_MODEL.items():
            setattr(targs, k, getattr(args, k, None) or v)
        langs = sorted({t.split(":")[0] for t in TEMPLATES} - {"num"})
        print(f"attnkit demo: an attention encoder-decoder ({targs.attention} attention, GRU, hidden {targs.hidden_dim}) "
              f"learns to normalize dates written in {len(TEMPLATES)} forms ({', '.join(langs)} and numeric) "
              "to YYYY-MM-DD")
        print(f"training for up to {budget:.0f} s on {torch.get_num_threads()} CPU thread(s); "
              f"checkpoint and pictures go to {str(out)!r}")
        sys.stdout.flush()
        run = _train(self, targs, epochs_default=1000)
        print(f"trained {run.epochs} epoch(s) in {run.seconds:.0f} s; decoding the test split…")
        em, n, preds, weights = _final_test(run, 1, targs.device)
        test = run.splits["test"]
        print("examples (source → prediction):")
        for i in _pick_examples(test, 8):
            ok = "✓" if preds[i] == test[i].target else f"✗ (expected {test[i].target})"
            print(f"  {_ljust(test[i].source, 38)} → {preds[i]}  {ok}")
        written = _write_pictures(out, test, preds, weights, run.tgt_vocab)
        for p in written:
            print(f"wrote {p}")
        print(f"checkpoint: {out}  (try: attnkit translate {out} \"14 juillet 1789\")")
        print(f"total time {time.perf_counter() - t0:.0f} s")
        print(summary_line(em, n, beam=1))
        return 0


DEMO_MODEL = dict(attention="luong-general", hidden_dim=128, emb_dim=64, batch_size=128, lr=3e-3)


def _ljust(text: str, width: int) -> str:
    """Left-justify for a terminal, counting East Asian wide characters as two columns."""
    cols = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - cols)


def _pick_examples(test: Sequence[Example], k: int) -> list[int]:
    """Up to ``k`` test indices with distinct languages/forms first."""
    seen, picked = set(), []
    for i, ex in enumerate(test):
        lang = ex.kind.split(":")[0]
        if lang not in seen:
            seen.add(lang)
            picked.append(i)
        if len(picked) == k:
            break
    for i in range(len(test)):
        if len(picked) >= k:
            break
        if i not in picked:
            picked.append(i)
    return picked


def _write_pictures(out: Path, test: Sequence[Example], preds: Sequence[str], weights: Sequence[Tensor],
                    tgt_vocab: Vocab) -> list[Path]:
    from ..viz.heatmap import alignment_png
    from ..viz.html import Alignment, alignment_page

    chosen: list[int] = []
    for kind in DEMO_KINDS:
        i = next((j for j, e in enumerate(test) if e.kind == kind), None)
        if i is not None:
            chosen.append(i)
    for i in range(len(test)):
        if len(chosen) >= len(DEMO_KINDS):
            break
        if i not in chosen:
            chosen.append(i)
    written, items = [], []
    for n, i in enumerate(chosen, 1):
        src = display_tokens(tokens(test[i].source))
        w = weights[i]
        tgt = tokens(preds[i])
        if w.shape[0] == len(tgt) + 1:
            tgt = tgt + ["</s>"]
        w = w[: len(tgt)]
        mark = "✓" if preds[i] == test[i].target else f"✗ expected {test[i].target}"
        title = f"{test[i].source} → {preds[i]} {mark}"
        written.append(alignment_png(w, src, tgt, out / f"alignment_{n}.png", title=title))
        items.append(Alignment(w, src, tgt, caption=title))
    alignment_page(items, out / "alignment.html", title="attnkit demo: date normalization attention")
    written.append(out / "alignment.html")
    return written


__all__ = ["DatesTask", "Example", "MONTHS", "TEMPLATES", "WEEKDAYS", "BudgetSchedule", "decode", "exact_match",
           "generate", "is_iso_date", "read_pairs", "render", "split_pairs", "template"]
