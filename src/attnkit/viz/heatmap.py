"""Attention alignment heatmaps as PNG files (matplotlib with the Agg backend; no display).

Example::

    >>> import tempfile, os, torch
    >>> from attnkit.viz.heatmap import alignment_png, alignment_size
    >>> w = torch.softmax(torch.randn(3, 5), -1)
    >>> path = alignment_png(w, list("hello"), ["h", "i", "</s>"], os.path.join(tempfile.mkdtemp(), "a.png"))
    >>> path.stat().st_size > 0
    True
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import _matrix

#: CJK-capable fonts tried after DejaVu Sans (only those installed are used).
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK KR", "Source Han Sans", "WenQuanYi Zen Hei",
                  "WenQuanYi Micro Hei", "Droid Sans Fallback", "Microsoft YaHei", "SimHei", "Hiragino Sans",
                  "Apple SD Gothic Neo", "Malgun Gothic", "NanumGothic", "Arial Unicode MS")

DPI = 100
MARGIN = 0.25      # inches around the plot
TITLE_H = 0.45     # inches for the title
COLORBAR_W = 0.9   # inches for the colour bar and its labels
MAX_LABEL = 24     # characters; longer labels are shortened with an ellipsis


#: tokens a side drawn with a label each; longer sides are summarized
MAX_LABELLED = 100
#: longest side of the cells area for a summarized side (inches), and the smallest cell
SUMMARY_SIDE = 16.0
MIN_CELL = 0.01


def _cell(n: int) -> tuple[float, float]:
    """Cell size (inches) and label font size (points) for ``n`` tokens on the longer side:
    0.28 in and 10 pt up to 40 tokens, shrinking to 0.16 in and ~8 pt at 70 tokens and beyond."""
    cell = 0.28 if n <= 40 else max(0.16, 0.28 * 40 / n)
    return cell, min(10.0, cell * 72 * 0.7)


@dataclass(frozen=True)
class _Layout:
    cell_x: float   # inches per source token (column)
    cell_y: float   # inches per target token (row)
    fontsize: float
    step_x: int     # every step-th source token is labelled
    step_y: int


def _layout(n_src: int, n_tgt: int) -> _Layout:
    """Square cells (:func:`_cell`) while both sides have at most :data:`MAX_LABELLED` tokens; a
    longer side is summarized: its cells shrink so that it spans :data:`SUMMARY_SIDE` inches (at
    least :data:`MIN_CELL` a cell) and only every ``k``-th token is labelled, ``k`` keeping the
    labels as far apart as the cells of a 100-token side."""
    base, fs = _cell(min(max(n_src, n_tgt, 1), MAX_LABELLED))

    def side(n: int) -> tuple[float, int]:
        if n <= MAX_LABELLED:
            return base, 1
        c = max(MIN_CELL, SUMMARY_SIDE / n)
        return c, math.ceil(base / c - 1e-9)

    cx, kx = side(n_src)
    cy, ky = side(n_tgt)
    return _Layout(cx, cy, fs, kx, ky)


def _shown(tokens: Sequence[str], step: int) -> list[str]:
    """The labels drawn for a side: every ``step``-th token."""
    return [_label(t) for t in tokens[::step]]


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 11 <= k % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


NOTE_H = 0.22  # inches for the "every k-th token labelled" note under a summarized axis


def _label_inches(labels: Sequence[str], fontsize: float) -> float:
    longest = max((len(s) for s in labels), default=1)
    return min(longest, MAX_LABEL) * 0.62 * fontsize / 72 + 0.1


def _margins(src_tokens: Sequence[str], tgt_tokens: Sequence[str], lay: _Layout) -> tuple[float, float]:
    """Left and bottom margins (inches): room for the labels (and the summary notes)."""
    left = MARGIN + _label_inches(_shown(tgt_tokens, lay.step_y), lay.fontsize) + (NOTE_H if lay.step_y > 1 else 0)
    bottom = MARGIN + _label_inches(_shown(src_tokens, lay.step_x), lay.fontsize) + (NOTE_H if lay.step_x > 1 else 0)
    return left, bottom


def _inches(src_tokens: Sequence[str], tgt_tokens: Sequence[str], title: bool) -> tuple[float, float]:
    lay = _layout(len(src_tokens), len(tgt_tokens))
    left, bottom = _margins(src_tokens, tgt_tokens, lay)
    width = left + lay.cell_x * max(len(src_tokens), 1) + COLORBAR_W + MARGIN
    height = bottom + lay.cell_y * max(len(tgt_tokens), 1) + (TITLE_H if title else MARGIN)
    return max(width, 3.0), max(height, 2.0)


def alignment_size(src_tokens: Sequence[str], tgt_tokens: Sequence[str], *, title: bool = True,
                   dpi: int = DPI) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG that :func:`alignment_png` writes for these labels
    (cells and label margins as :func:`alignment_png` describes, a colour bar, and a title row
    when ``title``)."""
    w, h = _inches(src_tokens, tgt_tokens, title)
    return math.ceil(w * dpi), math.ceil(h * dpi)


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[list[str], frozenset[int]]:
    """Font family list (DejaVu Sans, then installed CJK fallbacks) and the code points they cover."""
    from matplotlib import font_manager, ft2font

    families, covered = [], set()
    for name in ("DejaVu Sans",) + FALLBACK_FONTS:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        except ValueError:
            continue
        try:
            covered |= set(ft2font.FT2Font(path).get_charmap())
        except (OSError, RuntimeError):  # pragma: no cover - unreadable font file
            continue
        families.append(name)
    return families or ["DejaVu Sans"], frozenset(covered)


