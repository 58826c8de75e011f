"""Speech metrics: character and word error rates (``jiwer``, in the ``[apps]`` extra), exact
match of the normalized output, and how monotonic an alignment is.

Example::

    >>> error_rates(["the third of may"], ["the third of mai"])
    {'cer': 0.0625, 'wer': 0.25}
    >>> import torch
    >>> monotonic_steps([torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0]])])
    (1, 2)
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def _jiwer():
    try:
        import jiwer
    except ImportError:
        raise ImportError('speech error rates use jiwer: pip install -e ".[apps]"') from None
    return jiwer


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus CER and WER (``jiwer.cer`` / ``jiwer.wer``: edit operations over all utterances
    divided by the characters / words of all references). Empty references are skipped."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip()]
    if not pairs:
        return {"cer": float("nan"), "wer": float("nan")}
    jiwer = _jiwer()
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps))}


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Share of predictions equal to their target."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not targets:
        return float("nan")
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)


def monotonic_steps(alignments: Sequence[Tensor]) -> tuple[int, int]:
    """``(steps whose attention peak moved backwards, steps)`` over ``alignments``, each
    ``(T_out, T_in)``: step ``i > 0`` moves backwards when ``argmax α_i < argmax α_{i-1}``."""
    back = total = 0
    for a in alignments:
        if a.shape[0] < 2:
            continue
        peaks = a.argmax(-1)
        back += int((peaks[1:] < peaks[:-1]).sum())
        total += a.shape[0] - 1
    return back, total


def monotonic_share(alignments: Sequence[Tensor]) -> float:
    """Share of steps whose attention peak does not move backwards (see :func:`monotonic_steps`)."""
    back, total = monotonic_steps(alignments)
    return float("nan") if total == 0 else 1.0 - back / total
