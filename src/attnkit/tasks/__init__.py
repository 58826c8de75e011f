"""Tasks: an embedded default dataset, real-data loaders, a model and the field's metric.

``attnkit.tasks.get(name)`` returns a :class:`~attnkit.tasks.base.Task`; ``names()`` lists them.
Task modules are imported on first use.
"""

from __future__ import annotations

import importlib

from .._checks import lookup
from .base import Task, TrainResult, check_path

# task name -> "module:Class"
_TASKS = {
    "dates": "dates:DatesTask",
    "multi30k": "translation:Multi30kTask",
    "digits": "images:DigitsTask",
    "mnist": "images:MnistTask",
    "sst2": "text:Sst2Task",
}


def names() -> list[str]:
    return sorted(_TASKS)


def get(name: str) -> Task:
    """The task called ``name`` (unknown names list the valid ones)."""
    target = lookup("task", name, _TASKS)
    module, cls = target.split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)()


__all__ = ["Task", "TrainResult", "check_path", "get", "names"]
