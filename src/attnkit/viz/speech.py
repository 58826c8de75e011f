"""A speech recognizer's alignment over the audio: :func:`speech_png` draws the utterance's log-mel
spectrogram and, below it on the same time axis, the attention of every output character over the
listener's frames (one row per character, the peak of each row marked). The page version is
:func:`attnkit.viz.html.alignment_html` with the frames' times as the source tokens.

Example::

    >>> import os, tempfile, torch
    >>> from attnkit.viz.speech import speech_png
    >>> feats = torch.randn(160, 40)                        # 1.6 s of log-mel frames
    >>> align = torch.softmax(torch.randn(5, 20), -1)       # 5 characters over 20 listener frames
    >>> p = speech_png(feats, list("hello"), align, os.path.join(tempfile.mkdtemp(), "a.png"))
    >>> p.suffix
    '.png'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .heatmap import DPI, _drawable, _fonts, save_png

__all__ = ["frame_times", "speech_png"]


def frame_times(n_frames: int, n_steps: int, hop_s: float = 0.01) -> np.ndarray:
    """Centre time (seconds) of each of ``n_steps`` listener frames over ``n_frames`` input frames
    ``hop_s`` apart."""
    per = n_frames / max(n_steps, 1)
    return (np.arange(n_steps) + 0.5) * per * hop_s


def speech_png(features: Any, chars: Sequence[str], alignment: Any, path: str | os.PathLike, *,
               title: str | None = None, hop_s: float = 0.01, dpi: int = DPI) -> Path:
    """Write the spectrogram-and-alignment picture of one utterance to ``path`` (PNG).

    Args:
        features: ``(T, n_mels)`` log-mel frames ``hop_s`` apart.
        chars: the ``T_out`` output characters (a space is drawn as ``␣``).
        alignment: ``(T_out, T')`` attention of each character over the ``T'`` listener frames,
            which cover the ``T`` input frames evenly.
        title: shown above the picture.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    feats = torch.as_tensor(features, dtype=torch.float32).detach().cpu().numpy()
    a = torch.as_tensor(alignment, dtype=torch.float32).detach().cpu().numpy()
    if feats.ndim != 2:
        raise ValueError(f"features must be (T, n_mels); got shape {feats.shape}")
    if a.ndim != 2 or a.shape[0] != len(chars):
        raise ValueError(f"alignment must be (len(chars), T') = ({len(chars)}, T'); got shape {a.shape}")
    seconds = feats.shape[0] * hop_s
    rows = max(len(chars), 1)
    height = 1.6 + 0.16 * rows + (0.4 if title else 0.0) + 0.8
    width = min(16.0, max(6.0, 3.0 * seconds + 2.0))
    families, _ = _fonts()
    with matplotlib.rc_context({"font.family": families, "axes.unicode_minus": False}):
        fig = Figure(figsize=(width, height), dpi=dpi)
        FigureCanvasAgg(fig)
        top = 1 - (0.4 / height if title else 0.1 / height)
        spec_h, al_h = 1.4 / height, 0.16 * rows / height
        left, right = 0.9 / width, 1 - 0.3 / width
        ax1 = fig.add_axes((left, top - spec_h, right - left, spec_h - 0.05 / height))
        ax1.imshow(feats.T, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, feats.shape[1]),
                   interpolation="nearest")
        ax1.set_ylabel("mel", fontsize=8)
        ax1.set_xticks([])
        ax1.tick_params(labelsize=7)
        ax2 = fig.add_axes((left, top - spec_h - al_h - 0.1 / height, right - left, al_h))
        if a.size:
            ax2.imshow(a, aspect="auto", cmap="viridis", extent=(0, seconds, rows - 0.5, -0.5), vmin=0.0,
                       interpolation="nearest")
            times = frame_times(feats.shape[0], a.shape[1], hop_s)
            ax2.plot(times[a.argmax(1)], np.arange(rows), "w.", markersize=3)
        ax2.set_xlim(0, seconds)
        ax2.set_yticks(range(len(chars)))
        ax2.set_yticklabels([_drawable("␣" if c == " " else c) for c in chars], fontsize=6, parse_math=False)
        ax2.set_xlabel("seconds", fontsize=8)
        ax2.tick_params(labelsize=7, length=0)
        if title:
            fig.text(0.5, 1 - 0.22 / height, _drawable(title, "[U+{:04X}]"), ha="center", va="center", fontsize=9,
                     parse_math=False)
        return save_png(fig, path, dpi)
