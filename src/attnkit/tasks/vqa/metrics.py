r"""VQA metrics: exact-match accuracy (overall and per question kind) and the VQA accuracy of the
official VQA evaluation (``vqaEval.py`` of https://github.com/GT-Vision-Lab/VQA), with its answer
normalization.

**Normalization** (:func:`normalize_answer`), as ``vqaEval.py`` does it to an answer before
comparing: newlines and tabs become spaces and the ends are stripped; then
*processPunctuation*: each of ``; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !`` is deleted when it
touches a space or the answer holds a number with a thousands comma (``1,000``), else it becomes a
space, and a period not followed by a digit is deleted (``3.5`` keeps its point); then
*processDigitArticle*: lower-case, split on whitespace, the number words ``none``, ``zero`` ...
``ten`` become digits (``none`` is ``0`` there too), the articles ``a``, ``an``, ``the`` are dropped and
contractions written without the apostrophe get it back (``dont`` → ``don't``; a subset of the
official table: :data:`CONTRACTIONS`). The apostrophe, the colon and other characters are kept.
Unlike ``vqaEval.py``, which only runs processPunctuation on the human answers (and only when they
disagree), here both steps are applied to every answer, predicted and human, so the same answer
always compares equal.

**VQA accuracy** (Antol et al. 2015, https://arxiv.org/abs/1505.00468; the leave-one-out form of
the evaluation code): with ``n`` human answers (10 in VQA v2), an answer's accuracy is the mean
over the ``n`` ways of leaving one human out of ``min(1, m_k / 3)``, where ``m_k`` is the number
of the other ``n - 1`` humans who gave that answer:

.. math::  \mathrm{acc}(a) = \frac{1}{n} \sum_{k=1}^{n} \min\Big(1, \frac{|\{j \ne k : a_j = a\}|}{3}\Big)

So an answer three of ten humans gave scores ``(3 · 2/3 + 7 · 1) / 10 = 0.9``, one that four or
more gave scores 1, one that one gave scores ``(9 · 1/3) / 10 = 0.3``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from .data import Question

#: number words the evaluation turns into digits (its ``manualMap``)
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
#: contractions written without their apostrophe (a subset of the evaluation's table)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's",
    "mightve": "might've", "mustve": "must've", "mustnt": "mustn't", "shant": "shan't", "shouldve": "should've",
    "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd",
    "weve": "we've", "werent": "weren't", "whats": "what's", "whered": "where'd", "wheres": "where's",
    "whos": "who's", "whove": "who've", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")            # the evaluation's "(?!<=\d)(\.)(?!\d)" matches the same periods
_THOUSANDS = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    thousands = _THOUSANDS.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or thousands:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it (see the module docstring).

    Example::

        >>> normalize_answer("Two")
        '2'
        >>> normalize_answer("  the dog. ")
        'dog'
        >>> normalize_answer("dont know"), normalize_answer("1,000"), normalize_answer("3.5")
        ("don't know", '1000', '3.5')
        >>> normalize_answer("black-and-white"), normalize_answer("yes!"), normalize_answer("none")
        ('black and white', 'yes', '0')
    """
    return _process_digit_article(_process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def _check(predicted: Sequence[str], questions: Sequence[Question]) -> None:
    if len(predicted) != len(questions):
        raise ValueError(f"{len(predicted)} predicted answers but {len(questions)} questions; expected one each")


def accuracy(predicted: Sequence[str], questions: Sequence[Question]) -> float:
    """The share of questions whose ``answer`` equals the predicted one exactly (no normalization:
    a classifier predicts answers from the answer vocabulary); 0.0 when there are none.

    Example::

        >>> qs = [Question(["q"], "yes", 0, "yes/no"), Question(["q"], "red", 0, "colour")]
        >>> accuracy(["yes", "blue"], qs)
        0.5
    """
    _check(predicted, questions)
    if not questions:
        return 0.0
    return sum(p == q.answer for p, q in zip(predicted, questions)) / len(questions)


def accuracy_by_kind(predicted: Sequence[str], questions: Sequence[Question]) -> dict[str, tuple[float, int]]:
    """``{kind: (accuracy, number of questions)}`` over the questions of each ``kind`` (sorted by
    kind), accuracy as in :func:`accuracy`.

    Example::

        >>> qs = [Question(["q"], "yes", 0, "yes/no"), Question(["q"], "no", 0, "yes/no"),
        ...       Question(["q"], "red", 0, "colour")]
        >>> accuracy_by_kind(["yes", "yes", "red"], qs)
        {'colour': (1.0, 1), 'yes/no': (0.5, 2)}
    """
    _check(predicted, questions)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, q in zip(predicted, questions):
        hits[q.kind][0] += p == q.answer
        hits[q.kind][1] += 1
    return {k: (h / n, n) for k, (h, n) in sorted(hits.items())}


def answer_accuracy(predicted: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one ``predicted`` answer against the (already normalized) human
    ``answers``: the mean over leaving each human out of ``min(1, matches among the others / 3)``.

    Example::

        >>> answer_accuracy("2", ["2", "2", "2"] + ["3"] * 7)      # (3 * 2/3 + 7 * 1) / 10
        0.9
        >>> answer_accuracy("2", ["2"] + ["3"] * 9)                # (9 * 1/3) / 10
        0.3
    """
    n = len(answers)
    if n == 0:
        raise ValueError("no human answers to compare with")
    matches = sum(a == predicted for a in answers)
    # leaving out a matching human leaves matches - 1 of them, leaving out another leaves all
    total = matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)
    return round(total / n, 12)


def vqa_accuracy(predicted: Sequence[str], questions: Sequence[Question]) -> float:
    """The mean VQA accuracy (see the module docstring) over ``questions``; each predicted answer
    is normalized with :func:`normalize_answer` and compared with the question's ``answers``
    (normalized too). A question with fewer than two human answers (generated or easy-VQA data)
    scores 1 when the normalized prediction equals its normalized ``answer``, else 0. 0.0 when
    there are no questions.

    Example::

        >>> q = Question(["how", "many"], "2", 0, "number", answers=["2"] * 3 + ["3"] * 7)
        >>> vqa_accuracy(["Two"], [q]), vqa_accuracy(["three"], [q]), vqa_accuracy(["4"], [q])
        (0.9, 1.0, 0.0)
        >>> vqa_accuracy(["Yes."], [Question(["is", "it"], "yes", 0, "yes/no")])
        1.0
    """
    _check(predicted, questions)
    if not questions:
        return 0.0
    total = 0.0
    for p, q in zip(predicted, questions):
        p = normalize_answer(p)
        if len(q.answers) < 2:
            total += p == normalize_answer(q.answer)
        else:
            total += answer_accuracy(p, [normalize_answer(a) for a in q.answers])
    return total / len(questions)
