"""The translation task (Multi30k or any parallel text) and its tokenizers."""

from __future__ import annotations

import argparse
import gzip
import random
from pathlib import Path

import pytest
import sacrebleu
import torch

from attnkit.checkpoint import load_checkpoint
from attnkit.cli import _common_train_options, main
from attnkit.tasks import get
from attnkit.tasks.subword import SentencePieceTokenizer, WordTokenizer, from_config, train_tokenizers
from attnkit.tasks.multi30k import read_lines, read_parallel, token_batches

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
M30K = DATA / "multi30k"

EN = "a dog cat runs sleeps the big small red blue man woman park street ball".split()
DE = "ein hund katze läuft schläft der große kleine rote blaue mann frau park straße ball".split()


def corpus(folder: Path, sizes=(400, 40, 40), seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """A word-for-word 'translation' En -> De of random 3-7 word sentences, as parallel files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in zip(("train", "valid", "test"), sizes):
        src, tgt = [], []
        for _ in range(n):
            idx = [rng.randrange(len(EN)) for _ in range(rng.randint(3, 7))]
            src.append(" ".join(EN[i] for i in idx))
            tgt.append(" ".join(DE[i] for i in idx))
        (folder / f"{split}.en").write_text("\n".join(src) + "\n", encoding="utf-8")
        (folder / f"{split}.de").write_text("\n".join(tgt) + "\n", encoding="utf-8")
        paths[split] = (folder / f"{split}.en", folder / f"{split}.de")
    return paths


TINY = ["--tokenizer", "word", "--d-model", "32", "--heads", "2", "--ff", "64", "--encoder-layers", "1",
        "--decoder-layers", "1", "--batch-tokens", "200", "--lr", "5e-3", "--warmup", "30", "--dropout", "0",
        "--no-progress"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    _common_train_options(p)
    get("multi30k").add_arguments(p)
    return p.parse_args(argv)


def file_args(paths: dict[str, tuple[Path, Path]]) -> list[str]:
    return [x for s, (a, b) in paths.items() for x in (f"--{s}-src", str(a), f"--{s}-tgt", str(b))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny Transformer trained for 12 epochs on the word-for-word corpus (about 10 s)."""
    root = tmp_path_factory.mktemp("m30k")
    paths = corpus(root / "data")
    args = parse(file_args(paths) + TINY + ["--epochs", "12", "--out", str(root / "ck"), "--seed", "0"])
    result = get("multi30k").train(args)
    return root, paths, result


# -- training and the metric ------------------------------------------------------------------------
def test_task_trains_and_reports_sacrebleu(trained):
    root, paths, result = trained
    hist = result.extra["history"]
    assert len(hist) == 12
    assert hist[-1]["loss"] < hist[0]["loss"] - 1.0
    assert hist[-1]["valid_bleu"] > hist[0]["valid_bleu"]
    refs = paths["test"][1].read_text(encoding="utf-8").splitlines()
    hyps = result.extra["hypotheses"]
    assert len(hyps) == len(refs) == 40
    # the reported number is sacreBLEU's corpus BLEU of the outputs (tokenized text: tokenize="none")
    assert result.value == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score, abs=1e-9)
    assert result.extra["metrics"]["test_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert result.value > 25, result.summary  # the word-for-word mapping is (partly) learned
    assert result.metric == "test_bleu" and "test BLEU" in result.summary and "chrF" in result.summary
    assert (root / "ck" / "best" / "model.safetensors").is_file() and (root / "ck" / "trainer.json").is_file()


def test_evaluate_and_translate_from_the_checkpoint(trained, capsys):
    root, paths, result = trained
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.config["task"] == "multi30k" and ckpt.config["model"] == "Transformer"
    task = get("multi30k")
    m = task.evaluate(ckpt, argparse.Namespace(split="test", beam=1, data=None, device="cpu"))
    assert m["test_bleu"] == pytest.approx(result.value, abs=1e-9) and m["sentences"] == 40
    sources = paths["test"][0].read_text(encoding="utf-8").splitlines()
    out = task.translate(ckpt, sources[:5] + [""], argparse.Namespace(beam=1, device="cpu"))
    assert out == result.extra["hypotheses"][:5] + [""]
    beam = task.evaluate(ckpt, argparse.Namespace(split="valid", beam=3, data=None, device="cpu"))
    assert beam["beam"] == 3 and 0 <= beam["valid_bleu"] <= 100
    # and through the command line
    assert main(["translate", str(result.checkpoint), sources[0]]) == 0
    assert capsys.readouterr().out.strip() == result.extra["hypotheses"][0]
    assert main(["eval", str(result.checkpoint), "--split", "nope"]) == 2
    assert "--split: unknown split 'nope'" in capsys.readouterr().err


def test_resume_continues_exactly(tmp_path):
    paths = corpus(tmp_path / "data", sizes=(120, 10, 10))
    common = file_args(paths) + TINY + ["--seed", "3", "--dropout", "0.1"]
    task = get("multi30k")
    task.train(parse(common + ["--epochs", "2", "--out", str(tmp_path / "straight")]))
    task.train(parse(common + ["--epochs", "1", "--out", str(tmp_path / "split")]))
    resumed = task.train(parse(common + ["--epochs", "2", "--out", str(tmp_path / "split"), "--resume"]))
    assert [h["epoch"] for h in resumed.extra["history"]] == [1, 2]
    a = load_checkpoint(tmp_path / "straight", with_trainer=True)
    b = load_checkpoint(tmp_path / "split", with_trainer=True)
    assert a.trainer_state["next_epoch"] == b.trainer_state["next_epoch"] == 2
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k  # bit-identical to the uninterrupted run
    with pytest.raises(ValueError, match="has no model.safetensors|is not a folder"):
        task.train(parse(common + ["--epochs", "1", "--out", str(tmp_path / "nothing"), "--resume"]))


def test_seq2seq_model_trains_through_the_same_task(tmp_path):
    paths = corpus(tmp_path / "data", sizes=(200, 20, 20))
    args = parse(file_args(paths) + TINY + ["--model", "seq2seq", "--emb-dim", "16", "--hidden-dim", "32",
                                            "--epochs", "2", "--out", str(tmp_path / "ck")])
    result = get("multi30k").train(args)
    assert load_checkpoint(result.checkpoint).config["model"] == "Seq2Seq"
    assert result.extra["history"][-1]["loss"] < result.extra["history"][0]["loss"]
    refs = paths["test"][1].read_text(encoding="utf-8").splitlines()
    assert result.value == pytest.approx(
        sacrebleu.corpus_bleu(result.extra["hypotheses"], [refs], tokenize="none").score, abs=1e-9)
    m = get("multi30k").evaluate(load_checkpoint(result.checkpoint),
                                 argparse.Namespace(split="test", beam=2, data=None))
    assert m["sentences"] == 20


def test_subword_task_on_gzipped_raw_files_uses_detokenized_bleu(tmp_path):
    paths = corpus(tmp_path / "data", sizes=(150, 10, 10))
    gz = {}
    for split, (a, b) in paths.items():  # the raw/ layout of the Multi30k folder, gzipped
        stem = {"train": "train", "valid": "val", "test": "test_2016_flickr"}[split]
        for lang, p in (("en", a), ("de", b)):
            dest = tmp_path / "m30k" / "raw" / f"{stem}.{lang}.gz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(gzip.compress(p.read_bytes()))
            gz[(split, lang)] = dest
    args = parse(["--data", str(tmp_path / "m30k"), "--raw", "--out", str(tmp_path / "ck")] + TINY
                 + ["--tokenizer", "bpe", "--vocab-size", "60", "--epochs", "1"])
    result = get("multi30k").train(args)
    cfg = load_checkpoint(result.checkpoint).config
    assert cfg["bleu_tokenize"] == "13a" and cfg["src_tokenizer"]["type"] == "sentencepiece"
    assert "detokenized" in result.summary and result.summary.startswith("test2016 BLEU")
    assert not list(Path.cwd().glob("*.model")) and not list(Path.cwd().glob("*.vocab"))


# -- bad input --------------------------------------------------------------------------------------
def test_missing_empty_and_mismatched_files_are_named(tmp_path):
    paths = corpus(tmp_path / "data", sizes=(20, 5, 5))
    task = get("multi30k")
    base = file_args(paths) + TINY + ["--out", str(tmp_path / "ck")]

    def with_file(option, value):
        argv = list(base)
        argv[argv.index(option) + 1] = str(value)
        return parse(argv)

    missing = tmp_path / "nope.en"
    with pytest.raises(ValueError, match=f"--train-src: no such file '{missing}'"):
        task.train(with_file("--train-src", missing))
    empty = tmp_path / "empty.de"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=f"--valid-tgt: '{empty}' is empty"):
        task.train(with_file("--valid-tgt", empty))
    short = tmp_path / "short.de"
    short.write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        task.train(with_file("--train-tgt", short))
    msg = str(e.value)
    assert "not parallel" in msg and "20 lines" in msg and "has 2" in msg
    assert str(paths["train"][0]) in msg and str(short) in msg
    with pytest.raises(ValueError, match="--model: unknown model 'lstm'; valid names: 'transformer', 'seq2seq'"):
        task.train(argparse.Namespace(**{**vars(parse(base)), "model": "lstm"}))
    with pytest.raises(SystemExit):  # the command line refuses it too, listing the choices
        parse(base + ["--model", "lstm"])
    with pytest.raises(ValueError, match="--test-src was given without --test-tgt"):
        task.train(parse(["--train-src", str(paths["train"][0]), "--train-tgt", str(paths["train"][1]),
                          "--valid-src", str(paths["valid"][0]), "--valid-tgt", str(paths["valid"][1]),
                          "--test-src", str(paths["test"][0])] + TINY))


