"""The date-normalization task: the generated corpus, real-data files, training, resuming,
evaluation and translation."""

import argparse
import datetime
import re
import unicodedata
from collections import Counter

import pytest
import torch

from attnkit import checkpoint as ck
from attnkit import models
from attnkit.tasks import get as get_task
from attnkit.tasks.dates import (TEMPLATES, DatesTask, generate, read_pairs, render, split_pairs, template)

# -- an independent mini-parser --------------------------------------------------------------
# Month words written out here again, on purpose (not imported), matched as whole words after
# dropping accents, dots and commas. Weekday words are never month words, so they are ignored.
_MONTH_WORDS = {
    1: "january jan janvier janv enero ene januar gennaio janeiro",
    2: "february feb fevrier fevr febrero februar febbraio fevereiro",
    3: "march mar mars marzo marz marco",
    4: "april apr avril avr abril abr aprile",
    5: "may mai mayo maggio maio",
    6: "june jun juin junio juni giugno junho",
    7: "july jul juillet juil julio juli luglio julho",
    8: "august aug aout agosto ago",
    9: "september sep sept septembre septiembre settembre setembro",
    10: "october oct octobre octubre oktober okt ottobre outubro",
    11: "november nov novembre noviembre novembro",
    12: "december dec decembre diciembre dic dezember dez dicembre dezembro",
}
_WORD_TO_MONTH = {w: m for m, ws in _MONTH_WORDS.items() for w in ws.split()}


def _fold(s):
    return "".join(c for c in unicodedata.normalize("NFKD", s.lower()) if not unicodedata.combining(c))


def _year(y):
    return int(y) if len(y) == 4 else (1900 + int(y) if int(y) >= 50 else 2000 + int(y))


def parse_date(s):
    """Parse a source string back to a datetime.date, independently of the generator."""
    f = _fold(s)
    if "年" in s or "년" in s:
        y, m, d = re.findall(r"\d+", s)[:3]
        return datetime.date(int(y), int(m), int(d))
    words = re.findall(r"[a-z]+", f)
    months = [_WORD_TO_MONTH[w] for w in words if w in _WORD_TO_MONTH]
    if months:
        assert len(months) == 1, s
        nums = re.findall(r"\d+", f)  # "3rd", "1er" -> digits only
        return datetime.date(_year(nums[-1]), months[0], int(nums[0]))
    if re.fullmatch(r"\d{8}", s):
        return datetime.date(int(s[:4]), int(s[4:6]), int(s[6:]))
    m = re.fullmatch(r"(\d+)([-/.])(\d+)\2(\d+)", s)
    assert m, s
    a, sep, b, c = m.groups()
    if len(a) == 4:
        return datetime.date(int(a), int(b), int(c))  # year first: Y-M-D
    if sep == "/":
        return datetime.date(_year(c), int(a), int(b))  # US: M/D/Y
    return datetime.date(_year(c), int(b), int(a))  # dots: D.M.Y


@pytest.fixture(scope="module")
def corpus():
    return generate(n_train=4000, n_valid=500, n_test=1000, seed=7)


def test_corpus_is_deterministic_for_a_seed():
    a, b, c = generate(300, 50, 50, seed=3), generate(300, 50, 50, seed=3), generate(300, 50, 50, seed=4)
    assert a == b
    assert [e.source for e in a["train"]] != [e.source for e in c["train"]]


def test_splits_have_the_requested_sizes_and_are_disjoint(corpus):
    assert {k: len(v) for k, v in corpus.items()} == {"train": 4000, "valid": 500, "test": 1000}
    sources = [e.source for split in corpus.values() for e in split]
    assert len(sources) == len(set(sources))  # no source twice, within or across splits


def test_every_target_is_the_iso_date_the_source_denotes(corpus):
    n = 0
    for split in corpus.values():
        for e in split:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", e.target)
            assert parse_date(e.source) == datetime.date.fromisoformat(e.target), (e.source, e.target, e.kind)
            n += 1
    assert n == 5500


