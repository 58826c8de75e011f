"""Image captioning (Show, Attend and Tell): the generated scenes, the Karpathy-split reader, the
metrics against hand computations and the COCO evaluation's CIDEr-D values, the model's decoding
and training steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnkit.models.captioner import ShowAttendTell, doubly_stochastic_penalty
from attnkit.tasks.captioning import recipe
from attnkit.tasks.captioning.data import (CANVAS, COLOURS, OBJECT, SHAPES, Caption, Scene, SceneObject,
                                           generate_scenes, read_karpathy)
from attnkit.tasks.captioning.metrics import (attention_correctness, bleu4, cider_d, ground_words,
                                              mass_in_box)


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(n_train=40, n_valid=5, n_test=20, seed=3, digits="sklearn")


# -- data -------------------------------------------------------------------------------------------
def test_scenes_are_reproducible_and_grounded(scenes):
    again = generate_scenes(n_train=40, n_valid=5, n_test=20, seed=3, digits="sklearn")
    assert [c.text for s in again["train"] for c in s.captions] == [c.text for s in scenes["train"] for c in s.captions]
    assert torch.equal(again["test"][4].image, scenes["test"][4].image)
    other = generate_scenes(n_train=40, n_valid=5, n_test=20, seed=4, digits="sklearn")
    assert [c.text for c in other["train"][0].captions] != [c.text for c in scenes["train"][0].captions] or \
        not torch.equal(other["train"][0].image, scenes["train"][0].image)
    for s in scenes["train"] + scenes["test"]:
        assert s.image.shape == (3, CANVAS, CANVAS) and 0 <= float(s.image.min()) and float(s.image.max()) <= 1
        assert 3 <= len(s.captions) <= 5 and len(s.objects) == 2 and s.objects[0].words != s.objects[1].words
        a, b = (o.box for o in s.objects)
        for x0, y0, x1, y1 in (a, b):
            assert 0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS and x1 - x0 == OBJECT == y1 - y0
        assert a[2] + 4 <= b[0] or a[3] + 4 <= b[1]        # apart: side by side or one above the other
        for c in s.captions:
            named = [(c.words[i], o) for i, o in c.grounding]
            # every word that names an object is grounded to that object, and nothing else is
            assert [w for w, _ in named] == [w for w in c.words if w in SHAPES or w in COLOURS or w.isdigit()]
            for w, o in named:
                assert w in s.objects[o].words
        for o in s.objects:  # the pixels inside the box are the object's: not black
            x0, y0, x1, y1 = o.box
            assert float(s.image[:, y0:y1, x0:x1].sum()) > 5


def test_captions_say_where_the_objects_are(scenes):
    for s in scenes["train"]:
        (a, b) = s.objects
        texts = {c.text for c in s.captions}
        A, B = " ".join(a.words), " ".join(b.words)
        if a.box[2] + 4 <= b.box[0]:
            assert f"a {A} to the left of a {B}" in texts and f"a {B} to the right of a {A}" in texts
        else:
            assert a.box[3] + 4 <= b.box[1]
            assert f"a {A} above a {B}" in texts and f"a {B} below a {A}" in texts


def _png(path, colour=(255, 0, 0), size=(10, 7)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _karpathy(tmp_path, images=None):
    images = images if images is not None else [
        {"filename": "a.png", "filepath": "imgs", "split": "train", "sentences": [{"tokens": ["A", "red", "box"]}]},
        {"filename": "b.png", "filepath": "imgs", "split": "restval", "sentences": [{"tokens": ["a", "dog"]},
                                                                                    {"tokens": ["dog"]}]},
        {"filename": "c.png", "filepath": "imgs", "split": "val", "sentences": [{"tokens": ["a", "cat"]}]},
        {"filename": "d.png", "split": "test", "sentences": [{"tokens": ["two", "cats"]}, {"tokens": []}]},
    ]
    for e in images:
        _png(tmp_path / e.get("filepath", "") / e["filename"])
    p = tmp_path / "dataset_flickr8k.json"
    p.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return p


def test_karpathy_reader_reads_splits_tokens_and_images(tmp_path):
    splits = read_karpathy(_karpathy(tmp_path), tmp_path, size=16)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "valid": 1, "test": 1}
    assert splits["train"][0].captions[0].words == ["a", "red", "box"]      # lower-cased
    assert [c.text for c in splits["train"][1].captions] == ["a dog", "dog"]
    assert [c.text for c in splits["test"][0].captions] == ["two cats"]    # the empty sentence is dropped
    img = splits["train"][0].image
    assert img.shape == (3, 16, 16) and abs(float(img[0].mean()) - 1.0) < 1e-6 and float(img[1:].abs().max()) == 0
    assert splits["train"][0].objects == [] and splits["valid"][0].name == "imgs/c.png"


@pytest.mark.parametrize("break_it,message", [
    (lambda p, root: p.write_text('{"images": [\n  {"filename": "a.png",, }]}'), r"is not valid JSON \(line 2, column"),
    (lambda p, root: p.write_text('{"pictures": []}'), 'has no "images" list'),
    (lambda p, root: p.write_text(json.dumps({"images": [{"filename": "a.png", "split": "train"}]})),
     r"image 0 lacks a valid 'sentences' field"),
    (lambda p, root: p.write_text(json.dumps({"images": [{"filename": "a.png", "split": "dev", "sentences": []}]})),
     r"image 0 lacks a valid 'dev' field"),
    (lambda p, root: (root / "imgs" / "a.png").unlink(), r"no such image .*a\.png"),
    (lambda p, root: (root / "imgs" / "a.png").write_bytes(b"not a picture"), r"cannot read image .*a\.png"),
])
def test_karpathy_reader_bad_input_is_one_clear_error(tmp_path, break_it, message):
    p = _karpathy(tmp_path)
    break_it(p, tmp_path)
    with pytest.raises(ValueError, match=message):
        read_karpathy(p, tmp_path)


def test_karpathy_reader_missing_paths_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--karpathy-json: no such file"):
        read_karpathy(tmp_path / "nope.json", tmp_path)
    with pytest.raises(ValueError, match="--images: no such folder"):
        read_karpathy(_karpathy(tmp_path), tmp_path / "nowhere")


# -- metrics ----------------------------------------------------------------------------------------
HYPS = ["a red square to the left of a 7", "a 3 above a blue circle", "a green triangle and a 5 on the grass",
        "two dogs play in the snow"]
REFS = [["a red square to the left of a 7", "a 7 to the right of a red square", "a red square and a 7"],
        ["a blue circle below a 3", "a 3 above a blue circle", "a 3 on top of a blue circle", "a 3 and a blue circle"],
        ["a 5 to the right of a green triangle", "a green triangle left of a 5", "a green triangle and a 5"],
        ["two dogs are playing in the snow", "dogs running through snow",
         "a brown dog and a black dog play in the snow"]]


def test_cider_d_equals_the_coco_caption_evaluation():
    """Reference values from the COCO caption evaluation code (pycocoevalcap's CiderScorer) run on
    this corpus."""
    corpus, per_image = cider_d(HYPS, REFS)
    assert corpus == pytest.approx(4.624248748030737, rel=1e-12)
    assert per_image == pytest.approx([6.08217528133177, 5.45504162546691, 4.5277409285150645, 2.4320371568092005],
                                      rel=1e-12)


def test_cider_d_by_hand_on_two_images():
    # N = 2 images: idf = log 2 for an n-gram in one image's references, 0 for one in both
    corpus, (s1, s2) = cider_d(["a b", "c d"], [["a b"], ["c e"]])
    # image 1: unigrams a, b (idf log 2 each) and bigram "a b" match exactly: cos = 1 for n = 1, 2;
    # n = 3, 4 have no n-grams: 0. Score = 10 * (1 + 1 + 0 + 0) / 4 = 5
    assert s1 == pytest.approx(5.0)
    # image 2: unigram c matches (d, e do not); cos_1 = (log2)^2 / (sqrt(2) log2)^2 = 1/2; no bigram match
    assert s2 == pytest.approx(10 * 0.5 / 4)
    assert corpus == pytest.approx((s1 + s2) / 2)


def test_bleu4_perfect_partial_and_refs_of_different_counts():
    assert bleu4(HYPS[:2], REFS[:2]) == pytest.approx(1.0)
    assert bleu4(["x y z w"], [["a b c d"]]) == 0.0
    assert 0 < bleu4(HYPS, REFS) < 1


def test_ground_words_and_mass_in_box_by_hand():
    objs = [SceneObject("3", None, (0, 0, 20, 20)), SceneObject("circle", "blue", (40, 40, 60, 60))]
    assert ground_words("a 3 above a blue circle".split(), objs) == [(1, 0), (4, 1), (5, 1)]
    assert ground_words("a 5 above a red circle".split(), objs) == [(5, 1)]  # a wrong digit, a wrong colour
    # a 2 x 2 grid over 8 pixels: cells of 4 x 4; the box (2, 0)-(6, 4) covers half of cells 0 and 1
    a = torch.tensor([0.6, 0.2, 0.2, 0.0])
    assert mass_in_box(a, (2, 2), 8, (2, 0, 6, 4)) == pytest.approx(0.5 * 0.6 + 0.5 * 0.2)
    assert mass_in_box(a, (2, 2), 8, (0, 0, 8, 8)) == pytest.approx(1.0)
    # attention correctness: the mean over grounded words of their step's mass in the box
    alphas = torch.zeros(6, 4)
    alphas[1, 0] = 1.0                       # "3": all on cell 0, inside the 3's box (0,0)-(4,4) of 8 px
    alphas[4] = torch.tensor([0, 0, 0, 1.0])  # "blue": on cell 3, inside the circle's box
    alphas[5] = torch.tensor([0.5, 0, 0, 0.5])  # "circle": half inside
    objs8 = [SceneObject("3", None, (0, 0, 4, 4)), SceneObject("circle", "blue", (4, 4, 8, 8))]
    value, n = attention_correctness(["a 3 above a blue circle".split()], [alphas], [objs8], (2, 2), 8)
    assert n == 3 and value == pytest.approx((1.0 + 1.0 + 0.5) / 3)


# -- the model --------------------------------------------------------------------------------------
def _tiny(n=8):
    splits = generate_scenes(n_train=n, n_valid=1, n_test=1, seed=0, digits="sklearn")
    return splits["train"]


def test_doubly_stochastic_penalty_by_hand():
    alphas = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])   # (1, T=3, L=2)
    real = torch.tensor([[True, True, False]])
    # real steps sum to (1.5, 0.5): (1 - 1.5)^2 + (1 - 0.5)^2 = 0.5
    assert float(doubly_stochastic_penalty(alphas, real)) == pytest.approx(0.5)


def _briefly_trained(attention, n=6, steps=40):
    """A small model trained a few steps on ``n`` scenes: its captions differ from image to image."""
    torch.manual_seed(0)
    train = _tiny(n)
    vocab = recipe.build_vocab(train)
    model = recipe.build_model(vocab, attention, CANVAS, {"hidden_dim": 64, "dropout": 0.0})
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    step = recipe.make_step(model, doubly_stochastic=0.0)
    batch = recipe.batches(train, vocab, n, 0, epoch=0)[0]
    for _ in range(steps):
        loss = step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), torch.stack([s.image for s in train])


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_beam_one_equals_greedy(attention):
    m, x = _briefly_trained("soft")
    if attention == "hard":  # the same parameters (names and shapes) under hard attention: argmax locations
        vocab_size = m.vocab_size
        hard = ShowAttendTell(vocab_size, bos_id=m.bos_id, eos_id=m.eos_id, attention="hard", image_size=CANVAS,
                              **{**recipe.MODEL_DEFAULTS, "hidden_dim": 64})
        hard.load_state_dict(m.state_dict())
        m = hard.eval()
    g, ga = m.greedy(x, max_len=12)
    b, ba = m.beam_search(x, beam=1, max_len=12)
    assert g == b and len({tuple(s) for s in g}) > 1
    for p, q in zip(ga, ba):
        assert torch.allclose(p, q)
        assert p.shape[1] == 64 and torch.allclose(p.sum(-1), torch.ones(len(p)))


def test_wider_beam_finds_a_caption_at_least_as_likely():
    torch.manual_seed(2)
    m = ShowAttendTell(9, bos_id=1, eos_id=2, image_size=16).eval()
    x = torch.rand(3, 3, 16, 16)

    def logp(seq, image):
        words = torch.tensor([[1] + seq])
        target = torch.tensor(seq + [2])
        with torch.no_grad():
            out = m(image.unsqueeze(0), words)
        return float(torch.log_softmax(out.logits[0], -1).gather(1, target.view(-1, 1)).sum())

    g, _ = m.beam_search(x, beam=1, max_len=5)
    b, _ = m.beam_search(x, beam=4, max_len=5)
    for i in range(3):
        assert logp(b[i], x[i]) >= logp(g[i], x[i]) - 1e-5


def test_soft_attention_overfits_a_tiny_batch():
    torch.manual_seed(0)
    train = _tiny(8)
    for s in train:  # one caption each: the batch is a fixed target
        s.captions = s.captions[:1]
    vocab = recipe.build_vocab(train)
    model = recipe.build_model(vocab, "soft", CANVAS, {"dropout": 0.0, "hidden_dim": 128})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = recipe.make_step(model, doubly_stochastic=0.0)
    batch = recipe.batches(train, vocab, 8, 0, epoch=0)[0]
    first = None
    for _ in range(150):
        loss = step(batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.05 * first
    model.eval()
    dec = recipe.decode(model, train, vocab, beam=1)
    assert [" ".join(w) for w in dec.words] == [s.captions[0].text for s in train]


def test_hard_attention_trains_its_attention_with_reinforce():
    """The location samples carry no gradient: only the REINFORCE term reaches the attention MLP."""
    torch.manual_seed(0)
    train = _tiny(6)
    vocab = recipe.build_vocab(train)
    model = recipe.build_model(vocab, "hard", CANVAS)
    model.expected_share = 0.0  # every step samples
    batch = recipe.batches(train, vocab, 6, 0, epoch=0)[0]
    score_params = list(model.attend.score.parameters())
    for weight, expect_grad in ((1.0, True), (0.0, False)):
        model.zero_grad()
        state = recipe.StepState(baseline=-10.0)  # a baseline far from the reward: a strong signal
        recipe.make_step(model, doubly_stochastic=0.0, reinforce_weight=weight, entropy_weight=0.0,
                         state=state)(batch).backward()
        grads = [p.grad for p in score_params]
        has = any(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert has == expect_grad
    out = model(batch[0], batch[1])
    assert out.log_probs.shape == batch[1].shape and (out.log_probs <= 0).all()
    onehot = (out.alphas > 0).sum(-1)
    assert (onehot > 1).all()  # alphas report the distribution, not the one-hot sample


def test_hard_attention_baseline_moves_toward_the_reward():
    torch.manual_seed(0)
    train = _tiny(4)
    vocab = recipe.build_vocab(train)
    model = recipe.build_model(vocab, "hard", CANVAS)
    state = recipe.StepState()
    step = recipe.make_step(model, state=state)
    batch = recipe.batches(train, vocab, 4, 0, epoch=0)[0]
    step(batch)
    first = state.baseline
    assert first is not None and first < 0 and math.isfinite(first)
    state.baseline = first - 5.0
    step(batch)
    assert first - 5.0 < state.baseline < first  # 0.9 * old + 0.1 * reward


def test_model_refuses_bad_configuration():
    with pytest.raises(ValueError, match="attention must be one of"):
        ShowAttendTell(10, bos_id=1, eos_id=2, attention="glance")
    with pytest.raises(ValueError, match="image_size must be a multiple of 8; got 30"):
        ShowAttendTell(10, bos_id=1, eos_id=2, image_size=30)
    with pytest.raises(ValueError, match="beam must be"):
        ShowAttendTell(10, bos_id=1, eos_id=2, image_size=16).beam_search(torch.rand(1, 3, 16, 16), beam=0)


def test_scene_and_caption_types_hold_what_they_say():
    c = Caption(["a", "7"], [(1, 0)])
    s = Scene(torch.zeros(3, 8, 8), [c], [SceneObject("7", None, (0, 0, 4, 4))])
    assert c.text == "a 7" and s.objects[0].words == ["7"]
    assert SceneObject("circle", "red", (0, 0, 1, 1)).words == ["red", "circle"]


# -- the command line -------------------------------------------------------------------------------
SMALL = ["--epochs", "1", "--n-train", "48", "--n-valid", "6", "--n-test", "10", "--digits", "sklearn",
         "--no-progress", "--threads", "1"]


def test_train_eval_viz_from_the_command_line(tmp_path, capsys):
    from attnkit import cli

    out = tmp_path / "cap"
    assert cli.main(["train", "captioning", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "test BLEU-4" in printed and "attention correctness" in printed and "(10 images, beam 3)" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "captioning" and cfg["attention"] == "soft" and cfg["data"]["digits"] == "sklearn"
    assert set(cfg["metrics"]) >= {"test_bleu4", "test_cider_d", "test_attention_correctness", "beam"}
    assert cli.main(["eval", str(out), "--threads", "1"]) == 0
    assert "test bleu4" in capsys.readouterr().out
    viz = tmp_path / "viz"
    assert cli.main(["viz", str(out), "--index", "3", "--out", str(viz)]) == 0
    printed = capsys.readouterr().out
    assert "input:  test image 3" in printed and "references: " in printed
    page = (viz / "caption_attention.html").read_text()
    assert (viz / "caption_attention.png").stat().st_size > 1000 and "const maps = [[" in page
    assert cli.main(["viz", str(out), "--index", "99", "--out", str(viz)]) == 2
    assert "--index: the test split has 10 images (0-9); got 99" in capsys.readouterr().err


def test_hard_attention_trains_from_the_command_line(tmp_path, capsys):
    from attnkit import cli

    out = tmp_path / "hard"
    assert cli.main(["train", "captioning", "--attention", "hard", "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "config.json").read_text())["attention"] == "hard"
    assert "test BLEU-4" in capsys.readouterr().out


def test_karpathy_data_trains_and_bad_input_is_one_line(tmp_path, capsys):
    from attnkit import cli

    p = _karpathy(tmp_path)
    out = tmp_path / "real"
    args = ["train", "captioning", "--out", str(out), "--karpathy-json", str(p), "--images", str(tmp_path),
            "--image-size", "16", "--epochs", "1", "--no-progress", "--threads", "1"]
    assert cli.main(args) == 0
    assert "attention correctness" not in capsys.readouterr().out  # real data has no boxes
    assert cli.main(["train", "captioning", "--out", str(tmp_path / "x"), "--karpathy-json", str(p)]) == 2
    assert "--karpathy-json needs --images" in capsys.readouterr().err
    p.write_text("{not json")
    assert cli.main(args[:3] + [str(tmp_path / "y")] + args[4:]) == 2
    err = capsys.readouterr().err
    assert "is not valid JSON (line 1, column 2" in err and err.count("\n") == 1
