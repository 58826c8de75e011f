"""VQA data and metrics: the generated Sort-of-CLEVR (objects, pixels and every answer recomputed
here), the easy-VQA and VQA v2 readers on fixtures written here (and easy-VQA on the data the
package ships), the metrics against hand computations and the official evaluation's formula."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnkit.tasks.vqa.data import (ANSWERS, CANVAS, COLOURS, SHAPES, Question, generate_sort_of_clevr,
                                    generate_split, read_easy_vqa, read_vqa_v2)
from attnkit.tasks.vqa.metrics import accuracy, accuracy_by_kind, normalize_answer, vqa_accuracy


@pytest.fixture(scope="module")
def clevr():
    return generate_sort_of_clevr(n_train=30, n_valid=5, n_test=10, seed=7)


# -- Sort-of-CLEVR ----------------------------------------------------------------------------------
def _all_questions(split):
    return [(q.text, q.answer, q.image, q.kind, q.subject, q.target) for q in split.questions]


def test_sort_of_clevr_is_reproducible_and_its_splits_differ(clevr):
    again = generate_sort_of_clevr(n_train=30, n_valid=5, n_test=10, seed=7)
    for part in ("train", "valid", "test"):
        assert torch.equal(again[part].images, clevr[part].images)
        assert _all_questions(again[part]) == _all_questions(clevr[part])
    other = generate_sort_of_clevr(n_train=30, n_valid=5, n_test=10, seed=8)
    assert not torch.equal(other["train"].images, clevr["train"].images)
    assert {k: tuple(v.images.shape) for k, v in clevr.items()} == {
        "train": (30, 3, CANVAS, CANVAS), "valid": (5, 3, CANVAS, CANVAS), "test": (10, 3, CANVAS, CANVAS)}
    assert all(v.images.dtype == torch.uint8 for v in clevr.values())
    # no image is in two splits
    seen = {}
    for part, split in clevr.items():
        for image in split.images:
            key = image.numpy().tobytes()
            assert key not in seen, f"an image of {part} is also in {seen.get(key)}"
            seen[key] = part


def _centre(o):
    x0, y0, x1, y1 = o.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def test_sort_of_clevr_objects_are_drawn_where_their_boxes_say(clevr):
    for split in clevr.values():
        assert len(split.objects) == len(split.images)
        for image, objects in zip(split.images, split.objects):
            assert sorted(o.colour for o in objects) == sorted(COLOURS) and len(objects) == 6
            for o in objects:
                x0, y0, x1, y1 = o.box
                assert o.shape in SHAPES
                assert 0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS and x1 - x0 == 10 == y1 - y0
                cx, cy = _centre(o)
                assert tuple(image[:, int(cy), int(cx)].tolist()) == COLOURS[o.colour]
                # a square fills its corner pixel, a circle does not (unless another object covers it)
                corner = tuple(image[:, y0, x0].tolist())
                covered = any(p is not o and p.box[0] <= x0 < p.box[2] and p.box[1] <= y0 < p.box[3] for p in objects)
                if not covered:
                    assert (corner == COLOURS[o.colour]) == (o.shape == "square")
            for a, b in itertools.combinations(objects, 2):
                assert math.dist(_centre(a), _centre(b)) >= 12
            # pixels outside every box are white
            outside = torch.ones(CANVAS, CANVAS, dtype=torch.bool)
            for o in objects:
                x0, y0, x1, y1 = o.box
                outside[y0:y1, x0:x1] = False
            assert bool((image[:, outside] == 255).all())


def _check_answers(split):
    """Recompute every answer from the objects, from the question's text alone."""
    per_image = {}
    for q in split.questions:
        objects = split.objects[q.image]
        last = len(q.words) - 1 - q.words[::-1].index("object")
        colour = q.words[last - 1]          # the object a question is about is "the <colour> object"
        assert colour in COLOURS
        subject = [o.colour for o in objects].index(colour)
        assert q.subject == subject
        me = objects[subject]
        cx, cy = _centre(me)
        others = [(math.dist((cx, cy), _centre(p)), i) for i, p in enumerate(objects) if i != subject]
        text = q.text
        if text == f"what shape is the {colour} object":
            kind, answer, targets = "non-relational", me.shape, None
        elif text == f"is the {colour} object on the left or on the right":
            kind, answer, targets = "non-relational", "left" if cx < CANVAS / 2 else "right", None
        elif text == f"is the {colour} object at the top or at the bottom":
            kind, answer, targets = "non-relational", "top" if cy < CANVAS / 2 else "bottom", None
        elif text in (f"what shape is the object closest to the {colour} object",
                      f"what shape is the object furthest from the {colour} object"):
            best = min(d for d, _ in others) if "closest" in text else max(d for d, _ in others)
            targets = [i for d, i in others if d == best]
            kind, answer = "relational", None
            assert q.target in targets and q.answer == objects[q.target].shape
        elif text == f"how many objects have the same shape as the {colour} object":
            kind, answer, targets = "relational", str(sum(p.shape == me.shape for p in objects)), None
        else:
            raise AssertionError(f"unexpected question {text!r}")
        assert q.kind == kind and q.answer in ANSWERS
        if answer is not None:
            assert q.answer == answer, text
        if targets is None:
            assert q.target is None
        per_image.setdefault(q.image, []).append(kind)
    return per_image


