"""A mask's structure as a PNG: which (query, key) pairs may attend, and how a tiled kernel sees
it -- each ``block_q × block_k`` tile empty (skipped), partial (masked element by element) or
full (no mask evaluation), from :meth:`attnkit.masks.Mask.classify_blocks`.

Example::

    >>> import os, tempfile, attnkit
    >>> from attnkit.viz.masks import mask_png, mask_size
    >>> m = attnkit.masks.sliding_window(16) & attnkit.masks.causal()
    >>> p = mask_png(m, os.path.join(tempfile.mkdtemp(), "mask.png"), 256, 256, block_q=32, block_k=32)
    >>> p.stat().st_size > 0
    True
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .heatmap import DPI, MARGIN, TITLE_H, check_png_args, fonts, save_png, short_label

__all__ = ["mask_png", "mask_size", "tile_counts"]

PANEL_W = 4.5        # inches per panel
PANEL_H_MIN, PANEL_H_MAX = 1.2, 9.0
GAP = 0.9            # inches between the panels (room for the right panel's tick labels)
AXIS = 0.55          # inches for tick labels and an axis name, left and below
LEGEND_H = 0.5       # inches below the panels for the legend line
MAX_PAIRS = 1 << 26  # pairs materialized for the left panel (larger masks show the tiles only)
COLORS = {0: "#ffffff", 1: "#f4a259", 2: "#1f4e79"}  # EMPTY, PARTIAL, FULL


def _panel_h(num_queries: int, num_keys: int) -> float:
    return min(PANEL_H_MAX, max(PANEL_H_MIN, PANEL_W * num_queries / max(num_keys, 1)))


def mask_size(num_queries: int, num_keys: int, *, title: bool = True, dpi: int = DPI) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`mask_png` writes."""
    ph = _panel_h(num_queries, num_keys)
    width = MARGIN + AXIS + PANEL_W + GAP + PANEL_W + MARGIN
    height = MARGIN + LEGEND_H + AXIS + ph + (TITLE_H if title else MARGIN) + 0.3
    return math.ceil(width * dpi), math.ceil(height * dpi)


def _default_blocks() -> tuple[int, int]:
    from ..backends import registry

    b = registry.REGISTRY.get("tiled")
    return int(getattr(b, "block_q", 128)), int(getattr(b, "block_k", 128))


def tile_counts(classes: torch.Tensor) -> dict[str, int]:
    """``{"empty": n, "partial": n, "full": n}`` of a ``classify_blocks`` result."""
    from ..masks import EMPTY, FULL, PARTIAL

    return {"empty": int((classes == EMPTY).sum()), "partial": int((classes == PARTIAL).sum()),
            "full": int((classes == FULL).sum())}


def _check_int(name: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    return v


_FORM = "mask_png(mask, path, num_queries, num_keys, ...)"


def _call_form(mask: Any, path: Any, num_queries: Any, num_keys: Any) -> tuple[Any, int, int]:
    """``(path, Tq, Tk)`` from the arguments: the form above, or the old ``(mask, Tq, Tk, path)``
    (an int where the path goes; still accepted, with a DeprecationWarning)."""
    if isinstance(path, int) and not isinstance(path, bool):
        if not isinstance(num_keys, (str, os.PathLike)):
            raise TypeError(f"mask_png takes its path second: {_FORM}; got an int there and no path after the "
                            "sizes (the old form was mask_png(mask, num_queries, num_keys, path))")
        warnings.warn(f"mask_png(mask, num_queries, num_keys, path) is deprecated; call {_FORM}, the path "
                      "following what is drawn as in head_grid_png and attention_page", DeprecationWarning,
                      stacklevel=3)
        path, num_queries, num_keys = num_keys, path, num_queries
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"mask_png takes its path second: {_FORM}; got {type(path).__name__} there")
    if num_queries is None and num_keys is None and isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        num_queries, num_keys = int(mask.shape[-2]), int(mask.shape[-1])  # a bool tensor knows its sizes
    if num_queries is None or num_keys is None:
        raise TypeError(f"mask_png needs the sizes to draw the mask for: {_FORM} (only a tensor mask gives its own)")
    return path, num_queries, num_keys


