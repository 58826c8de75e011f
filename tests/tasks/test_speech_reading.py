"""Reading a spoken date back from its words (attnkit.tasks.speech.reading): every phrase the
generator says reads back exactly (hypothesis), recognition errors cost the edits a hand count
gives, phrases that are no calendar date read as none, and ``say_all`` lists what ``say_date`` says."""

from __future__ import annotations

import datetime
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("num2words", reason='the date grammar spells numbers with num2words (pip install -e ".[apps]")')
pytest.importorskip("rapidfuzz", reason='reading dates uses rapidfuzz (installed with jiwer: pip install -e ".[apps]")')

from attnkit.tasks.speech.data import LANGUAGES, YEARS, say_date  # noqa: E402
from attnkit.tasks.speech.reading import FORMS, Reading, read_date, say_all, slot_phrases  # noqa: E402

dates = st.dates(datetime.date(YEARS[0], 1, 1), datetime.date(YEARS[1], 12, 31))


@settings(max_examples=60, deadline=None)
@given(dates, st.sampled_from(LANGUAGES), st.integers(0, 2**31))
def test_what_say_date_says_reads_back_exactly(date, lang, seed):
    said = say_date(date, lang, random.Random(seed))
    assert read_date(said) == Reading(date.isoformat(), 0, lang)
    assert read_date(said, [lang]) == Reading(date.isoformat(), 0, lang)
    assert said in say_all(date.isoformat(), [lang])


@settings(max_examples=30, deadline=None)
@given(dates, st.sampled_from(LANGUAGES))
def test_say_all_lists_every_form_of_say_date(date, lang):
    said = {say_date(date, lang, random.Random(s)) for s in range(40)}
    assert said <= set(say_all(date.isoformat(), [lang]))
    assert set(say_all(date.isoformat())) >= set(say_all(date.isoformat(), [lang]))


@pytest.mark.parametrize("heard, iso, edits, lang", [
    ("vingt octobre mille neuf cent", "1900-10-20", 1, "fr"),  # "cents"
    ("twenth september twenty eleven", "2011-09-10", 1, "en"),  # "tenth"
    ("the twenty first of may nineteen ninety eigth", "1998-05-21", 2, "en"),  # a swap is two edits
    ("once de octubre de mil novecientos veinto", "1920-10-11", 1, "es"),  # "veinte"
    ("Der Dritte Mai, neunzehnhundertsieben!", "1907-05-03", 0, "de"),  # case and punctuation are not errors
])
def test_a_few_misheard_letters_still_read_as_the_date(heard, iso, edits, lang):
    assert read_date(heard) == Reading(iso, edits, lang)


def test_a_day_the_month_lacks_reads_as_the_closest_calendar_date():
    # April has 30 days; of the days it has, "twenty first" is the closest to "thirty first" (w->h,
    # e->i, n->r), closer than "thirtieth" (5 edits)
    assert read_date("the thirty first of april nineteen ninety") == Reading("1990-04-21", 3, "en")
    # 1901 is no leap year: "einundzwanzigste" is 2 edits from "neunundzwanzigste"
    assert read_date("der neunundzwanzigste februar neunzehnhunderteins", ["de"]) == Reading("1901-02-21", 2, "de")
    assert read_date("der neunundzwanzigste februar zweitausend", ["de"]) == Reading("2000-02-29", 0, "de")


def test_long_transcripts_are_read_too():
    said = "the first of may two thousand"
    noisy = "and then " * 12 + said + " and so on" * 5  # 40 words: a part may take many of them
    r = read_date(noisy)
    assert r is not None and 0 < r.edits < len(noisy)


def test_nothing_to_read():
    assert read_date("   ") is None
    assert read_date("") is None


def test_a_transcript_is_read_in_the_language_it_is_closest_to():
    r = read_date("el primero de enero de dos mil")
    assert r == Reading("2000-01-01", 0, "es")
    # restricted to English, the same words are far from any date, but one is still the closest
    en = read_date("el primero de enero de dos mil", ["en"])
    assert en is not None and en.lang == "en" and en.edits > 10


def test_slot_phrases_cover_every_value_and_the_grammar_is_checked():
    for lang in LANGUAGES:
        slots = slot_phrases(lang)
        assert set(slots["day"][1]) == set(range(1, 32))
        assert slots["month"][1] == tuple(range(1, 13))
        assert set(slots["year"][1]) == set(range(YEARS[0], YEARS[1] + 1))
        assert all("{day}" in f and "{month}" in f and "{year}" in f for f in FORMS[lang])
    assert slot_phrases("en")["day"][0][20] == "twenty first"
    with pytest.raises(ValueError, match="lang must be one of"):
        slot_phrases("it")