def test_missing_data_folder_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--data: no such folder '\.\./shared/data/multi30k'.*github.com/multi30k"):
        get("multi30k").train(parse(TINY))
    (tmp_path / "m30k").mkdir()
    with pytest.raises(ValueError, match=r"has no train files for --src en --tgt de.*--raw"):
        get("multi30k").train(parse(["--data", str(tmp_path / "m30k")] + TINY))


def test_read_lines_gzip_crlf_and_bad_encoding(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress("Zwei Männer\r\nein Hund\r\n".encode("utf-8")))
    assert read_lines(p) == ["Zwei Männer", "ein Hund"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Männer\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"--train-src: .*latin1.txt' line 1 is not UTF-8 text \(byte 0xe4 at col"):
        read_lines(bad, "--train-src")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        read_parallel(blank, p)


def test_token_batches_cover_every_pair_within_the_budget():
    rng = random.Random(0)
    src = [rng.randint(1, 30) for _ in range(500)]
    tgt = [rng.randint(1, 30) for _ in range(500)]
    batches = token_batches(src, tgt, 200, shuffle=True, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * max(max(src[i], tgt[i]) for i in b) <= 200
    assert batches == token_batches(src, tgt, 200, shuffle=True, seed=1)
    assert batches != token_batches(src, tgt, 200, shuffle=True, seed=2)
    assert token_batches([500], [3], 10, shuffle=False) == [[0]]  # too long alone: still one batch


# -- tokenizers ------------------------------------------------------------------------------------
SENTENCES = ["Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
             "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
             "A little girl climbing into a wooden playhouse.",
             "Two young, White males are outside near many bushes."] * 10


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_round_trips_and_serializes(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = SentencePieceTokenizer.train(SENTENCES, vocab_size=120, model_type=kind)
    assert list(tmp_path.iterdir()) == []  # trained in memory: no files left behind
    for s in SENTENCES[:4] + ["Weiße Männer sind im Freien.", "Mehrere Büsche, playhouse"]:  # seen characters
        ids = tok.encode(s)
        assert all(i > 3 for i in ids) and tok.decode(ids) == s
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, 7]) == s  # stops at EOS
    again = from_config(tok.to_config())
    assert again.encode(SENTENCES[0]) == tok.encode(SENTENCES[0]) and len(again) == len(tok) <= 120
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.sp.id_to_piece(0) == "<pad>" and tok.sp.id_to_piece(2) == "</s>"


