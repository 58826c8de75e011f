"""The dates task's data: the embedded corpus (the surface forms of :data:`TEMPLATES` in several
languages, :func:`render`, :func:`generate`), the ``--data`` file reader (:func:`read_pairs`,
checked line by line), the splits (:func:`split_pairs`, :func:`load_splits`), and the character
tokens and batches the model trains on (:func:`encode_split`, :func:`train_batches`).
"""

from __future__ import annotations

import datetime
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import check_path, read_text_lines
from ..vocab import Vocab, batch_indices, pad_batch

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


DATA_DEFAULTS = dict(train_size=20_000, valid_size=1_000, test_size=2_000, seed=1234)


# ---------------------------------------------------------------------------------------------
# Tokens and batches
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
