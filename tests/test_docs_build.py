"""The API reference (docs/api) builds from the docstrings with warnings as errors."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="Sphinx is not installed (pip install -e '.[docs]')")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api"


def test_api_reference_builds_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("index", "functional", "masks", "scores", "normalizers", "positions", "nn", "models", "viz",
                 "capture", "backends"):
        assert (out / f"{page}.html").is_file(), page
    masks = (out / "masks.html").read_text(encoding="utf-8")
    assert "sliding_window" in masks and "33" in masks  # the window's exact semantics made it in
