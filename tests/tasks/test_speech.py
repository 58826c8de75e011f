"""Listen, Attend and Spell and the speech recipe: the listener's lengths and padding invariance,
teacher forcing against step-by-step decoding, beam 1 against a greedy loop written here,
overfitting a tiny batch, the batches, and ``attnkit train speech`` / ``eval`` / ``translate`` /
``viz`` end to end, on real-format fixtures (no espeak-ng needed) and on the generated corpus
(the data readers and metrics are tests/tasks/test_speech_data.py's)."""

from __future__ import annotations

import contextlib
import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnkit import cli
from attnkit.models.las import Listener, ListenAttendSpell
from attnkit.tasks.speech import data, recipe
from attnkit.tasks.speech.data import Utterance

torch.set_num_threads(1)
pytest.importorskip("jiwer", reason='speech metrics use jiwer (pip install -e ".[apps]")')
needs_espeak = pytest.mark.skipif(not data.have_espeak(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")


def _las(**kw):
    torch.manual_seed(0)
    cfg = dict(n_mels=8, hidden_dim=16, att_dim=12, emb_dim=8, channels=3, kernel_size=5, dropout=0.0)
    return ListenAttendSpell(11, **{**cfg, **kw}).eval()


# -- the model --------------------------------------------------------------------------------------
def test_listener_lengths_and_padding_do_not_leak():
    torch.manual_seed(0)
    lis = Listener(n_mels=8, hidden_dim=6, layers=3, conv_channels=5, dropout=0.0).eval()
    lengths = torch.tensor([80, 37, 16])
    feats = torch.randn(3, 80, 8)
    h, n = lis(feats, lengths)
    want = [((t + 1) // 2 + 1) // 2 // 4 for t in (80, 37, 16)]
    assert n.tolist() == want == lis.out_lengths(lengths).tolist() and h.shape == (3, max(want), 12)
    garbage = feats.clone()
    garbage[1, 37:] = 1e3  # what lies beyond an utterance's length must not matter
    h2, _ = lis(garbage, lengths)
    torch.testing.assert_close(h2[1, : want[1]], h[1, : want[1]])
    alone, _ = lis(feats[1:2, :37], lengths[1:2])  # nor the other utterances of the batch
    torch.testing.assert_close(alone[0], h[1, : want[1]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 16 frames"):
        lis(torch.randn(1, 10, 8), torch.tensor([10]))


def test_teacher_forcing_equals_feeding_steps_one_by_one():
    m = _las()
    feats, lengths = torch.randn(2, 60, 8), torch.tensor([60, 41])
    inputs = torch.tensor([[4, 5, 6, 7], [4, 8, 9, 0]])
    out = m(feats, lengths, inputs)
    h, pk, pad = m.encode(feats, lengths)
    state, ctx, w = m.init_state(h)
    for t in range(4):
        lg, state, ctx, w = m.step(inputs[:, t], state, ctx, w, h, pk, pad)
        torch.testing.assert_close(out.logits[:, t], lg)
        torch.testing.assert_close(out.weights[:, t], w)
    assert torch.all(out.weights[1, :, pad[1]] == 0) and pad[1].any()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 4))


def _greedy(m, feats, lengths, start, max_len):
    """Greedy decoding written plainly, one utterance at a time."""
    outs = []
    for b in range(feats.shape[0]):
        h, pk, pad = m.encode(feats[b:b + 1, : lengths[b]], lengths[b:b + 1])
        state, ctx, w = m.init_state(h)
        y, seq = torch.tensor([start]), []
        for _ in range(max_len):
            lg, state, ctx, w = m.step(y, state, ctx, w, h, pk, pad)
            y = lg.argmax(-1)
            if int(y) == m.eos_id:
                break
            seq.append(int(y))
        outs.append(seq)
    return outs


def test_beam_one_is_greedy_and_a_wider_beam_scores_at_least_as_well():
    m = _las()
    torch.manual_seed(5)
    feats, lengths = torch.randn(3, 70, 8), torch.tensor([70, 50, 33])
    ids, maps = m.beam_search(feats, lengths, start_id=4, beam=1, max_len=12)
    assert ids == _greedy(m, feats, lengths, 4, 12)
    assert [tuple(a.shape) for a in maps] == [(len(s), m.listener.out_lengths(lengths)[0].item()) for s in ids]

    @torch.no_grad()
    def score(b, seq):
        inputs = torch.tensor([[4] + seq])
        lp = torch.log_softmax(m(feats[b:b + 1, : lengths[b]], lengths[b:b + 1], inputs).logits, -1)[0]
        targets = seq + [m.eos_id] if len(seq) < 12 else seq
        return float(lp[torch.arange(len(targets)), torch.tensor(targets)].sum())

    wide, _ = m.beam_search(feats, lengths, start_id=4, beam=4, max_len=12)
    for b in range(3):
        assert score(b, wide[b]) >= score(b, ids[b]) - 1e-4


def test_nbest_is_the_final_beam_best_first_and_the_length_penalty_only_rescales_it():
    m = _las()
    torch.manual_seed(6)
    feats, lengths = torch.randn(3, 70, 8), torch.tensor([70, 50, 33])
    raw = m.nbest(feats, lengths, start_id=4, beam=3, max_len=12)
    ids, maps = m.beam_search(feats, lengths, start_id=4, beam=3, max_len=12)
    for b in range(3):
        assert 1 <= len(raw[b]) <= 3 and raw[b][0][0] == ids[b]
        torch.testing.assert_close(raw[b][0][2], maps[b])
        assert [s for _, s, _ in raw[b]] == sorted((s for _, s, _ in raw[b]), reverse=True)
    normed = m.nbest(feats, lengths, start_id=4, beam=3, max_len=12, length_penalty=1.0)
    for b in range(3):  # the same hypotheses; each score divided by (5 + length) / 6
        got = {tuple(seq): s for seq, s, _ in normed[b]}
        assert set(got) == {tuple(seq) for seq, _, _ in raw[b]}
        for seq, s, _ in raw[b]:
            n = len(seq) + (len(seq) < 12)  # the end token counts, when there is one
            assert got[tuple(seq)] == pytest.approx(s / ((5 + n) / 6), rel=1e-5)
        best = max(normed[b], key=lambda h: h[1])[0]
        assert m.beam_search(feats, lengths, start_id=4, beam=3, max_len=12, length_penalty=1.0)[0][b] == best
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        m.beam_search(feats, lengths, start_id=4, length_penalty=-1.0)


def test_sequence_logprobs_equal_a_step_by_step_sum():
    utts = _utts(3)
    vocab = recipe.build_vocab(utts)
    torch.manual_seed(0)
    m = recipe.build_model(vocab, 8, dict(hidden_dim=16, att_dim=12, emb_dim=8, dropout=0.0)).eval()
    feats, lengths = recipe.pad_features(utts)
    seqs, rows = ["one", "three two", "", "two"], [0, 2, 1, 0]  # rows may repeat and come in any order
    with torch.no_grad():
        enc = m.encode(feats, lengths)
        got = recipe.sequence_logprobs(m, enc, rows, recipe.TEXT, seqs, vocab)
        for r, seq, value in zip(rows, seqs, got.tolist()):
            h, pk, pad = (t[r:r + 1] for t in enc)
            state, ctx, w = m.init_state(h)
            y, total = torch.tensor([vocab.stoi[recipe.TEXT]]), 0.0
            for tok in vocab.encode(list(seq)) + [vocab.eos_id]:
                logits, state, ctx, w = m.step(y, state, ctx, w, h, pk, pad)
                total += float(torch.log_softmax(logits, -1)[0, tok])
                y = torch.tensor([tok])
            assert value == pytest.approx(total, rel=1e-5, abs=1e-5)


def test_choose_dates_takes_the_candidate_both_outputs_find_likeliest():
    pytest.importorskip("num2words", reason='the date grammar spells numbers with num2words (pip install -e ".[apps]")')
    from attnkit.tasks.speech.reading import read_date, say_all

    said = ["the first of may two thousand", "twelve"]
    utts = [Utterance(torch.randn(48 + 8 * i, 8), t, "", "date", "en") for i, t in enumerate(said)]
    utts += [Utterance(torch.randn(50, 8), " ".join(say_all("2001-05-02", ["en"])), "2001-05-02", "date", "en")]
    vocab = recipe.build_vocab(utts)
    m = recipe.build_model(vocab, 8, dict(hidden_dim=16, att_dim=12, emb_dim=8, dropout=0.0)).eval()
    feats, lengths = recipe.pad_features(utts[:2])
    texts = [["the first of may two thousand", "the first of may two thousand and one"], ["twelve"]]
    norms = [["2000-05-03", "12", "2000-05-01"], ["12", "2000-05-01"]]
    with torch.no_grad():
        enc = m.encode(feats, lengths)
        chosen = recipe.choose_dates(m, enc, texts, norms, vocab)

        def joint(c):  # the score written out: the norm output's, plus the transcript's over the phrases
            n = recipe.sequence_logprobs(m, enc, [0], recipe.NORM, [c], vocab)[0]
            phrases = say_all(c, ["en"])
            t = recipe.sequence_logprobs(m, enc, [0] * len(phrases), recipe.TEXT, phrases, vocab)
            return float(n + torch.logsumexp(t, 0))

        cands = ["2000-05-03", "2000-05-01", read_date(texts[0][1]).iso]
        assert cands[2] == "2001-05-01"
        assert chosen[0] == max(cands, key=joint)
    assert chosen[1] == "12"  # the normalized output's best is no date: a number stays as it is


def _utts(n=4, frames=48, n_mels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["one", "two", "three", "four", "five", "six"]
    out = []
    for i in range(n):
        feats = torch.randn(frames + 8 * i, n_mels, generator=g)
        out.append(Utterance(feats, words[i % 6], str(i + 1), "number", "en", f"s{i % 2}"))
    return out


def test_overfits_a_tiny_batch_both_outputs():
    utts = _utts()
    vocab = recipe.build_vocab(utts)
    torch.manual_seed(0)
    m = recipe.build_model(vocab, 8, dict(hidden_dim=32, att_dim=32, emb_dim=16, dropout=0.0))
    step = recipe.make_step(m, label_smoothing=0.0, ctc_weight=0.3)
    batch = recipe.make_batch(utts, vocab)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    losses = []
    for _ in range(150):
        loss = step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    metrics, dec = recipe.evaluate(m, utts, vocab, beam=2, max_len=12)
    assert dec.transcripts == [u.transcript for u in utts] and dec.normalized == [u.target for u in utts]
    assert metrics["cer"] == 0 and metrics["exact_match"] == 1.0 and metrics["number_exact_match"] == 1.0


def test_batches_cover_every_utterance_once_with_the_start_tokens():
    utts = _utts(7) + [Utterance(torch.randn(60, 8), "plain words", "", "speech")]
    vocab = recipe.build_vocab(utts)
    bs = recipe.batches(utts, vocab, 3, seed=1, epoch=0)
    seen = sorted(t for b in bs for t in ["".join(vocab.decode(r)) for r in b.text_out])
    assert seen == sorted(u.transcript for u in utts)
    for b in bs:
        assert torch.all(b.text_in[:, 0] == vocab.stoi[recipe.TEXT])
        assert b.norm_in.shape[0] == b.norm_rows.numel() and torch.all(b.norm_in[:, 0] == vocab.stoi[recipe.NORM])
        for r, length in enumerate(b.lengths.tolist()):
            assert torch.all(b.feats[r, length:] == 0)
        ends = (b.text_out == vocab.eos_id).sum(1)
        assert torch.all(ends == 1)
    assert sum(b.norm_rows.numel() for b in bs) == 7
    again = recipe.batches(utts, vocab, 3, seed=1, epoch=0)
    assert [b.lengths.tolist() for b in again] == [b.lengths.tolist() for b in bs]


# -- the command line -------------------------------------------------------------------------------
def _main(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _wav(path: Path, freq: float, seconds: float = 0.4, rate: int = 8000):
    t = np.arange(int(seconds * rate)) / rate
    x = (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return path


@pytest.fixture(scope="module")
def tsv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech-tsv")
    for split, n in (("train", 6), ("valid", 2), ("test", 3)):
        lines = ["path\ttranscript\tnormalized"]
        for i in range(n):
            _wav(root / split / f"{i}.wav", 200 + 150 * i)
            lines.append(f"{split}/{i}.wav\tday {i}\t2000-01-0{i + 1}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    out = root / "ckpt"
    code, printed, err = _main("train", "speech", "--train", root / "train.tsv", "--valid", root / "valid.tsv",
                               "--test", root / "test.tsv", "--epochs", "2", "--hidden-dim", "16", "--beam", "2",
                               "--threads", "1", "--no-progress", "--out", out)
    assert code == 0, err
    return root, out, printed


def test_train_on_a_transcript_tsv_then_eval_prints_the_same_line(tsv_run):
    root, out, printed = tsv_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "speech" and cfg["sizes"] == {"train": 6, "valid": 2, "test": 3}
    assert cfg["data"]["train"] == str((root / "train.tsv").resolve()) and len(cfg["history"]["loss"]) == 2
    assert set(cfg["history"]) == {"loss", "valid_cer", "valid_exact_match"}
    last = printed.strip().splitlines()[-1]
    assert last.startswith("test CER: ") and "test date exact match: " in last and last.endswith("(3 utterances, 3 dates, beam 2)")
    assert f"{100 * cfg['metrics']['test_cer']:.2f}%" in last
    code, again, err = _main("eval", out, "--threads", "1")
    assert code == 0, err
    assert again.strip() == last
    code, js, _ = _main("eval", out, "--json", "--threads", "1", "--split", "valid", "--beam", "1")
    got = json.loads(js)
    assert got["utterances"] == 2 and got["beam"] == 1 and 0 <= got["valid_exact_match"] <= 1


def test_translate_reads_audio_files_and_test_lines(tsv_run):
    root, out, _ = tsv_run
    code, printed, err = _main("translate", out, str(root / "test" / "1.wav"), "test:1", "--threads", "1")
    assert code == 0, err
    a, b = printed.rstrip("\n").split("\n")
    assert a == b and a.count("\t") == 1  # the file and test:1 are the same audio
    code, _, err = _main("translate", out, str(root / "nope.wav"))
    assert code != 0 and "line 1: no such audio file" in err and "nope.wav" in err
    code, _, err = _main("translate", out, "test:9")
    assert code != 0 and "the test split has utterances 0-2" in err


def test_viz_draws_the_alignment_over_the_spectrogram(tsv_run):
    root, out, _ = tsv_run
    code, printed, err = _main("viz", out, "--index", "2", "--out", root / "viz", "--threads", "1")
    assert code == 0, err
    png, page = root / "viz" / "speech_alignment.png", root / "viz" / "speech_alignment.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "reference: day 2" in page.read_text()
    assert "input:  test utterance 2" in printed and "reference: day 2  →  2000-01-03" in printed
    assert "attention peak moves backwards at" in printed
    code, _, err = _main("viz", out, "--index", "7", "--out", root / "viz")
    assert code != 0 and "the test split has 3 utterances (0-2); got 7" in err


def test_resume_with_more_epochs_stretches_the_schedule(tsv_run, tmp_path):
    root, out, _ = tsv_run
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(out, ck)
    args = ["train", "speech", "--train", root / "train.tsv", "--valid", root / "valid.tsv", "--test",
            root / "test.tsv", "--hidden-dim", "16", "--beam", "1", "--threads", "1", "--no-progress", "--out", ck]
    code, printed, err = _main(*args, "--epochs", "3", "--resume")
    assert code == 0, err
    assert "resuming" in printed and "after epoch 2" in printed
    cfg = json.loads((ck / "config.json").read_text())
    assert len(cfg["history"]["loss"]) == 3 and cfg["train"]["epochs"] == 3


def test_bad_options_have_clear_errors(tmp_path):
    code, _, err = _main("train", "speech", "--train", tmp_path / "a.tsv", "--out", tmp_path / "o")
    assert code != 0 and "--train needs --valid and --test too" in err
    code, _, err = _main("train", "speech", "--languages", "xx", "--out", tmp_path / "o")
    assert code != 0 and "--languages" in err and "invalid choice" in err
    (tmp_path / "a.tsv").write_text("x.wav\thi\n")
    code, _, err = _main("train", "speech", "--train", tmp_path / "a.tsv", "--valid", tmp_path / "a.tsv", "--test",
                         tmp_path / "a.tsv", "--out", tmp_path / "o", "--no-progress")
    assert code != 0 and "--train: " in err and "line 1: no such audio file" in err


@needs_espeak
def test_train_on_generated_speech_end_to_end(tmp_path):
    out = tmp_path / "gen"
    code, printed, err = _main("train", "speech", "--n-train", "12", "--n-valid", "2", "--n-test", "3",
                               "--languages", "en", "es", "--epochs", "1", "--hidden-dim", "16", "--beam", "1",
                               "--threads", "1", "--no-progress", "--out", out)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["languages"] == ["en", "es"] and cfg["sizes"] == {"train": 12, "valid": 2, "test": 3}
    assert "test date exact match" in printed.strip().splitlines()[-1] or "test number exact match" in printed
    code, again, err = _main("eval", out, "--threads", "1")
    assert code == 0, err
    assert again.strip() == printed.strip().splitlines()[-1]
    code, shown, err = _main("viz", out, "--index", "0", "--out", tmp_path / "v", "--threads", "1")
    assert code == 0, err
    assert "speaker " in shown and (tmp_path / "v" / "speech_alignment.png").is_file()
    vocab = json.loads((out / "config.json").read_text())["vocab"]
    assert "<text>" in vocab and "<norm>" in vocab and "-" in vocab


def test_guided_attention_loss_by_hand():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(2, 5, 7), -1)
    out_len, in_len = torch.tensor([5, 3]), torch.tensor([7, 4])
    total, steps = 0.0, 0
    for b in range(2):
        for n in range(int(out_len[b])):
            for t in range(7):
                d = n / int(out_len[b]) - t / int(in_len[b])
                total += float(w[b, n, t]) * (1 - np.exp(-d * d / (2 * 0.3 ** 2)))
            steps += 1
    got = recipe.guided_attention_loss(w, out_len, in_len, width=0.3)
    assert float(got) == pytest.approx(total / steps, rel=1e-5)


def test_the_step_adds_the_ctc_and_guide_terms_with_their_weights():
    utts = _utts(3)
    vocab = recipe.build_vocab(utts)
    torch.manual_seed(0)
    m = recipe.build_model(vocab, 8, dict(hidden_dim=16, att_dim=8, emb_dim=8, dropout=0.0))
    batch = recipe.make_batch(utts, vocab)
    base = recipe.make_step(m, 0.0, ctc_weight=0.0, guide_weight=0.0)(batch)
    layers = m.listener.layer_outputs(batch.feats, batch.lengths)
    first, n = layers[0]
    lengths = torch.tensor([len(u.transcript) for u in utts])
    ctc = F.ctc_loss(torch.log_softmax(m.ctc(first), -1).transpose(0, 1), batch.text_out, n, lengths, blank=0,
                     zero_infinity=True)
    with_ctc = recipe.make_step(m, 0.0, ctc_weight=0.5, guide_weight=0.0)(batch)
    torch.testing.assert_close(with_ctc, base + 0.5 * ctc)
    out = m(batch.feats, batch.lengths, batch.text_in)
    guide = recipe.guided_attention_loss(out.weights, lengths + 1, layers[-1][1], 0.2)
    with_guide = recipe.make_step(m, 0.0, ctc_weight=0.0, guide_weight=2.0)(batch)
    torch.testing.assert_close(with_guide, base + 2.0 * guide)
