"""A researcher's first hour at the command line: ``attnkit train --help`` lists the tasks and
their options; ``attnkit viz`` draws an image model's attention on the image; ``train`` and
``eval`` print a metric the same way (``eval --json`` for scripts); ``--max-seconds`` says where
it stopped; ``train`` says which files it wrote, and ``--out``'s help says what each task writes.

One tiny digits checkpoint (and one tiny synthetic MNIST one) is trained for the module: a few
seconds.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit import cli, tasks
from attnkit.checkpoint import load_checkpoint
from attnkit.training import format_metrics
from attnkit.viz import image as vimage

QUIET = ["--threads", "1", "--no-progress"]
TINY = ["--epochs", "1", "--dim", "8", "--depth", "1", "--heads", "2", *QUIET]


def run(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``attnkit ARGV`` run in-process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def quietly(argv) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main([str(a) for a in argv])
    return code, buf.getvalue()


def write_mnist(directory: Path, n_train: int = 160, n_test: int = 20, size: int = 8) -> Path:
    """Tiny idx files: class k lights up row k."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, size, n).astype(np.uint8)
        imgs = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        imgs[np.arange(n), labels] = 255
        for kind, arr in (("images-idx3-ubyte", imgs), ("labels-idx1-ubyte", labels)):
            head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (directory / f"{part}-{kind}.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    return directory


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A tiny digits checkpoint, trained through the command line, and what training printed."""
    out = tmp_path_factory.mktemp("first_hour") / "digits"
    code, printed = quietly(["train", "digits", "--out", out, *TINY])
    assert code == 0, printed
    return out, printed


# -- 1. attnkit train --help ------------------------------------------------------------------------
def test_train_help_lists_every_task_and_its_options(capsys):
    code, out, err = run(["train", "--help"], capsys)
    assert code == 0 and err == ""
    for name in tasks.names():
        assert re.search(rf"^  {name} +\S", out, re.M), name           # the task list, with its description
        assert f"=== attnkit train {name} ===" in out                 # and a section of its own options
    for option in ("--max-seconds", "--epochs", "--out", "--resume",   # shared
                   "--patch-size", "--split-seed",                     # digits
                   "--attention", "--hidden-dim",                      # dates
                   "--train-limit", "--memory-dim",                    # mnist
                   "--min-freq", "--tokenizer"):                       # sst2, multi30k
        assert option in out, option
    assert run(["train", "-h"], capsys)[1] == out
    code, out2, err2 = run(["train"], capsys)  # no task: the same help, on stderr, and a usage error
    assert code == 2 and out2 == "" and err2 == out


def test_train_task_help_shows_that_tasks_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "digits", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: attnkit train digits")
    assert "--patch-size" in out and "--max-seconds" in out and "--attention" not in out


# -- 2. attnkit viz on image checkpoints ---------------------------------------------------------------
def test_upsample_copies_each_patch_weight_onto_its_pixels():
    w = torch.arange(6.0)                                   # a 2×3 grid, row-major
    up = vimage.upsample(w, (2, 3), (4, 6))
    assert up.shape == (4, 6)
    assert up[:2, :2].eq(0).all() and up[:2, 4:].eq(2).all() and up[2:, 2:4].eq(4).all()
    assert torch.equal(vimage.upsample(w.view(2, 3), (2, 3), (4, 6)), up)
    rows = vimage.upsample(torch.tensor([1.0, 2.0]), (2, 1), (2, 5))  # a model that reads rows
    assert rows.tolist() == [[1.0] * 5, [2.0] * 5]
    with pytest.raises(ValueError, match="one weight per token of the 2×3 grid"):
        vimage.upsample(torch.ones(5), (2, 3), (4, 6))


def test_image_attention_png_colours_the_attended_patch_only(tmp_path):
    import matplotlib.image

    image = torch.linspace(0, 1, 64).view(8, 8)
    w = torch.zeros(16)
    w[5] = 1.0                                               # all weight on patch (row 1, col 1) of a 4×4 grid
    path = vimage.image_attention_png(image, {"one patch": w}, (4, 4), tmp_path / "a.png", title=None, dpi=50)
    px = matplotlib.image.imread(path)[..., :3]
    assert px.shape[1::-1] == vimage.image_attention_size(1, title=False, dpi=50)
    dpi, cell = 50, vimage.PANEL / 4

    def centre(panel: int, row: int, col: int) -> np.ndarray:
        x = (vimage.MARGIN + panel * (vimage.PANEL + vimage.GAP) + (col + 0.5) * cell) * dpi
        y = (vimage.MARGIN + vimage.LABEL_H + (row + 0.5) * cell) * dpi
        return px[int(y), int(x)]

    def grey(p: np.ndarray) -> bool:
        return float(p.max() - p.min()) < 0.02

    assert all(grey(centre(0, r, c)) for r in range(4) for c in range(4))       # the image, as it is
    assert not grey(centre(1, 1, 1))                                            # the attended patch is coloured
    assert all(grey(centre(1, r, c)) for r in range(4) for c in range(4) if (r, c) != (1, 1))
    # elsewhere the image shows through (weight 0 is black in inferno): brighter pixels stay brighter
    assert centre(1, 3, 3).mean() > centre(1, 0, 0).mean() + 0.1 and centre(1, 3, 3).mean() > 0.1


def test_viz_draws_a_digits_models_attention_on_the_image(digits, tmp_path, capsys):
    ckpt, printed = digits
    code, out, err = run(["viz", ckpt, "--index", "3", "--out", tmp_path / "v"], capsys)
    assert code == 0 and err == "", err
    assert "input:  test image 3 (label " in out and re.search(r"output: \d \(p = 0\.\d+\)", out)
    png, tsv = tmp_path / "v" / "image_attention.png", tmp_path / "v" / "image_attention.tsv"
    assert f"wrote {png}" in out and f"wrote {tsv}" in out
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    maps = list(dict.fromkeys(r[0] for r in rows))
    # depth 1, 2 heads: the pooling, the pooling traced back through the layers, and each head
    assert maps == ["pooling", "pooling · rollout", "pooling · layer 1 head 1", "pooling · layer 1 head 2"]
    for name in maps:  # each map: one weight per 2×2 patch of the 8×8 image (a 4×4 grid), summing to 1
        cells = [(int(r[2]), int(r[3]), float(r[4])) for r in rows if r[0] == name]
        assert sorted((i, j) for i, j, _ in cells) == [(i, j) for i in range(4) for j in range(4)]
        assert sum(v for *_, v in cells) == pytest.approx(1, abs=1e-4)
    from matplotlib.image import imread

    h, w = imread(png).shape[:2]
    assert (w, h) == vimage.image_attention_size(len(maps))
    # the model's own pooling weights, for the same image
    from attnkit.tasks.images import load_digits_splits
    from attnkit.tasks.classification import rebuild_model

    model = rebuild_model(load_checkpoint(ckpt))
    _, attn = model(load_digits_splits(0)["test"][0][3:4], return_attention=True)
    got = [float(r[4]) for r in rows if r[0] == "pooling"]
    assert got == pytest.approx(attn["pooling"][0].tolist(), abs=1e-5)
    # training pointed at this command
    assert f"draw its attention: attnkit viz {ckpt} --index 0" in printed


def test_viz_draws_the_mnist_memory_models_attention_over_rows(tmp_path, capsys):
    data = write_mnist(tmp_path / "mnist")
    code, _ = quietly(["train", "mnist", "--data", data, "--out", tmp_path / "m", "--valid-size", "20", "--epochs", "1",
                       "--dim", "8", "--memory-dim", "8", "--steps", "2", "--batch-size", "32", *QUIET])
    assert code == 0
    code, out, err = run(["viz", tmp_path / "m", "--out", tmp_path / "v", "--split", "valid", "--index", "19"],
                         capsys)
    assert code == 0 and err == "", err
    assert "input:  valid image 19" in out and "AttentionMemoryClassifier reading the 8 rows" in out
    rows = [line.split("\t") for line in (tmp_path / "v" / "image_attention.tsv").read_text().splitlines()[1:]]
    assert list(dict.fromkeys(r[0] for r in rows)) == ["memory step 1", "memory step 2", "memory, steps averaged"]
    assert {(r[2], r[3]) for r in rows} == {(str(i), "0") for i in range(8)}  # an 8×1 grid: one token per row
    assert (tmp_path / "v" / "image_attention.png").stat().st_size > 1000


def test_viz_image_checkpoint_errors_are_one_line(digits, tmp_path, capsys):
    ckpt, _ = digits
    code, out, err = run(["viz", ckpt, "--index", "360", "--out", tmp_path / "v"], capsys)
    assert code == 2 and out == "" and err == "attnkit viz: error: --index 360: the test split has images 0 to 359\n"
    code, _, err = run(["viz", ckpt, "--text", "a cat"], capsys)
    assert code == 2 and err.startswith("attnkit viz: error: --text: an image checkpoint draws one of its images")
    code, _, err = run(["viz", ckpt, "--split", "dev"], capsys)
    assert code == 2 and "--split must be one of test, train, valid; got 'dev'" in err
    assert not (tmp_path / "v").exists()
    with pytest.raises(SystemExit) as e:  # the viz help names the image options too
        cli.main(["viz", "--help"])
    assert e.value.code == 0 and "Image checkpoints (digits, mnist)" in capsys.readouterr().out


# -- 3. one metric format for train and eval -------------------------------------------------------
def test_train_and_eval_print_the_metric_the_same_way(digits, capsys):
    ckpt, printed = digits
    acc = load_checkpoint(ckpt).config["metrics"]["test_accuracy"]
    line = f"test accuracy: {100 * acc:.2f}% (360 examples)"
    assert printed.splitlines()[-1] == line                       # train ends with it
    code, out, _ = run(["eval", ckpt, "--threads", "1"], capsys)
    assert code == 0 and out == line + "\n"                        # eval prints exactly it
    code, out, _ = run(["eval", ckpt, "--threads", "1", "--json"], capsys)
    assert code == 0 and json.loads(out) == {"test_accuracy": acc, "examples": 360}  # raw values for scripts


def test_format_metrics_covers_every_tasks_metrics():
    assert format_metrics({"test_exact_match": 0.9985, "examples": 2000, "beam": 1}) == \
        "test exact match: 99.85% (2000 examples, greedy)"
    assert format_metrics({"dev accuracy": 0.5, "examples": 10}) == "dev accuracy: 50.00% (10 examples)"
    assert format_metrics({"test_bleu": 31.2041, "test_chrf": 0.5, "sentences": 40, "beam": 4,
                           "signature": "nrefs:1"}) == \
        "test BLEU: 31.20, test chrF: 0.50 (40 sentences, beam 4, signature nrefs:1)"
    assert format_metrics({"test accuracy": float("nan"), "examples": 0}) == "test accuracy: n/a (0 examples)"


# -- 4. --max-seconds says that it stopped, where, and the limit ----------------------------------------
def test_max_seconds_prints_where_training_stopped(digits, tmp_path):
    _, printed = digits
    assert "time limit" not in printed                             # a run that finished its epochs
    code, out = quietly(["train", "digits", "--out", tmp_path / "d", "--epochs", "3", "--dim", "8", "--depth", "1",
                         "--max-seconds", "0.001", *QUIET])
    assert code == 0
    lines = [line for line in out.splitlines() if "time limit" in line]
    assert len(lines) == 1, out
    assert re.fullmatch(r"training stopped at the time limit \(--max-seconds 0\.001\) in epoch 1/3, after step 1 "
                        r"of \d+ \(1 step in all\)", lines[0]), lines[0]


# -- 5. --out: the help says what each task writes; train lists what it wrote ---------------------------
def test_out_help_says_what_each_task_writes_and_train_lists_the_files(digits, capsys):
    for name in tasks.names():
        with pytest.raises(SystemExit):
            cli.main(["train", name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        start = text.index("--out OUT", text.index("training:"))  # the option's help, not the usage line
        out_help = text[start:text.index("--seed SEED", start)]
        assert "model.safetensors" in out_help and "config.json" in out_help, name
        assert "no pictures (attnkit viz" in out_help, name        # a promise the tasks keep
    ckpt, printed = digits
    m = re.search(r"^wrote (\d+) file\(s\) in (.+?): (.+)$", printed, re.M)
    assert m and Path(m.group(2)) == ckpt
    listed = m.group(3).split(", ")
    on_disk = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("."))
    assert sorted(listed) == on_disk and int(m.group(1)) == len(listed)
    assert set(listed) == {"checkpoint.json", "config.json", "model.safetensors", "trainer.json",
                           "trainer.safetensors"}
    assert not any(name.endswith((".png", ".html")) for name in on_disk)
