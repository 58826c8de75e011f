"""Every script in examples/ runs, exits 0 and prints what it promises (each in a fresh process)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# script -> (extra arguments, lines its output must contain, as regular expressions)
EXPECTED = {
    "causal_lm.py": ([], [r"entmax15 +loss \d+\.\d+ -> \d+\.\d+", r"sigmoid\(-log n\) +loss \d+\.\d+ -> \d+\.\d+",
                          r"ok: both models learn"]),
    "custom_mask_and_score_mod.py": ([], [r"slopes after:", r"ok: the learned slopes changed"]),
    "custom_normalizer.py": ([], [r"matches the hand computation: True", r"backend: reference",
                                  r"ok: softmax_plus_one runs on the reference backend"]),
    "huggingface.py": ([], [r"logits, attnkit vs eager: max \|diff\| = \d\.\d+e-(0[7-9]|1\d)",
                            r"mask handed to attnkit: \(SlidingWindow\(left=7, right=0, align=0\) & key_padding",
                            r"captured: model\.layers\.0\.self_attn \(2, 1, 1, 24\)",
                            r"ok: a Hugging Face model runs on attnkit"]),
    "ring_attention.py": ([], [r"rank 0/2: computed on the K/V shards of ranks \[0, 1\]",
                               r"max \|diff\| = \d\.\de-(1[0-9]|[2-9]\d)", r"ok: ring attention equals one process"]),
    "attention_html.py": (["{tmp}/heads.html"], [r"captured layers\.0: weights \(1, 2, 8, 8\)",
                                                r"wrote .*heads\.html"]),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script, tmp_path):
    args, patterns = EXPECTED[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *[a.format(tmp=tmp_path) for a in args]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    for pattern in patterns:
        assert re.search(pattern, proc.stdout), f"{script}: no line matching {pattern!r} in:\n{proc.stdout}"
    if script == "attention_html.py":
        page = (tmp_path / "heads.html").read_text(encoding="utf-8")
        assert page.startswith("<!DOCTYPE html>") and "layers.*" in page
