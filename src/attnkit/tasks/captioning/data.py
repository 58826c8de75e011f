"""Captioning data: generated scenes (the default, no download) and the Karpathy-split JSON of
Flickr8k / Flickr30k / COCO. No models here: images are ``(3, S, S)`` float tensors in ``[0, 1]``,
captions are lower-case space-separated words.

**Scenes.** A ``64 × 64`` black canvas holds two objects side by side or one above the other: a
handwritten digit (real MNIST digits from ``../shared/data/mnist`` when the folder is there,
scikit-learn's 8×8 digits otherwise) or a coloured shape (red, green, blue or yellow square,
circle or triangle). Each scene has 3 to 5 captions made from templates that name both objects
and their spatial relation::

    a red square to the left of a 7        a 7 to the right of a red square
    a red square and a 7                   a red square left of a 7

The generator knows each object's box, so every caption carries, for each word that names an
object (the digit, the colour, the shape), the box of that object: the ground truth for the
*attention correctness* of Liu et al. 2017 (https://arxiv.org/abs/1605.09553).

Example::

    >>> splits = generate_scenes(n_train=4, n_valid=1, n_test=2, seed=0, digits="sklearn")
    >>> [len(splits[s]) for s in ("train", "valid", "test")]
    [4, 1, 2]
    >>> s = splits["train"][0]
    >>> s.image.shape, 3 <= len(s.captions) <= 5
    (torch.Size([3, 64, 64]), True)
    >>> c = s.captions[0]
    >>> [(c.words[i], s.objects[o].box) for i, o in c.grounding][:1]  # doctest: +ELLIPSIS
    [(..., (...))]
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import check_path

Tensor = torch.Tensor

CANVAS = 64        # pixels a side
OBJECT = 20        # an object's box, pixels a side
COLOURS = {"red": (0.95, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.25, 0.4, 1.0),
           "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
DEFAULT_MNIST = "../shared/data/mnist"

#: templates per relation: ``{A}`` is the first object (left / upper), ``{B}`` the other. The first
#: two are in every scene's captions; 1 to 3 of the others join them.
TEMPLATES = {
    "horizontal": ["a {A} to the left of a {B}", "a {B} to the right of a {A}", "a {A} and a {B}",
                   "a {A} left of a {B}", "a {B} right of a {A}"],
    "vertical": ["a {A} above a {B}", "a {B} below a {A}", "a {A} and a {B}", "a {A} on top of a {B}",
                 "a {B} under a {A}"],
}


@dataclass
class SceneObject:
    """One object: a digit (``label`` ``"0"``-``"9"``, no colour) or a shape (``label`` in
    :data:`SHAPES`, ``colour`` in :data:`COLOURS`), in ``box = (x0, y0, x1, y1)`` pixels (ends
    excluded)."""

    label: str
    colour: str | None
    box: tuple[int, int, int, int]

    @property
    def words(self) -> list[str]:
        """How captions name it: ``["7"]`` or ``["red", "square"]``."""
        return [self.label] if self.colour is None else [self.colour, self.label]


@dataclass
class Caption:
    """A caption's ``words`` and its ``grounding``: ``(word index, object index)`` for every word
    that names an object (empty for real data, which has no boxes)."""

    words: list[str]
    grounding: list[tuple[int, int]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class Scene:
    """An image ``(3, S, S)`` in ``[0, 1]``, its objects (empty for real data) and its captions."""

    image: Tensor
    captions: list[Caption]
    objects: list[SceneObject] = field(default_factory=list)
    name: str = ""


# ---------------------------------------------------------------------------------------------
# Generated scenes
# ---------------------------------------------------------------------------------------------

def _shape_mask(shape: str, size: int = OBJECT) -> np.ndarray:
    """A ``(size, size)`` float mask of a filled shape with a 2-pixel margin."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    m, c = 2.0, size / 2
    if shape == "square":
        out = (x >= m) & (x <= size - m) & (y >= m) & (y <= size - m)
    elif shape == "circle":
        out = (x - c) ** 2 + (y - c) ** 2 <= (c - m) ** 2
    elif shape == "triangle":  # apex up: the half-width grows from 0 at the top to c - m at the bottom
        half = (y - m) / (size - 2 * m) * (c - m)
        out = (y >= m) & (y <= size - m) & (np.abs(x - c) <= half)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return out.astype(np.float32)


