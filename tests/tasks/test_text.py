"""SST-2: the tsv reader and its errors, training on a tiny synthetic corpus, the real files' counts."""

import argparse
import random
from pathlib import Path

import pytest
import torch

from attnkit import cli, tasks
from attnkit.checkpoint import load_checkpoint
from attnkit.tasks.sst2 import encode_batch, read_sst2_tsv, resolve_data_dir, split_clauses
from attnkit.tasks.vocab import Vocab

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SMALL = ["--threads", "1", "--no-progress"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_glue_tsv(tmp_path):
    p = write(tmp_path / "t.tsv", "sentence\tlabel\nA Gorgeous film \t1\n\nflat , dull \t0\n")
    assert read_sst2_tsv(p) == ([["a", "gorgeous", "film"], ["flat", ",", "dull"]], [1, 0])
    # columns in another order, Windows line ends
    p = write(tmp_path / "u.tsv", "label\tsentence\r\n0\tbad\r\n")
    assert read_sst2_tsv(p) == ([["bad"]], [0])


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ("sentence\tlabel\n", "has a header but no examples"),
    ("index\tsentence\n0\tgood\n", "line 1: the header must name the columns 'sentence' and 'label'"),
    ("sentence\tlabel\ngood\t1\nno tab here\n", "line 3: expected 2 tab-separated fields"),
    ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", "line 3: expected 2 tab-separated fields .* got 3"),
    ("sentence\tlabel\ngood\t1\nmeh\t2\n", "line 3: unknown label '2'; expected one of 0 .*, 1"),
    ("sentence\tlabel\ngood\tpositive\n", "line 2: unknown label 'positive'"),
    ("sentence\tlabel\n \t1\n", "line 2: the sentence is empty"),
])
def test_reader_errors_name_file_and_line(tmp_path, text, match):
    p = write(tmp_path / "bad.tsv", text)
    with pytest.raises(ValueError, match=match) as e:
        read_sst2_tsv(p)
    assert str(p) in str(e.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_sst2_tsv(tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match="SST-2 folder .* does not exist"):
        resolve_data_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no train.tsv or dev.tsv in"):
        resolve_data_dir(tmp_path / "empty")
    write(tmp_path / "sst2" / "glue" / "train.tsv", "sentence\tlabel\na\t1\n")
    assert resolve_data_dir(tmp_path / "sst2") == tmp_path / "sst2" / "glue"


def test_clauses_for_the_han():
    assert split_clauses("good , but ; long".split()) == [["good", ","], ["but", ";"], ["long"]]
    v = Vocab.build([["good", ",", "but", "long"]])
    x = encode_batch(v, [["good", ",", "but"], ["long"]], hierarchical=True)
    assert x.shape == (2, 2, 2) and x[1, 1].tolist() == [0, 0] and x[1, 0, 1] == 0
    assert encode_batch(v, [["good", ",", "but"], ["long"]], hierarchical=False).shape == (2, 3)


POS, NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "boring"]
FILLER = ["the", "film", "plot", "is", "a", "with", "actors", "and", "story", "it", ",", "very"]


def synthetic(n, seed):
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
        lines.append(" ".join(words) + " \t" + str(label))
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path):
    write(tmp_path / "data" / "train.tsv", synthetic(600, 0))
    write(tmp_path / "data" / "dev.tsv", synthetic(100, 1))
    return tmp_path / "data"


@pytest.mark.parametrize("model", ["AttentionClassifier", "HierarchicalAttentionNetwork"])
def test_sst2_learns_a_synthetic_sentiment_corpus(corpus, tmp_path, capsys, model):
    out = tmp_path / model
    args = ["train", "sst2", "--out", str(out), "--data", str(corpus), "--model", model, "--epochs", "4",
            "--dim", "32", "--batch-size", "16", "--lr", "5e-3", "--dropout", "0", *SMALL]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    ckpt = load_checkpoint(out, with_trainer=True)
    acc = ckpt.config["metrics"]["dev_accuracy"]
    assert acc >= 0.9, f"{model}: dev accuracy {acc} on a corpus where one word decides"
    assert printed.splitlines()[-1] == f"dev accuracy: {100 * acc:.2f}% (100 examples)"
    assert "dev accuracy" in printed.splitlines()[1] and ckpt.trainer_state["epoch"] == 4
    # the checkpoint carries the vocabulary; eval (split "test" falls back to dev) reproduces the figure
    ns = argparse.Namespace(split="test", data=None, device="cpu")
    assert tasks.get("sst2").evaluate(load_checkpoint(out), ns) == {"dev accuracy": acc, "examples": 100}


def test_sst2_padding_and_attention(corpus, tmp_path):
    out = tmp_path / "m"
    assert cli.main(["train", "sst2", "--out", str(out), "--data", str(corpus), "--epochs", "3", "--dim", "32",
                     "--lr", "5e-3", "--batch-size", "16", "--dropout", "0", *SMALL]) == 0
    ckpt = load_checkpoint(out)
    from attnkit.tasks.classification import rebuild_model

    model, vocab = rebuild_model(ckpt), Vocab.from_json(ckpt.config["vocab"])
    x = encode_batch(vocab, [["the", "film", "is", "awful", "and", "dull"], ["a", "lovely", "story"]], False)
    logits, attn = model(x, return_attention=True)
    assert logits.argmax(-1).tolist() == [0, 1]
    assert torch.all(attn["pooling"][1, 3:] == 0)
    # the sentiment word gets more attention than any filler word (trained on 600 sentences)
    assert attn["pooling"][1].argmax() == 1


def test_sst2_resume_keeps_the_vocabulary(corpus, tmp_path):
    out = tmp_path / "m"
    opts = ["--out", str(out), "--data", str(corpus), "--dim", "16", "--batch-size", "32", *SMALL]
    assert cli.main(["train", "sst2", "--epochs", "1", *opts]) == 0
    vocab = load_checkpoint(out).config["vocab"]
    assert cli.main(["train", "sst2", "--epochs", "2", "--resume", "--min-freq", "5", *opts]) == 0
    ckpt = load_checkpoint(out, with_trainer=True)
    assert ckpt.config["vocab"] == vocab and ckpt.trainer_state["epoch"] == 2
    assert len(ckpt.config["history"]["dev_accuracy"]) == 2


def test_sst2_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    assert cli.main(["train", "sst2", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "x"), *SMALL]) == 2
    assert "--data: SST-2 folder" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "sst2" / "glue").is_dir(), reason=f"SST-2 is not in {DATA / 'sst2' / 'glue'}")
def test_real_sst2_files():
    sents, labels = read_sst2_tsv(DATA / "sst2" / "glue" / "train.tsv")
    assert len(labels) == 67349
    sents, labels = read_sst2_tsv(DATA / "sst2" / "glue" / "dev.tsv")
    assert len(labels) == 872 and (labels.count(0), labels.count(1)) == (428, 444)
