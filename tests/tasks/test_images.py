"""Image tasks: digits (embedded) and MNIST (idx files): training, checkpoints, resume, the idx reader."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import attnkit.tasks.classification as classification
from attnkit import cli, tasks
from attnkit.checkpoint import load_checkpoint
from attnkit.tasks.images import load_digits_splits, load_mnist_splits, random_shift, read_idx, read_mnist

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SMALL = ["--threads", "1", "--no-progress"]


def train(task, out, *args):
    assert cli.main(["train", task, "--out", str(out), *SMALL, *args]) == 0
    return load_checkpoint(out, with_trainer=True)


def weights(ckpt):
    return ckpt.state_dict


# -- digits -------------------------------------------------------------------------------------

def test_digits_split_is_stratified_seeded_and_disjoint():
    a, b = load_digits_splits(0), load_digits_splits(0)
    assert {k: len(v[1]) for k, v in a.items()} == {"train": 1257, "valid": 180, "test": 360}
    assert all(torch.equal(a[k][0], b[k][0]) for k in a)
    assert not torch.equal(load_digits_splits(1)["test"][0], a["test"][0])
    for k, (x, y) in a.items():  # stratified: every class has its share (about 10%)
        counts = torch.bincount(y, minlength=10).float() / len(y)
        assert counts.min() > 0.08 and counts.max() < 0.12, k
        assert x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
    flat = {k: {tuple(img.flatten().tolist()) for img in v[0]} for k, v in a.items()}
    assert len(flat["test"] & flat["train"]) < 5  # (the digits set has a few exact duplicates)


def test_digits_learns_well_above_chance_and_eval_reproduces_it(tmp_path, capsys):
    ckpt = train("digits", tmp_path / "d", "--epochs", "4")
    out = capsys.readouterr().out
    assert "epoch 4/4" in out and "valid accuracy" in out
    acc = ckpt.config["metrics"]["test_accuracy"]
    assert acc > 0.5, f"digits test accuracy {acc:.3f} after 4 epochs (chance is 0.1)"
    assert out.splitlines()[-1] == f"test accuracy: {100 * acc:.2f}% (360 examples)"
    assert len(ckpt.config["history"]["valid_accuracy"]) == 4 and ckpt.trainer_state["epoch"] == 4
    # attnkit eval rebuilds the model from config.json and gets the same figure
    assert cli.main(["eval", str(tmp_path / "d"), "--threads", "1"]) == 0
    assert capsys.readouterr().out == f"test accuracy: {100 * acc:.2f}% (360 examples)\n"  # as train printed it


def test_seed_reproduces_a_run_and_resume_continues_bit_exactly(tmp_path, monkeypatch):
    opts = ["--epochs", "2", "--dim", "16", "--depth", "1", "--seed", "3"]
    straight = train("digits", tmp_path / "a", *opts)
    again = train("digits", tmp_path / "b", *opts)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(again)[k]), k

    # Interrupt a run after its first epoch's checkpoint, then resume it.
    real_save = classification.save_checkpoint

    def save_then_die(directory, **kw):
        real_save(directory, **kw)
        if kw["trainer_state"]["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(classification, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "digits", "--out", str(tmp_path / "c"), *SMALL, *opts])
    monkeypatch.setattr(classification, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "c", with_trainer=True).trainer_state["epoch"] == 1
    resumed = train("digits", tmp_path / "c", "--resume")  # model, data and the 2 epochs come from the checkpoint
    assert resumed.trainer_state["epoch"] == 2
    assert resumed.config["history"] == straight.config["history"]
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(resumed)[k]), k


def test_resume_refuses_another_tasks_checkpoint(tmp_path, capsys):
    train("digits", tmp_path / "d", "--epochs", "1", "--dim", "16", "--depth", "1")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["task"] = "sst2"
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "d" / "checkpoint.json").unlink()  # hand-edited files are read as they are without the manifest
    assert cli.main(["train", "digits", "--out", str(tmp_path / "d"), "--resume", *SMALL]) == 2
    assert "is for task 'sst2', not 'digits'" in capsys.readouterr().err


def test_model_options_are_checked(tmp_path, capsys):
    args = ["train", "digits", "--out", str(tmp_path), "--model", "AttentionMemoryClassifier", "--pooling", "mlp"]
    assert cli.main(args + SMALL) == 2
    assert "--pooling does not apply to --model AttentionMemoryClassifier" in capsys.readouterr().err
    assert cli.main(["train", "mnist", "--out", str(tmp_path), "--data", str(tmp_path / "nope"), *SMALL]) == 2
    assert "MNIST folder" in capsys.readouterr().err


def test_random_shift_moves_whole_images_by_at_most_one_pixel():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 6, 6)
    x[:, 0, 2:4, 2:4] = 1
    y = random_shift(x)
    assert torch.all(y.sum((1, 2, 3)) == 4)  # nothing falls off: the blob is 1 px from every border
    rows = y[:, 0].sum(2).argmax(1)
    assert set(rows.tolist()) == {1, 2, 3}


# -- idx reader ---------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    head = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(">u1" if code == 0x08 else ">i4").tobytes()


def write_mnist(directory: Path, n_train: int, n_test: int, size: int = 8, gz: bool = True, seed: int = 0):
    """Synthetic MNIST-like idx files: class k lights up row k (so it is learnable)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, min(10, size), n).astype(np.uint8)
        imgs = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        imgs[np.arange(n), labels] = 255
        for kind, arr in (("images-idx3-ubyte", imgs), ("labels-idx1-ubyte", labels)):
            data = idx_bytes(arr)
            name = f"{part}-{kind}" + (".gz" if gz else "")
            (directory / name).write_bytes(gzip.compress(data) if gz else data)
    return directory


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_reads_what_was_written(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x-idx3-ubyte" + (".gz" if gz else ""))
    p.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    out = read_idx(p, expect_ndim=3)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    (tmp_path / "ints").write_bytes(idx_bytes(ints, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "ints"), ints)


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    cases = {
        "missing": (None, "does not exist"),
        "bad_magic": (b"\x12\x34" + good[2:], r"magic number 305399811 \(0x12340803\), which is not an idx header"),
        "bad_type": (good[:2] + b"\x07" + good[3:], "not an idx header"),
        "labels_not_images": (idx_bytes(np.zeros(5, np.uint8)), r"magic number 2049 \(1 dims\); expected 2051"),
        "truncated": (good[:-5], r"truncated: its header says shape \(3, 4, 4\) \(48 data bytes\) but it holds 43"),
        "short_header": (good[:10], "truncated: 10 bytes, the header alone needs 16"),
        "tiny": (b"\x00\x00", "too short"),
        "trailing": (good + b"\x00\x00", "has 2 bytes after the 48 data bytes"),
        "corrupt_gz": (gzip.compress(good)[:-12], "not a valid gzip file"),
    }
    for name, (data, match) in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(ValueError, match=match) as e:
            read_idx(p, expect_ndim=3)
        assert str(p) in str(e.value), name


def test_read_mnist_checks_the_pair(tmp_path):
    d = write_mnist(tmp_path / "m", 30, 10, gz=False)
    x, y = read_mnist(d, "train")
    assert x.shape == (30, 8, 8) and y.shape == (30,) and y.dtype == np.int64
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(ValueError, match="holds 10 images but .* holds 9 labels"):
        read_mnist(d, "test")
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 12, np.uint8)))
    with pytest.raises(ValueError, match="holds label 12; MNIST labels are 0-9"):
        read_mnist(d, "test")
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz in it"):
        read_mnist(d, "test")
    with pytest.raises(ValueError, match="MNIST folder .* does not exist"):
        read_mnist(tmp_path / "nowhere", "train")