def digit_images(source: str = "auto", mnist_dir: str | Path = DEFAULT_MNIST, size: int = OBJECT
                 ) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Handwritten digits to paste into scenes, as ``(source, {"train"|"test": (images (N, size,
    size) float32 in [0, 1], labels (N,))})``: MNIST's own train/test parts (``source="mnist"``,
    from the idx files in ``mnist_dir``), or scikit-learn's 8×8 digits split 80/20
    (``"sklearn"``); ``"auto"`` takes MNIST when ``mnist_dir`` exists. Test scenes use only the
    test part, so no digit drawing is in both."""
    if source not in ("auto", "mnist", "sklearn"):
        raise ValueError(f"digits must be 'auto', 'mnist' or 'sklearn'; got {source!r}")
    if source == "auto":
        source = "mnist" if Path(mnist_dir).is_dir() else "sklearn"
    out = {}
    if source == "mnist":
        from ..images.data import read_mnist  # the idx reader (imported here: only this source needs it)

        for part in ("train", "test"):
            x, y = read_mnist(mnist_dir, part)
            t = torch.from_numpy(x).float().unsqueeze(1) / 255.0
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")
            out[part] = (t.squeeze(1).numpy(), y.astype(np.int64))
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        t = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        t = torch.nn.functional.interpolate(t, size=(size - 4, size - 4), mode="bilinear", align_corners=False)
        t = torch.nn.functional.pad(t, (2, 2, 2, 2)).clamp(0, 1)  # MNIST-like margin
        idx = np.random.default_rng(0).permutation(len(d.target))
        cut = int(0.8 * len(idx))
        for part, sel in (("train", idx[:cut]), ("test", idx[cut:])):
            out[part] = (t[sel].squeeze(1).numpy(), d.target[sel].astype(np.int64))
    return source, out


def _place(rng: random.Random, relation: str) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Boxes of the first (left / upper) and second object, apart by at least 4 pixels."""
    hi = CANVAS - OBJECT
    a_main = rng.randint(0, hi - OBJECT - 4)
    b_main = rng.randint(a_main + OBJECT + 4, hi)
    a_cross = rng.randint(0, hi)
    b_cross = min(hi, max(0, a_cross + rng.randint(-12, 12)))
    if relation == "horizontal":
        a, b = (a_main, a_cross), (b_main, b_cross)
    else:
        a, b = (a_cross, a_main), (b_cross, b_main)
    return tuple((x, y, x + OBJECT, y + OBJECT) for x, y in (a, b))  # type: ignore[return-value]


def _random_object(rng: random.Random, digits: tuple[np.ndarray, np.ndarray]) -> tuple[SceneObject, np.ndarray]:
    """An object (box not yet set) and its ``(3, OBJECT, OBJECT)`` pixels."""
    if rng.random() < 0.5:
        i = rng.randrange(len(digits[1]))
        img = digits[0][i]
        return SceneObject(str(int(digits[1][i])), None, (0, 0, 0, 0)), np.stack([img, img, img])
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    m = _shape_mask(shape)
    return SceneObject(shape, colour, (0, 0, 0, 0)), np.stack([m * c for c in COLOURS[colour]])


def _captions(rng: random.Random, objects: list[SceneObject], relation: str) -> list[Caption]:
    templates = TEMPLATES[relation]
    chosen = templates[:2] + rng.sample(templates[2:], rng.randint(1, len(templates) - 2))
    out = []
    for tpl in chosen:
        words, grounding = [], []
        for token in tpl.split():
            if token in ("{A}", "{B}"):
                o = 0 if token == "{A}" else 1
                for w in objects[o].words:
                    grounding.append((len(words), o))
                    words.append(w)
            else:
                words.append(token)
        out.append(Caption(words, grounding))
    return out