def _drawable(s: str, fmt: str = "U+{:04X}") -> str:
    """``s`` with the characters no installed font has written as code points."""
    _, covered = _fonts()
    return "".join(c if (ord(c) in covered or c.isspace()) else fmt.format(ord(c)) for c in s)


def _label(s: str) -> str:
    """A label matplotlib can draw: characters no installed font has become ``U+XXXX``;
    long labels are shortened."""
    text = _drawable(s)
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def _labels(tokens: Sequence[str]) -> list[str]:
    return [_label(t) for t in tokens]


def alignment_png(weights: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str], path: str | os.PathLike, *,
                  title: str | None = None, cmap: str = "viridis", dpi: int = DPI) -> Path:
    """Draw an attention alignment as a heatmap and write it to ``path`` (PNG).

    Args:
        weights: ``(T_out, T_in)`` attention weights (tensor, array or nested lists); row ``i`` is
            what target token ``i`` attends to over the source tokens.
        src_tokens: ``T_in`` labels for the columns (drawn rotated, below the map).
        tgt_tokens: ``T_out`` labels for the rows.
        path: the PNG file to write (folders are created; written atomically).
        title: shown above the map (shortened to fit).
        cmap: a matplotlib colour map; the scale runs from 0 to the largest weight (at least 1e-9).
        dpi: pixels per inch; the image is :func:`alignment_size` pixels.

    Cells are square, 0.28 in for up to 40 tokens a side and down to 0.16 in (labels ~8 pt)
    for 70 to 100, so maps stay readable up to 100 tokens a side. A side with more tokens is
    summarized: it spans 16 inches (cells of at least 0.01 in) and only every ``k``-th token is
    labelled (``k`` keeps labels 0.16 in apart; a note beside the axis says so), while the other
    side keeps the cells of a 100-token side. Characters that no
    installed font can draw are labelled ``U+XXXX``; labels are drawn as plain text (no math mode).

    Returns:
        The path written.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, src, tgt = _matrix(weights, src_tokens, tgt_tokens)
    if not isinstance(dpi, int) or isinstance(dpi, bool) or dpi < 10:
        raise ValueError(f"dpi must be an int >= 10; got {dpi!r}")
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown cmap {cmap!r}; see matplotlib.colormaps for the valid names")
    families, _ = _fonts()
    px_w, px_h = alignment_size(src, tgt, title=title is not None, dpi=dpi)
    W, H = (px_w + 0.25) / dpi, (px_h + 0.25) / dpi  # exactly px_w x px_h pixels, whether matplotlib rounds or truncates
    lay = _layout(len(src), len(tgt))
    fs = lay.fontsize
    left, bottom = _margins(src, tgt, lay)
    with matplotlib.rc_context({"font.family": families, "axes.unicode_minus": False}):
        fig = Figure(figsize=(W, H), dpi=dpi)
        FigureCanvasAgg(fig)
        pw, ph = lay.cell_x * max(len(src), 1), lay.cell_y * max(len(tgt), 1)
        ax = fig.add_axes((left / W, bottom / H, pw / W, ph / H))
        vmax = max(float(w.max()) if w.size else 0.0, 1e-9)
        im = ax.imshow(w if w.size else [[0.0]], cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        ax.set_xticks(range(0, len(src), lay.step_x))
        ax.set_xticklabels(_shown(src, lay.step_x), rotation=90, fontsize=fs, parse_math=False)
        ax.set_yticks(range(0, len(tgt), lay.step_y))
        ax.set_yticklabels(_shown(tgt, lay.step_y), fontsize=fs, parse_math=False)
        ax.tick_params(length=0, pad=2)
        ax.set_xlabel("")
        if lay.step_x > 1:
            fig.text((left + pw / 2) / W, (MARGIN * 0.5) / H, f"{len(src)} source tokens, every {_ordinal(lay.step_x)} "
                     "labelled", ha="center", va="bottom", fontsize=8, color="#444")
        if lay.step_y > 1:
            fig.text((MARGIN * 0.5) / W, (bottom + ph / 2) / H, f"{len(tgt)} target tokens, every "
                     f"{_ordinal(lay.step_y)} labelled", ha="left", va="center", rotation=90, fontsize=8, color="#444")
        cax = fig.add_axes(((left + pw + 0.15) / W, bottom / H, 0.15 / W, ph / H))
        cb = fig.colorbar(im, cax=cax)
        cb.ax.tick_params(labelsize=7)
        if title is not None:
            text = _drawable(title, "[U+{:04X}]")
            max_chars = max(8, int((W - 2 * MARGIN) / (0.62 * 9 / 72)))
            text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
            fig.text(0.5, 1 - (TITLE_H * 0.55) / H, text, ha="center", va="center", fontsize=9, parse_math=False)
        out = save_png(fig, path, dpi)
    return out


def save_png(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Write a matplotlib figure to ``path`` as a PNG, atomically (a temporary file renamed into
    place; folders are created; the file is readable by all, as a picture is for sharing)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


def check_png_args(dpi: Any, cmap: str | None = None) -> None:
    """Errors naming ``dpi`` / ``cmap`` for bad values."""
    import matplotlib

    if not isinstance(dpi, int) or isinstance(dpi, bool) or dpi < 10:
        raise ValueError(f"dpi must be an int >= 10; got {dpi!r}")
    if cmap is not None and cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown cmap {cmap!r}; see matplotlib.colormaps for the valid names")


def fonts() -> list[str]:
    """Font families for labels: DejaVu Sans, then the installed CJK fallbacks."""
    return _fonts()[0]


def short_label(s: str, max_chars: int = MAX_LABEL) -> str:
    """A label matplotlib can draw (``U+XXXX`` for characters no font has), shortened to ``max_chars``."""
    text = _drawable(s)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


__all__ = ["alignment_png", "alignment_size", "save_png"]
