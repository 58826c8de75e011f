"""Speech data: what the generated corpus says (dates and numbers in four languages, checked against
num2words and the calendar), the split plan (speakers disjoint), espeak-ng synthesis and its noise,
the WAV parser, log-mel features by hand, the readers of a transcript TSV and of LibriSpeech's
layout on fixtures, and their errors; metrics by hand."""

from __future__ import annotations

import datetime
import io
import math
import random
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.tasks.speech import data
from attnkit.tasks.speech.features import frame_sizes, log_mel, mel_filterbank
from attnkit.tasks.speech.metrics import error_rates, exact_match, monotonic_share, monotonic_steps

torch.set_num_threads(1)
num2words = pytest.importorskip("num2words", reason='the generated corpus needs num2words (pip install -e ".[apps]")')
needs_espeak = pytest.mark.skipif(not data.have_espeak(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")


# -- what is said -----------------------------------------------------------------------------------
def test_normalize_transcript():
    assert data.normalize_transcript("  Twenty-First of MAY, 1998! ") == "twenty first of may 1998"
    assert data.normalize_transcript("l'an deux-mille") == "l'an deux mille"
    assert data.normalize_transcript("Der 3. März") == "der 3 märz"


@settings(max_examples=60, deadline=None)
@given(st.dates(datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)), st.sampled_from(data.LANGUAGES),
       st.integers(0, 2 ** 16))
def test_a_said_date_names_its_day_month_and_year(date, lang, seed):
    text = data.say_date(date, lang, random.Random(seed))
    words = text.split()
    assert data.MONTHS[lang][date.month - 1] in words
    n2w = num2words.num2words
    year = {"en": n2w(date.year, lang="en", to="year"), "de": n2w(date.year, lang="de", to="year"),
            "fr": n2w(date.year, lang="fr"), "es": n2w(date.year, lang="es")}[lang]
    assert text.endswith(data.normalize_transcript(year))
    day = {"en": [n2w(date.day, lang="en", to="ordinal")], "de": [n2w(date.day, lang="de", to="ordinal")],
           "fr": ["premier"] if date.day == 1 else [n2w(date.day, lang="fr")],
           "es": ["primero", "uno"] if date.day == 1 else [n2w(date.day, lang="es")]}[lang]
    assert any(f" {data.normalize_transcript(d)} " in f" {text} " for d in day)
    assert text == data.normalize_transcript(text)


def test_make_text_targets_are_iso_dates_and_digits():
    rng = random.Random(0)
    for lang in data.LANGUAGES:
        for _ in range(20):
            d = data.make_text(rng, lang, "date")
            assert data.is_iso_date(d.target) and data.YEARS[0] <= int(d.target[:4]) <= data.YEARS[1]
            n = data.make_text(rng, lang, "number")
            assert n.target.isdigit() and n.transcript == data.normalize_transcript(num2words.num2words(int(n.target), lang=lang))
    with pytest.raises(ValueError, match="lang must be one of"):
        data.make_text(rng, "xx", "date")
    with pytest.raises(ValueError, match="kind must be one of"):
        data.make_text(rng, "en", "time")
    assert data.is_iso_date("2024-02-29") and not data.is_iso_date("2023-02-29") and not data.is_iso_date("2023-2-1")


def test_the_splits_have_disjoint_speakers_and_the_plan_is_seeded():
    assert not set(data.SPEAKERS["train"]) & set(data.SPEAKERS["test"])
    assert not set(data.SPEAKERS["train"]) & set(data.SPEAKERS["valid"])
    assert not set(data.SPEAKERS["valid"]) & set(data.SPEAKERS["test"])
    for split in ("train", "valid", "test"):
        plan = data.plan_split(split, 200, seed=5, languages=("en", "de"))
        assert {v.speaker for _, v in plan} <= set(data.SPEAKERS[split])
        assert {t.lang for t, _ in plan} == {"en", "de"}
        assert all(v.accent in data.ACCENTS[t.lang] for t, v in plan)
        assert all(data.RATES[0] <= v.rate <= data.RATES[1] and data.PITCHES[0] <= v.pitch <= data.PITCHES[1]
                   and data.SNR_DB[0] <= v.snr_db <= data.SNR_DB[1] for _, v in plan)
    assert data.plan_split("test", 30, seed=1) == data.plan_split("test", 30, seed=1)
    assert data.plan_split("test", 30, seed=1) != data.plan_split("test", 30, seed=2)
    kinds = [t.kind for t, _ in data.plan_split("train", 1000, seed=0)]
    assert 0.65 < kinds.count("date") / 1000 < 0.75
    with pytest.raises(ValueError, match="--languages"):
        data.plan_split("train", 3, seed=0, languages=("en", "zz"))
    with pytest.raises(ValueError, match="split must be one of"):
        data.plan_split("dev", 3, seed=0)


# -- how it is said ---------------------------------------------------------------------------------
def _wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def test_the_wav_parser_reads_streamed_headers():
    x = (np.sin(np.arange(800) / 5) * 20000).astype("<i2")
    raw = _wav_bytes(x, 16000)
    got, rate = data._wav_samples(raw, "w")
    assert rate == 16000 and np.allclose(got, x / 32768.0)
    # espeak-ng --stdout cannot seek back: its size fields say 0x7ffff..., the data runs to the end
    streamed = raw[:4] + b"\xff\xff\xff\x7f" + raw[8:40] + b"\xff\xff\xff\x7f" + raw[44:]
    got, _ = data._wav_samples(streamed, "w")
    assert np.allclose(got, x / 32768.0)
    with pytest.raises(ValueError, match="not a WAV file"):
        data._wav_samples(b"RIFF" + b"\0" * 60, "w")


@needs_espeak
def test_every_accent_and_speaker_sounds_different():
    """espeak-ng silently ignores a variant it cannot apply (``en-gb+m3`` sounds like ``en-gb+f2``):
    every accent must change with the speaker, and every speaker must be a voice of its own."""
    import subprocess

    def audio(voice):
        done = subprocess.run([data.ESPEAK, "-v", voice, "-q", "--pho", "--stdout", "2000"], capture_output=True)
        assert done.returncode == 0, done.stderr
        return subprocess.run([data.ESPEAK, "-v", voice, "--stdout", "2000"], capture_output=True).stdout

    for accents in data.ACCENTS.values():
        for accent in accents:
            assert audio(f"{accent}+m3") != audio(f"{accent}+f2"), accent
    speakers = [s for split in ("train", "valid", "test") for s in data.SPEAKERS[split]]
    sounds = {audio(f"es+{s}") for s in speakers}
    assert len(sounds) == len(speakers)


@needs_espeak
def test_synthesis_is_deterministic_and_its_noise_has_the_asked_snr():
    v = data.Voice("en-us", "m3", 170, 50, 200.0, 7)
    clean, rate = data.synthesize("the third of march", v)
    assert rate == 22050 and 0.5 < len(clean) / rate < 3.0 and np.abs(clean).max() <= 1.0
    noisy, _ = data.synthesize("the third of march", data.Voice("en-us", "m3", 170, 50, 20.0, 7))
    again, _ = data.synthesize("the third of march", data.Voice("en-us", "m3", 170, 50, 20.0, 7))
    assert np.array_equal(noisy, again)
    snr = 10 * math.log10(np.mean(clean ** 2) / np.mean((noisy - clean) ** 2))
    assert abs(snr - 20.0) < 0.5
    fast, _ = data.synthesize("the third of march", data.Voice("en-us", "m3", 300, 50, 200.0, 7))
    assert len(fast) < 0.8 * len(clean)  # the rate is the voice's


@needs_espeak
def test_generate_gives_features_and_keeps_speakers_apart():
    splits = data.generate(6, 2, 3, seed=3, languages=("fr",))
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "valid": 2, "test": 3}
    for split, utts in splits.items():
        for u in utts:
            assert u.speaker in data.SPEAKERS[split] and u.lang == "fr" and u.features.shape[1] == 40
            assert u.features.shape[0] > 50 and torch.isfinite(u.features).all()
    u = splits["test"][0]
    wave_, rate = u.waveform()
    torch.testing.assert_close(log_mel(torch.from_numpy(wave_), rate), u.features)