def test_weekdays_are_the_true_weekday():
    ex = render(datetime.date(2019, 3, 3), template("en:{W}, {MMMM} {d}, {yyyy}"), None, case="as-is")
    assert ex.source == "Sunday, March 3, 2019"
    ex = render(datetime.date(1789, 7, 14), template("fr:le {W} {d1} {MMMM} {yyyy}"), None, case="as-is")
    assert ex.source == "le mardi 14 juillet 1789" and ex.target == "1789-07-14"
    ex = render(datetime.date(2019, 3, 1), template("fr:{d1} {MMMM} {yyyy}"), None, case="upper")
    assert ex.source == "1ER MARS 2019"


def test_many_distinct_surface_forms(corpus):
    train = corpus["train"]
    kinds = Counter(e.kind for e in train)
    assert len(kinds) == len(TEMPLATES) >= 50
    assert len({k.split(":")[0] for k in kinds}) >= 9  # en fr es de it pt zh ja ko + numeric
    text = [e.source for e in train]
    for pattern in (r"\b\d+st\b", r"\b\d+nd\b", r"\b\d+rd\b", r"\b\d+th\b", r"^\d+/\d+/\d\d$", r"^\d+\.\d+\.\d{4}$",
                    r"^\d{4}-\d+-\d+$", r"年", r"년", r"\bde\b", r"März", r"\d+(ST|ND|RD|TH)\b"):
        assert any(re.search(pattern, s) for s in text), pattern
    for variants in (("March", "march", "MARCH"), ("Sunday", "sunday", "SUNDAY"), ("juillet", "JUILLET")):
        assert all(any(v in s for s in text) for v in variants), variants  # as-is, lower and upper case
    # no two-digit year is ambiguous: they all lie in 1950-2049
    assert all(1950 <= int(e.target[:4]) <= 2049 for e in train if "{yy}" in e.kind)


def test_field_spans_point_at_the_fields(corpus):
    for e in corpus["test"][:300]:
        y, m, d = e.target.split("-")
        (ys, ye), = e.field_spans("year")
        assert e.source[ys:ye] in (y, y[2:])
        (ds, de), = e.field_spans("day")
        assert re.match(r"\d+", e.source[ds:de]).group() in (d, d.lstrip("0"))
        (ms, me), = e.field_spans("month")
        assert e.source[ms:me]


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="n_train must be an int >= 0; got -1"):
        generate(-1)
    with pytest.raises(ValueError, match="unknown date template 'xx'; valid names: 'en:"):
        generate(10, 1, 1, templates=["xx"])


