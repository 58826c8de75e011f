"""The interactive page, read as a file: one self-contained document whose data is an escaped
JSON blob, whose only script is admitted by hash, and whose numbers are the analyses'."""

import base64
import hashlib
import json
import re

import pytest
import torch

import attnkit
from attnkit.viz import analysis
from attnkit.viz.collect import Group, Layer, assign_tokens, group_records
from attnkit.viz.view import attention_page, json_for_script, view_data

EVIL = ["<script>document.title='pwned'</script>", "\"onmouseover=\"document.title='pwned'",
        "<img src=x onerror=\"document.title='pwned'\">", "</script><script>document.title='pwned'</script>",
        "<!--", "&amp;", "\u2028"]


def transformer_groups(src_toks, tgt_toks, seed=0):
    torch.manual_seed(seed)
    model = attnkit.models.get("Transformer")(30, 30, d_model=16, num_heads=2, num_encoder_layers=2,
                                             num_decoder_layers=2, dim_feedforward=32, dropout=0.0).eval()
    src = torch.randint(4, 30, (1, len(src_toks)))
    tgt = torch.randint(4, 30, (1, len(tgt_toks)))
    with torch.no_grad(), attnkit.capture() as rec:
        model(src, src == 0, tgt)
    groups = group_records(rec)
    assign_tokens(groups, src_toks, tgt_toks)
    return groups


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def blob(page):
    m = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', page, re.S)
    return m.group(1)


def test_user_text_is_data_never_markup():
    groups = transformer_groups(EVIL, ["<s>", "<b>x</b>", "y"])
    page = attention_page(groups, title="t <i>&</i>", info=[("input", "<script>x</script>")])
    text = blob(page)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    data = json.loads(text)
    assert data["groups"][0]["queries"] == EVIL and data["groups"][2]["keys"] == EVIL
    assert data["info"] == [["input", "<script>x</script>"]] and data["title"] == "t <i>&</i>"
    assert "<title>t &lt;i&gt;&amp;&lt;/i&gt;</title>" in page
    # outside the blob, no user text at all: the page is the same for any tokens of the same shape
    bland = attention_page(transformer_groups(["s"] * len(EVIL), ["a", "b", "c"]), title="t")
    strip = lambda p: re.sub(r'(<script type="application/json" id="attnkit-data">).*?(</script>)', r"\1\2",  # noqa
                             re.sub(r"<title>.*?</title>", "", p), flags=re.S)
    assert strip(page) == strip(bland)
    assert json_for_script({"a": "</script><!--\u2029"}) == '{"a":"\\u003c/script\\u003e\\u003c!--\\u2029"}'
    with pytest.raises(ValueError):
        json_for_script({"a": float("nan")})


def test_one_file_one_script_admitted_by_its_hash_and_nothing_loaded():
    page = attention_page(transformer_groups(list("abcd"), list("xyz")), title="x")
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert [a for a, _ in scripts] == [' type="application/json" id="attnkit-data"', ""]
    digest = base64.b64encode(hashlib.sha256(scripts[1][1].encode()).digest()).decode()
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1)
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert not re.search(r"\b(src|href)\s*=", page.replace(blob(page), "")) and "<link" not in page
    assert "url(" not in page and "@import" not in page
    assert set(re.findall(r"https?://[^\s'\"]+", page)) <= {"http://www.w3.org/2000/svg"}  # a namespace, not a fetch


def test_the_pages_numbers_are_the_captured_weights_and_their_rollout():
    src, tgt = ["a", "b", "c", "d", "</s>"], ["<s>", "x", "y"]
    groups = transformer_groups(src, tgt)
    data = view_data(groups, flow=True)
    enc, dec, cross = data["groups"]
    assert [g["name"] for g in data["groups"]] == ["encoder_layers.*.self_attn", "decoder_layers.*.self_attn",
                                                   "decoder_layers.*.cross_attn"]
    for gd, g in zip(data["groups"], groups):
        for ld, layer in zip(gd["layers"], g.layers):
            torch.testing.assert_close(f64(ld["w"]), layer.weights.double(), atol=5.1e-5, rtol=0)
            assert ld["heads"] == [0, 1] and ld["backend"] in attnkit.backends.names()
    R = analysis.rollout(groups[0].stack(), cumulative=True)
    torch.testing.assert_close(f64(enc["derived"]["rollout"]["layers"]), R, atol=5.1e-5, rtol=0)
    F = analysis.flow(groups[0].stack())
    torch.testing.assert_close(f64(enc["derived"]["flow"]["layers"][0]), F, atol=5.1e-5, rtol=0)
    # cross-attention rollout: each layer's head mean times the encoder's full rollout
    for k, layer in enumerate(groups[2].layers):
        want = layer.weights.double().mean(0) @ R[-1]
        torch.testing.assert_close(f64(cross["derived"]["rollout"]["layers"][k]), want, atol=3e-4, rtol=0)
    assert "encoder_layers.*.self_attn" in cross["derived"]["rollout"]["note"]
    assert "flow" not in cross["derived"]
    # statistics shown on the head buttons
    ent = analysis.head_entropy(groups[0].layers[1].weights)
    assert [s["entropy"] for s in enc["stats"][1]] == pytest.approx(ent.tolist(), abs=1e-4)


def test_partial_captures_long_inputs_and_bad_arguments():
    w = torch.softmax(torch.randn(1, 2, 6), -1)
    g = Group("g", [Layer("g", w, (3,), (1, 4), num_queries=6)], list("abcdef"), list("abcdef"))
    data = view_data([g], flow=True)
    rows = data["groups"][0]["layers"][0]["w"][0]
    assert [sum(r) > 0 for r in rows] == [False, True, False, False, True, False]  # rows not captured are zeros
    d = data["groups"][0]["derived"]
    assert "rollout" not in d and "every row" in d["rollout_unavailable"]  # a partial capture: no rollout
    sq = Group("s", [Layer("s", torch.softmax(torch.randn(2, 5, 5), -1), (0, 1), tuple(range(5)))])
    d = view_data([sq], flow=True, flow_max_tokens=3)["groups"][0]["derived"]
    assert "rollout" in d and "flow" not in d and "at most 3 tokens; this one has 5" in d["flow_unavailable"]
    with pytest.raises(TypeError, match="groups must be a non-empty sequence"):
        view_data([])
    with pytest.raises(TypeError, match=r"info must be \(label, text\) pairs of strings"):
        view_data([sq], info=[("a", 1)])