def test_word_tokenizer_and_joint_or_separate_vocabularies():
    src, tgt = ["A Dog runs", "a cat"], ["Ein Hund läuft", "eine Katze"]
    s, t = train_tokenizers(src, tgt, kind="word", joint=True, lowercase=True)
    assert s is t and s.decode(s.encode("a DOG läuft")) == "a dog läuft"
    s, t = train_tokenizers(src, tgt, kind="word", joint=False)
    assert s is not t and s.decode(s.encode("Dog Hund")) == "Dog <unk>"
    w = from_config(t.to_config())
    assert isinstance(w, WordTokenizer) and w.vocab.itos == t.vocab.itos
    with pytest.raises(ValueError, match="unknown tokenizer 'chars'; valid names: 'bpe', 'unigram', 'word'"):
        train_tokenizers(src, tgt, kind="chars")
    with pytest.raises(ValueError, match="tokenizer config must be a dict with type"):
        from_config({"type": "bytes"})


# -- the real data ------------------------------------------------------------------------------------
@pytest.mark.skipif(not M30K.is_dir(), reason=f"Multi30k is not at {M30K} (see its README for the source)")
@pytest.mark.parametrize("layout", ["raw", "tok"])
def test_real_multi30k_line_counts_match_the_readme(layout):
    task_args = argparse.Namespace(data=str(M30K), src="en", tgt="de", raw=layout == "raw")
    from attnkit.tasks.multi30k import resolve_files

    files = resolve_files(task_args, required=("train", "valid", "test"))
    counts = {s: tuple(len(read_lines(p)) for p in files[s]) for s in files}
    assert counts == {"train": (29000, 29000), "valid": (1014, 1014), "test": (1000, 1000)}
