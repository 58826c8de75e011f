"""VQA models and recipe: the stacked attention network's hops against a hand computation, the
Transformer's maps against its encoder's weights, padding and ``image_index`` invariances, both
models overfitting a tiny batch, the recipe's batches / prediction / grounding metric by hand, and
``attnkit train vqa`` / ``eval`` / ``translate`` / ``viz`` end to end (the data readers and metrics
are tests/tasks/test_vqa_data.py's)."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnkit import cli
from attnkit.checkpoint import Checkpoint, load_checkpoint
from attnkit.models.vqa import (GridEncoder, RelationalAttentionNetwork, StackedAttentionNetwork, VqaTransformer,
                                grid_side)
from attnkit.tasks.vqa import recipe
from attnkit.tasks.vqa.data import Question, VqaObject, VqaSplit, generate_sort_of_clevr
from attnkit.tasks.vqa.metrics import accuracy, vqa_accuracy

torch.set_num_threads(1)


# -- the models -------------------------------------------------------------------------------------
def _san(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=32, dim=16, att_dim=8, emb_dim=8, hops=3, width=8, dropout=0.0)
    return StackedAttentionNetwork(5, 20, **{**cfg, **kw}).eval()


def _transformer(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=32, dim=16, depth=3, num_heads=4, width=8, max_words=10)
    return VqaTransformer(5, 20, **{**cfg, **kw}).eval()


def _relational(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=32, dim=16, att_dim=8, emb_dim=8, width=8)
    return RelationalAttentionNetwork(5, 20, **{**cfg, **kw}).eval()


MODELS = {"san": _san, "relational": _relational, "transformer": _transformer}


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)
    questions = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 0], [11, 0, 0, 0]])[:b]
    return images, questions


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_maps_are_distributions_at_every_hop(name):
    model = MODELS[name]()
    images, questions = _inputs()
    with torch.no_grad():
        out = model(images, questions)
    assert grid_side(32, 4) == 2 and grid_side(75, 4) == 5 and grid_side(64, 4) == 4
    assert GridEncoder(75, 8, width=4)(torch.zeros(2, 3, 75, 75, dtype=torch.uint8)).shape == (2, 25, 8)
    assert model.grid == (2, 2)
    hops = 2 if name == "relational" else 3
    assert out.logits.shape == (3, 5) and out.maps.shape == (3, hops, 4)   # hops / layers, a 2 x 2 grid
    assert bool((out.maps >= 0).all())
    assert torch.allclose(out.maps.sum(-1), torch.ones(3, hops), atol=1e-6)
    # the maps differ from question to question and from hop to hop: they are computed, not uniform
    assert not torch.allclose(out.maps[0], out.maps[1], atol=1e-4)
    assert not torch.allclose(out.maps[:, 0], out.maps[:, 1], atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_padding_does_not_change_the_answer(name):
    model = MODELS[name]()
    images, questions = _inputs()
    padded = torch.cat([questions, torch.zeros(3, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        a, b = model(images, questions), model(images, padded)
        other = model(images, torch.tensor([[4, 5, 6, 12], [8, 9, 10, 0], [11, 0, 0, 0]]))
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.maps, b.maps, atol=1e-5)
    assert not torch.allclose(a.logits[0], other.logits[0], atol=1e-4)   # a real word does change it
    assert torch.allclose(a.logits[1:], other.logits[1:], atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_image_index_equals_repeating_the_images(name):
    model = MODELS[name]()
    images, _ = _inputs()
    questions = torch.tensor([[4, 5, 0], [6, 7, 8], [9, 0, 0], [10, 11, 0], [12, 13, 14], [4, 0, 0]])
    index = torch.tensor([2, 0, 0, 1, 2, 1])
    with torch.no_grad():
        once = model(images, questions, index)
        repeated = model(images[index], questions)
    assert torch.allclose(once.logits, repeated.logits, atol=1e-5)
    assert torch.allclose(once.maps, repeated.maps, atol=1e-6)
    assert once.maps.shape == (6, 2 if name == "relational" else 3, 4)


@pytest.mark.parametrize("name", MODELS)
def test_need_maps_false_gives_no_maps_and_the_same_logits(name):
    model = MODELS[name]()
    images, questions = _inputs()
    with torch.no_grad():
        with_maps, without = model(images, questions), model(images, questions, need_maps=False)
    assert without.maps is None and with_maps.maps is not None
    assert torch.allclose(with_maps.logits, without.logits, atol=1e-6)


def test_uint8_images_are_scaled_to_unit_range():
    model = _san()
    images, questions = _inputs()
    with torch.no_grad():
        a = model(images, questions).logits
        b = model(images.float() / 255, questions).logits
        c = model(images.float(), questions).logits          # a float image is taken as it is
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


def test_san_hops_equal_the_hand_computation():
    model = _san(hops=2)
    images, questions = _inputs()
    with torch.no_grad():
        out = model(images, questions)
        v = model.encoder(images)                            # (B, L, D)
        # u_0: the LSTM's last state over each question's real words, run here one question at a time
        u = torch.stack([model.lstm(model.embed(q[q != 0])[None])[1][0][-1, 0] for q in questions])
        assert torch.allclose(u, model.question_vector(questions), atol=1e-6)
        for k, attend in enumerate(model.hops):
            s = attend.score
            # e_i = w^T tanh(W_q u + W_k v_i + b)
            e = torch.tanh((u @ s.query_proj.weight.T)[:, None] + v @ s.key_proj.weight.T + s.key_proj.bias) \
                @ s.v.weight[0]                              # (B, L)
            p = torch.softmax(e, -1)
            assert torch.allclose(out.maps[:, k], p, atol=1e-6), f"hop {k + 1}"
            u = u + (p[..., None] * v).sum(1)                # u_k = u_{k-1} + sum_i p_i v_i
        assert torch.allclose(out.logits, model.head(u), atol=1e-5)


def test_relational_hops_and_relation_term_equal_the_hand_computation():
    model = _relational()
    images, questions = _inputs()
    with torch.no_grad():
        out = model(images, questions)
        v = model.encoder(images)                            # (B, L, D)
        B, L, D = v.shape
        # u_0 = LSTM last state over the real words + W_b (mean of the real words' embeddings)
        u = torch.stack([model.lstm(model.embed(q[q != 0])[None])[1][0][-1, 0]
                         + model.bag(model.embed(q[q != 0]).mean(0)) for q in questions])
        assert torch.allclose(u, model.question_vector(questions), atol=1e-6)
        d = model.find_q.out_features
        p1 = torch.softmax((model.find_q(u)[:, None] * model.find_k(v)).sum(-1) / d ** 0.5, -1)   # hop 1
        assert torch.allclose(out.maps[:, 0], p1, atol=1e-6)
        s1 = (p1[..., None] * v).sum(1)
        u1 = u + s1
        # the cells' (x, y), row-major on the 2 x 2 grid, and each cell's offset from the subject
        xy = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
        a = (p1[..., None] * xy).sum(1)                      # (B, 2): where hop 1 looked
        g = torch.stack([torch.stack([torch.cat([xy[i] - a[b], ((xy[i] - a[b]) ** 2).sum()[None]])
                                      for i in range(L)]) for b in range(B)])           # (B, L, 3)
        keys = torch.cat([v, g], -1)
        sc = model.relate.score                              # hop 2: w^T tanh(W u_1 + V [v_i; g_i] + b)
        e = torch.tanh((u1 @ sc.query_proj.weight.T)[:, None] + keys @ sc.key_proj.weight.T + sc.key_proj.bias) \
            @ sc.v.weight[0]
        p2 = torch.softmax(e, -1)
        assert torch.allclose(out.maps[:, 1], p2, atol=1e-6)
        s2 = (p2[..., None] * v).sum(1)
        r = torch.stack([sum(model.f(torch.cat([u1[b], s1[b], v[b, i], g[b, i]])) for i in range(L)) / L
                         for b in range(B)])
        assert torch.allclose(out.logits, model.head(torch.cat([u, s1, s2, r], -1)), atol=1e-5)


def test_every_parameter_of_the_relational_network_gets_a_gradient():
    model = _relational().train()
    images, questions = _inputs()
    model(images, questions).logits.square().sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not dead, dead


def test_transformer_maps_are_cls_attention_over_the_regions():
    model = _transformer()
    images, questions = _inputs()
    seen = {}
    hook = model.transformer.register_forward_hook(lambda mod, args, output: seen.update(out=output))
    try:
        with torch.no_grad():
            out = model(images, questions)
    finally:
        hook.remove()
    h, weights = seen["out"]
    assert len(weights) == 3 and weights[0].shape == (3, 4, 1 + 4 + 4, 1 + 4 + 4)   # (B, H, T, T)
    L, lengths = 4, (questions != 0).sum(1)
    for k, w in enumerate(weights):
        raw = w[:, :, 0, 1:1 + L].mean(1)                   # CLS over the regions, averaged over heads
        assert bool((raw.sum(-1) < 1 - 1e-3).all())        # CLS also attends to itself and the words
        assert torch.allclose(out.maps[:, k], raw / raw.sum(-1, keepdim=True), atol=1e-6)
        for b in range(3):                                  # padded words get no attention
            assert float(w[b, :, :, 1 + L + int(lengths[b]):].abs().sum()) == 0
    assert torch.allclose(out.logits, model.head(h[:, 0]), atol=1e-6)


def test_models_refuse_bad_input_with_clear_messages():
    san, tr = _san(), _transformer()
    images, questions = _inputs()
    for m in (san, _relational(), tr):
        with pytest.raises(ValueError, match=r"questions must be token ids, a \(B, T\) integer tensor; got shape "
                                             r"\(3, 4\) dtype torch.float32"):
            m(images, questions.float())
        with pytest.raises(ValueError, match=r"questions must be token ids.*got shape \(4\) dtype torch.int64"):
            m(images, questions[0])
        with pytest.raises(ValueError, match="same batch size; got 2 images and 3 questions"):
            m(images[:2], questions)
        with pytest.raises(ValueError, match=r"image_index must be in \[0, 3\) \(rows of images\); got values in "
                                             r"\[0, 3\]"):
            m(images, questions, torch.tensor([0, 3, 1]))
        with pytest.raises(ValueError, match=r"image_index must be in \[0, 3\).*\[-1, 1\]"):
            m(images, questions, torch.tensor([0, -1, 1]))
        for bad in (torch.tensor([0, 1]), torch.tensor([[0], [1], [2]]), torch.tensor([0.0, 1.0, 2.0]),
                    torch.tensor([True, False, True]), [0, 1, 2]):
            with pytest.raises(ValueError, match=r"image_index must be a \(3,\) integer tensor, the image row"):
                m(images, questions, bad)
        with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\); got shape \(3, 3, 30, 30\)"):
            m(images[..., :30, :30], questions)
        with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\); got shape \(3, 32, 32\)"):
            m(images[0], questions)
    with pytest.raises(ValueError, match="questions have 11 words but the model was built with max_words = 10"):
        tr(images, torch.ones(3, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="dim must be divisible by num_heads; got dim = 18 and num_heads = 4"):
        VqaTransformer(5, 20, image_size=32, dim=18, num_heads=4)
    with pytest.raises(ValueError, match="hops must be > 0; got 0"):
        StackedAttentionNetwork(5, 20, image_size=32, hops=0)


# -- overfitting a tiny batch ------------------------------------------------------------------------
@pytest.mark.parametrize("name,config,lr", [
    ("san", dict(dim=32, att_dim=32, emb_dim=32, dropout=0.0), 1e-2),
    ("relational", dict(dim=32, att_dim=32, emb_dim=32), 3e-3),
    ("transformer", dict(dim=32, depth=2, num_heads=4, dropout=0.0), 1e-3),
])
def test_both_models_overfit_four_images(name, config, lr):
    torch.manual_seed(0)
    train = generate_sort_of_clevr(n_train=4, n_valid=1, n_test=1, seed=5)["train"]    # 80 questions
    vocab, answers = recipe.build_vocab(train), recipe.answer_list(train)
    model = recipe.build_model(name, vocab, answers, 75, config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, enc = recipe.make_step(model), recipe.encode(train, vocab, answers)
    acc, steps = 0.0, 0
    while acc < 1.0 and steps < 300:          # ~100 steps are enough for either
        for _ in range(20):
            model.train()
            (batch,) = recipe.batches(train, enc, 4, 0, steps)
            loss = step(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        acc = accuracy(recipe.predict(model, train, vocab, answers).answers, train.questions)
    assert acc == 1.0, f"{name}: {100 * acc:.1f}% after {steps} steps"


# -- the recipe ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clevr():
    return generate_sort_of_clevr(n_train=6, n_valid=1, n_test=3, seed=11)


def _image_row(split, image):
    return next(i for i in range(len(split.images)) if torch.equal(split.images[i], image))


def test_batches_cover_each_question_once_with_its_own_image(clevr):
    train = clevr["train"]
    vocab, answers = recipe.build_vocab(train), recipe.answer_list(train)
    enc = recipe.encode(train, vocab, answers)
    want = Counter((q.image, tuple(vocab.encode(q.words)), answers.index(q.answer)) for q in train.questions)
    orders = []
    for epoch in (0, 1, 2, None):
        got, order = Counter(), []
        bs = recipe.batches(train, enc, 4, seed=3, epoch=epoch)
        assert [len(b[0]) for b in bs] == [4, 2]
        for images, questions, index, targets in bs:
            rows = [_image_row(train, im) for im in images]
            order += rows
            assert questions.dtype == torch.long and index.dtype == torch.long
            assert len(questions) == len(index) == len(targets) == 20 * len(images)
            for q, i, a in zip(questions.tolist(), index.tolist(), targets.tolist()):
                got[(rows[i], tuple(w for w in q if w != vocab.pad_id), a)] += 1
        assert got == want                  # every question exactly once, with its own image and answer
        orders.append(order)
        if epoch is not None:               # the same seed and epoch: the same batches
            again = recipe.batches(train, enc, 4, seed=3, epoch=epoch)
            assert all(torch.equal(x, y) for b1, b2 in zip(bs, again) for x, y in zip(b1, b2))
    assert orders[3] == list(range(6))                           # no epoch: in order
    assert len({tuple(o) for o in orders[:3]}) == 3              # each epoch its own shuffle
    other = [_image_row(train, im) for b in recipe.batches(train, enc, 4, seed=4, epoch=0) for im in b[0]]
    assert other != orders[0]


def test_predict_answers_in_question_order(clevr):
    test = clevr["test"]
    vocab, answers = recipe.build_vocab(clevr["train"]), recipe.answer_list(clevr["train"])
    torch.manual_seed(0)
    model = recipe.build_model("san", vocab, answers, 75, dict(dim=16, att_dim=8, emb_dim=8, width=8))
    opt, step = torch.optim.Adam(model.parameters(), lr=1e-2), recipe.make_step(model)
    enc = recipe.encode(clevr["train"], vocab, answers)
    for epoch in range(30):                  # a little training: answers that differ from question to question
        for batch in recipe.batches(clevr["train"], enc, 6, 0, epoch):
            opt.zero_grad()
            step(batch).backward()
            opt.step()
    pred = recipe.predict(model, test, vocab, answers, maps=True, images_per_batch=2)
    assert not model.training and len(pred.answers) == len(pred.maps) == 60
    expect, maps = [], []
    with torch.no_grad():
        for q in test.questions:             # one question at a time
            out = model(test.images[q.image][None], torch.tensor([vocab.encode(q.words)]))
            expect.append(answers[int(out.logits.argmax())])
            maps.append(out.maps[0])
    assert len(set(expect)) >= 3, "a test of order needs answers that differ"
    assert pred.answers == expect
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(pred.maps, maps))
    some = recipe.predict(model, test, vocab, answers, questions=[45, 3, 22])
    assert some.answers == [expect[45], expect[3], expect[22]] and some.maps is None


def test_hop_grounding_by_hand():
    # an 8-pixel image, a 2 x 2 grid of 4-pixel cells; object 0 fills cell 0, object 1 half of cells 2 and 3
    split = VqaSplit(torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                     [Question(["q"], "square", 0, "non-relational", subject=0),
                      Question(["q"], "circle", 0, "relational", subject=1, target=0),
                      Question(["q"], "2", 0, "relational", subject=1)],
                     [[VqaObject("red", "square", (0, 0, 4, 4)), VqaObject("blue", "circle", (2, 4, 6, 8))]])
    maps = [torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]),
            torch.tensor([[0.0, 0.0, 0.4, 0.6], [0.5, 0.0, 0.0, 0.5]]),
            torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])]
    got = recipe.hop_grounding(split, recipe.Predicted(["x"] * 3, maps), (2, 2))
    # subject: q1 hop1 0.7, hop2 0.25; q2 hop1 .5*.4 + .5*.6 = .5, hop2 .5*.5 = .25; q3 hop1 .5, hop2 .5
    assert got == pytest.approx({"hop1_on_subject": (0.7 + 0.5 + 0.5) / 3, "hop2_on_subject": (0.25 + 0.25 + 0.5) / 3,
                                 "hop1_on_target": 0.0, "hop2_on_target": 0.5})    # target: q2 only
    assert recipe.hop_grounding(split, recipe.Predicted(["x"] * 3, None), (2, 2)) == {}
    assert recipe.hop_grounding(VqaSplit(split.images, split.questions, [[]]), recipe.Predicted(["x"] * 3, maps),
                                (2, 2)) == {}


def test_evaluate_on_generated_data(clevr):
    vocab, answers = recipe.build_vocab(clevr["train"]), recipe.answer_list(clevr["train"])
    torch.manual_seed(0)
    model = recipe.build_model("transformer", vocab, answers, 75, dict(dim=16, depth=3, width=8))
    test = clevr["test"]
    metrics, pred = recipe.evaluate(model, test, vocab, answers)
    assert set(metrics) == {"accuracy", "non_relational_accuracy", "relational_accuracy"} | {
        f"hop{k}_on_{r}" for k in (1, 2, 3) for r in ("subject", "target")}
    assert metrics["accuracy"] == accuracy(pred.answers, test.questions)
    rel = [(p, q) for p, q in zip(pred.answers, test.questions) if q.kind == "relational"]
    assert metrics["relational_accuracy"] == pytest.approx(sum(p == q.answer for p, q in rel) / len(rel))
    assert recipe.hop_grounding(test, pred, model.grid) == {k: v for k, v in metrics.items() if k.startswith("hop")}
    assert all(0 <= metrics[k] <= 1 for k in metrics)
    assert "vqa_accuracy" not in metrics
    plain, _ = recipe.evaluate(model, test, vocab, answers, grounding=False)
    assert not any(k.startswith("hop") for k in plain) and plain["accuracy"] == metrics["accuracy"]


def test_evaluate_reports_vqa_accuracy_when_questions_carry_answers():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    qs = [Question(["how", "many"], "2", 0, "number", answers=["2"] * 3 + ["3"] * 7),
          Question(["is", "it", "red"], "yes", 1, "yes/no", answers=["yes"] * 10),
          Question(["what", "colour"], "red", 1, "other", answers=["red"] * 5 + ["blue"] * 5)]
    split = VqaSplit(images, qs, [[], []], ["a.jpg", "b.jpg"])
    vocab, answers = recipe.build_vocab(split), recipe.answer_list(split)
    torch.manual_seed(0)
    model = recipe.build_model("san", vocab, answers, 32, dict(dim=16, att_dim=8, emb_dim=8, width=8))
    metrics, pred = recipe.evaluate(model, split, vocab, answers)
    assert set(metrics) == {"accuracy", "number_accuracy", "yes_no_accuracy", "other_accuracy", "vqa_accuracy"}
    assert pred.maps is None                       # real data: no boxes, no maps asked for
    assert metrics["vqa_accuracy"] == pytest.approx(vqa_accuracy(pred.answers, qs))


def test_answer_list_order_encode_and_the_loss_ignore_unlisted_answers():
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    qs = [Question(["q", str(i)], a, 0, "other") for i, a in enumerate("b b b c a c a d".split())]
    split = VqaSplit(images, qs)
    assert recipe.answer_list(split) == ["b", "a", "c", "d"]       # most frequent first, ties alphabetically
    assert recipe.answer_list(split, max_answers=2) == ["b", "a"]
    vocab = recipe.build_vocab(split)
    enc = recipe.encode(split, vocab, ["b", "a"])
    assert enc.answers.tolist() == [0, 0, 0, -1, 1, -1, 1, -1] and enc.by_image == [list(range(8))]
    torch.manual_seed(0)
    model = recipe.build_model("san", vocab, ["b", "a"], 32, dict(dim=16, att_dim=8, emb_dim=8, width=8)).eval()
    (batch,) = recipe.batches(split, enc, 1, 0, None)
    loss = recipe.make_step(model)(batch)
    with torch.no_grad():
        logits = model(batch[0], batch[1], batch[2]).logits
    keep = batch[3] >= 0
    assert loss.item() == pytest.approx(float(F.cross_entropy(logits[keep], batch[3][keep])), rel=1e-5)


def test_rebuild_refuses_what_is_not_a_vqa_checkpoint():
    good = {"model_config": {}, "vocab": ["<pad>"], "answers": ["yes"], "model_name": "san"}
    for key in good:
        cfg = {k: v for k, v in good.items() if k != key}
        with pytest.raises(ValueError, match=f"config.json has no '{key}' \\(not a VQA checkpoint\\?\\)"):
            recipe.rebuild(Checkpoint(path=Path("ck"), config=cfg, state_dict={}))
    with pytest.raises(ValueError, match=r"unknown VQA model 'rnn'; expected one of \['relational', 'san', 'transformer'\]"):
        recipe.rebuild(Checkpoint(path=Path("ck"), config={**good, "model_name": "rnn"}, state_dict={}))


# -- the command line ---------------------------------------------------------------------------------
TINY = ["--data", "sort-of-clevr", "--n-train", "8", "--n-valid", "2", "--n-test", "2", "--epochs", "1",
        "--dim", "16", "--threads", "1", "--no-progress"]


def _main(*argv):
    """``attnkit ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of each model: {name: (checkpoint folder, what train printed)}."""
    root = tmp_path_factory.mktemp("vqa-runs")
    done = {}
    for name in ("san", "relational", "transformer"):
        code, out, err = _main("train", "vqa", "--model", name, "--out", root / name, *TINY)
        assert code == 0, err
        done[name] = (root / name, out)
    return done


def _config(folder):
    return json.loads((Path(folder) / "config.json").read_text())


@pytest.mark.parametrize("name", ["san", "relational", "transformer"])
def test_train_writes_the_checkpoint_and_eval_reports_the_same_accuracy(runs, name):
    folder, printed = runs[name]
    assert {"model.safetensors", "config.json", "trainer.json", "checkpoint.json"} <= {p.name for p in folder.iterdir()}
    cfg = _config(folder)
    assert cfg["task"] == "vqa" and cfg["model_name"] == name and cfg["model_config"]["dim"] == 16
    assert cfg["data"]["data"] == "sort-of-clevr" and cfg["sizes"] == {"train": 160, "valid": 40, "test": 40}
    if name == "relational":                                # two hops, fixed
        layers = 2
    else:
        unit = "hops" if name == "san" else "depth"
        layers = cfg["model_config"][unit]
        assert layers == recipe.MODEL_DEFAULTS[name][unit]
    assert len(cfg["history"]["loss"]) == 1
    metrics = cfg["metrics"]
    assert set(metrics) == {"test_accuracy", "test_non_relational_accuracy", "test_relational_accuracy"} | {
        f"test_hop{k}_on_{r}" for k in range(1, layers + 1) for r in ("subject", "target")}
    acc = metrics["test_accuracy"]
    last = printed.splitlines()[-1]
    assert last.startswith(f"test accuracy: {100 * acc:.2f}%, ") and "test non relational accuracy: " in last
    assert last.endswith("(40 questions)") and f"attnkit viz {folder} --index 0" in printed
    code, out, err = _main("eval", folder, "--threads", "1")
    assert code == 0, err
    assert out.strip() == last  # eval prints the line train ended with
    code, out, _ = _main("eval", folder, "--threads", "1", "--json")
    got = json.loads(out)
    assert got["test_accuracy"] == acc and got["questions"] == 40
    assert got["test_hop1_on_subject"] == pytest.approx(metrics["test_hop1_on_subject"])


def _png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.parametrize("name", ["san", "transformer"])
def test_translate_answers_each_line(runs, name, tmp_path, monkeypatch):
    from PIL import Image

    folder = runs[name][0]
    test = recipe.load_splits(_config(folder)["data"])["test"]          # the run's test split
    model, vocab, answers, _ = recipe.rebuild(load_checkpoint(folder))
    picked = [0, 7, 25, 39]
    expect = recipe.predict(model, test, vocab, answers, questions=picked).answers
    lines = [f"test:{test.questions[i].image}\t{test.questions[i].text}" for i in picked]
    image = _png(tmp_path / "test0.png", test.images[0])                 # lossless: the same pixels as test:0
    small = tmp_path / "small.png"
    Image.new("RGBA", (40, 50), (255, 0, 0, 128)).save(small)           # resized to the model's 75 pixels
    lines += [f"{image}\t{test.questions[0].text}?", f"{small}\twhat shape is the red object"]
    # from stdin, as a shell pipe gives it
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("\n".join(lines) + "\n").encode())))
    code, out, err = _main("translate", folder, "--threads", "1")
    assert code == 0, err
    got = out.splitlines()
    assert len(got) == 6 and all(a in answers for a in got)
    assert got[:4] == expect
    assert test.questions[0].image == 0 and got[4] == got[0]


def test_translate_bad_lines_are_clear_errors(runs, tmp_path):
    folder = runs["san"][0]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    for line, message in [
        ("test:0 what shape is the red object", "line 1: expected IMAGE<TAB>QUESTION"),
        (f"{tmp_path / 'missing.png'}\twhat shape is the red object", "line 1: no such image .*missing.png"),
        (f"{garbage}\twhat shape is the red object", "line 1: cannot read image .*garbage.png"),
        ("test:2\twhat shape is the red object", r"line 1: 'test:2': the test split has images 0-1"),
        ("test:x\twhat shape is the red object", r"line 1: 'test:x': the test split has images 0-1"),
        ("test:0\t?!", "line 1: the question is empty"),
    ]:
        code, out, err = _main("translate", folder, "test:1\tis the red object on the left or on the right", line)
        assert code == 2 and out == "", line
        assert err.startswith("attnkit: error: ") and err.count("\n") == 1, err
        assert re.search(message.replace("line 1", "line 2"), err), (message, err)


def test_translate_answers_an_empty_line_with_an_empty_line(runs):
    folder = runs["san"][0]
    code, out, err = _main("translate", folder, "test:0\twhat shape is the red object", "", "test:1\thow many objects "
                           "have the same shape as the blue object")
    assert code == 0, err
    lines = out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2] and lines[3] == ""


def test_viz_draws_the_question_over_its_image(runs, tmp_path):
    from PIL import Image

    folder = runs["san"][0]
    out_dir = tmp_path / "viz"
    code, out, err = _main("viz", folder, "--index", "1", "--out", out_dir, "--threads", "1")
    assert code == 0, err
    test = recipe.load_splits(_config(folder)["data"])["test"]
    q = test.questions[1]
    assert f"input:  test question 1 about image {q.image}" in out and f"{q.text}?" in out
    assert f"(truth: {q.answer}; {q.kind})" in out and "attention on the " in out and "(subject): hop 1 " in out
    png = out_dir / "vqa_attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 75 and im.size[1] > 75
    page = (out_dir / "vqa_attention.html").read_text(encoding="utf-8")
    assert html.escape(f"{q.text}? → ") in page and "hop 2" in page
    code, out, err = _main("viz", folder, "--index", "40", "--out", tmp_path / "v2")
    assert code == 2 and "--index: the test split has 40 questions (0-39); got 40" in err
    assert not (tmp_path / "v2").exists()


def test_resume_continues_a_run(runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(runs["san"][0], folder)
    first = _config(folder)["history"]
    code, out, err = _main("train", "vqa", "--model", "san", "--out", folder, "--resume", *TINY, "--epochs", "2")
    assert code == 0, err
    assert "resuming" in out and "epoch 2/2" in out
    history = _config(folder)["history"]
    assert len(history["loss"]) == len(history["valid_accuracy"]) == 2
    assert history["loss"][0] == first["loss"][0]


def test_a_checkpoint_without_its_model_is_refused(runs, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(runs["san"][0], folder)
    cfg = _config(folder)
    del cfg["model_config"]
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "checkpoint.json").unlink()          # its manifest would refuse the edited config.json
    code, _, err = _main("eval", folder)
    assert code == 2 and "config.json has no 'model_config' (not a VQA checkpoint?)" in err


def test_vqa_v2_needs_its_paths(tmp_path):
    code, _, err = _main("train", "vqa", "--data", "vqa-v2", "--out", tmp_path / "v2", "--no-progress")
    assert code == 2
    assert err == "attnkit: error: --data vqa-v2 needs --train-questions, --train-annotations, --train-images\n"
    assert not (tmp_path / "v2").exists()


def _easy_vqa(root, n_train=6, n_test=3):
    """A folder laid out like the easy-vqa package's data: 64 x 64 PNGs and [question, answer, id] lists."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}
    shapes = ("circle", "rectangle", "triangle")
    for part, n in (("train", n_train), ("test", n_test)):
        (root / part / "images").mkdir(parents=True)
        rows = []
        for i in range(n):
            colour, shape = list(colours)[i % 3], shapes[(i // 3 + i) % 3]
            im = Image.new("RGB", (64, 64), (255, 255, 255))
            d = ImageDraw.Draw(im)
            if shape == "circle":
                d.ellipse((16, 16, 48, 48), fill=colours[colour])
            elif shape == "rectangle":
                d.rectangle((12, 20, 52, 44), fill=colours[colour])
            else:
                d.polygon([(32, 10), (54, 52), (10, 52)], fill=colours[colour])
            im.save(root / part / "images" / f"{i}.png")
            rows += [["What's the shape in the image?", shape, i], ["What color is the shape?", colour, i],
                     [f"Is there a {shape}?", "yes", i],
                     ["Is there a blue shape?", "yes" if colour == "blue" else "no", i]]
        (root / part / "questions.json").write_text(json.dumps(rows))
    (root / "answers.txt").write_text("\n".join(["yes", "no", *shapes, *colours]) + "\n")
    return root


def test_easy_vqa_trains_from_a_folder_and_reports_each_kind(tmp_path):
    data = _easy_vqa(tmp_path / "easy")
    out = tmp_path / "run"
    code, printed, err = _main("train", "vqa", "--data", "easy-vqa", "--easy-vqa-dir", data, "--out", out,
                               "--epochs", "1", "--dim", "16", "--threads", "1", "--no-progress")
    assert code == 0, err
    cfg = _config(out)
    assert cfg["data"] == {"data": "easy-vqa", "easy_vqa_dir": str(data.resolve()), "limit": None}
    assert cfg["model_config"]["image_size"] == 64 and cfg["sizes"] == {"train": 20, "valid": 4, "test": 12}
    assert set(cfg["metrics"]) == {"test_accuracy", "test_yes_no_accuracy", "test_shape_accuracy",
                                   "test_colour_accuracy"}
    last = printed.splitlines()[-1]
    assert last.startswith(f"test accuracy: {100 * cfg['metrics']['test_accuracy']:.2f}%, ")
    assert ("test yes no accuracy: " in last and "test shape accuracy: " in last and "test colour accuracy: " in last
            and last.endswith("(12 questions)"))
    # viz: the question (with its apostrophe) is HTML-escaped in the page
    code, shown, err = _main("viz", out, "--index", "0", "--out", tmp_path / "viz")
    assert code == 0, err
    assert "what's the shape in the image?" in shown
    page = (tmp_path / "viz" / "vqa_attention.html").read_text(encoding="utf-8")
    assert "what&#x27;s the shape in the image?" in page and "what's the shape" not in page


def test_easy_vqa_malformed_questions_is_one_clear_error(tmp_path):
    data = _easy_vqa(tmp_path / "easy", n_train=2, n_test=1)
    (data / "train" / "questions.json").write_text('[["What color?", "red", 0],\n ["x", "no"]]')
    code, _, err = _main("train", "vqa", "--data", "easy-vqa", "--easy-vqa-dir", data, "--out", tmp_path / "run",
                         "--epochs", "1", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "questions.json" in err and "entry 1 is ['x', 'no']; expected [question, answer, image id]" in err
    (data / "train" / "questions.json").write_text('[["What color?", "red", 0],,]')
    code, _, err = _main("train", "vqa", "--data", "easy-vqa", "--easy-vqa-dir", data, "--out", tmp_path / "run",
                         "--epochs", "1", "--no-progress")
    assert code == 2 and "is not valid JSON (line 1, column 28" in err
    assert not (tmp_path / "run").exists()


def test_curriculum_trains_the_first_epochs_on_non_relational_questions(tmp_path, monkeypatch):
    seen = []
    real = recipe.batches

    def spy(split, enc, images_per_batch, seed, epoch):
        seen.append((epoch, {q.kind for q in split.questions}))
        return real(split, enc, images_per_batch, seed, epoch)

    monkeypatch.setattr(recipe, "batches", spy)
    out = tmp_path / "cur"
    code, printed, err = _main("train", "vqa", "--data", "sort-of-clevr", "--n-train", "4", "--n-valid", "1",
                               "--n-test", "1", "--epochs", "3", "--curriculum", "2", "--dim", "16", "--out", out,
                               "--threads", "1", "--no-progress")
    assert code == 0, err
    assert [(e, kinds) for e, kinds in seen if e is not None] == [
        (0, {"non-relational"}), (1, {"non-relational"}), (2, {"non-relational", "relational"})]
    assert _config(out)["train"]["curriculum"] == 2


def test_curriculum_needs_sort_of_clevr(tmp_path):
    code, out, err = _main("train", "vqa", "--data", "easy-vqa", "--curriculum", "2", "--out", tmp_path / "x",
                           "--threads", "1", "--no-progress")
    assert code == 2 and not (tmp_path / "x").exists()
    assert "--curriculum: only Sort-of-CLEVR has the non-relational questions" in err and "easy-vqa" in err
