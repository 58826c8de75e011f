"""Command-line helpers of the tasks: argparse ``type=`` functions that refuse a bad value when the
command line is parsed (:func:`positive_int`, :func:`fraction`, ...), and :func:`option`, an
option's value or a default when it was not given.
"""

from __future__ import annotations

import argparse
import math
from typing import Any


def option(args: argparse.Namespace, name: str, default: Any) -> Any:
    """``args.<name>``, or ``default`` when ``args`` has no such attribute or it is None."""
    v = getattr(args, name, None)
    return default if v is None else v


# argparse ``type=`` functions: an option's bad value is refused when the command line is parsed,
# with a message that names the option (argparse adds "argument --NAME: ").
def _number(text: str, kind: type, test, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or not test(value):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: v > 0, "a number > 0")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (dropout, label smoothing)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")
