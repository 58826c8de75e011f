"""Bad input at the command line (SPEC §7): one line on stderr naming the option or the file and
its line, exit status 2, never a traceback, and nothing already written is lost.

Three tiny checkpoints are trained once for the module (dates, multi30k, digits: a few seconds);
most cases run ``attnkit.cli.main`` in-process, two run ``python -m attnkit`` in a subprocess.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnkit import cli
from attnkit.tasks import dates
from attnkit.tasks.dates import NOT_A_DATE, is_iso_date
from attnkit.tasks.dates import task as dates_task  # the module DatesTask.translate runs in
from attnkit.tasks.io import decode_utf8, split_lines

QUIET = ["--threads", "1", "--no-progress"]
EN = "a dog cat runs sleeps the big small red man woman park ball".split()
DE = "ein hund katze läuft schläft der große kleine rote mann frau park ball".split()


def run(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``attnkit ARGV`` run in-process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The error message, after checking that stderr holds exactly one ``attnkit: error:`` line."""
    assert err.startswith("attnkit: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err[len("attnkit: error: "):-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def feed_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny dates, multi30k and digits checkpoints, trained through the command line."""
    root = tmp_path_factory.mktemp("cli_bad_input")
    capture = pytest.MonkeyPatch()  # keep the training logs out of the tests' output
    capture.setattr(sys, "stdout", io.StringIO())
    try:
        assert cli.main(["train", "dates", "--out", str(root / "dates"), "--epochs", "2", "--train-size", "300",
                         "--valid-size", "20", "--test-size", "20", "--emb-dim", "16", "--hidden-dim", "32",
                         "--batch-size", "64", *QUIET]) == 0
        pairs = [(" ".join(EN[i] for i in idx), " ".join(DE[i] for i in idx))
                 for idx in ([(7 * k + j) % len(EN) for j in range(3 + k % 4)] for k in range(60))]
        files = []
        for split in ("train", "valid", "test"):
            src = write(root / "m30k" / f"{split}.en", "".join(s + "\n" for s, _ in pairs))
            tgt = write(root / "m30k" / f"{split}.de", "".join(t + "\n" for _, t in pairs))
            files += [f"--{split}-src", str(src), f"--{split}-tgt", str(tgt)]
        assert cli.main(["train", "multi30k", *files, "--out", str(root / "m30k_ck"), "--epochs", "1",
                         "--tokenizer", "word", "--d-model", "16", "--heads", "2", "--ff", "16", "--encoder-layers",
                         "1", "--decoder-layers", "1", "--max-positions", "16", *QUIET]) == 0
        assert cli.main(["train", "digits", "--out", str(root / "digits"), "--epochs", "1", "--dim", "8",
                         "--depth", "1", *QUIET]) == 0
    finally:
        capture.undo()
    return {"dates": root / "dates", "multi30k": root / "m30k_ck" / "best", "digits": root / "digits"}


# -- attnkit translate ------------------------------------------------------------------------------
def test_empty_lines_give_empty_lines_in_place(ckpts, capsys, monkeypatch):
    feed_stdin(monkeypatch, "3 March 2019\n\n   \r\n2019年3月3日\n".encode("utf-8"))
    code, out, err = run(["translate", ckpts["dates"], "--threads", "1"], capsys)
    assert code == 0 and err == ""
    lines = out.split("\n")[:-1]
    assert len(lines) == 4 and lines[1] == lines[2] == "" and lines[0] and lines[3]
    code, out, _ = run(["translate", ckpts["multi30k"], "a dog runs", "", "the cat"], capsys)
    assert code == 0 and out.split("\n")[:-1][1] == "" and len(out.split("\n")) == 4


def test_a_10000_character_line_is_cut_with_a_warning(ckpts, capsys, monkeypatch):
    feed_stdin(monkeypatch, ("3 March 2019\n" + "1" * 10_000 + "\nx\n").encode())
    code, out, err = run(["translate", ckpts["dates"]], capsys)
    assert code == 0 and len(out.split("\n")) == 4
    assert err == ("attnkit: warning: input line 2 has 10000 characters; the date model reads only the first "
                   f"{dates.MAX_SOURCE_CHARS}\n")
    code, out, err = run(["translate", ckpts["multi30k"], "a dog", " ".join(["dog"] * 10_000)], capsys)
    assert code == 0 and len(out.split("\n")) == 3
    assert err == ("attnkit: warning: input line 2 has 10000 tokens; the model reads at most 15, so only the first "
                   "ones are translated\n")


def test_stdin_that_is_not_utf8_names_the_line_and_prints_nothing(ckpts, capsys, monkeypatch):
    feed_stdin(monkeypatch, b"3 March 2019\n\xff\xfe 2019\n")
    code, out, err = run(["translate", ckpts["dates"]], capsys)
    assert code == 2 and out == ""
    assert one_line_error(err) == "stdin line 2 is not UTF-8 text (byte 0xff at column 1)"


def test_no_stdin_and_a_closed_stdout(ckpts, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed (<&-)
    code, out, err = run(["translate", ckpts["dates"]], capsys)
    assert code == 2 and "no text to translate" in one_line_error(err)

    class ClosedPipe(io.StringIO):  # attnkit translate ... | head -1, once head has exited
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["translate", str(ckpts["dates"]), "3 March 2019"]) == 141  # quietly, as cat does
    assert capsys.readouterr().err == ""


def test_a_checkpoint_of_another_task_is_refused(ckpts, capsys):
    code, out, err = run(["translate", ckpts["digits"], "hello"], capsys)
    assert code == 2 and out == ""
    assert one_line_error(err) == (f"checkpoint {str(ckpts['digits'])!r} is a digits model; translate needs a "
                                   "model of a task that turns lines into lines (dates, multi30k, speech, vqa)")


def test_outputs_that_are_not_calendar_dates_are_marked(ckpts, capsys, monkeypatch):
    def fake_decode(model, sources, *a, **k):  # what a half-trained model may say
        return [{"31/31/2020": "2020-31-31", "29 Feb 2020": "2020-02-29", "30 Feb 2021": "2021-02-30",
                 "??": "", "": ""}[s] for s in sources], [None] * len(sources)

    monkeypatch.setattr(dates_task, "decode", fake_decode)
    code, out, _ = run(["translate", ckpts["dates"], "31/31/2020", "29 Feb 2020", "", "30 Feb 2021", "??"], capsys)
    assert code == 0
    assert out.split("\n")[:-1] == ["2020-31-31  [not a valid date]", "2020-02-29", "", "2021-02-30  [not a valid date]",
                                    "  [not a valid date]"]


def test_a_trained_model_never_presents_an_invalid_date_as_a_result(ckpts, capsys):
    inputs = ["31/31/2020", "2020-13-45", "3 March 2019", "29 February 2019", "00/00/0000", "hello"]
    code, out, _ = run(["translate", ckpts["dates"], *inputs], capsys)
    lines = out.split("\n")[:-1]
    assert code == 0 and len(lines) == len(inputs)
    for line in lines:
        assert is_iso_date(line) or (line.endswith(NOT_A_DATE) and not is_iso_date(line[:-len(NOT_A_DATE)])), line


def test_is_iso_date():
    assert is_iso_date("2020-02-29") and is_iso_date("1000-01-01")
    for bad in ("2019-02-29", "2020-31-31", "2020-00-10", "0000-01-01", "20200101", "2020-1-1", "２０２０-01-01", ""):
        assert not is_iso_date(bad), bad


# -- attnkit train TASK --data ... ----------------------------------------------------------------
SST2_OK = "sentence\tlabel\na good film\t1\na dull film\t0\n"
M30K_OK = "a dog\nthe cat\n"


def _dates(tmp, content):
    return ["dates", "--data", write(tmp / "d.tsv", content) if content is not None else tmp / "missing.tsv"]


def _sst2(tmp, train, dev=SST2_OK):
    write(tmp / "sst" / "dev.tsv", dev)
    if train is not None:
        write(tmp / "sst" / "train.tsv", train)
    return ["sst2", "--data", tmp / "sst"]


def _m30k(tmp, src, tgt):
    ok = write(tmp / "ok.txt", M30K_OK)
    return ["multi30k", "--train-src", write(tmp / "tr.en", src), "--train-tgt", write(tmp / "tr.de", tgt),
            "--valid-src", ok, "--valid-tgt", ok, "--test-src", ok, "--test-tgt", ok]


DATA_CASES = {
    "dates missing": (lambda t: _dates(t, None), r"--data: no such file '.*missing.tsv'$"),
    "dates folder": (lambda t: ["dates", "--data", t], r"--data: '.*' is a folder; expected a file$"),
    "dates empty": (lambda t: _dates(t, ""), r"--data: '.*d.tsv' is empty; expected lines 'source<TAB>target'$"),
    "dates 3 columns": (lambda t: _dates(t, "3 May 2001\t2001-05-03\n4 May 2001\t2001-05-04\tx\n"),
                        r"--data: '.*d.tsv' line 2: expected 2 tab-separated columns \(source, target\); got 3: "),
    "dates not UTF-8": (lambda t: _dates(t, "3 May 2001\t2001-05-03\n4 M\xe4rz 2001\t2001-03-04\n".encode("latin-1")),
                        r"--data: '.*d.tsv' line 2 is not UTF-8 text \(byte 0xe4 at column 4\)$"),
    "dates swapped": (lambda t: _dates(t, "2001-05-03\t3 May 2001\n"),
                      r"'.*d.tsv' line 1: the target '3 May 2001' is not a date written YYYY-MM-DD \(are the columns "
                      r"swapped\?\)"),
    "sst2 empty": (lambda t: _sst2(t, ""), r"SST-2 file '.*train.tsv' is empty"),
    "sst2 3 columns": (lambda t: _sst2(t, SST2_OK + "fine\t1\textra\n"),
                       r"SST-2 file '.*train.tsv' line 4: expected 2 tab-separated fields \(sentence, label\); got 3"),
    "sst2 bad label": (lambda t: _sst2(t, "sentence\tlabel\ngreat\tpositive\n"),
                       r"SST-2 file '.*train.tsv' line 2: unknown label 'positive'; expected one of 0 \(negative\), "
                       r"1 \(positive\)$"),
    "sst2 not UTF-8": (lambda t: _sst2(t, SST2_OK, dev=b"sentence\tlabel\ncaf\xe9\t1\n"),
                       r"SST-2 file '.*dev.tsv' line 2 is not UTF-8 text \(byte 0xe9 at column 4\)$"),
    "sst2 missing": (lambda t: ["sst2", "--data", t / "nope"], r"--data: SST-2 folder '.*nope' does not exist"),
    "multi30k not parallel": (lambda t: _m30k(t, "a dog\nthe cat\na ball\n", M30K_OK),
                              r"train files are not parallel: source '.*tr.en' has 3 lines but target '.*tr.de' has 2"),
    "multi30k not UTF-8": (lambda t: _m30k(t, M30K_OK, b"ein hund\ndie k\xe4tze\n"),
                           r"--train-tgt: '.*tr.de' line 2 is not UTF-8 text \(byte 0xe4 at column 6\)$"),
    "mnist missing": (lambda t: ["mnist", "--data", t / "nope"], r"--data: MNIST folder '.*nope' does not exist"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_files_name_file_and_line_and_leave_the_checkpoint_alone(case, ckpts, tmp_path, capsys):
    import re
    import shutil

    make, pattern = DATA_CASES[case]
    out = tmp_path / "out"
    shutil.copytree(ckpts["dates"], out)  # --out already holds a checkpoint: a failing run must not touch it
    before = snapshot(out)
    code, stdout, err = run(["train", *make(tmp_path), "--out", out, *QUIET], capsys)
    assert code == 2
    assert re.search(pattern, one_line_error(err)), err
    assert snapshot(out) == before


# -- options -----------------------------------------------------------------------------------------
OPTION_CASES = [
    (["translate", "{dates}", "x", "--beam", "0"],
     "argument --beam: expected an integer >= 1; got '0' (see attnkit translate --help)"),
    (["translate", "{dates}", "x", "--threads", "0"], "argument --threads: expected an integer >= 1; got '0'"),
    (["translate", "{dates}", "x", "--device", "nope"], "--device 'nope' is not a device attnkit runs on"),
    (["translate", "{tmp}/nowhere", "x"], "checkpoint '{tmp}/nowhere'"),
    (["eval", "{tmp}/nowhere"], "checkpoint '{tmp}/nowhere'"),
    (["eval", "{dates}", "--beam", "0"], "argument --beam: expected an integer >= 1; got '0' (see attnkit eval --help)"),
    (["eval", "{dates}", "--split", "dev"], "--split must be one of 'test', 'train', 'valid'; got 'dev'"),
    (["eval"], "the following arguments are required: checkpoint (see attnkit eval --help)"),
    (["train", "dates", "--epochs", "-1"], "argument --epochs: expected an integer >= 1; got '-1' (see attnkit train "
                                           "dates --help)"),
    (["train", "dates", "--epochs", "0"], "argument --epochs: expected an integer >= 1; got '0'"),
    (["train", "dates", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1; got '0'"),
    (["train", "dates", "--max-seconds", "-5"], "argument --max-seconds: expected a number > 0; got '-5'"),
    (["train", "dates", "--test-size", "0"], "argument --test-size: expected an integer >= 1; got '0'"),
    (["train", "digits", "--lr", "nan"], "argument --lr: expected a number > 0; got 'nan'"),
    (["train", "digits", "--split-seed", "-1"], "argument --split-seed: expected an integer >= 0; got '-1'"),
    (["train", "sst2", "--label-smoothing", "2"], "argument --label-smoothing: expected a number in [0, 1); got '2'"),
    (["train", "multi30k", "--warmup", "-5"], "argument --warmup: expected an integer >= 0; got '-5'"),
    (["train", "nope"], "argument task: invalid choice: 'nope'"),
    (["train", "dates", "--out", "{tmp}/a_file"], "--out '{tmp}/a_file' is a file; expected a folder"),
    (["demo", "--out", "{tmp}/a_file"], "--out '{tmp}/a_file' is a file; expected a folder"),
    (["translate", "{dates}", "ok", "caf\udce9"], "text argument 2 is not UTF-8 text: b'caf\\xe9'"),
]


@pytest.mark.parametrize("argv, message", OPTION_CASES, ids=[ascii(" ".join(a)) for a, _ in OPTION_CASES])
def test_bad_options_are_one_line_errors(argv, message, ckpts, tmp_path, capsys):
    def fill(s):
        return s.replace("{dates}", str(ckpts["dates"])).replace("{tmp}", str(tmp_path))

    (tmp_path / "a_file").write_text("not a folder")
    argv = [fill(a) for a in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert fill(message) in one_line_error(err)
    assert not (tmp_path / "new").exists()  # refused before anything was written
    assert (tmp_path / "a_file").read_text() == "not a folder"


# -- the same, as a user sees it ---------------------------------------------------------------------
def _attnkit(args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(cli.__file__).resolve().parents[1]))
    env.pop("ATTNKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "attnkit", *map(str, args)], input=stdin, capture_output=True,
                          env=env, timeout=120)


def test_python_m_attnkit_exits_2_with_one_line_and_no_traceback(ckpts, tmp_path):
    r = _attnkit(["translate", ckpts["dates"], "--threads", "1"], stdin=b"3 March 2019\n\n\xc3\x28 bad\n")
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode() == "attnkit: error: stdin line 3 is not UTF-8 text (byte 0xc3 at column 1)\n"
    bad = write(tmp_path / "d.tsv", "3 May 2001\t2001-05-03\n4 May 2001\t2001-05-04\t!\n")
    r = _attnkit(["train", "dates", "--data", bad, "--out", tmp_path / "out", "--threads", "1"])
    assert r.returncode == 2 and b"Traceback" not in r.stderr and r.stderr.count(b"\n") == 1
    assert f"'{bad}' line 2: expected 2 tab-separated columns".encode() in r.stderr
    assert not (tmp_path / "out").exists()


# -- helpers ------------------------------------------------------------------------------------------
def test_utf8_helpers():
    assert split_lines("a\r\nb\n\nc") == ["a", "b", "", "c"] and split_lines("") == [] and split_lines("\n") == [""]
    assert decode_utf8(b"\xef\xbb\xbfsentence\tlabel", "f") == "sentence\tlabel"  # a byte-order mark is dropped
    with pytest.raises(ValueError, match=r"^f line 3 is not UTF-8 text \(byte 0xe9 at column 6\)$"):
        decode_utf8(b"one\ntwo\ncaf\xc3\xa9\xe9\n", "f")