# -- features ---------------------------------------------------------------------------------------
def test_mel_filterbank_by_hand():
    fb = mel_filterbank(512, 16000, 10)
    assert fb.shape == (10, 257) and torch.all(fb >= 0)
    edges = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 8000 / 700), 12) / 2595) - 1)
    freqs = np.linspace(0, 8000, 257)
    for i in range(10):
        peak = freqs[int(fb[i].argmax())]
        assert abs(peak - edges[i + 1]) <= 8000 / 256  # each filter peaks at its centre, within a bin
        live = freqs[fb[i].numpy() > 0]
        assert live.min() > edges[i] - 1e-6 and live.max() < edges[i + 2] + 1e-6


def test_log_mel_frames_and_a_tone_lands_in_its_filter():
    rate = 16000
    win, hop, n_fft = frame_sizes(rate)
    assert (win, hop, n_fft) == (400, 160, 512)
    t = torch.arange(rate) / rate
    feats = log_mel(torch.sin(2 * math.pi * 1000 * t) + 0.001 * torch.randn(rate), rate)
    assert feats.shape == (1 + (rate - n_fft) // hop, 40)  # frames of n_fft samples, the window centred
    torch.testing.assert_close(feats.mean(0), torch.zeros(40), atol=1e-4, rtol=0)
    raw = torch.log(mel_filterbank(n_fft, rate) @ torch.stft(torch.sin(2 * math.pi * 1000 * t), n_fft, hop, win,
                                                               torch.hann_window(win), center=False,
                                                               return_complex=True).abs().pow(2) + 1e-6)
    band = int(raw.mean(1).argmax())
    centres = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 8000 / 700), 42)[1:-1] / 2595) - 1)
    assert abs(centres[band] - 1000) < 120
    with pytest.raises(ValueError, match="mono"):
        log_mel(torch.zeros(2, 100), rate)


