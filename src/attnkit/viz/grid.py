"""A head × layer grid of attention maps as one PNG (matplotlib, Agg; no display needed).

Row ``l`` shows layer ``l`` (bottom layer first, at the top of the picture), column ``h`` head
``h``; an optional last column shows the rollout through that layer
(:func:`attnkit.viz.analysis.rollout`). Each panel has its own colour scale, from 0 to its largest
weight, so that every head's pattern is visible.

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
from pathlib import Path
from typing import Any, Sequence

import torch

from .heatmap import DPI, MARGIN, TITLE_H, check_png_args, fonts, save_png, short_label

Tensor = torch.Tensor

__all__ = ["head_grid_png", "head_grid_size"]

GAP = 0.12          # inches between panels
HEADER_H = 0.3      # inches for the column headers
ROW_LABEL = 22      # characters of a layer name shown (the right end: "…layers.3.self_attn")
TICKS_UP_TO = 24    # token labels are drawn on the edge panels up to this many tokens a side
TICK_FS = 6.0       # points


def _panel(tq: int, tk: int) -> tuple[float, float]:
    """Panel width and height (inches): the longer side is 1.5 in up to 24 tokens, 2 in up to
    64, 2.6 in beyond; the other side in proportion (at least 0.35 in)."""
    n = max(tq, tk, 1)
    side = 1.5 if n <= 24 else 2.0 if n <= 64 else 2.6
    return max(0.35, side * tk / n), max(0.35, side * tq / n)


def _tick_inches(tokens: Sequence[str] | None, n: int) -> float:
    if tokens is None or n > TICKS_UP_TO:
        return 0.0
    longest = max((len(short_label(t, 12)) for t in tokens), default=1)
    return longest * 0.62 * TICK_FS / 72 + 0.06


def _geometry(L: int, H: int, tq: int, tk: int, *, title: bool, rollout: bool,
              query_tokens: Sequence[str] | None, key_tokens: Sequence[str] | None) -> dict[str, float]:
    pw, ph = _panel(tq, tk)
    cols = H + (1 if rollout else 0)
    left = MARGIN + ROW_LABEL * 0.62 * 8 / 72 + 0.1 + _tick_inches(query_tokens, tq)
    bottom = MARGIN + _tick_inches(key_tokens, tk)
    top = (TITLE_H if title else MARGIN) + HEADER_H
    width = left + cols * pw + (cols - 1) * GAP + MARGIN
    height = bottom + L * ph + (L - 1) * GAP + top
    return dict(pw=pw, ph=ph, cols=cols, left=left, bottom=bottom, top=top, width=max(width, 3.0),
                height=max(height, 2.0))


def head_grid_size(num_layers: int, num_heads: int, num_queries: int, num_keys: int, *, title: bool = True,
                   rollout: bool = False, query_tokens: Sequence[str] | None = None,
                   key_tokens: Sequence[str] | None = None, dpi: int = DPI) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`head_grid_png` writes for these sizes
    (and labels: token labels widen the margins up to 24 tokens a side)."""
    g = _geometry(num_layers, num_heads, num_queries, num_keys, title=title, rollout=rollout,
                  query_tokens=query_tokens, key_tokens=key_tokens)
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
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a collect.Group, a sequence of (H, Tq, Tk) weights or records, or an "
                            f"(L, H, Tq, Tk) tensor; got {type(layers).__name__}")
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


def head_grid_png(layers: Any, path: str | os.PathLike, *, layer_names: Sequence[str] | None = None,
                  query_tokens: Sequence[str] | None = None, key_tokens: Sequence[str] | None = None,
                  title: str | None = None, rollout: bool = False, cmap: str = "viridis", dpi: int = DPI) -> Path:
    """Draw every head of every layer as a grid of heatmaps and write it to ``path`` (PNG).

    Args:
        layers: a :class:`attnkit.viz.collect.Group`, a sequence of ``(H, Tq, Tk)`` weights (or
            capture records: their first example), or an ``(L, H, Tq, Tk)`` tensor. Layers may
            differ in size; panels are sized for the largest.
        path: the PNG file (folders are created; written atomically).
        layer_names: row labels (default: the records' or group's names, else ``layer 0``, ...).
        query_tokens, key_tokens: token labels drawn on the left and bottom panels when a side has
            at most 24 tokens (default: a group's labels).
        title: shown above the grid.
        rollout: add a last column with the rollout through each layer (square self-attention only).
        cmap: a matplotlib colour map; each panel runs from 0 to its own largest weight.
        dpi: pixels per inch; the image is :func:`head_grid_size` pixels.

    Returns:
        The path written.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_png_args(dpi, cmap)
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
    g = _geometry(L, H, tq, tk, title=title is not None, rollout=rollout, query_tokens=query_tokens,
                  key_tokens=key_tokens)
    px_w, px_h = math.ceil(g["width"] * dpi), math.ceil(g["height"] * dpi)
    W, Hh = (px_w + 0.25) / dpi, (px_h + 0.25) / dpi
    ticks_q = query_tokens is not None and tq <= TICKS_UP_TO
    ticks_k = key_tokens is not None and tk <= TICKS_UP_TO
    with matplotlib.rc_context({"font.family": fonts(), "axes.unicode_minus": False}):
        fig = Figure(figsize=(W, Hh), dpi=dpi)
        FigureCanvasAgg(fig)
        for li in range(L):
            y0 = g["bottom"] + (L - 1 - li) * (g["ph"] + GAP)
            for c in range(g["cols"]):
                x0 = g["left"] + c * (g["pw"] + GAP)
                ax = fig.add_axes((x0 / W, y0 / Hh, g["pw"] / W, g["ph"] / Hh))
                if c < H:
                    m = ws[li][c] if c < ws[li].shape[0] else None
                else:
                    m = roll[li]
                if m is None:
                    ax.axis("off")
                    continue
                ax.imshow(m.numpy(), cmap=cmap, vmin=0.0, vmax=max(float(m.max()), 1e-9), aspect="auto",
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0 and ticks_q:
                    ax.set_yticks(range(m.shape[0]))
                    ax.set_yticklabels([short_label(t, 12) for t in query_tokens[: m.shape[0]]], fontsize=TICK_FS,
                                       parse_math=False)
                if li == L - 1 and ticks_k:
                    ax.set_xticks(range(m.shape[1]))
                    ax.set_xticklabels([short_label(t, 12) for t in key_tokens[: m.shape[1]]], fontsize=TICK_FS,
                                       rotation=90, parse_math=False)
                ax.tick_params(length=0, pad=1)
                if li == 0:
                    ax.set_title("rollout" if c >= H else f"head {c}", fontsize=8, pad=3)
            label = names[li]
            label = label if len(label) <= ROW_LABEL else "…" + label[-(ROW_LABEL - 1):]
            tick_w = _tick_inches(query_tokens, tq) if ticks_q else 0.0
            fig.text((g["left"] - tick_w - 0.08) / W, (y0 + g["ph"] / 2) / Hh, short_label(label, ROW_LABEL + 1),
                     ha="right", va="center", fontsize=8, parse_math=False)
        if title is not None:
            text = short_label(title, max(8, int((W - 2 * MARGIN) / (0.62 * 9 / 72))))
            fig.text(0.5, 1 - (TITLE_H * 0.55) / Hh, text, ha="center", va="center", fontsize=9, parse_math=False)
        return save_png(fig, path, dpi)
