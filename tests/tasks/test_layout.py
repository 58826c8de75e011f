"""Every task is a package of one shape (``data.py``, ``recipe.py``, ``task.py``; see
:mod:`attnkit.tasks`), and its ``data`` module stands alone: importing it loads no model,
training or checkpoint code.

``import attnkit`` itself imports the registries ``attnkit.models`` and ``attnkit.nn``, which hold
no model code (their classes live in submodules, imported on first use); what a data module must
not pull in is those submodules, ``attnkit.training`` and ``attnkit.checkpoint``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import attnkit.tasks as tasks

PACKAGES = sorted({type(tasks.get(name)).__module__.rpartition(".")[0] for name in tasks.names()})


def forbidden(module: str) -> bool:
    """A module that a task's ``data.py`` must not import, directly or through its imports."""
    return (module in ("attnkit.training", "attnkit.checkpoint")
            or module.startswith(("attnkit.models.", "attnkit.nn.", "attnkit.training.")))


def modules_after(*imports: str) -> list[list[str]]:
    """The ``attnkit`` modules loaded in a fresh interpreter after each of ``imports`` in turn."""
    code = ("import importlib, json, sys\nloaded = []\n"
            f"for name in {list(imports)!r}:\n"
            "    importlib.import_module(name)\n"
            "    loaded.append(sorted(m for m in sys.modules if m == 'attnkit' or m.startswith('attnkit.')))\n"
            "print(json.dumps(loaded))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_registered_task_is_a_package_with_data_and_task_modules():
    assert {f"attnkit.tasks.{p}" for p in ("dates", "images", "multi30k", "sst2")} <= set(PACKAGES)
    for name in tasks.names():
        module = type(tasks.get(name)).__module__
        assert module.endswith(".task"), f"task {name!r}: its class lives in {module}, not in a task.py"
    root = Path(tasks.__file__).parent
    for package in PACKAGES:
        folder = root / package.rpartition(".")[2]
        assert (folder / "__init__.py").is_file(), package
        for part in ("data.py", "task.py"):
            assert (folder / part).is_file(), f"{package} has no {part}"


@pytest.mark.parametrize("package", PACKAGES)
def test_a_data_module_imports_no_model_training_or_checkpoint_code(package):
    data, task = modules_after(f"{package}.data", f"{package}.task")
    assert [m for m in data if forbidden(m)] == [], f"importing {package}.data imported them"
    assert f"{package}.task" not in data and f"{package}.recipe" not in data
    assert f"{package}.task" in task  # and the task module imports in a fresh interpreter (no import cycle)


def test_importing_attnkit_imports_no_task():
    (loaded,) = modules_after("attnkit")
    assert [m for m in loaded if m.startswith(tuple(p + "." for p in PACKAGES)) or m in PACKAGES] == []
    assert [m for m in loaded if forbidden(m)] == []