# -- real audio -------------------------------------------------------------------------------------
def _tone(path: Path, seconds: float = 0.5, rate: int = 16000, freq: float = 440.0, channels: int = 1):
    t = np.arange(int(seconds * rate)) / rate
    x = (np.sin(2 * np.pi * freq * t) * 12000).astype("<i2")
    if channels == 2:
        x = np.stack([x, x // 2], 1).reshape(-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_wav_bytes(x, rate, channels))
    return path


def test_read_tsv_with_a_header_two_and_three_columns(tmp_path):
    _tone(tmp_path / "alice" / "a.wav")
    _tone(tmp_path / "bob" / "b.wav", channels=2, freq=880)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("path\ttranscript\tnormalized\nalice/a.wav\tThe third of May, 2001\t2001-05-03\n"
                   "bob/b.wav\thello world\n", encoding="utf-8")
    utts = data.read_tsv(tsv)
    assert [u.transcript for u in utts] == ["the third of may 2001", "hello world"]
    assert [u.target for u in utts] == ["2001-05-03", ""] and [u.kind for u in utts] == ["date", "speech"]
    assert [u.speaker for u in utts] == ["alice", "bob"] and utts[0].features.shape == (47, 40)
    x, rate = data.load_audio(tmp_path / "bob" / "b.wav")
    assert rate == 16000 and np.allclose(x[:50], (np.sin(2 * np.pi * 880 * np.arange(50) / 16000) * 12000)
                                         .astype("<i2") * 0.75 / 32768.0, atol=1e-4)  # channels averaged
    assert len(data.read_tsv(tsv, limit=1)) == 1
    assert data.read_split(tsv, "--test")[1].transcript == "hello world"


def test_read_tsv_errors_name_the_file_and_line(tmp_path):
    _tone(tmp_path / "a.wav")
    bad = tmp_path / "bad.tsv"
    bad.write_text("a.wav\tok\nb.wav\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--train: '.*bad.tsv' line 2: expected FILE<TAB>TRANSCRIPT"):
        data.read_tsv(bad)
    bad.write_text("missing.wav\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: no such audio file '.*missing.wav'"):
        data.read_tsv(bad)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    bad.write_text("junk.wav\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: cannot read audio file '.*junk.wav'"):
        data.read_tsv(bad)
    (tmp_path / "x.mp3").write_bytes(b"ID3")
    bad.write_text("x.mp3\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected one of .wav, .flac"):
        data.read_tsv(bad)
    (tmp_path / "w8.wav").write_bytes(_wav_bytes(np.zeros(800, dtype=np.uint8), 8000, width=1))
    bad.write_text("w8.wav\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="8-bit WAV; expected 16-bit PCM"):
        data.read_tsv(bad)
    _tone(tmp_path / "short.wav", seconds=0.05)
    bad.write_text("short.wav\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="shorter than 0.1 s"):
        data.read_tsv(bad)
    bad.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no utterances"):
        data.read_tsv(bad)
    with pytest.raises(ValueError, match="--valid: no such file"):
        data.read_tsv(tmp_path / "nope.tsv", "--valid")


def test_read_librispeech_layout(tmp_path):
    sf = pytest.importorskip("soundfile", reason='FLAC needs soundfile (pip install -e ".[apps]")')
    chapter = tmp_path / "19" / "198"
    chapter.mkdir(parents=True)
    t = np.arange(8000) / 16000
    sf.write(str(chapter / "19-198-0000.flac"), (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    _tone(chapter / "19-198-0001.wav")
    (chapter / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS LITTLE WORK\n")
    utts = data.read_librispeech(tmp_path)
    assert [u.transcript for u in utts] == ["northanger abbey", "this little work"]
    assert {u.speaker for u in utts} == {"19"} and utts[0].features.shape == (47, 40)
    assert utts[0].path.endswith("19-198-0000.flac") and data.read_split(tmp_path, "--train")[1].path.endswith(".wav")
    x, rate = data.load_audio(chapter / "19-198-0000.flac")
    assert rate == 16000 and np.allclose(x, 0.3 * np.sin(2 * np.pi * 300 * t), atol=1e-4)
    (chapter / "19-198.trans.txt").write_text("19-198-0002 GONE\n")
    with pytest.raises(ValueError, match=r"19-198.trans.txt' line 1: no such audio file '.*19-198-0002.flac'"):
        data.read_librispeech(tmp_path)
    (chapter / "19-198.trans.txt").write_text("19-198-0000\n")
    with pytest.raises(ValueError, match="expected 'ID TRANSCRIPT'"):
        data.read_librispeech(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--test: '.*empty' has no \*.trans.txt files"):
        data.read_librispeech(tmp_path / "empty", "--test")


# -- metrics ----------------------------------------------------------------------------------------
def _edits(a, b):
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def test_error_rates_are_edits_over_reference_length():
    pytest.importorskip("jiwer", reason='error rates use jiwer (pip install -e ".[apps]")')
    refs = ["the third of may", "zwei tausend", "uno"]
    hyps = ["the thirt of may", "zweitausend", ""]
    got = error_rates(refs, hyps)
    cer = sum(_edits(r, h) for r, h in zip(refs, hyps)) / sum(len(r) for r in refs)
    wer = sum(_edits(r.split(), h.split()) for r, h in zip(refs, hyps)) / sum(len(r.split()) for r in refs)
    assert got["cer"] == pytest.approx(cer) and got["wer"] == pytest.approx(wer)
    assert math.isnan(error_rates([""], ["x"])["cer"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"])


def test_exact_match_and_monotonic_share_by_hand():
    assert exact_match(["2001-05-03", "12"], ["2001-05-03", "13"]) == 0.5
    a = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.1, 0.8, 0.1, 0.0], [0.0, 0.1, 0.2, 0.7], [0.1, 0.6, 0.3, 0.0],
                      [0.0, 0.0, 0.4, 0.6]])
    # peaks 0, 1, 3, 1, 3: one step back (3 -> 1) of four
    assert monotonic_steps([a, torch.ones(1, 4)]) == (1, 4)
    assert monotonic_share([a]) == 0.75 and math.isnan(monotonic_share([torch.ones(1, 3)]))
