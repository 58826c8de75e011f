"""A head × layer grid of attention maps as one PNG (matplotlib, Agg; no display needed).

Row ``l`` shows layer ``l`` (bottom layer first, at the top of the picture), column ``h`` head
``h``; an optional last column shows the rollout through that layer
(:func:`attnkit.viz.analysis.rollout`). In every panel the rows are the queries and the columns
the keys (the axes say so). By default each panel has its own colour scale, from 0 to its largest
weight, so that every head's pattern is visible; the colour bar and a note under the grid say so.
``scale="shared"`` puts every panel on one scale, from 0 to the largest weight of all, to compare
how sharp the heads are.

Each token row and column gets 0.14 in (14 px at the default 100 dpi, room for a 7 pt label; up
to 0.3 in when there are few tokens) while a panel's longer side stays within 4.2 in (30 tokens)
and the whole grid within 36 in; beyond that the cells shrink and only every ``k``-th token is
labelled, keeping labels 0.14 in apart (the axis name says so). Margins fit the labels and layer
names drawn, so a small grid is a small picture, not a large white one.

Example::

    >>> import os, tempfile, torch
    >>> from attnkit.viz.grid import head_grid_png, head_grid_size
    >>> layers = [torch.softmax(torch.randn(4, 6, 6), -1) for _ in range(3)]   # 3 layers of (H=4, 6, 6)
    >>> p = head_grid_png(layers, os.path.join(tempfile.mkdtemp(), "heads.png"), rollout=True)
    >>> p.stat().st_size > 0, head_grid_size(3, 4, 6, 6, rollout=True)[0] > head_grid_size(3, 4, 6, 6)[0]
    (True, True)
"""

from __future__ import annotations

import math
import os
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import torch

from .heatmap import DPI, MARGIN, TITLE_H, _ordinal, check_png_args, fonts, save_png, short_label

Tensor = torch.Tensor

__all__ = ["head_grid_png", "head_grid_size"]

TOKEN_IN = 0.14     # inches a labelled token row / column gets: 14 px at 100 dpi, room for a TICK_FS label
TICK_FS = 7.0       # points (~10 px at 100 dpi)
TICK_CHARS = 12     # characters of a token label shown
CELL_MAX = 0.3      # inches per token at most: a few tokens get larger cells, ...
PANEL_SMALL = 2.0   # ... up to this many inches a side
PANEL_MIN = 0.5     # inches: a panel's shorter side (a one-query decoder step still gets a visible row)
PANEL_MAX = 4.2     # inches: a panel's longer side (30 tokens at TOKEN_IN); more tokens shrink the cells
GRID_MAX = 36.0     # inches: the panels together, wide and high; more shrinks the cells
GAP = 0.12          # inches between panels
HEADER_H = 0.3      # inches for the column headers
NAME_FS = 8.0       # points, the layer names left of the rows
ROW_LABEL = 32      # characters of a layer name shown (the right end: "…decoder_layers.3.cross_attn")
AXIS_FS = 7.0       # points, the axis names "query" and "key"
AXIS_NAME = 0.2     # inches for an axis name
NOTE_FS = 7.5       # points, the note saying how the colours are scaled
NOTE_H = 0.25       # inches for that note, at the bottom
CB_PAD, CB_W, CB_TEXT = 0.15, 0.12, 0.8  # inches: before the colour bar, the bar, its tick labels and name
CB_MIN_H = 1.2      # inches: the colour bar's height at least (a short grid is drawn at its top)
SCALES = ("panel", "shared")


def _text_inches(s: str, fontsize: float) -> float:
    """Estimated width of ``s`` at ``fontsize`` points: 0.62 em a character, 1 em for wide (CJK) ones."""
    em = sum(1.0 if unicodedata.east_asian_width(c) in "WF" else 0.62 for c in s)
    return em * fontsize / 72


def _cell(L: int, cols: int, tq: int, tk: int) -> float:
    """Inches per token: :data:`TOKEN_IN` (more for a few tokens: panels up to PANEL_SMALL inches, cells
    up to CELL_MAX), less where a panel or the grid would be too large."""
    n = max(tq, tk, 1)
    wanted = max(TOKEN_IN, min(CELL_MAX, PANEL_SMALL / n))
    fits_w = (GRID_MAX - (cols - 1) * GAP) / (cols * max(tk, 1))
    fits_h = (GRID_MAX - (L - 1) * GAP) / (L * max(tq, 1))
    return min(wanted, PANEL_MAX / n, fits_w, fits_h)


