"""PNG pictures: the documented pixel size, and pixels that show the weights (head grid, mask
tiles, summarized long alignments)."""

import struct

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import attnkit
from attnkit.viz import grid, heatmap
from attnkit.viz import masks as vmasks
from attnkit.viz.grid import head_grid_png, head_grid_size
from attnkit.viz.heatmap import alignment_png, alignment_size
from attnkit.viz.masks import mask_png, mask_size, tile_counts

DPI = 100


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def is_yellow(px):  # viridis at the top of the scale
    return px[0] > 0.9 and px[1] > 0.8 and px[2] < 0.3


def is_purple(px):  # viridis at 0
    return px[0] < 0.35 and px[1] < 0.1 and px[2] > 0.3


def perm(n, shift):
    w = torch.zeros(n, n)
    w[torch.arange(n), (torch.arange(n) + shift) % n] = 1.0
    return w


def test_head_grid_pixels_show_each_heads_pattern(tmp_path):
    """Layer l, head h is the permutation i -> i + l + 2h (mod 6); the centre of every cell is
    yellow exactly where that permutation puts its weight."""
    L, H, T = 2, 3, 6
    layers = [torch.stack([perm(T, l + 2 * h) for h in range(H)]) for l in range(L)]
    toks = list("abcdef")
    p = head_grid_png(layers, tmp_path / "g.png", query_tokens=toks, key_tokens=toks, title="permutations")
    w_px, h_px = png_size(p)
    assert (w_px, h_px) == head_grid_size(L, H, T, T, query_tokens=toks, key_tokens=toks)
    img = mpimg.imread(p)[..., :3]
    g = grid._geometry(L, H, T, T, title=True, rollout=False, query_tokens=toks, key_tokens=toks)
    for l in range(L):
        y0 = g["bottom"] + (L - 1 - l) * (g["ph"] + grid.GAP)
        for h in range(H):
            x0 = g["left"] + h * (g["pw"] + grid.GAP)
            for i in range(T):
                for j in range(T):
                    x = int((x0 + (j + 0.5) * g["pw"] / T) * DPI)
                    y = h_px - int((y0 + (T - i - 0.5) * g["ph"] / T) * DPI)
                    hot = j == (i + l + 2 * h) % T
                    assert (is_yellow if hot else is_purple)(img[y, x]), (l, h, i, j)


def test_head_grid_with_rollout_sizes_and_errors(tmp_path):
    layers = torch.softmax(torch.randn(3, 4, 30, 30), -1)
    p = head_grid_png(layers, tmp_path / "r.png", rollout=True, layer_names=["a", "b", "c"])
    assert png_size(p) == head_grid_size(3, 4, 30, 30, title=False, rollout=True, layer_names=["a", "b", "c"])
    assert p.stat().st_size > 5000
    assert head_grid_size(3, 4, 30, 30, rollout=True)[0] > head_grid_size(3, 4, 30, 30)[0]
    p = head_grid_png([torch.rand(2, 3, 7)], tmp_path / "c.png", dpi=50)  # cross-attention, one layer
    assert png_size(p) == head_grid_size(1, 2, 3, 7, title=False, dpi=50)
    with pytest.raises(ValueError, match="rollout=True needs square self-attention"):
        head_grid_png([torch.rand(2, 3, 7)], tmp_path / "x.png", rollout=True)
    with pytest.raises(ValueError, match=r"layer_names must name every layer \(3\); got 1"):
        head_grid_png(layers, tmp_path / "x.png", layer_names=["a"])
    with pytest.raises(ValueError, match="query_tokens must be a sequence of 30 labels"):
        head_grid_png(layers, tmp_path / "x.png", query_tokens=["a"])
    with pytest.raises(ValueError, match="unknown cmap"):
        head_grid_png(layers, tmp_path / "x.png", cmap="nope")
    assert not (tmp_path / "x.png").exists()


