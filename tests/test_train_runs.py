"""benchmarks/train_runs.py: how a task benchmark's runs are stored (seeds added, reruns replaced)."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_runs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("attnkit_benchmarks_train_runs",
                                                      ROOT / "benchmarks" / "train_runs.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _run(label, seed, value):
    return {"label": label, "seed": seed, "rc": 0, "value": value}


def test_added_seeds_keep_the_stored_ones_and_a_rerun_seed_replaces_its_run(tmp_path):
    tr = _train_runs()
    path = str(tmp_path / "r.json")
    order = ["soft", "hard"]
    tr.save(path, 'cmd --variants "soft" "hard"', 2, 1, [_run("soft", 0, 1.0), _run("hard", 0, 2.0)],
            ["soft", "hard"], order)
    tr.save(path, 'cmd --first-seed 1 --variants "soft"', 2, 2, [_run("soft", 1, 3.0), _run("soft", 2, 4.0)],
            ["soft"], order)
    d = json.loads(Path(path).read_text())
    assert [(r["label"], r["seed"], r["value"]) for r in d["runs"]] == [
        ("soft", 0, 1.0), ("soft", 1, 3.0), ("soft", 2, 4.0), ("hard", 0, 2.0)]
    assert d["commands"] == ['cmd --variants "soft" "hard"', 'cmd --first-seed 1 --variants "soft"']
    tr.save(path, 'cmd --variants "soft"', 2, 1, [_run("soft", 0, 5.0)], ["soft"], order)
    d = json.loads(Path(path).read_text())
    assert [(r["label"], r["seed"], r["value"]) for r in d["runs"]] == [
        ("soft", 0, 5.0), ("soft", 1, 3.0), ("soft", 2, 4.0), ("hard", 0, 2.0)]
    tr.save(path, 'cmd --variants "soft"', 1, 1, [_run("soft", 0, 6.0)], ["soft"], order)   # other threads: alone
    assert [r["value"] for r in json.loads(Path(path).read_text())["runs"]] == [6.0]
