"""Normalizers: softmax (temperature), sigmoid, and (see submodules) sparse and hard ones.

Strings name parameter-free defaults (``"softmax"``, ``"sigmoid"``, ...); objects carry
parameters (``Softmax(temperature=0.5)``, ``Sigmoid(bias="log_n")``, ...).
"""

from __future__ import annotations

from .._checks import lookup
from .base import Normalizer, Sigmoid, Softmax

#: parameter-free normalizers by name
NAMED = {"softmax": Softmax, "sigmoid": Sigmoid}


def get(normalizer) -> Normalizer:
    """Resolve ``normalizer=`` (a name or a :class:`Normalizer`)."""
    if isinstance(normalizer, Normalizer):
        return normalizer
    return lookup("normalizer", normalizer, NAMED)()


__all__ = ["Normalizer", "Softmax", "Sigmoid", "get", "NAMED"]
