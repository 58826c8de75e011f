"""Reading a spoken date back from its words: the inverse of :func:`~attnkit.tasks.speech.data.say_date`.

A transcript such as ``"the twenty first of may nineteen ninety eight"`` is matched against the
date grammar of each language (:data:`FORMS`: where the day, month and year go, and the words
between them). The match tolerates recognition errors: it finds the phrase the grammar can say
that is fewest character edits (Levenshtein distance, with ``rapidfuzz``) from the transcript, by
dynamic programming over the transcript's words::

    cost[i][k] = min over j <= k of  cost[i-1][j] + min over the phrases a of part i:  edits(words[j:k], a)

where part ``i`` is a fixed word (``"of"``, ``"de"``) or a slot (the day, the month or the year,
with every way the language says each). The speech recipe uses it to write the date from the
recognized transcript (see :func:`attnkit.tasks.speech.recipe.decode`).

>>> read_date("the twenty first of may nineteen ninety eight")
Reading(iso='1998-05-21', edits=0, lang='en')
>>> read_date("vingt octobre mille neuf cent").iso  # one letter missing: "cents"
'1900-10-20'
"""

from __future__ import annotations

import calendar
import datetime
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

from .data import LANGUAGES, MONTHS, YEARS, _words, normalize_transcript

#: where each language puts the parts of a date (``{day}``, ``{month}``, ``{year}``; other words are
#: said as written); the same forms :func:`~attnkit.tasks.speech.data.say_date` draws from
FORMS: dict[str, tuple[str, ...]] = {
    "en": ("the {day} of {month} {year}", "{month} {day} {year}", "{day} {month} {year}"),
    "fr": ("le {day} {month} {year}", "{day} {month} {year}"),
    "de": ("der {day} {month} {year}", "{day} {month} {year}"),
    "es": ("el {day} de {month} de {year}", "{day} de {month} de {year}"),
}


@dataclass(frozen=True)
class Reading:
    """The date a transcript is closest to: ``iso`` (``YYYY-MM-DD``), ``edits`` (characters to change
    in the transcript to say it exactly) and ``lang``."""

    iso: str
    edits: int
    lang: str


@functools.lru_cache(maxsize=None)
def slot_phrases(lang: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every way ``lang`` says each slot: ``{"day"|"month"|"year": (phrases, values)}``."""
    if lang not in FORMS:
        raise ValueError(f"lang must be one of {', '.join(LANGUAGES)}; got {lang!r}")
    to = {"en": "ordinal", "de": "ordinal"}.get(lang, "cardinal")
    days = [(normalize_transcript(_words(d, lang, to)), d) for d in range(1, 32)]
    if lang == "fr":
        days = [("premier", 1)] + days[1:]
    if lang == "es":
        days.append(("primero", 1))
    year_to = "year" if lang in ("en", "de") else "cardinal"
    years = [(normalize_transcript(_words(y, lang, year_to)), y) for y in range(YEARS[0], YEARS[1] + 1)]
    months = [(m, i) for i, m in enumerate(MONTHS[lang], 1)]
    return {name: (tuple(p for p, _ in pairs), tuple(v for _, v in pairs))
            for name, pairs in (("day", days), ("month", months), ("year", years))}


def _parts(form: str) -> list[str]:
    """``"the {day} of {month} {year}"`` -> ``["the", "{day}", "of", "{month}", "{year}"]``."""
    return form.split()


def _read_lang(words: Sequence[str], lang: str) -> Reading:
    """The closest calendar date: when the closest phrase says a day the month lacks (the 31st of
    April), the day is read again among the days of that month and year."""
    max_day = 31
    while True:
        edits, chosen = _closest(words, lang, max_day)
        last = calendar.monthrange(chosen["year"], chosen["month"])[1]
        if chosen["day"] <= last:
            date = datetime.date(chosen["year"], chosen["month"], chosen["day"])
            return Reading(date.isoformat(), edits, lang)
        max_day = last  # smaller each time round: the loop ends


def _closest(words: Sequence[str], lang: str, max_day: int) -> tuple[int, dict[str, int]]:
    """(edits, {"day", "month", "year"}) of the closest phrase of ``lang`` with a day <= ``max_day``."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    slots = dict(slot_phrases(lang))
    if max_day < 31:
        slots["day"] = tuple(zip(*[(p, v) for p, v in zip(*slots["day"]) if v <= max_day]))
    n = len(words)
    span_cache: dict[tuple[str, int, int], tuple[int, int]] = {}

    def span_cost(part: str, j: int, k: int) -> tuple[int, int]:
        """(edits, value) of the best phrase of ``part`` for ``words[j:k]``."""
        key = (part, j, k)
        if key not in span_cache:
            text = " ".join(words[j:k])
            if part.startswith("{"):
                phrases, values = slots[part[1:-1]]
                _, score, idx = process.extractOne(text, phrases, scorer=Levenshtein.distance)
                span_cache[key] = (int(score), values[idx])
            else:
                span_cache[key] = (Levenshtein.distance(text, part), 0)
        return span_cache[key]

    best: Optional[tuple[int, dict[str, int]]] = None
    for form in FORMS[lang]:
        parts = _parts(form)
        # cost[k]: (edits, chosen values) of the parts so far covering words[:k]
        cost: list[Optional[tuple[int, dict[str, int]]]] = [(0, {})] + [None] * n
        for part in parts:
            new: list[Optional[tuple[int, dict[str, int]]]] = [None] * (n + 1)
            for j, prev in enumerate(cost):
                if prev is None:
                    continue
                for k in range(j, n + 1):
                    edits, value = span_cost(part, j, k)
                    total = prev[0] + edits
                    if new[k] is None or total < new[k][0]:
                        chosen = prev[1] | ({part[1:-1]: value} if part.startswith("{") else {})
                        new[k] = (total, chosen)
            cost = new
        last = cost[n]
        assert last is not None  # the last part may take every word left
        if best is None or last[0] < best[0]:
            best = last
    assert best is not None
    return best


def read_date(transcript: str, languages: Sequence[str] = LANGUAGES) -> Optional[Reading]:
    """The calendar date (years :data:`~attnkit.tasks.speech.data.YEARS`) whose words in one of
    ``languages`` are fewest character edits from ``transcript``; ``None`` for an empty transcript.

    ``Reading.edits`` says how far it is: 0 when the transcript says the date exactly; a caller
    decides how many edits to accept (the speech recipe accepts up to
    :data:`~attnkit.tasks.speech.recipe.READ_MAX_EDITS` per character).

    >>> read_date("el primero de enero de dos mil").iso
    '2000-01-01'
    >>> read_date("")  is None
    True
    """
    words = normalize_transcript(transcript).split()
    if not words:
        return None
    return min((_read_lang(words, lang) for lang in languages), key=lambda r: r.edits, default=None)


__all__ = ["FORMS", "Reading", "read_date", "slot_phrases"]


def say_all(iso: str, languages: Sequence[str] = LANGUAGES) -> list[str]:
    """Every phrase the grammar says the date ``iso`` with, in each of ``languages``.

    >>> say_all("2000-01-01", ["fr"])
    ['le premier janvier deux mille', 'premier janvier deux mille']
    """
    date = datetime.date.fromisoformat(iso)
    out = []
    for lang in languages:
        slots = slot_phrases(lang)
        options = {name: [p for p, v in zip(*slots[name]) if v == value]
                   for name, value in (("day", date.day), ("month", date.month), ("year", date.year))}
        for form in FORMS[lang]:
            for day in options["day"]:
                out += [form.format(day=day, month=month, year=year)
                        for month in options["month"] for year in options["year"]]
    return out