def test_sort_of_clevr_answers_agree_with_the_objects(clevr):
    answers = set()
    for split in clevr.values():
        per_image = _check_answers(split)
        assert sorted(per_image) == list(range(len(split.images)))
        for kinds in per_image.values():
            assert kinds.count("relational") == 10 and kinds.count("non-relational") == 10
        answers |= {q.answer for q in split.questions}
    assert answers <= set(ANSWERS)
    assert {"square", "circle", "left", "right", "top", "bottom"} <= answers


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), per_kind=st.integers(1, 6))
def test_sort_of_clevr_answers_agree_for_any_seed(seed, per_kind):
    split = generate_split(2, seed, questions_per_kind=per_kind)
    per_image = _check_answers(split)
    assert all(k.count("relational") == per_kind == k.count("non-relational") for k in per_image.values())
    for objects in split.objects:
        assert all(math.dist(_centre(a), _centre(b)) >= 12 for a, b in itertools.combinations(objects, 2))


# -- easy-VQA -----------------------------------------------------------------------------------------
def _png(path, colour, size=(8, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _colour(i):
    return (10 * i, 200 - 10 * i, 7 * i)


EASY_ANSWERS = ["yes", "no", "circle", "rectangle", "triangle", "red", "blue"]


def _easy(tmp_path, n_train=10, n_test=3):
    root = tmp_path / "easy"
    for part, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            _png(root / part / "images" / f"{i}.png", _colour(i + (5 if part == "test" else 0)))
            rows += [[f"what is the shape in image {i}?", EASY_ANSWERS[i % 7], i],
                     [f"is there a shape in {i}?", "yes", i]]
        random.Random(0).shuffle(rows)   # questions about an image need not be next to each other
        (root / part / "questions.json").write_text(json.dumps(rows))
    (root / "answers.txt").write_text("\n".join(EASY_ANSWERS) + "\n")
    return root


def test_easy_vqa_reader_splits_by_image(tmp_path):
    splits = read_easy_vqa(_easy(tmp_path), valid_share=0.2)
    assert {k: (len(v.images), len(v)) for k, v in splits.items()} == {"train": (8, 16), "valid": (2, 4), "test": (3, 6)}
    assert splits["train"].names == [f"{i}.png" for i in range(8)] and splits["valid"].names == ["8.png", "9.png"]
    assert not set(splits["train"].names) & set(splits["valid"].names)
    for part, split in splits.items():
        assert split.objects == [[] for _ in split.names]
        for q in split.questions:
            image_id = int(split.names[q.image][:-4])
            # each question stays with its own image: its pixels and its words name the same id
            offset = 5 if part == "test" else 0
            assert tuple(split.images[q.image][:, 0, 0].tolist()) == _colour(image_id + offset)
            assert str(image_id) in q.words
            assert q.answer in ("yes", EASY_ANSWERS[image_id % 7])
            assert q.kind == {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape",
                              "triangle": "shape"}.get(q.answer, "colour")
    q = next(q for q in splits["train"].questions if q.words[0] == "what")
    assert q.words[:4] == ["what", "is", "the", "shape"] and q.subject is None and q.answers == []


def test_easy_vqa_reader_limit_and_no_valid(tmp_path):
    root = _easy(tmp_path)
    splits = read_easy_vqa(root, valid_share=0.25, limit=4)
    assert {k: v.names for k, v in splits.items()} == {"train": ["0.png", "1.png", "2.png"], "valid": ["3.png"],
                                                       "test": ["0.png", "1.png", "2.png"]}
    splits = read_easy_vqa(root, valid_share=0.0)
    assert len(splits["train"].images) == 10 and len(splits["valid"]) == 0
    assert tuple(splits["valid"].images.shape)[0] == 0


@pytest.mark.parametrize("break_it,message", [
    (lambda root: (root / "train" / "questions.json").write_text('[["a?", "yes", 0],\n ["b?",, 1]]'),
     r"questions\.json'? is not valid JSON \(line 2, column 8"),
    (lambda root: (root / "test" / "questions.json").write_text('{"questions": []}'),
     r"must be a list of \[question, answer, image id\] triples"),
    (lambda root: (root / "train" / "questions.json").write_text('[["a?", "yes", 0], ["b?", "no", "one"]]'),
     r"entry 1 is \['b\?', 'no', 'one'\]; expected \[question, answer, image id\]"),
    (lambda root: (root / "test" / "questions.json").unlink(), r"--easy-vqa-dir: no such file .*questions\.json"),
    (lambda root: (root / "train" / "images" / "3.png").unlink(), r"no such image .*3\.png"),
    (lambda root: (root / "train" / "images" / "3.png").write_bytes(b"\x89PNG not really"), r"cannot read image .*3\.png"),
])
def test_easy_vqa_reader_bad_input_is_one_clear_error(tmp_path, break_it, message):
    root = _easy(tmp_path)
    break_it(root)
    with pytest.raises(ValueError, match=message):
        read_easy_vqa(root)


def test_easy_vqa_reader_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--easy-vqa-dir: no such folder"):
        read_easy_vqa(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"valid_share must be in \[0, 1\); got 1"):
        read_easy_vqa(_easy(tmp_path), valid_share=1)


def test_easy_vqa_reader_on_the_packaged_data():
    pytest.importorskip("easy_vqa", reason="the easy-vqa package (pip install -e '.[apps]') is not installed")
    from attnkit.tasks.vqa.data import easy_vqa_root

    splits = read_easy_vqa()
    assert len(splits["train"].images) + len(splits["valid"].images) == 4000
    assert len(splits["valid"].images) == 400 and len(splits["test"].images) == 1000
    assert len(splits["test"]) == 9673
    assert tuple(splits["test"].images.shape[1:]) == (3, 64, 64)
    answers = (easy_vqa_root() / "answers.txt").read_text().split()
    assert len(answers) == 13
    assert {q.answer for s in splits.values() for q in s.questions} == set(answers)
    assert not set(splits["train"].names) & set(splits["valid"].names)
    assert {q.kind for q in splits["test"].questions} == {"yes/no", "shape", "colour"}


# -- VQA v2 -------------------------------------------------------------------------------------------
def _jpg(path, colour, size):
    from PIL import Image

    Image.new("RGB", size, colour).save(path, quality=95)


V2_COLOURS = {42: (200, 30, 30), 9: (30, 200, 30), 1000: (30, 30, 200)}


def _vqa_v2(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    _jpg(images / "COCO_val2014_000000000042.jpg", V2_COLOURS[42], (20, 12))
    _jpg(images / "COCO_val2014_000000000009.jpg", V2_COLOURS[9], (30, 30))
    _png(images / "1000.png", V2_COLOURS[1000], (16, 16))                  # a plain name
    _jpg(images / "COCO_val2014_000000000077.jpg", (0, 0, 0), (8, 8))      # not asked about
    questions = [{"image_id": 42, "question": "How many dogs are there?", "question_id": 420},
                 {"image_id": 9, "question": "What is on the sofa?", "question_id": 90},
                 {"image_id": 42, "question": "Is it sunny?", "question_id": 421},
                 {"image_id": 1000, "question": "What colour is the bus?", "question_id": 10000}]

    def ann(qid, image_id, mc, kind, given):
        return {"question_id": qid, "image_id": image_id, "multiple_choice_answer": mc, "answer_type": kind,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(given)]}

    annotations = [ann(10000, 1000, "Blue", "other", ["blue"] * 8 + ["Dark blue", "navy."]),
                   ann(421, 42, "yes", "yes/no", ["Yes", "yes!", "YES"] + ["yes"] * 6 + ["no"]),
                   ann(420, 42, "Two", "number", ["2", "two", "Two"] + ["3"] * 7),
                   ann(90, 9, "the dog.", "other", ["dog", "a dog", "The dog"] + ["cat"] * 7)]
    qp, ap = tmp_path / "questions.json", tmp_path / "annotations.json"
    qp.write_text(json.dumps({"info": {}, "questions": questions}, indent=1))
    ap.write_text(json.dumps({"info": {}, "annotations": annotations}, indent=1))
    return qp, ap, images


def test_vqa_v2_reader_reads_questions_answers_and_images(tmp_path):
    qp, ap, images = _vqa_v2(tmp_path)
    split = read_vqa_v2(qp, ap, images, size=8)
    assert split.names == ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000009.jpg", "1000.png"]
    assert tuple(split.images.shape) == (3, 3, 8, 8) and split.images.dtype == torch.uint8
    for k, image_id in enumerate((42, 9, 1000)):       # by first appearance; resized; the right picture
        mean = split.images[k].float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(V2_COLOURS[image_id], dtype=torch.float), atol=6)
    got = [(q.text, q.image, q.kind, q.answer, q.answers) for q in split.questions]
    assert got == [("how many dogs are there", 0, "number", "2", ["2"] * 3 + ["3"] * 7),
                   ("what is on the sofa", 1, "other", "dog", ["dog"] * 3 + ["cat"] * 7),
                   ("is it sunny", 0, "yes/no", "yes", ["yes"] * 9 + ["no"]),
                   ("what colour is the bus", 2, "other", "blue", ["blue"] * 8 + ["dark blue", "navy"])]
    assert split.objects == [[], [], []] and all(q.subject is None and q.target is None for q in split.questions)
    assert len(split) == 4


def test_vqa_v2_reader_limit(tmp_path):
    qp, ap, images = _vqa_v2(tmp_path)
    split = read_vqa_v2(qp, ap, images, size=5, limit=2)
    assert tuple(split.images.shape) == (2, 3, 5, 5)
    assert split.names == ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000009.jpg"]
    assert [q.text for q in split.questions] == ["how many dogs are there", "what is on the sofa", "is it sunny"]
    empty = read_vqa_v2(qp, ap, images, size=5, limit=0)
    assert tuple(empty.images.shape) == (0, 3, 5, 5) and len(empty) == 0


def _edit(path, key, change):
    data = json.loads(path.read_text())
    change(data[key])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("break_it,message", [
    (lambda qp, ap, im: qp.write_text('{"questions": [\n  {"image_id": 42,, }]}'),
     r"--vqa-questions: .*questions\.json'? is not valid JSON \(line 2, column 19"),
    (lambda qp, ap, im: ap.write_text('{"annotations": [}'),
     r"--vqa-annotations: .*annotations\.json'? is not valid JSON \(line 1, column 18"),
    (lambda qp, ap, im: qp.write_text('{"qs": []}'), r'has no "questions" list'),
    (lambda qp, ap, im: ap.write_text('[]'), r'has no "annotations" list'),
    (lambda qp, ap, im: _edit(qp, "questions", lambda q: q[2].pop("question_id")),
     r"--vqa-questions: .*question 2 lacks the 'question_id' key"),
    (lambda qp, ap, im: _edit(qp, "questions", lambda q: q[1].update(image_id="9")),
     r"question 1 has 'image_id' = '9'; expected int"),
    (lambda qp, ap, im: _edit(ap, "annotations", lambda a: a[3].pop("multiple_choice_answer")),
     r"--vqa-annotations: .*annotation 3 lacks the 'multiple_choice_answer' key"),
    (lambda qp, ap, im: _edit(ap, "annotations", lambda a: a[0]["answers"][4].pop("answer")),
     r"annotation 0: answer 4 lacks the 'answer' key"),
    (lambda qp, ap, im: _edit(ap, "annotations", lambda a: a.pop(1)),
     r"question 2 \(question_id 421\) has no annotation"),
    (lambda qp, ap, im: (im / "COCO_val2014_000000000009.jpg").unlink(),
     r"--vqa-images: no image for image id 9 in .*val2014"),
    (lambda qp, ap, im: (im / "1000.png").write_bytes(b"garbage"), r"image id 1000: cannot read image .*1000\.png"),
])
def test_vqa_v2_reader_bad_input_is_one_clear_error(tmp_path, break_it, message):
    qp, ap, images = _vqa_v2(tmp_path)
    break_it(qp, ap, images)
    with pytest.raises(ValueError, match=message):
        read_vqa_v2(qp, ap, images)


def test_vqa_v2_reader_missing_paths_name_the_option(tmp_path):
    qp, ap, images = _vqa_v2(tmp_path)
    with pytest.raises(ValueError, match="--vqa-questions: no such file"):
        read_vqa_v2(tmp_path / "nope.json", ap, images)
    with pytest.raises(ValueError, match="--vqa-annotations: no such file"):
        read_vqa_v2(qp, tmp_path / "nope.json", images)
    with pytest.raises(ValueError, match="--vqa-images: no such folder"):
        read_vqa_v2(qp, ap, tmp_path / "nowhere")


# -- metrics -------------------------------------------------------------------------------------------
def _q(answer, kind="other", answers=()):
    return Question(["q"], answer, 0, kind, answers=list(answers))


def test_accuracy_and_accuracy_by_kind_by_hand():
    qs = [_q("yes", "yes/no"), _q("no", "yes/no"), _q("no", "yes/no"), _q("2", "number"), _q("red", "other")]
    predicted = ["yes", "yes", "no", "3", "red"]
    assert accuracy(predicted, qs) == pytest.approx(3 / 5)
    by_kind = accuracy_by_kind(predicted, qs)
    assert list(by_kind) == ["number", "other", "yes/no"]
    assert by_kind["yes/no"] == (pytest.approx(2 / 3), 3)
    assert by_kind == {"number": (0.0, 1), "other": (1.0, 1), "yes/no": (pytest.approx(2 / 3), 3)}
    assert accuracy(["Yes"], [_q("yes")]) == 0.0      # exact match: no normalization
    assert accuracy([], []) == 0.0 and accuracy_by_kind([], []) == {}
    with pytest.raises(ValueError, match="2 predicted answers but 1 questions"):
        accuracy(["a", "b"], [_q("a")])
    with pytest.raises(ValueError, match="1 predicted answers but 2 questions"):
        accuracy_by_kind(["a"], [_q("a"), _q("b")])


@pytest.mark.parametrize("matching,expected", [
    (0, 0.0),
    (1, 9 * (1 / 3) / 10),                       # left out: the one match -> 0, any other -> 1/3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),       # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),             # 0.9
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_by_hand(matching, expected):
    q = _q("2", "number", ["2"] * matching + ["5"] * (10 - matching))
    assert vqa_accuracy(["2"], [q]) == pytest.approx(expected)
    assert vqa_accuracy(["two"], [q]) == pytest.approx(expected)      # the prediction is normalized


def _official(predicted, answers):
    """The official vqaEval.py loop: leave each annotator out, count matches among the rest."""
    accs = []
    for k in range(len(answers)):
        others = answers[:k] + answers[k + 1:]
        accs.append(min(1.0, sum(a == predicted for a in others) / 3))
    return sum(accs) / len(accs)


@settings(max_examples=50, deadline=None)
@given(answers=st.lists(st.sampled_from(["2", "3", "dog", "yes"]), min_size=10, max_size=10),
       predicted=st.sampled_from(["2", "3", "dog", "yes", "cat"]))
def test_vqa_accuracy_is_the_leave_one_out_formula(answers, predicted):
    assert vqa_accuracy([predicted], [_q(answers[0], "other", answers)]) == pytest.approx(_official(predicted, answers))


def test_vqa_accuracy_averages_and_falls_back_to_exact_match():
    qs = [_q("2", "number", ["2"] * 3 + ["3"] * 7), _q("yes", "yes/no"), _q("dog", "other", ["dog"] * 10)]
    assert vqa_accuracy(["2", "Yes.", "cat"], qs) == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    assert vqa_accuracy(["2", "no", "the dog"], qs) == pytest.approx((0.9 + 0.0 + 1.0) / 3)
    assert vqa_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="1 predicted answers but 3 questions"):
        vqa_accuracy(["2"], qs)


@pytest.mark.parametrize("text,expected", [
    ("Two", "2"), ("the dog.", "dog"), ("  A Dog  ", "dog"), ("ten", "10"), ("none", "0"),
    ("yes!", "yes"), ("Yes.", "yes"), ("dont know", "don't know"), ("isnt", "isn't"), ("don't", "don't"),
    ("1,000", "1000"), ("3.5", "3.5"), ("black-and-white", "black and white"), ("black - white", "black white"),
    ("left/right", "left right"), ("(red)", "red"), ("red\tand\nblue", "red and blue"), ("an apple", "apple"),
    ("theater", "theater"), ("12:30", "12:30"), ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected
    assert normalize_answer(expected) == expected     # normalized answers stay as they are
