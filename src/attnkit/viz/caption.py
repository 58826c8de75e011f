"""A caption's attention over its image: one map per word.

:func:`caption_png` draws the image and, for every word of the caption, the attention the model
paid when it wrote that word, laid over the image (:func:`attnkit.viz.image.image_attention_png`
with the words as panel labels). :func:`caption_html` writes a self-contained page (inline
JavaScript, the image embedded as a PNG data URL, no network needed): hover or focus a word to
see its map over the image; every word and the title are HTML-escaped.

Example::

    >>> import os, tempfile, torch
    >>> from attnkit.viz.caption import caption_html
    >>> maps = torch.softmax(torch.randn(3, 16), -1)       # 3 words over a 4 x 4 grid
    >>> p = caption_html(torch.rand(3, 32, 32), ["a", "<red>", "square"], maps, (4, 4),
    ...                  os.path.join(tempfile.mkdtemp(), "c.html"))
    >>> page = p.read_text(); "&lt;red&gt;" in page and "<red>" not in page
    True
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .._io import atomic_write_text
from .image import _as_grid, _grid, _image, image_attention_png

Tensor = torch.Tensor

__all__ = ["caption_png", "caption_html"]


def _maps(words: Sequence[str], maps: Any, grid: tuple[int, int]) -> list[np.ndarray]:
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise TypeError("words must be a list of strings")
    rows = list(maps) if not isinstance(maps, (Tensor, np.ndarray)) else [m for m in maps]
    if len(rows) != len(words):
        raise ValueError(f"maps must hold one map per word: {len(words)} words but {len(rows)} maps")
    return [_as_grid(m, grid, f"maps[{i}]").numpy() for i, m in enumerate(rows)]


def caption_png(image: Any, words: Sequence[str], maps: Any, grid: tuple[int, int], path: str | os.PathLike, *,
                title: str | None = None, columns: int = 5) -> Path:
    """The image beside one panel per word: ``maps[t]`` (``(rows·cols,)`` or ``(rows, cols)``) is
    the attention when ``words[t]`` was written."""
    g = _grid(grid)
    ms = _maps(words, maps, g)
    labelled = {f"{t + 1}. {w}": m for t, (w, m) in enumerate(zip(words, ms))}
    return image_attention_png(image, labelled, g, path, title=title, columns=columns)


def _png_data_url(img: np.ndarray) -> str:
    from matplotlib.image import imsave

    buf = io.BytesIO()
    lo, hi = float(img.min()), float(img.max())
    shown = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    imsave(buf, shown, format="png", cmap="gray" if shown.ndim == 2 else None)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.view {{ position: relative; display: inline-block; }}
.view img, .view canvas {{ width: {px}px; height: {px}px; image-rendering: pixelated; display: block; }}
.view canvas {{ position: absolute; left: 0; top: 0; }}
.words {{ margin: 1em 0; font-size: 1.3em; }}
.words span {{ padding: 0.1em 0.3em; margin: 0 0.1em; border-radius: 4px; cursor: pointer; outline: none; }}
.words span.on {{ background: #ffd54f; }}
.note {{ color: #666; font-size: 0.9em; }}
</style></head><body>
<h2>{title}</h2>
<div class="words">{spans}</div>
<div class="view"><img src="{src}" alt="the image"><canvas width="{gw}" height="{gh}"></canvas></div>
<p class="note">Hover or focus a word: the colour over the image is the attention the model paid when it
wrote that word (each word's map scaled to its own largest weight; the weight is written under the image).</p>
<p class="note" id="weight"></p>
<script>
const maps = {maps};
const grid = [{gh}, {gw}];
const canvas = document.querySelector("canvas");
const ctx = canvas.getContext("2d");
const spans = document.querySelectorAll(".words span");
function show(t) {{
  spans.forEach((s, i) => s.classList.toggle("on", i === t));
  ctx.clearRect(0, 0, grid[1], grid[0]);
  const m = maps[t]; let top = 0;
  m.forEach(v => {{ if (v > top) top = v; }});
  for (let r = 0; r < grid[0]; r++) for (let c = 0; c < grid[1]; c++) {{
    const v = m[r * grid[1] + c] / (top || 1);
    ctx.fillStyle = `rgba(255, ${{Math.round(80 + 150 * v)}}, 0, ${{(0.75 * v).toFixed(3)}})`;
    ctx.fillRect(c, r, 1, 1);
  }}
  document.getElementById("weight").textContent = `word ${{t + 1}}: largest weight ${{top.toFixed(3)}}`;
}}
spans.forEach((s, i) => {{ s.addEventListener("mouseenter", () => show(i)); s.addEventListener("focus", () => show(i)); }});
if (maps.length) show(0);
</script></body></html>
"""


def caption_html(image: Any, words: Sequence[str], maps: Any, grid: tuple[int, int],
                 path: str | os.PathLike, *, title: str = "caption attention", size_px: int = 384) -> Path:
    """Write the interactive page (see the module docstring) to ``path`` and return it."""
    g = _grid(grid)
    ms = _maps(words, maps, g)
    img = _image(image)
    spans = "".join(f'<span tabindex="0">{html.escape(w)}</span>' for w in words)
    page = _PAGE.format(title=html.escape(str(title)), spans=spans, src=_png_data_url(img), px=int(size_px),
                        gh=g[0], gw=g[1], maps=json.dumps([[round(float(x), 6) for x in m.flatten()] for m in ms]))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, page)
    return p
