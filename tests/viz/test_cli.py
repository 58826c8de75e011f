"""``attnkit viz CHECKPOINT --text ... --out DIR``: the page, pictures and tables for a dates
Seq2Seq and a Transformer translation checkpoint, the same whichever backend computed the
attention, and clear errors for missing or corrupt checkpoints."""

import json
import re
import struct

import pytest
import torch

import attnkit
from attnkit.checkpoint import save_checkpoint
from attnkit.tasks.dates import generate, tokens
from attnkit.tasks.vocab import Vocab
from attnkit.viz.cli import main
from attnkit.viz.grid import head_grid_size
from attnkit.viz.heatmap import alignment_size


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return struct.unpack(">II", data[16:24])


def page_data(path):
    return json.loads(re.search(r'id="attnkit-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S).group(1))


@pytest.fixture(scope="module")
def dates_ckpt(tmp_path_factory):
    """An untrained dates checkpoint (the viz does not care how good the model is)."""
    torch.manual_seed(0)
    splits = generate(n_train=300, n_valid=5, n_test=5, seed=1)
    src_vocab = Vocab.build(tokens(e.source) for e in splits["train"])
    tgt_vocab = Vocab.build(tokens(e.target) for e in splits["train"])
    cfg = dict(src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), emb_dim=16, hidden_dim=32, rnn="gru",
               attention="luong-general", input_feeding=True, num_layers=1, dropout=0.0, pad_id=0, bos_id=1, eos_id=2)
    model = attnkit.models.get("Seq2Seq")(**cfg)
    d = tmp_path_factory.mktemp("dates")
    save_checkpoint(d, model=model, config={"task": "dates", "model": "Seq2Seq", "model_config": model.config,
                                            "src_vocab": src_vocab.to_json(), "tgt_vocab": tgt_vocab.to_json(),
                                            "train": {"max_len": 14}})
    return d


@pytest.fixture(scope="module")
def translation_ckpt(tmp_path_factory):
    from attnkit.tasks.subword import WordTokenizer

    torch.manual_seed(0)
    lines = ["a man rides a horse .", "two dogs play in the snow .", "a woman reads a book ."]
    src_tok = WordTokenizer.build(lines)
    tgt_tok = WordTokenizer.build(["ein mann reitet ein pferd .", "zwei hunde spielen im schnee ."])
    model = attnkit.models.get("Transformer")(len(src_tok), len(tgt_tok), d_model=16, num_heads=2,
                                             num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                                             dropout=0.1, max_len=64)
    d = tmp_path_factory.mktemp("multi30k")
    save_checkpoint(d, model=model, config={"task": "multi30k", "model": "Transformer", "model_config": model.config,
                                            "src_tokenizer": src_tok.to_config(), "tgt_tokenizer": tgt_tok.to_config(),
                                            "joint": False, "decode": {"max_len_a": 1.0, "max_len_b": 3}})
    return d


def test_dates_checkpoint_gives_the_page_pictures_and_tables(dates_ckpt, tmp_path, capsys):
    text = "14 juillet 1789"
    assert main([str(dates_ckpt), "--text", text, "--out", str(tmp_path), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"input:  {text}" in printed and f"wrote {tmp_path / 'attention.html'}" in printed
    data = page_data(tmp_path / "attention.html")
    (g,) = data["groups"]
    src = [("␣" if c == " " else c) for c in text]
    assert g["name"] == "attention" and g["keys"] == src
    T, S = len(g["queries"]), len(src)
    assert len(g["layers"]) == 1 and len(g["layers"][0]["w"][0]) == T and len(g["layers"][0]["w"][0][0]) == S
    assert dict(data["info"])["input"] == text
    assert png_size(tmp_path / "alignment.png") == alignment_size(src, g["queries"], title=True)
    assert png_size(tmp_path / "heads_attention.png") == head_grid_size(
        1, 1, T, S, query_tokens=g["queries"], key_tokens=src, layer_names=[layer["name"] for layer in g["layers"]])
    rows = (tmp_path / "alignment.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["target_index", "target", "source_index", "source", "weight"] and len(rows) == T + 1
    for line in rows[1:]:  # each target token's most-attended source token, from the page's own weights
        i, _, j, s, w = line.split("\t")
        row = g["layers"][0]["w"][0][int(i)]
        assert row.index(max(row)) == int(j) and src[int(j)] == s and abs(max(row) - float(w)) < 1e-3
    stats = (tmp_path / "stats.tsv").read_text(encoding="utf-8").splitlines()
    assert stats[0].startswith("group\tlayer\tname\thead\tentropy_nats") and len(stats) == 2


def test_dates_backends_give_the_same_page_and_refusals_are_clear(dates_ckpt, tmp_path, capsys):
    pages = {}
    for backend in ("reference", "tiled"):
        out = tmp_path / backend
        assert main([str(dates_ckpt), "--text", "3 March 2019", "--out", str(out), "--backend", backend,
                     "--no-png"]) == 0
        pages[backend] = page_data(out / "attention.html")
        assert dict(pages[backend]["info"])["backend"].startswith(backend)
        assert not (out / "alignment.png").exists()
    a, b = (pages[k]["groups"][0]["layers"][0]["w"] for k in ("reference", "tiled"))
    assert max(abs(x - y) for ha, hb in zip(a, b) for ra, rb in zip(ha, hb) for x, y in zip(ra, rb)) <= 1e-4
    capsys.readouterr()
    assert main([str(dates_ckpt), "--text", "3 March 2019", "--out", str(tmp_path / "s"), "--backend", "sdpa"]) == 2
    assert "backend 'sdpa' cannot serve this request: score 'general' is not a dot product" in capsys.readouterr().err


def test_transformer_on_sdpa_and_tiled_gives_the_same_views(translation_ckpt, tmp_path):
    pages = {}
    for backend in ("sdpa", "tiled"):
        out = tmp_path / backend
        assert main([str(translation_ckpt), "--text", "a man reads a book .", "--out", str(out), "--backend",
                     backend, "--flow", "--threads", "1"]) == 0
        pages[backend] = data = page_data(out / "attention.html")
        assert dict(data["info"])["backend"].startswith(backend)
        assert [g["name"] for g in data["groups"]] == ["encoder_layers.*.self_attn", "decoder_layers.*.self_attn",
                                                       "decoder_layers.*.cross_attn"]
        assert all(layer["backend"] == backend for g in data["groups"] for layer in g["layers"])
        enc = data["groups"][0]
        assert enc["queries"] == ["a", "man", "reads", "a", "book", ".", "</s>"]
        assert "rollout" in enc["derived"] and "flow" in enc["derived"]
        for name in ("encoder_layers_self_attn", "decoder_layers_self_attn", "decoder_layers_cross_attn"):
            assert png_size(out / f"heads_{name}.png")[0] > 300
        assert png_size(out / "alignment.png")[0] > 300
    for ga, gb in zip(pages["sdpa"]["groups"], pages["tiled"]["groups"]):
        assert ga["queries"] == gb["queries"] and ga["keys"] == gb["keys"]
        for la, lb in zip(ga["layers"] + [ga["derived"]["rollout"]], gb["layers"] + [gb["derived"]["rollout"]]):
            xa = torch.tensor(la.get("w", la.get("layers")))
            xb = torch.tensor(lb.get("w", lb.get("layers")))
            torch.testing.assert_close(xa, xb, atol=2e-4, rtol=0)


@pytest.mark.parametrize("breakage,message", [
    ("missing", "does not exist"),
    ("no-weights", "has no model.safetensors"),
    ("corrupt-weights", "are not a readable safetensors file"),
    ("corrupt-config", "is not valid JSON"),
    ("image-task", "attnkit viz reads text into the models of tasks dates, multi30k, sst2; .* is for task 'digits'"),
    ("wrong-weights", "does not match the model"),
])
def test_missing_or_corrupt_checkpoints_give_a_clear_error(dates_ckpt, tmp_path, capsys, breakage, message):
    import shutil

    ck = tmp_path / "ck"
    if breakage != "missing":
        shutil.copytree(dates_ckpt, ck)
    if breakage == "no-weights":
        (ck / "model.safetensors").unlink()
    elif breakage == "corrupt-weights":
        (ck / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif breakage == "corrupt-config":
        (ck / "config.json").write_text("{not json", encoding="utf-8")
    elif breakage in ("image-task", "wrong-weights"):
        cfg = json.loads((ck / "config.json").read_text(encoding="utf-8"))
        if breakage == "image-task":
            cfg["task"] = "digits"
        else:
            cfg["model_config"]["hidden_dim"] = 64
        (ck / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if breakage != "missing":  # hand-edited files: read as they are, not checked against checkpoint.json
        (ck / "checkpoint.json").unlink()
    assert main([str(ck), "--text", "1 May 2000", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit viz: error: ") and re.search(message, err), err
    assert not (tmp_path / "out" / "attention.html").exists()


def test_bad_arguments(dates_ckpt, tmp_path, capsys):
    assert main([str(dates_ckpt), "--text", "  ", "--out", str(tmp_path)]) == 2
    assert "--text must be a non-empty string" in capsys.readouterr().err
    assert main([str(dates_ckpt), "--text", "1 May", "--out", str(tmp_path), "--align-layer", "top"]) == 2
    assert "--align-layer must be an int or 'mean'; got 'top'" in capsys.readouterr().err
    assert main([str(dates_ckpt), "--text", "1 May", "--out", str(tmp_path), "--backend", "warp"]) == 2
    assert "--backend must be 'auto' or one of" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([str(dates_ckpt), "--text", "1 May", "--out", str(tmp_path), "--device", "cuda"]) == 2
        assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(dates_ckpt)])  # --text is required (argparse exits 2)


def test_sst2_classifier_shows_its_encoder_and_pooling(tmp_path, capsys):
    vocab = Vocab.build([["a", "great", "film"], ["a", "bad", "movie"]])
    torch.manual_seed(0)
    m = attnkit.models.get("AttentionClassifier")(num_classes=2, input="tokens", dim=16, depth=2, num_heads=2,
                                                  encoder="transformer", pooling="mlp", dropout=0.0, max_len=64,
                                                  pad_id=0, vocab_size=len(vocab))
    save_checkpoint(tmp_path / "ck", model=m, config={"task": "sst2", "model": "AttentionClassifier",
                                                      "model_config": m.config, "vocab": vocab.to_json()})
    assert main([str(tmp_path / "ck"), "--text", "A great film , truly", "--out", str(tmp_path / "o")]) == 0
    assert re.search(r"output: (positive|negative) \(p = 0\.\d{3}\)", capsys.readouterr().out)
    enc, pool = page_data(tmp_path / "o" / "attention.html")["groups"]
    words = ["a", "great", "film", ", (unk)", "truly (unk)"]
    assert enc["name"] == "encoder.layers.*.attn" and enc["queries"] == enc["keys"] == words and len(enc["layers"]) == 2
    assert pool["queries"] == ["[pool]"] and pool["keys"] == words
    assert "encoder.layers.*.attn" in pool["derived"]["rollout"]["note"]  # pooling composed with the encoder rollout