def mask_png(mask: Any, path: str | os.PathLike, num_queries: int | None = None, num_keys: int | None = None, *,
             block_q: int | None = None, block_k: int | None = None, batch: int = 0, head: int = 0,
             batch_size: int | None = None, num_heads: int | None = None, title: str | None = None,
             dpi: int = DPI) -> Path:
    """Draw a mask for ``num_queries × num_keys`` and its tile classes; write a PNG.

    Left: the pairs that may attend (dark), drawn when ``Tq·Tk ≤ 2^26``. Right: the
    ``block_q × block_k`` tiles, white = empty (skipped), orange = partial, blue = full, with
    their counts below.

    Args:
        mask: an :mod:`attnkit.masks` object, a bool tensor or a ``mask_mod`` callable (``True`` = may attend).
        path: the PNG file (folders are created; written atomically). As in :func:`head_grid_png`
            and every ``*_page`` function, the path follows what is drawn. The old order
            ``mask_png(mask, num_queries, num_keys, path)`` still works, with a DeprecationWarning.
        num_queries, num_keys: ``Tq`` and ``Tk`` (default: a tensor mask's last two sizes).
        block_q, block_k: tile sizes (default: the tiled backend's, 128 × 128).
        batch, head: which example and head to draw, for masks that depend on them.
        batch_size, num_heads: the ``B`` and ``H`` the mask was built for (default ``batch + 1`` and
            ``head + 1``; a key-padding mask needs its own batch size).
        title: shown above (default: the mask's ``repr``).
        dpi: pixels per inch; the image is :func:`mask_size` pixels.

    Returns:
        The path written.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ..masks.base import as_mask

    path, num_queries, num_keys = _call_form(mask, path, num_queries, num_keys)
    check_png_args(dpi)
    tq, tk = _check_int("num_queries", num_queries, 1), _check_int("num_keys", num_keys, 1)
    dq, dk = _default_blocks()
    bq = _check_int("block_q", dq if block_q is None else block_q, 1)
    bk = _check_int("block_k", dk if block_k is None else block_k, 1)
    batch, head = _check_int("batch", batch, 0), _check_int("head", head, 0)
    B = _check_int("batch_size", batch + 1 if batch_size is None else batch_size, batch + 1)
    H = _check_int("num_heads", head + 1 if num_heads is None else num_heads, head + 1)
    m = as_mask(mask)
    try:
        classes = m.classify_blocks(tq, tk, bq, bk, B, H)
        pairs = m.materialize(tq, tk, B, H) if tq * tk <= MAX_PAIRS else None
    except ValueError as e:
        raise ValueError(f"mask cannot be drawn for Tq = {tq}, Tk = {tk}, batch_size = {B}, num_heads = {H}: {e} "
                         "(pass batch_size= / num_heads= as the mask was built for)") from None
    cls = classes[min(batch, classes.shape[0] - 1), min(head, classes.shape[1] - 1)]
    counts = tile_counts(cls)
    px_w, px_h = mask_size(tq, tk, title=True, dpi=dpi)
    W, Hh = (px_w + 0.25) / dpi, (px_h + 0.25) / dpi
    ph = _panel_h(tq, tk)
    y0 = MARGIN + LEGEND_H + AXIS
    x_left = MARGIN + AXIS
    x_right = x_left + PANEL_W + GAP
    with matplotlib.rc_context({"font.family": fonts(), "axes.unicode_minus": False}):
        fig = Figure(figsize=(W, Hh), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((x_left / W, y0 / Hh, PANEL_W / W, ph / Hh))
        if pairs is not None:
            p = pairs[min(batch, pairs.shape[0] - 1), min(head, pairs.shape[1] - 1)]
            ax.imshow(p.float().numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="antialiased",
                      extent=(0, tk, tq, 0))
            live = int(p.sum())
            ax.set_title(f"pairs that may attend: {live:,} of {tq * tk:,} ({100 * live / (tq * tk):.1f}%)", fontsize=9)
        else:
            ax.text(0.5, 0.5, f"{tq:,} × {tk:,} pairs: too many to draw one by one\n(see the tiles)",
                    ha="center", va="center", fontsize=9, transform=ax.transAxes)
            ax.set_title("pairs that may attend", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        ax.tick_params(labelsize=7)
        ax2 = fig.add_axes((x_right / W, y0 / Hh, PANEL_W / W, ph / Hh))
        ax2.imshow(cls.numpy(), cmap=ListedColormap([COLORS[0], COLORS[1], COLORS[2]]), vmin=-0.5, vmax=2.5,
                   aspect="auto", interpolation="nearest", extent=(0, cls.shape[1] * bk, cls.shape[0] * bq, 0))
        ax2.set_xlim(0, tk)
        ax2.set_ylim(tq, 0)  # the last, ragged tiles are cut at the sequence ends
        nq, nk = cls.shape
        if nq <= 64 and nk <= 64:  # tile borders
            for i in range(1, nq):
                ax2.axhline(min(i * bq, tq), color="#bbbbbb", linewidth=0.5)
            for j in range(1, nk):
                ax2.axvline(min(j * bk, tk), color="#bbbbbb", linewidth=0.5)
        for side in ax2.spines.values():
            side.set_color("#888888")
        ax2.set_title(f"{bq} × {bk} tiles ({nq} × {nk})", fontsize=9)
        ax2.set_xlabel("key position", fontsize=8)
        ax2.tick_params(labelsize=7)
        total = max(1, nq * nk)
        legend = [Patch(facecolor=COLORS[c], edgecolor="#888888",
                        label=f"{name} {counts[name]} ({100 * counts[name] / total:.0f}%)")
                  for c, name in ((0, "empty"), (1, "partial"), (2, "full"))]
        fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False,
                   bbox_to_anchor=((x_right + PANEL_W / 2) / W, MARGIN * 0.3 / Hh))
        text = short_label(title if title is not None else repr(m), max(8, int((W - 2 * MARGIN) / (0.62 * 9 / 72))))
        fig.text(0.5, 1 - (TITLE_H * 0.55) / Hh, text, ha="center", va="center", fontsize=9, parse_math=False)
        return save_png(fig, path, dpi)
