"""Tasks: an embedded default dataset, real-data loaders, a model and the field's metric.

``attnkit.tasks.get(name)`` returns a :class:`~attnkit.tasks.base.Task`; ``names()`` lists them.
Task modules are imported on first use.

Each task is a package of the same shape: ``data.py`` (data generation, file readers and their
checks, splits, tokens and batches; no model, training or checkpoint code), ``recipe.py`` (the
model, the training run, decoding, the metric, the model rebuilt from a checkpoint) and
``task.py`` (the :class:`~attnkit.tasks.base.Task`: command-line options, train / eval /
translate / demo wiring, the demo's pictures). Shared: :mod:`~attnkit.tasks.base` (the
interface), :mod:`~attnkit.tasks.io` (reading user files), :mod:`~attnkit.tasks.args`
(command-line helpers), :mod:`~attnkit.tasks.classification` (the classifier recipe of digits,
mnist and sst2), :mod:`~attnkit.tasks.vocab` and :mod:`~attnkit.tasks.subword` (text tools).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from .._checks import lookup
from .base import Task, TrainResult
from .io import check_path

# task name -> "package.module:Class"
_TASKS = {
    "dates": "dates.task:DatesTask",
    "multi30k": "multi30k.task:Multi30kTask",
    "digits": "images.task:DigitsTask",
    "mnist": "images.task:MnistTask",
    "sst2": "sst2.task:Sst2Task",
    "captioning": "captioning.task:CaptioningTask",
    "vqa": "vqa.task:VqaTask",
    "speech": "speech.task:SpeechTask",
}


def names() -> list[str]:
    return sorted(_TASKS)


def get(name: str) -> Task:
    """The task called ``name`` (unknown names list the valid ones)."""
    target = lookup("task", name, _TASKS)
    module, cls = target.split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)()


def lazy_attribute(package: str, exports: dict[str, str], name: str) -> Any:
    """A task package's ``__getattr__``: ``name`` from the package's module ``exports[name]``
    (``"task"``, ``"recipe"``), imported on first use, so that importing the package or its
    ``data`` module does not import the model, training and checkpoint code."""
    module = exports.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{module}"), name)
    setattr(sys.modules[package], name, value)
    return value


__all__ = ["Task", "TrainResult", "check_path", "get", "names"]