def _step(side: float, n: int) -> int:
    """Label every ``step``-th of ``n`` tokens along a panel side of ``side`` inches (labels >= TOKEN_IN apart)."""
    return max(1, math.ceil(TOKEN_IN / (side / max(n, 1)) - 1e-9))


def _shown(tokens: Sequence[str] | None, step: int) -> list[str]:
    return [] if tokens is None else [short_label(t, TICK_CHARS) for t in tokens[::step]]


def _tick_inches(shown: Sequence[str]) -> float:
    if not shown:
        return 0.0
    return max(_text_inches(s, TICK_FS) for s in shown) + 0.06


def _name(label: str) -> str:
    label = label if len(label) <= ROW_LABEL else "…" + label[-(ROW_LABEL - 1):]
    return short_label(label, ROW_LABEL + 1)


def _axis_name(name: str, step: int, tokens: Sequence[str] | None) -> str:
    return name if step == 1 or tokens is None else f"{name} (every {_ordinal(step)} labelled)"


NOTES = {"panel": "colour scale: per panel, 0 to its own max",
         "shared": "colour scale: shared, 0 to the max of all"}


def _geometry(L: int, H: int, tq: int, tk: int, *, title: bool, rollout: bool,
              query_tokens: Sequence[str] | None, key_tokens: Sequence[str] | None,
              layer_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Where everything goes, in inches from the bottom left (see the module docstring)."""
    cols = H + (1 if rollout else 0)
    c = _cell(L, cols, tq, tk)
    pw, ph = max(PANEL_MIN, tk * c), max(PANEL_MIN, tq * c)
    step_q, step_k = _step(ph, tq), _step(pw, tk)
    tick_q = _tick_inches(_shown(query_tokens, step_q))
    tick_k = _tick_inches(_shown(key_tokens, step_k))
    names = [_name(n) for n in (layer_names if layer_names is not None else [f"layer {i}" for i in range(L)])]
    name_w = max(_text_inches(n, NAME_FS) for n in names) + 0.1
    left = MARGIN + name_w + AXIS_NAME + tick_q
    base = MARGIN / 2 + NOTE_H + AXIS_NAME + tick_k  # the colour bar's bottom
    grid_w, grid_h = cols * pw + (cols - 1) * GAP, L * ph + (L - 1) * GAP
    area_h = max(grid_h, CB_MIN_H)
    top = (TITLE_H if title else MARGIN) + HEADER_H
    note_w = max(_text_inches(n, NOTE_FS) for n in NOTES.values())
    width = max(left + grid_w + CB_PAD + CB_W + CB_TEXT + MARGIN, 2 * MARGIN + note_w)
    return dict(pw=pw, ph=ph, cols=cols, left=left, bottom=base + area_h - grid_h, base=base, area_h=area_h,
                top=top, grid_w=grid_w, step_q=step_q, step_k=step_k, tick_q=tick_q, names=names, width=width,
                height=base + area_h + top)


def head_grid_size(num_layers: int, num_heads: int, num_queries: int, num_keys: int, *, title: bool = True,
                   rollout: bool = False, query_tokens: Sequence[str] | None = None,
                   key_tokens: Sequence[str] | None = None, layer_names: Sequence[str] | None = None,
                   dpi: int = DPI) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`head_grid_png` writes for these sizes, token
    labels and layer names (the margins fit them; default names ``layer 0``, ``layer 1``, ...)."""
    g = _geometry(num_layers, num_heads, num_queries, num_keys, title=title, rollout=rollout,
                  query_tokens=query_tokens, key_tokens=key_tokens, layer_names=layer_names)
    return math.ceil(g["width"] * dpi), math.ceil(g["height"] * dpi)


def _layers(layers: Any) -> tuple[list[Tensor], list[str]]:
    """``[(H, Tq, Tk)]`` float64 and names from a Group, records, tensors or an (L, H, Tq, Tk) tensor."""
    from .analysis import _tensor

    names: list[str] = []
    if hasattr(layers, "layers") and hasattr(layers, "name"):  # a collect.Group
        names = [layer.name for layer in layers.layers]
        items = [layer.weights for layer in layers.layers]
    elif isinstance(layers, torch.Tensor):
        if layers.dim() != 4:
            raise ValueError(f"layers as one tensor must be (L, H, Tq, Tk); got shape {tuple(layers.shape)}")
        items = list(layers.unbind(0))
    else:
        if isinstance(layers, (str, bytes, os.PathLike)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a collect.Group, a sequence of (H, Tq, Tk) weights or records, or an "
                            f"(L, H, Tq, Tk) tensor; got {type(layers).__name__} (the call is "
                            "head_grid_png(layers, path, ...))")
        items = []
        for i, x in enumerate(layers):
            if hasattr(x, "weights") and hasattr(x, "name"):  # a capture record: its first example
                names.append(x.name)
                x = x.weights[0] if x.weights.dim() == 4 else x.weights
            items.append(x)
    out = []
    for i, x in enumerate(items):
        t = _tensor(f"layers[{i}]", x)
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3:
            raise ValueError(f"layers[{i}] must be (H, Tq, Tk); got shape {tuple(t.shape)}")
        out.append(t)
    if not out:
        raise ValueError("layers must hold at least one layer; got none")
    return out, names


def _figure(layers: Any, *, layer_names: Sequence[str] | None = None, query_tokens: Sequence[str] | None = None,
            key_tokens: Sequence[str] | None = None, title: str | None = None, rollout: bool = False,
            cmap: str = "viridis", scale: str = "panel", dpi: int = DPI):
    """The matplotlib Figure :func:`head_grid_png` saves (same arguments, less ``path``)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    check_png_args(dpi, cmap)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES} ('panel': each panel from 0 to its own largest weight; "
                         f"'shared': one scale for all); got {scale!r}")
    ws, names = _layers(layers)
    if hasattr(layers, "labels") and query_tokens is None and key_tokens is None:
        query_tokens, key_tokens = layers.query_tokens, layers.key_tokens
    if layer_names is not None:
        names = [str(n) for n in layer_names]
        if len(names) != len(ws):
            raise ValueError(f"layer_names must name every layer ({len(ws)}); got {len(names)}")
    if not names:
        names = [f"layer {i}" for i in range(len(ws))]
    L = len(ws)
    H = max(w.shape[0] for w in ws)
    tq, tk = max(w.shape[1] for w in ws), max(w.shape[2] for w in ws)
    for name, toks, n in (("query_tokens", query_tokens, tq), ("key_tokens", key_tokens, tk)):
        if toks is not None and (isinstance(toks, str) or len(toks) != n):
            raise ValueError(f"{name} must be a sequence of {n} labels; got "
                             f"{type(toks).__name__ if isinstance(toks, str) else len(toks)}")
    roll = None
    if rollout:
        if any(w.shape[1] != w.shape[2] or w.shape != ws[0].shape for w in ws):
            raise ValueError("rollout=True needs square self-attention layers of one shape; got "
                             f"{sorted({tuple(w.shape) for w in ws})}")
        from .analysis import rollout as _rollout

        roll = _rollout(ws, cumulative=True)
    vmax = max([float(w.max()) for w in ws] + ([float(roll.max())] if roll is not None else []))
    vmax = max(vmax, 1e-9)
    g = _geometry(L, H, tq, tk, title=title is not None, rollout=rollout, query_tokens=query_tokens,
                  key_tokens=key_tokens, layer_names=names)
    px_w, px_h = math.ceil(g["width"] * dpi), math.ceil(g["height"] * dpi)
    W, Hh = (px_w + 0.25) / dpi, (px_h + 0.25) / dpi  # exactly px_w x px_h pixels, however matplotlib rounds
    norm = Normalize(0.0, 1.0 if scale == "panel" else vmax)
    with matplotlib.rc_context({"font.family": fonts(), "axes.unicode_minus": False}):
        fig = Figure(figsize=(W, Hh), dpi=dpi)
        FigureCanvasAgg(fig)
        for li in range(L):
            y0 = g["bottom"] + (L - 1 - li) * (g["ph"] + GAP)
            for c in range(g["cols"]):
                x0 = g["left"] + c * (g["pw"] + GAP)
                ax = fig.add_axes((x0 / W, y0 / Hh, g["pw"] / W, g["ph"] / Hh))
                m = (ws[li][c] if c < ws[li].shape[0] else None) if c < H else roll[li]
                if m is None:
                    ax.axis("off")
                    continue
                if scale == "panel":
                    m = m / max(float(m.max()), 1e-9)
                ax.imshow(m.numpy(), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    if query_tokens is not None:
                        rows = range(0, m.shape[0], g["step_q"])
                        ax.set_yticks(list(rows))
                        ax.set_yticklabels([short_label(query_tokens[i], TICK_CHARS) for i in rows],
                                           fontsize=TICK_FS, parse_math=False)
                    ax.set_ylabel(_axis_name("query", g["step_q"], query_tokens), fontsize=AXIS_FS, labelpad=2)
                if li == L - 1:
                    if key_tokens is not None:
                        keys = range(0, m.shape[1], g["step_k"])
                        ax.set_xticks(list(keys))
                        ax.set_xticklabels([short_label(key_tokens[j], TICK_CHARS) for j in keys],
                                           fontsize=TICK_FS, rotation=90, parse_math=False)
                    ax.set_xlabel(_axis_name("key", g["step_k"], key_tokens), fontsize=AXIS_FS, labelpad=2)
                ax.tick_params(length=0, pad=1)
                if li == 0:
                    ax.set_title("rollout" if c >= H else f"head {c}", fontsize=8, pad=3)
            fig.text((g["left"] - g["tick_q"] - AXIS_NAME - 0.04) / W, (y0 + g["ph"] / 2) / Hh, g["names"][li],
                     ha="right", va="center", fontsize=NAME_FS, parse_math=False)
        cax = fig.add_axes(((g["left"] + g["grid_w"] + CB_PAD) / W, g["base"] / Hh, CB_W / W, g["area_h"] / Hh))
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        cb.ax.tick_params(labelsize=7)
        if scale == "panel":
            cb.set_ticks([0.0, 0.5, 1.0])
            cb.set_ticklabels(["0", "½ max", "max"])
            cb.set_label("weight ÷ the panel's max", fontsize=7)
        else:
            cb.set_label("weight", fontsize=7)
        fig.text(MARGIN / W, (MARGIN / 2 + NOTE_H * 0.5) / Hh, NOTES[scale], ha="left", va="center", fontsize=NOTE_FS,
                 color="#444", parse_math=False)
        if title is not None:
            text = short_label(title, max(8, int((W - 2 * MARGIN) / (0.62 * 9 / 72))))
            fig.text(0.5, 1 - (TITLE_H * 0.55) / Hh, text, ha="center", va="center", fontsize=9, parse_math=False)
    return fig


def head_grid_png(layers: Any, path: str | os.PathLike, *, layer_names: Sequence[str] | None = None,
                  query_tokens: Sequence[str] | None = None, key_tokens: Sequence[str] | None = None,
                  title: str | None = None, rollout: bool = False, cmap: str = "viridis", scale: str = "panel",
                  dpi: int = DPI) -> Path:
    """Draw every head of every layer as a grid of heatmaps and write it to ``path`` (PNG).

    Args:
        layers: a :class:`attnkit.viz.collect.Group`, a sequence of ``(H, Tq, Tk)`` weights (or
            capture records: their first example), or an ``(L, H, Tq, Tk)`` tensor. Layers may
            differ in size; panels are sized for the largest.
        path: the PNG file (folders are created; written atomically). As in every ``*_png`` and
            ``*_page`` function of :mod:`attnkit.viz`, the path follows what is drawn.
        layer_names: row labels (default: the records' or group's names, else ``layer 0``, ...).
        query_tokens, key_tokens: token labels drawn left of the first column and below the last
            row, every ``k``-th one when the cells are smaller than 0.14 in (default: a group's labels).
        title: shown above the grid.
        rollout: add a last column with the rollout through each layer (square self-attention only).
        cmap: a matplotlib colour map.
        scale: ``"panel"`` (default): each panel runs from 0 to its own largest weight (every
            head's pattern shows; the colour bar reads as a share of the panel's max);
            ``"shared"``: one scale, from 0 to the largest weight of all panels. A note under
            the grid says which.
        dpi: pixels per inch; the image is :func:`head_grid_size` pixels (pass it the same labels
            and layer names).

    Returns:
        The path written.
    """
    import matplotlib

    fig = _figure(layers, layer_names=layer_names, query_tokens=query_tokens, key_tokens=key_tokens, title=title,
                  rollout=rollout, cmap=cmap, scale=scale, dpi=dpi)
    with matplotlib.rc_context({"font.family": fonts(), "axes.unicode_minus": False}):  # fonts are found at draw time
        return save_png(fig, path, dpi)