# -- real data files ------------------------------------------------------------------------
def test_read_pairs_and_split(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("".join(f"{i} March 2019\t2019-03-{i:02d}\n" for i in range(1, 29)) + "\n", encoding="utf-8")
    pairs = read_pairs(f)
    assert len(pairs) == 28 and pairs[0].source == "1 March 2019" and pairs[0].target == "2019-03-01"
    s = split_pairs(pairs, seed=0)
    assert sum(len(v) for v in s.values()) == 28 and min(len(v) for v in s.values()) >= 1
    sets = [{e.source for e in v} for v in s.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


@pytest.mark.parametrize("content,msg", [
    (None, r"--data: no such file '.*missing.tsv'"),
    ("", r"is empty; expected lines 'source<TAB>target'"),
    ("\n\n", r"is empty"),
    ("3 March 2019\t2019-03-03\nno tab here\n", r"line 2 has no tab; expected 'source<TAB>target', got 'no tab here'"),
    ("\t2019-03-03\n", r"line 1 has an empty source"),
    (b"\xff\xfe\x00bad", r"is not UTF-8 text"),
])
def test_malformed_data_files_give_clear_errors(tmp_path, content, msg):
    f = tmp_path / "missing.tsv"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=msg):
        read_pairs(f)
    args = _args(tmp_path / "out", data=str(f))
    with pytest.raises(ValueError, match=msg):  # the same error through the task
        DatesTask().train(args)


def test_too_few_pairs_to_split(tmp_path):
    with pytest.raises(ValueError, match="at least 3 distinct sources"):
        split_pairs(read_pairs(_write(tmp_path / "d.tsv", "a\t2019-01-01\na\t2019-01-01\n")))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# -- training, resuming, evaluation -----------------------------------------------------------
def _args(out, **kw):
    base = dict(out=str(out), seed=0, device="cpu", threads=None, epochs=2, max_seconds=None, resume=False,
                progress=False, data=None, data_seed=5, train_size=300, valid_size=40, test_size=60, attention=None,
                rnn=None, no_input_feeding=False, emb_dim=16, hidden_dim=32, num_layers=None, dropout=None,
                batch_size=64, lr=None, schedule="constant", beam=1)
    base.update(kw)
    return argparse.Namespace(**base)


def _weights(path):
    return ck.load_checkpoint(path).state_dict


def test_train_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, capsys):
    task = get_task("dates")
    full = task.train(_args(tmp_path / "full", epochs=3))
    assert full.summary == f"test exact match: {100 * full.value:.2f}% (60 examples, greedy)"
    task.train(_args(tmp_path / "part", epochs=2))
    part = ck.load_checkpoint(tmp_path / "part", with_trainer=True)
    assert part.trainer_state["epoch"] == 2 and len(part.config["history"]["loss"]) == 2
    capsys.readouterr()
    # the data, model and recipe come from the checkpoint, whatever the command line says
    resumed = task.train(_args(tmp_path / "part", epochs=3, resume=True, seed=99, hidden_dim=999))
    assert "resuming" in capsys.readouterr().out
    c = ck.load_checkpoint(tmp_path / "part", with_trainer=True)
    assert c.trainer_state["epoch"] == 3 and c.config["model_config"]["hidden_dim"] == 32
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact continuation
    assert resumed.value == full.value
    full_cfg = ck.load_checkpoint(tmp_path / "full").config
    assert c.config["history"] == full_cfg["history"]
    assert full_cfg["metrics"]["test_examples"] == 60 and full_cfg["task"] == "dates"


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        DatesTask().train(_args(tmp_path / "none", resume=True))


def test_checkpoint_rebuilds_the_model_bit_exactly(tmp_path):
    DatesTask().train(_args(tmp_path / "c", epochs=1))
    c = ck.load_checkpoint(tmp_path / "c")
    model = models.get(c.config["model"])(**c.config["model_config"])
    ck.load_weights(model, c)
    model2 = models.get(c.config["model"])(**c.config["model_config"])
    ck.load_weights(model2, ck.load_checkpoint(tmp_path / "c"))
    src = torch.randint(4, c.config["model_config"]["src_vocab"], (3, 9))
    lengths = torch.tensor([9, 4, 6])
    tgt = torch.randint(4, c.config["model_config"]["tgt_vocab"], (3, 5))
    model.eval(), model2.eval()
    assert torch.equal(model(src, lengths, tgt), model2(src, lengths, tgt))


def test_evaluate_and_translate(tmp_path):
    task = DatesTask()
    res = task.train(_args(tmp_path / "c", epochs=2, beam=2))
    c = ck.load_checkpoint(tmp_path / "c")
    m = task.evaluate(c, argparse.Namespace(data=None, split="test", beam=2, device="cpu"))
    assert m["examples"] == 60 and m["test_exact_match"] == pytest.approx(res.value) and m["beam"] == 2
    with pytest.raises(ValueError, match="--split must be one of 'test', 'train', 'valid'; got 'dev'"):
        task.evaluate(c, argparse.Namespace(data=None, split="dev", beam=1, device="cpu"))
    f = _write(tmp_path / "d.tsv", "3 March 2019\t2019-03-03\n2019年3月3日\t2019-03-03\n")
    m = task.evaluate(c, argparse.Namespace(data=str(f), split="test", beam=1, device="cpu"))
    assert m["examples"] == 2 and 0.0 <= m["data_exact_match"] <= 1.0
    out = task.translate(c, ["3 March 2019", "", "2019年3月3日\n"], argparse.Namespace(beam=1, device="cpu"))
    assert len(out) == 3 and out[1] == "" and all(o and "<s>" not in o and "<pad>" not in o for o in out[::2])
