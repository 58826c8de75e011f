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

    >>> import datetime, random
    >>> splits = generate(n_train=5, n_valid=2, n_test=2, seed=0)
    >>> [len(splits[s]) for s in ("train", "valid", "test")]
    [5, 2, 2]
    >>> ex = render(datetime.date(2019, 3, 3), template("en:{do} of {MMMM}, {yyyy}"), random.Random(0))
    >>> ex.source, ex.target, ex.field_spans("year")
    ('3rd of March, 2019', '2019-03-03', [(14, 18)])
"""

from __future__ import annotations

from typing import Any

from .. import lazy_attribute
from .data import (MONTHS, TEMPLATES, WEEKDAYS, Example, generate, is_iso_date, load_splits, read_pairs, render,
                   split_pairs, template, tokens)

# Imported on first use (they import the model and training code): name -> module of this package.
_LAZY = {"BudgetSchedule": "recipe", "decode": "recipe", "exact_match": "recipe", "rebuild": "recipe",
         "DatesTask": "task", "MAX_SOURCE_CHARS": "task", "NOT_A_DATE": "task"}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)


__all__ = ["DatesTask", "Example", "MONTHS", "TEMPLATES", "WEEKDAYS", "BudgetSchedule", "decode", "exact_match",
           "generate", "is_iso_date", "read_pairs", "render", "split_pairs", "template", "load_splits", "tokens",
           "rebuild", "MAX_SOURCE_CHARS", "NOT_A_DATE"]