def test_mask_tiles_are_coloured_by_class(tmp_path):
    """Causal 256 x 256 in 64 x 64 tiles: the diagonal tiles are partial, those below full, those
    above empty; the left panel shows the pairs."""
    m = attnkit.masks.causal()
    p = mask_png(m, tmp_path / "m.png", 256, 256, block_q=64, block_k=64)
    w_px, h_px = png_size(p)
    assert (w_px, h_px) == mask_size(256, 256)
    img = mpimg.imread(p)[..., :3]
    ph = vmasks._panel_h(256, 256)
    y0 = vmasks.MARGIN + vmasks.LEGEND_H + vmasks.AXIS
    x_left = vmasks.MARGIN + vmasks.AXIS
    x_right = x_left + vmasks.PANEL_W + vmasks.GAP
    colours = {k: np.array([int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)]) for k, c in vmasks.COLORS.items()}
    cls = m.classify_blocks(256, 256, 64, 64)[0, 0]
    assert tile_counts(cls) == {"empty": 6, "partial": 4, "full": 6}
    for i in range(4):
        for j in range(4):
            x = int((x_right + (j + 0.5) * vmasks.PANEL_W / 4) * DPI)
            y = h_px - int((y0 + ph - (i + 0.5) * ph / 4) * DPI)
            want = 1 if i == j else 2 if i > j else 0
            assert int(cls[i, j]) == want
            np.testing.assert_allclose(img[y, x], colours[want], atol=0.02, err_msg=f"tile {i},{j}")

    def pair(q, k):
        y = h_px - int((y0 + ph - (q + 0.5) / 256 * ph) * DPI)
        return img[y, int((x_left + (k + 0.5) / 256 * vmasks.PANEL_W) * DPI)]
    assert pair(200, 10).max() < 0.1 and pair(10, 200).min() > 0.9  # allowed: dark; masked: white


def test_mask_png_needs_the_batch_a_padding_mask_was_built_for(tmp_path):
    m = attnkit.masks.causal() & attnkit.masks.key_padding(torch.tensor([300, 100]))
    p = mask_png(m, tmp_path / "kp.png", 200, 300, batch=1, batch_size=2, block_q=64, block_k=64, dpi=60)
    assert png_size(p) == mask_size(200, 300, dpi=60)
    with pytest.raises(ValueError, match="key_padding was built for batch 2.*pass batch_size="):
        mask_png(m, tmp_path / "x.png", 200, 300)
    with pytest.raises(ValueError, match="block_q must be an int >= 1; got 0"):
        mask_png(attnkit.masks.causal(), tmp_path / "x.png", 8, 8, block_q=0)


def test_long_alignments_are_summarized_not_unreadable(tmp_path):
    """Up to 100 tokens a side every token is labelled on cells of at least 0.16 in; a 300-token side
    spans 16 in with every 3rd token labelled (labels still 0.16 in apart); the weights stay in place."""
    lay = heatmap._layout(100, 100)
    assert (lay.step_x, lay.step_y, lay.cell_x) == (1, 1, 0.16)
    lay = heatmap._layout(300, 12)
    assert lay.step_x == 3 and lay.step_y == 1 and lay.cell_x * 300 == pytest.approx(16.0) and lay.cell_y == 0.16
    assert lay.step_x * lay.cell_x >= 0.16 - 1e-9
    src = [f"w{i}" for i in range(300)]
    tgt = [f"t{i}" for i in range(12)]
    w = torch.zeros(12, 300)
    w[torch.arange(12), torch.arange(12) * 25] = 1.0
    p = alignment_png(w, src, tgt, tmp_path / "long.png", title="long")
    w_px, h_px = png_size(p)
    assert (w_px, h_px) == alignment_size(src, tgt)
    assert w_px < 16 * DPI + 500  # 16 in of cells plus labels and the colour bar
    img = mpimg.imread(p)[..., :3]
    left, bottom = heatmap._margins(src, tgt, lay)
    for i in range(12):
        y = h_px - int((bottom + (12 - i - 0.5) * lay.cell_y) * DPI)
        for j in (i * 25, i * 25 + 12):
            x = int((left + (j + 0.5) * lay.cell_x) * DPI)
            assert (is_yellow if j == i * 25 else is_purple)(img[y, x]), (i, j)
