"""Attention over an image's patches, drawn on the image (matplotlib, Agg; no display needed).

An image model cuts its input into a grid of tokens -- ViT-style patches, ``(H/p_h) × (W/p_w)``
cells of ``p_h × p_w`` pixels numbered row-major (Dosovitskiy et al. 2021,
https://arxiv.org/abs/2010.11929), or whole rows, an ``H × 1`` grid -- and attends over them.
:func:`upsample` spreads one weight per token back onto the pixels that token covers, and
:func:`image_attention_png` draws the image beside each attention map laid over it::

    ┌────────┐ ┌────────┐ ┌────────┐
    │ image  │ │ image  │ │ image  │      one panel per map; each map's colour scale runs
    │        │ │+ map 1 │ │+ map 2 │ ...  from 0 (black, with the default inferno) to its own
    └────────┘ └────────┘ └────────┘      largest weight (yellow); the image shows through

``attnkit viz CHECKPOINT --index N`` draws it for digits and MNIST checkpoints
(:func:`attnkit.tasks.images.image_attention` collects the maps).

Example::

    >>> import os, tempfile, torch
    >>> from attnkit.viz.image import image_attention_png, upsample
    >>> image = torch.rand(8, 8)
    >>> w = torch.softmax(torch.randn(16), -1)          # one weight per 2×2 patch: a 4×4 grid
    >>> upsample(w, (4, 4), (8, 8)).shape
    torch.Size([8, 8])
    >>> p = image_attention_png(image, {"pooling": w}, (4, 4), os.path.join(tempfile.mkdtemp(), "a.png"))
    >>> p.stat().st_size > 0
    True
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = ["upsample", "image_attention_png", "image_attention_size"]

DPI = 100
PANEL = 2.0        # inches a side for each panel's image
GAP = 0.25         # inches between panels
MARGIN = 0.2       # inches around the figure
LABEL_H = 0.4      # inches above each panel for its label (two lines)
TITLE_H = 0.45     # inches for the figure title
MAX_LABEL = 30     # characters of a panel label


def _grid(grid: Any) -> tuple[int, int]:
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
        isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    if not ok:
        raise ValueError(f"grid must be (rows, cols) of positive ints; got {grid!r}")
    return int(grid[0]), int(grid[1])


def _as_grid(weights: Any, grid: tuple[int, int], name: str = "weights") -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    gh, gw = grid
    if w.numel() != gh * gw or w.dim() not in (1, 2) or (w.dim() == 2 and tuple(w.shape) != (gh, gw)):
        raise ValueError(f"{name} must hold one weight per token of the {gh}×{gw} grid: shape ({gh * gw},) or "
                         f"({gh}, {gw}); got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must be finite; got {w.tolist()}")
    return w.reshape(gh, gw)


def upsample(weights: Any, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Spread one weight per token onto the pixels it covers.

    Args:
        weights: ``(rows·cols,)`` in row-major token order, or ``(rows, cols)``.
        grid: ``(rows, cols)`` of the token grid, e.g. ``(H/p, W/p)`` for ``p × p`` patches or
            ``(H, 1)`` for a model that reads rows.
        size: ``(H, W)`` of the image.

    Returns:
        ``(H, W)`` float64: pixel ``(y, x)`` holds the weight of the token whose cell contains it
        (exact block copies when the grid divides the image, nearest token otherwise).

    Equivalent PyTorch (grid dividing the image)::

        w.reshape(rows, cols).repeat_interleave(H // rows, 0).repeat_interleave(W // cols, 1)
    """
    g = _grid(grid)
    H, W = _grid(size)
    w = _as_grid(weights, g)
    if H % g[0] == 0 and W % g[1] == 0:
        return w.repeat_interleave(H // g[0], 0).repeat_interleave(W // g[1], 1)
    return torch.nn.functional.interpolate(w[None, None], size=(H, W), mode="nearest")[0, 0]


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _image(image: Any) -> np.ndarray:
    """``(H, W)`` grey or ``(H, W, 3)`` colour in [0, 1] from ``(H, W)``, ``(1|3, H, W)`` or ``(H, W, 3)``."""
    x = torch.as_tensor(image).detach().cpu().to(torch.float64)
    if x.dim() == 3 and x.shape[0] in (1, 3):  # channels first (as torch models read images)
        x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    if not (x.dim() == 2 or (x.dim() == 3 and x.shape[-1] == 3)) or x.numel() == 0:
        raise ValueError(f"image must be (H, W), (1, H, W), (3, H, W) or (H, W, 3); got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("image must be finite")
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)).numpy()


