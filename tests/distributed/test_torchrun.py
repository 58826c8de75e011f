"""``torchrun -m attnkit train``: data-parallel training from the command line over gloo processes.
The same global batches give one process's loss curve; rank 0 alone prints and writes the
checkpoint; a checkpoint written by R ranks resumes with another number of ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

TINY = ["--train-size", "384", "--valid-size", "32", "--test-size", "32", "--batch-size", "48", "--hidden-dim", "32",
        "--emb-dim", "16", "--schedule", "constant", "--no-progress", "--threads", "1"]  # constant: a 1-epoch run
# is the first epoch of a 2-epoch one


def _attnkit(out: Path, epochs: int, ranks: int = 1, resume: bool = False) -> str:
    args = ["-m", "attnkit", "train", "dates", *TINY, "--epochs", str(epochs), "--out", str(out)]
    if resume:
        args.append("--resume")
    if ranks > 1:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(ranks), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(out: Path) -> list[float]:
    return json.loads((out / "config.json").read_text())["history"]["loss"]


@pytest.mark.skipif(not (shutil.which("torchrun") or Path(sys.executable).with_name("torchrun").exists()),
                    reason="torchrun is not installed beside this Python")
def test_torchrun_training_equals_one_process_and_resumes_with_another_rank_count(tmp_path):
    one = tmp_path / "one"
    _attnkit(one, epochs=2)
    want = _losses(one)

    split = tmp_path / "split"
    printed = _attnkit(split, epochs=1, ranks=2)
    assert printed.count("test exact match") == 1 and printed.count("wrote ") == 1, printed  # rank 0 alone
    assert not [f for f in split.iterdir() if f.name.startswith(".")], "a staged checkpoint file was left"
    assert _losses(split) == pytest.approx(want[:1], rel=1e-6)
    _attnkit(split, epochs=2, ranks=3, resume=True)  # 2 ranks wrote it, 3 resume it
    assert _losses(split) == pytest.approx(want, rel=1e-6)


M30K = Path(__file__).resolve().parents[3] / "shared" / "data" / "multi30k"
SMALL_TRANSFORMER = ["--max-train", "256", "--tokenizer", "word", "--d-model", "32", "--heads", "2", "--encoder-layers",
                     "1", "--decoder-layers", "1", "--ff", "64", "--dropout", "0", "--batch-tokens", "1000",
                     "--valid-sentences", "16", "--epochs", "1", "--no-progress", "--threads", "1", "--beam", "1"]


@pytest.mark.skipif(not M30K.is_dir(), reason=f"Multi30k is not at {M30K} (see its README for the source)")
@pytest.mark.skipif(not (shutil.which("torchrun") or Path(sys.executable).with_name("torchrun").exists()),
                    reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("how", ["batches split", "--context-parallel"])
def test_multi30k_over_two_ranks_follows_one_process(tmp_path, how):
    """Data parallel (token-weighted) and context parallel (every sentence split, ring attention)
    give one process's training loss."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["-m", "attnkit", "train", "multi30k", *SMALL_TRANSFORMER, "--data", str(M30K)]
    runs = {"one": [sys.executable, *base, "--out", str(tmp_path / "one")],
            "two": [torchrun, "--standalone", "--nproc-per-node", "2", *base, "--out", str(tmp_path / "two")]
            + (["--context-parallel"] if how == "--context-parallel" else [])}
    for name, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [json.loads((tmp_path / n / "config.json").read_text())["history"][0]["loss"] for n in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
