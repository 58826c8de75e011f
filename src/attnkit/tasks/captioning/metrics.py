r"""Caption metrics: BLEU-4 (sacrebleu), CIDEr-D (written here; the COCO caption evaluation's
definition) and attention correctness.

**BLEU-4** is sacrebleu's corpus BLEU over lower-case space-separated words (``tokenize="none"``;
each image may have a different number of references), divided by 100 to read as captioning
papers quote it (0.6, not 60).

**CIDEr-D** (Vedantam et al. 2015, https://arxiv.org/abs/1411.5726), as the COCO caption
evaluation code computes it: for ``n = 1..4``, each caption becomes a vector of TF-IDF weights
``tf(g) * (log N - log max(1, df(g)))`` over its n-grams ``g``, where ``N`` is the number of
images and ``df(g)`` the number of images whose references contain ``g``; the similarity of the
candidate ``c`` to a reference ``r`` is ``sum_g min(c_g, r_g) r_g / (|c| |r|)`` (the clipped
cosine) times the length penalty ``exp(-(l_c - l_r)^2 / (2 * 6^2))``, where ``l`` is the
caption's number of bigrams, the evaluation code's choice; the image's score is ten times the
mean over ``n`` of the mean over its references; CIDEr-D is the mean over images. (Where the COCO
code divides by a zero norm, here the term is 0.)

**Attention correctness** (Liu et al. 2017, https://arxiv.org/abs/1605.09553): when the model
emits a word that names an object in the image, the share of that step's attention that falls
inside the object's box; each cell's weight is spread evenly over the pixels it covers.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

import torch

from .data import COLOURS, SHAPES, SceneObject

Tensor = torch.Tensor


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1]. ``references[i]`` are image ``i``'s reference captions.

    Example::

        >>> round(bleu4(["a red square above a 7"], [["a red square above a 7", "a 7 below a red square"]]), 6)
        1.0
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    k = max((len(r) for r in references), default=0)
    streams = [[r[j] if j < len(r) else None for r in references] for j in range(k)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize="none").score / 100.0


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0,
            n: int = 4) -> tuple[float, list[float]]:
    """CIDEr-D of the corpus and of each image (see the module docstring).

    Example::

        >>> round(cider_d(["a cat"], [["a cat", "a dog"]])[0], 6)   # one image: log N = 0, every idf is 0
        0.0
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    refs = [[_ngrams(r.split(), n) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_n = math.log(float(len(refs))) if refs else 0.0

    def vec(counts: Counter):
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        bigrams = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df[g])))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:
                bigrams += tf
        return v, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for hyp, rs in zip(hypotheses, refs):
        vh, nh, lh = vec(_ngrams(hyp.split(), n))
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                if nh[k] == 0 or nr[k] == 0:
                    continue
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                total[k] += dot / (nh[k] * nr[k]) * penalty
        scores.append(10.0 * sum(total) / n / max(1, len(rs)))
    return (sum(scores) / len(scores) if scores else 0.0), scores


def ground_words(words: Sequence[str], objects: Sequence[SceneObject]) -> list[tuple[int, int]]:
    """``(word index, object index)`` for the words of a *generated* caption that name an object
    of the scene: a digit names that digit; a shape names the object of that shape (the colour
    before it decides between two); a colour names the object of that colour and of the shape
    after it. Words that name nothing in the scene (a wrong digit, a wrong colour) are left out.

    Example::

        >>> objs = [SceneObject("7", None, (0, 0, 20, 20)), SceneObject("square", "red", (30, 0, 50, 20))]
        >>> ground_words("a red square to the right of a 7".split(), objs)
        [(1, 1), (2, 1), (8, 0)]
    """
    out = []
    for i, w in enumerate(words):
        before = words[i - 1] if i > 0 else None
        after = words[i + 1] if i + 1 < len(words) else None
        if w in SHAPES:  # the object of that shape; the colour before it decides between two
            match = [j for j, o in enumerate(objects) if o.colour is not None and o.label == w]
            if len(match) > 1:
                match = [j for j in match if objects[j].colour == before]
        elif w in COLOURS:  # the object of that colour and of the shape after it
            match = [j for j, o in enumerate(objects) if o.colour == w and (after not in SHAPES or o.label == after)]
        else:
            match = [j for j, o in enumerate(objects) if o.colour is None and o.label == w]
        if len(match) == 1:
            out.append((i, match[0]))
    return out


def mass_in_box(alpha: Tensor, grid: tuple[int, int], image_size: int, box: tuple[int, int, int, int]) -> float:
    """The share of ``alpha`` (``(L,)`` over a row-major ``grid`` of cells covering an image of
    ``image_size`` pixels a side) inside ``box = (x0, y0, x1, y1)``, each cell's weight spread
    evenly over its pixels.

    Example::

        >>> mass_in_box(torch.tensor([0.5, 0.5, 0.0, 0.0]), (2, 2), 8, (0, 0, 2, 4))   # half of cell 0
        0.25
    """
    gh, gw = grid
    ch, cw = image_size / gh, image_size / gw
    x0, y0, x1, y1 = box
    ys = torch.arange(gh, dtype=torch.float64)
    xs = torch.arange(gw, dtype=torch.float64)
    oy = (torch.clamp(torch.minimum((ys + 1) * ch, torch.tensor(float(y1))) - torch.maximum(ys * ch, torch.tensor(float(y0))), min=0) / ch)
    ox = (torch.clamp(torch.minimum((xs + 1) * cw, torch.tensor(float(x1))) - torch.maximum(xs * cw, torch.tensor(float(x0))), min=0) / cw)
    share = (oy.view(-1, 1) * ox.view(1, -1)).flatten()          # fraction of each cell inside the box
    a = alpha.detach().double().flatten()
    total = float(a.sum())
    return float((a * share).sum()) / total if total > 0 else 0.0


def attention_correctness(captions: Sequence[Sequence[str]], alphas: Sequence[Tensor],
                          objects: Sequence[Sequence[SceneObject]], grid: tuple[int, int], image_size: int
                          ) -> tuple[Optional[float], int]:
    """Mean :func:`mass_in_box` over every grounded word of the generated ``captions`` (``alphas[i]``
    ``(T_i, L)``: the attention when word ``t`` was emitted), and how many words counted (None
    when none did)."""
    values = []
    for words, a, objs in zip(captions, alphas, objects):
        for i, o in ground_words(words, objs):
            values.append(mass_in_box(a[i], grid, image_size, objs[o].box))
    return (sum(values) / len(values) if values else None), len(values)