def image_attention_size(num_maps: int, *, columns: int = 4, title: bool = True,
                         dpi: int = DPI) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`image_attention_png` writes for ``num_maps`` maps."""
    panels = num_maps + 1
    cols = min(panels, columns)
    rows = math.ceil(panels / cols)
    w = 2 * MARGIN + cols * PANEL + (cols - 1) * GAP
    h = (TITLE_H if title else MARGIN) + rows * (LABEL_H + PANEL) + (rows - 1) * GAP + MARGIN
    return math.ceil(w * dpi), math.ceil(h * dpi)


def image_attention_png(image: Any, maps: Mapping[str, Any], grid: tuple[int, int], path: str | os.PathLike, *,
                        title: str | None = None, cmap: str = "inferno", alpha: float = 0.6, columns: int = 4,
                        grid_lines: bool | None = None, dpi: int = DPI) -> Path:
    """Draw ``image`` and, beside it, each attention map over its tokens laid on the image.

    Args:
        image: ``(H, W)`` grey, ``(1, H, W)``, ``(3, H, W)`` or ``(H, W, 3)`` pixels (any range:
            shown from their min to their max).
        maps: ``{label: weights}``, each ``(rows·cols,)`` in row-major token order or
            ``(rows, cols)``; one panel each, in order (e.g. the pooling query's weights, one map
            per head, or their mean).
        grid: ``(rows, cols)`` of the token grid (``(H/p, W/p)`` for ``p × p`` patches, ``(H, 1)``
            for rows); the weights are :func:`upsample` d onto the image.
        path: the PNG file to write (folders are created; written atomically).
        title: shown above the panels.
        cmap: a matplotlib colour map for the weights; each panel's scale runs from 0 to its own
            largest weight (written under its label).
        alpha: opacity of the colour laid over the image (the image shows through with ``1 - alpha``).
        columns: panels per row.
        grid_lines: draw the token cells' borders (default: when the grid has at most 16 cells a side).
        dpi: pixels per inch; the picture is :func:`image_attention_size` pixels.

    Returns:
        The path written.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .heatmap import save_png

    g = _grid(grid)
    img = _image(image)
    H, W = img.shape[:2]
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps must be a non-empty {label: weights} mapping")
    ups = {str(k): upsample(_as_grid(v, g, f"maps[{k!r}]"), g, (H, W)).numpy() for k, v in maps.items()}
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown cmap {cmap!r}; see matplotlib.colormaps for the valid names")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
    if not isinstance(columns, int) or isinstance(columns, bool) or columns < 1:
        raise ValueError(f"columns must be an int >= 1; got {columns!r}")
    if not isinstance(dpi, int) or isinstance(dpi, bool) or dpi < 10:
        raise ValueError(f"dpi must be an int >= 10; got {dpi!r}")

    px_w, px_h = image_attention_size(len(ups), columns=columns, title=title is not None, dpi=dpi)
    FW, FH = (px_w + 0.25) / dpi, (px_h + 0.25) / dpi  # exactly px_w x px_h pixels
    cols = min(len(ups) + 1, columns)
    top = TITLE_H if title is not None else MARGIN
    grey = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img
    colours = matplotlib.colormaps[cmap]
    fig = Figure(figsize=(FW, FH), dpi=dpi)
    FigureCanvasAgg(fig)
    panels = [("image", None)] + list(ups.items())
    for i, (label, w) in enumerate(panels):
        r, c = divmod(i, cols)
        left = MARGIN + c * (PANEL + GAP)
        bottom = FH - top - LABEL_H - PANEL - r * (LABEL_H + PANEL + GAP)
        ax = fig.add_axes((left / FW, bottom / FH, PANEL / FW, PANEL / FH))
        ax.set_xticks([])
        ax.set_yticks([])
        if w is None:
            ax.imshow(grey, interpolation="nearest", extent=(0, W, H, 0))
        else:
            vmax = max(float(w.max()), 1e-12)
            share = np.clip(w / vmax, 0.0, 1.0)
            rgb = (1 - alpha) * grey + alpha * colours(share)[..., :3]   # the weight's colour over the image
            ax.imshow(rgb, interpolation="nearest", extent=(0, W, H, 0))
            label = f"{_short(label)}\nmax {vmax:.3f} (uniform {1 / (g[0] * g[1]):.3f})"
            if grid_lines or (grid_lines is None and max(g) <= 16):
                for y in range(1, g[0]):
                    ax.axhline(y * H / g[0], color="white", lw=0.3, alpha=0.5)
                for x in range(1, g[1]):
                    ax.axvline(x * W / g[1], color="white", lw=0.3, alpha=0.5)
        ax.set_title(label, fontsize=8, pad=3)
    if title is not None:
        fig.text(0.5, 1 - (TITLE_H * 0.5) / FH, title, ha="center", va="center", fontsize=9, parse_math=False)
    return save_png(fig, path, dpi)