def test_mnist_holds_out_the_last_training_images(tmp_path):
    d = write_mnist(tmp_path / "m", 50, 10)
    x, y = read_mnist(d, "train")
    s = load_mnist_splits(d, valid_size=20)
    assert len(s["train"][1]) == 30 and len(s["valid"][1]) == 20 and len(s["test"][1]) == 10
    assert torch.equal(s["valid"][0], torch.from_numpy(x[30:]))


def test_mnist_task_trains_on_synthetic_idx_files(tmp_path, capsys):
    d = write_mnist(tmp_path / "m", 900, 100)
    out = tmp_path / "ckpt"
    ckpt = train("mnist", out, "--data", str(d), "--valid-size", "100", "--epochs", "5", "--dim", "16",
                 "--memory-dim", "16", "--steps", "2", "--batch-size", "16", "--lr", "5e-3")
    assert ckpt.config["model"] == "AttentionMemoryClassifier"
    assert ckpt.config["model_config"]["row_dim"] == 8 and ckpt.config["model_config"]["num_rows"] == 8
    acc = ckpt.config["metrics"]["test_accuracy"]
    assert acc > 0.6, f"accuracy {acc} on the lit-row task (chance 0.125)"
    assert capsys.readouterr().out.splitlines()[-1] == f"test accuracy: {100 * acc:.2f}% (100 examples)"
    task = tasks.get("mnist")
    import argparse
    res = task.evaluate(load_checkpoint(out), argparse.Namespace(split="test", data=str(d), device="cpu"))
    assert res == {"test accuracy": acc, "examples": 100}


# -- real data ------------------------------------------------------------------------------------

@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"MNIST is not in {DATA / 'mnist'}")
def test_real_mnist_files():
    x, y = read_mnist(DATA / "mnist", "train")
    assert x.shape == (60000, 28, 28) and y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    x, y = read_mnist(DATA / "mnist", "test")
    assert x.shape == (10000, 28, 28) and y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
