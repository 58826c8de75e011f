"""VQA data: generated Sort-of-CLEVR (the default without a download), the easy-VQA dataset (the
packaged default when the ``easy-vqa`` package is installed: ``pip install -e ".[apps]"``) and
the VQA v2 JSON format (COCO images). No models here: images are ``uint8`` tensors ``(N, 3, S,
S)``, questions are lower-case words.

**Sort-of-CLEVR** (Santoro et al. 2017, https://arxiv.org/abs/1706.01427, the Relation Networks
paper). A ``75 × 75`` white canvas holds 6 objects, one of each colour (red, green, blue, orange,
gray, yellow), each a square or a circle ``10`` pixels across at a random place (no two closer
than 15 pixels, centre to centre). Each image comes with 10 non-relational and 10 relational
questions about an object named by its colour:

=================  =============================================================  ==============
kind               question                                                       answers
=================  =============================================================  ==============
non-relational     what shape is the red object                                   square, circle
non-relational     is the red object on the left or on the right                  left, right
non-relational     is the red object at the top or at the bottom                  top, bottom
relational         what shape is the object closest to the red object             square, circle
relational         what shape is the object furthest from the red object          square, circle
relational         how many objects have the same shape as the red object         1 ... 6
=================  =============================================================  ==============

The generator knows each object's box: a question carries the object it names (``subject``) and,
for *closest* / *furthest*, the object that answers it (``target``), so attention pictures can
be checked against them.

Example::

    >>> splits = generate_sort_of_clevr(n_train=2, n_valid=1, n_test=1, seed=0)
    >>> s = splits["train"]
    >>> tuple(s.images.shape), s.images.dtype, len(s.questions)
    ((2, 3, 75, 75), torch.uint8, 40)
    >>> q = s.questions[0]
    >>> colour = s.objects[q.image][q.subject].colour
    >>> q.kind, q.text in [t.format(c=colour) for t in NON_RELATIONAL], q.answer in ANSWERS
    ('non-relational', True, True)
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import check_path

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# What a split holds
# ---------------------------------------------------------------------------------------------


@dataclass
class VqaObject:
    """One object of a generated image: ``colour``, ``shape`` and ``box = (x0, y0, x1, y1)``
    pixels (ends excluded)."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Question:
    """A question about ``image`` (an index into its split's images), its ``answer`` and its
    ``kind`` (``"relational"`` / ``"non-relational"`` for Sort-of-CLEVR; ``"yes/no"``,
    ``"shape"``, ``"colour"`` for easy-VQA; ``"yes/no"``, ``"number"``, ``"other"`` for VQA v2).
    ``subject`` is the index of the object it names and ``target`` the object that answers it
    (generated data only, else None). ``answers`` are the annotators' answers when there are
    several (VQA v2; the metric then is VQA accuracy)."""

    words: list[str]
    answer: str
    image: int
    kind: str
    subject: int | None = None
    target: int | None = None
    answers: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class VqaSplit:
    """``images (N, 3, S, S)`` uint8, the ``questions`` about them, each image's ``objects``
    (empty lists for real data) and ``names`` (file names for real data)."""

    images: Tensor
    questions: list[Question]
    objects: list[list[VqaObject]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers of a question; punctuation is dropped.

    >>> tokenize("What shape is the RED object?")
    ['what', 'shape', 'is', 'the', 'red', 'object']
    """
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


# ---------------------------------------------------------------------------------------------
# Sort-of-CLEVR
# ---------------------------------------------------------------------------------------------

CANVAS = 75
HALF = 5            # an object spans 2 * HALF pixels
MIN_DISTANCE = 15   # between two objects' centres (10·√2 < 15: squares never overlap)
COLOURS = {"red": (255, 0, 0), "green": (0, 190, 0), "blue": (0, 0, 255), "orange": (255, 156, 0),
           "gray": (128, 128, 128), "yellow": (230, 210, 0)}
SHAPES = ("square", "circle")
ANSWERS = ("square", "circle", "left", "right", "top", "bottom", "1", "2", "3", "4", "5", "6")
NON_RELATIONAL = ("what shape is the {c} object", "is the {c} object on the left or on the right",
                  "is the {c} object at the top or at the bottom")
RELATIONAL = ("what shape is the object closest to the {c} object",
              "what shape is the object furthest from the {c} object",
              "how many objects have the same shape as the {c} object")


def _place_objects(rng: random.Random) -> list[VqaObject]:
    centres: list[tuple[int, int]] = []
    objects = []
    for colour in COLOURS:
        while True:
            cx, cy = rng.randint(HALF, CANVAS - HALF - 1), rng.randint(HALF, CANVAS - HALF - 1)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= MIN_DISTANCE ** 2 for x, y in centres):
                break
        centres.append((cx, cy))
        objects.append(VqaObject(colour, rng.choice(SHAPES), (cx - HALF, cy - HALF, cx + HALF, cy + HALF)))
    return objects


def draw_objects(objects: list[VqaObject], size: int = CANVAS) -> np.ndarray:
    """The ``(3, size, size)`` uint8 image of ``objects`` on a white canvas."""
    canvas = np.full((3, size, size), 255, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for o in objects:
        x0, y0, x1, y1 = o.box
        if o.shape == "square":
            inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        else:
            cx, cy = o.centre
            inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= HALF ** 2
        for c, v in enumerate(COLOURS[o.colour]):
            canvas[c][inside] = v
    return canvas


def answer_question(objects: list[VqaObject], subject: int, relational: bool, subtype: int
                    ) -> tuple[str, int | None]:
    """The answer to question ``subtype`` (0-2) of kind ``relational`` about ``objects[subject]``,
    and the object that answers it (closest / furthest) or None."""
    o = objects[subject]
    cx, cy = o.centre
    if not relational:
        if subtype == 0:
            return o.shape, None
        if subtype == 1:
            return ("left" if cx < CANVAS / 2 else "right"), None
        return ("top" if cy < CANVAS / 2 else "bottom"), None
    if subtype == 2:
        return str(sum(p.shape == o.shape for p in objects)), None
    others = [i for i in range(len(objects)) if i != subject]
    dist = [math.dist(o.centre, objects[i].centre) for i in others]
    pick = others[int(np.argmin(dist) if subtype == 0 else np.argmax(dist))]
    return objects[pick].shape, pick


def _questions(rng: random.Random, objects: list[VqaObject], image: int, per_kind: int) -> list[Question]:
    out = []
    for relational, templates in ((False, NON_RELATIONAL), (True, RELATIONAL)):
        for _ in range(per_kind):
            subject, subtype = rng.randrange(len(objects)), rng.randrange(3)
            answer, target = answer_question(objects, subject, relational, subtype)
            words = templates[subtype].format(c=objects[subject].colour).split()
            out.append(Question(words, answer, image, "relational" if relational else "non-relational",
                                subject, target))
    return out


def generate_split(n_images: int, seed: int, questions_per_kind: int = 10) -> VqaSplit:
    """``n_images`` Sort-of-CLEVR images from ``seed``, each with ``questions_per_kind``
    non-relational and as many relational questions."""
    rng = random.Random(seed)
    images, questions, objects = [], [], []
    for i in range(n_images):
        objs = _place_objects(rng)
        objects.append(objs)
        images.append(draw_objects(objs))
        questions += _questions(rng, objs, i, questions_per_kind)
    tensor = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, CANVAS, CANVAS, dtype=torch.uint8)
    return VqaSplit(tensor, questions, objects, [f"{i}" for i in range(n_images)])


def generate_sort_of_clevr(n_train: int = 5000, n_valid: int = 200, n_test: int = 1000, seed: int = 1234,
                           questions_per_kind: int = 10) -> dict[str, VqaSplit]:
    """The generated default: ``{"train", "valid", "test"}`` splits of distinct images, from
    ``seed`` (see the module docstring)."""
    return {split: generate_split(n, seed * 1000 + i, questions_per_kind)
            for i, (split, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test)))}


# ---------------------------------------------------------------------------------------------
# easy-VQA (https://github.com/vzhou842/easy-VQA): 64 x 64 images of one shape, 13 answers
# ---------------------------------------------------------------------------------------------

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_root() -> Path:
    """The data folder the ``easy-vqa`` package ships (``train/``, ``test/``, ``answers.txt``)."""
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the easy-VQA data comes with the easy-vqa package, which is not installed: "
                          "pip install -e \".[apps]\" (or pass --easy-vqa-dir with a copy of its data folder)") from None
    return Path(easy_vqa.__file__).resolve().parent / "data"


def load_image(path: Path, where: str, size: int | None = None) -> np.ndarray:
    """An image file (PNG, JPEG, ...) as a ``(3, H, W)`` uint8 array, resized to ``size × size``
    when given; a missing or unreadable file raises ``ValueError`` starting with ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such image {str(path)!r}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read image {str(path)!r} ({e})") from None


def _read_json(path: Path, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read it ({e})") from None


def easy_vqa_kind(answer: str) -> str:
    """``"yes/no"``, ``"shape"`` or ``"colour"``: what an easy-VQA answer says."""
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in EASY_VQA_SHAPES else "colour"


def _read_easy_part(root: Path, part: str, limit: int | None) -> tuple[list[int], dict[int, list[tuple]], Path]:
    qpath = check_path("--easy-vqa-dir", root / part / "questions.json")
    where = f"--easy-vqa-dir: {str(qpath)!r}"
    data = _read_json(qpath, where)
    if not isinstance(data, list):
        raise ValueError(f"{where} must be a list of [question, answer, image id] triples")
    by_image: dict[int, list[tuple]] = {}
    for i, row in enumerate(data):
        if (not isinstance(row, (list, tuple)) or len(row) != 3 or not isinstance(row[0], str)
                or not isinstance(row[1], str) or not isinstance(row[2], int)):
            raise ValueError(f"{where}: entry {i} is {row!r}; expected [question, answer, image id]")
        by_image.setdefault(row[2], []).append(row)
    ids = sorted(by_image)[:limit] if limit is not None else sorted(by_image)
    return ids, by_image, root / part / "images"


def _easy_split(ids: list[int], by_image: dict[int, list[tuple]], image_dir: Path, where: str) -> VqaSplit:
    images, questions = [], []
    for k, image_id in enumerate(ids):
        images.append(load_image(image_dir / f"{image_id}.png", where))
        questions += [Question(tokenize(q), a.strip().lower(), k, easy_vqa_kind(a.strip().lower()))
                      for q, a, _ in by_image[image_id]]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise ValueError(f"{where}: the images differ in size ({sorted(sizes)}); expected one size")
    tensor = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, 64, 64, dtype=torch.uint8)
    return VqaSplit(tensor, questions, [[] for _ in ids], [f"{i}.png" for i in ids])


def read_easy_vqa(root: str | Path | None = None, *, valid_share: float = 0.1,
                  limit: int | None = None) -> dict[str, VqaSplit]:
    """easy-VQA from its data folder (default: the one the ``easy-vqa`` package ships): ``{"train",
    "valid", "test"}``. ``valid`` is the last ``valid_share`` of the training images (by id) with
    all their questions, so no image is in two splits. ``limit`` reads at most that many images
    per part. Errors name the file: a missing folder or image, JSON that is not a list of
    ``[question, answer, image id]``."""
    root = easy_vqa_root() if root is None else check_path("--easy-vqa-dir", root, kind="dir")
    if not 0 <= valid_share < 1:
        raise ValueError(f"valid_share must be in [0, 1); got {valid_share}")
    out = {}
    ids, by_image, image_dir = _read_easy_part(root, "train", limit)
    cut = len(ids) - int(round(valid_share * len(ids)))
    where = f"--easy-vqa-dir: {str(root)!r}"
    out["train"] = _easy_split(ids[:cut], by_image, image_dir, where)
    out["valid"] = _easy_split(ids[cut:], by_image, image_dir, where)
    ids, by_image, image_dir = _read_easy_part(root, "test", limit)
    out["test"] = _easy_split(ids, by_image, image_dir, where)
    return out


# ---------------------------------------------------------------------------------------------
# VQA v2 (https://visualqa.org): the official questions / annotations JSON and COCO images
# ---------------------------------------------------------------------------------------------

VQA_V2_KINDS = ("yes/no", "number", "other")
_COCO_NAME = re.compile(r"_(\d{12})\.(?:jpg|jpeg|png)$", re.IGNORECASE)
_PLAIN_NAME = re.compile(r"^(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def _vqa_field(entry, i: int, key: str, types, what: str, where: str):
    """``entry[key]`` of entry ``i`` in a VQA v2 file, checked to be of ``types``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: {what} {i} is {entry!r}; expected an object")
    if key not in entry:
        raise ValueError(f"{where}: {what} {i} lacks the {key!r} key")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{where}: {what} {i} has {key!r} = {value!r}; expected {names}")
    return value


def _coco_image_index(root: Path) -> dict[int, str]:
    """Image id -> file name for the images in ``root``: COCO names (``COCO_val2014_
    000000000042.jpg``: the 12-digit id before the extension) and plain ``42.jpg`` / ``42.png``."""
    index: dict[int, str] = {}
    for name in sorted(p.name for p in root.iterdir()):
        m = _COCO_NAME.search(name) or _PLAIN_NAME.match(name)
        if m:
            index.setdefault(int(m.group(1)), name)
    return index


def read_vqa_v2(questions_json: str | Path, annotations_json: str | Path, image_dir: str | Path, *,
                size: int = 64, limit: int | None = None,
                options: tuple[str, str, str] = ("--vqa-questions", "--vqa-annotations", "--vqa-images")
                ) -> VqaSplit:
    """One VQA v2 split (e.g. ``val2014``) from the official files:

    - ``questions_json`` (``v2_OpenEnded_mscoco_val2014_questions.json``): ``{"questions":
      [{"image_id": int, "question": str, "question_id": int}, ...]}``;
    - ``annotations_json`` (``v2_mscoco_val2014_annotations.json``): ``{"annotations":
      [{"question_id": int, "image_id": int, "multiple_choice_answer": str, "answer_type":
      "yes/no" | "number" | "other", "answers": [{"answer": str, "answer_confidence": ...,
      "answer_id": int}, ...]}, ...]}`` (10 annotators' answers per question);
    - ``image_dir``: the COCO images, found by the zero-padded id at the end of their names
      (``COCO_val2014_000000000042.jpg``) or named plainly (``42.jpg`` / ``42.png``).

    Each image is read once, resized to ``size × size``; images are in the order in which the
    questions first name them and ``limit`` keeps at most that many (with all their questions).
    A :class:`Question` has the question's :func:`tokenize`\\ d words, ``answer`` = the
    ``multiple_choice_answer`` and ``answers`` = the annotators' answers, both through
    :func:`~attnkit.tasks.vqa.metrics.normalize_answer` (the official evaluation's
    normalization), and ``kind`` = the ``answer_type``. ``names`` are the image file names.
    Errors name the file and what is wrong: not JSON (line and column), a missing key (which
    entry, which key), a question without an annotation, a missing or unreadable image (its id
    and the folder); they start with ``options``, the command-line names of the three paths."""
    from .metrics import normalize_answer  # metrics imports this module

    q_opt, a_opt, i_opt = options
    qp = check_path(q_opt, questions_json)
    ap = check_path(a_opt, annotations_json)
    root = check_path(i_opt, image_dir, kind="dir")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int; got {size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0; got {limit!r}")
    qwhere, awhere = f"{q_opt}: {str(qp)!r}", f"{a_opt}: {str(ap)!r}"

    qdata = _read_json(qp, qwhere)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(f"{qwhere} has no \"questions\" list; expected the VQA v2 format "
                         "{\"questions\": [{\"image_id\": ..., \"question\": ..., \"question_id\": ...}]}")
    adata = _read_json(ap, awhere)
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise ValueError(f"{awhere} has no \"annotations\" list; expected the VQA v2 format "
                         "{\"annotations\": [{\"question_id\": ..., \"multiple_choice_answer\": ..., "
                         "\"answer_type\": ..., \"answers\": [{\"answer\": ...}]}]}")

    annotations: dict[int, tuple[str, str, list[str], int | None]] = {}
    for i, a in enumerate(adata["annotations"]):
        qid = _vqa_field(a, i, "question_id", int, "annotation", awhere)
        answer = _vqa_field(a, i, "multiple_choice_answer", str, "annotation", awhere)
        kind = _vqa_field(a, i, "answer_type", str, "annotation", awhere)
        answers = _vqa_field(a, i, "answers", list, "annotation", awhere)
        given = [_vqa_field(x, j, "answer", str, f"annotation {i}: answer", awhere) for j, x in enumerate(answers)]
        image_id = a.get("image_id")
        if qid in annotations:
            raise ValueError(f"{awhere}: annotation {i} repeats question_id {qid}")
        annotations[qid] = (normalize_answer(answer), kind, [normalize_answer(x) for x in given],
                            image_id if isinstance(image_id, int) else None)

    order: dict[int, int] = {}      # image id -> index in the split, by first appearance
    rows = []
    for i, q in enumerate(qdata["questions"]):
        image_id = _vqa_field(q, i, "image_id", int, "question", qwhere)
        text = _vqa_field(q, i, "question", str, "question", qwhere)
        qid = _vqa_field(q, i, "question_id", int, "question", qwhere)
        if qid not in annotations:
            raise ValueError(f"{qwhere}: question {i} (question_id {qid}) has no annotation in {awhere}")
        answer, kind, answers, ann_image = annotations[qid]
        if ann_image is not None and ann_image != image_id:
            raise ValueError(f"{qwhere}: question {i} (question_id {qid}) is about image {image_id} but its "
                             f"annotation in {awhere} says image {ann_image}")
        if image_id not in order:
            if limit is not None and len(order) >= limit:
                continue
            order[image_id] = len(order)
        rows.append(Question(tokenize(text), answer, order[image_id], kind, answers=answers))

    index = _coco_image_index(root) if order else {}
    images, names = [], []
    for image_id in order:
        if image_id not in index:
            raise ValueError(f"{i_opt}: no image for image id {image_id} in {str(root)!r} (expected a file "
                             f"named like COCO_val2014_{image_id:012d}.jpg or {image_id}.jpg)")
        names.append(index[image_id])
        images.append(load_image(root / index[image_id], f"{i_opt}: image id {image_id}", size))
    tensor = (torch.from_numpy(np.stack(images)) if images
              else torch.zeros(0, 3, size, size, dtype=torch.uint8))
    return VqaSplit(tensor, rows, [[] for _ in images], names)