def render_scene(rng: random.Random, digits: tuple[np.ndarray, np.ndarray]) -> Scene:
    """One scene: two different objects, a relation, the image and 3-5 grounded captions."""
    while True:
        (a, pa), (b, pb) = _random_object(rng, digits), _random_object(rng, digits)
        if a.words != b.words:  # "a 7 to the left of a 7" would not say which one
            break
    relation = rng.choice(["horizontal", "vertical"])
    a.box, b.box = _place(rng, relation)
    canvas = np.zeros((3, CANVAS, CANVAS), dtype=np.float32)
    for obj, pixels in ((a, pa), (b, pb)):
        x0, y0, x1, y1 = obj.box
        canvas[:, y0:y1, x0:x1] = np.maximum(canvas[:, y0:y1, x0:x1], pixels)
    return Scene(torch.from_numpy(canvas), _captions(rng, [a, b], relation), [a, b])


def generate_scenes(n_train: int = 6000, n_valid: int = 500, n_test: int = 1000, seed: int = 1234,
                    digits: str = "auto", mnist_dir: str | Path = DEFAULT_MNIST) -> dict[str, list[Scene]]:
    """The default corpus: ``{"train", "valid", "test"}`` lists of :class:`Scene`, from ``seed``.
    Train and valid scenes paste digits from the digits' train part, test scenes from their test
    part (see :func:`digit_images`); ``splits["source"]`` is not set: read it from
    :func:`digit_images` when it matters."""
    _, parts = digit_images(digits, mnist_dir)
    out = {}
    for i, (split, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        rng = random.Random(seed * 1000 + i)
        part = parts["test" if split == "test" else "train"]
        out[split] = [render_scene(rng, part) for _ in range(n)]
        for k, s in enumerate(out[split]):
            s.name = f"{split}-{k}"
    return out


# ---------------------------------------------------------------------------------------------
# Real data: the Karpathy split (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json)
# ---------------------------------------------------------------------------------------------

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "valid", "test": "test"}


def _load_image(path: Path, size: int, where: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError(f"{where}: no such image {str(path)!r}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read image {str(path)!r} ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_karpathy(json_path: str | Path, image_dir: str | Path, size: int = CANVAS,
                  limit: int | None = None) -> dict[str, list[Scene]]:
    """Flickr8k / Flickr30k / COCO in the Karpathy-split format: ``dataset_*.json`` (``{"images":
    [{"filename", "filepath"?, "split", "sentences": [{"tokens": [...]}]}]}``) and the folder of
    images it names (``image_dir/filepath/filename``). Images are resized to ``size × size``;
    ``restval`` joins train, ``val`` is valid. ``limit`` reads at most that many images per split.
    Errors name the file and what is wrong: not JSON (line and column), a missing key, a missing
    or unreadable image."""
    jp = check_path("--karpathy-json", json_path)
    root = check_path("--images", image_dir, kind="dir")
    where = f"--karpathy-json: {str(jp)!r}"
    try:
        data = json.loads(jp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read it ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{where} has no \"images\" list; expected the Karpathy-split format "
                         "{\"images\": [{\"filename\": ..., \"split\": ..., \"sentences\": [{\"tokens\": [...]}]}]}")
    out: dict[str, list[Scene]] = {"train": [], "valid": [], "test": []}
    for i, entry in enumerate(data["images"]):
        try:
            split = KARPATHY_SPLITS[entry["split"]]
            rel = Path(entry.get("filepath", "")) / entry["filename"]
            sentences = [[str(t).lower() for t in s["tokens"]] for s in entry["sentences"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: image {i} lacks a valid {e} field (filename, split in "
                             f"{sorted(KARPATHY_SPLITS)}, sentences with tokens)") from None
        if limit is not None and len(out[split]) >= limit:
            continue
        sentences = [s for s in sentences if s]
        if not sentences:
            raise ValueError(f"{where}: image {i} ({str(rel)!r}) has no non-empty sentence")
        image = _load_image(root / rel, size, where)
        out[split].append(Scene(image, [Caption(s) for s in sentences], [], str(rel)))
    return out
