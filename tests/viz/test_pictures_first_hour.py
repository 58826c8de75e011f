"""A researcher's first hour with the pictures: a 24-token head grid is readable (rows of at least
14 px, axis names, a colour bar, a note on how panels are scaled), the CLI's one-head picture is
not a small white sheet, ``mask_png`` and ``head_grid_png`` take the path in the same place,
printing captured weights shows sizes not numbers, and the HTML pages name CJK fonts."""

import inspect
import re
import struct
import warnings

import matplotlib.image as mpimg
import pytest
import torch

import attnkit
from attnkit.viz import grid
from attnkit.viz.collect import Group, Layer, group_records
from attnkit.viz.grid import head_grid_png, head_grid_size
from attnkit.viz.html import alignment_html
from attnkit.viz.masks import mask_png, mask_size
from attnkit.viz.view import attention_page

DPI = 100


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def words(n):
    return [f"tok{i}" for i in range(n)]


# 1. a readable head grid ---------------------------------------------------------------------------


def test_head_grid_rows_are_readable_and_the_picture_grows_with_the_tokens(tmp_path):
    toks = words(24)
    g = grid._geometry(2, 4, 24, 24, title=True, rollout=False, query_tokens=toks, key_tokens=toks)
    row_px, col_px = g["ph"] / 24 * DPI, g["pw"] / 24 * DPI
    assert row_px >= 14 and col_px >= 14 and (g["step_q"], g["step_k"]) == (1, 1)  # every token labelled
    assert grid.TICK_FS / 72 * DPI < row_px  # a label is shorter than its row: no overlap
    sizes = [head_grid_size(2, 4, n, n, query_tokens=words(n), key_tokens=words(n)) for n in (8, 16, 24, 30)]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(sizes, sizes[1:]))
    w = torch.softmax(torch.randn(2, 4, 24, 24), -1)
    p = head_grid_png(w, tmp_path / "g.png", query_tokens=toks, key_tokens=toks, title="24 tokens")
    assert png_size(p) == head_grid_size(2, 4, 24, 24, query_tokens=toks, key_tokens=toks)
    assert png_size(p)[1] >= 2 * 24 * 14  # two layers of 24 rows of 14 px at least


def test_head_grid_long_sides_are_capped_and_their_labels_thinned():
    toks = words(120)
    g = grid._geometry(1, 2, 120, 120, title=False, rollout=False, query_tokens=toks, key_tokens=toks)
    assert g["pw"] <= grid.PANEL_MAX + 1e-9 and g["ph"] <= grid.PANEL_MAX + 1e-9
    assert g["step_q"] > 1 and g["step_q"] * g["ph"] / 120 * DPI >= 14 - 1e-6  # labelled rows still 14 px apart
    fig = grid._figure(torch.softmax(torch.randn(1, 2, 120, 120), -1), query_tokens=toks, key_tokens=toks)
    first = fig.axes[0]
    assert len(first.get_yticklabels()) == -(-120 // g["step_q"])
    assert first.get_ylabel() == f"query (every {g['step_q']}th labelled)"
    big = grid._geometry(12, 16, 512, 512, title=True, rollout=False, query_tokens=None, key_tokens=None)
    assert big["grid_w"] <= grid.GRID_MAX + 1e-6 and big["height"] < grid.GRID_MAX + 3


def test_head_grid_names_its_axes_and_has_a_colour_bar_and_a_scale_note():
    toks = list("abcdef")
    w = torch.softmax(torch.randn(2, 3, 6, 6), -1)
    fig = grid._figure(w, query_tokens=toks, key_tokens=toks, rollout=True)
    panels, (cbar,) = fig.axes[:-1], fig.axes[-1:]
    assert len(panels) == 2 * 4
    assert [ax.get_ylabel() for ax in panels] == ["query", "", "", "", "query", "", "", ""]
    assert [ax.get_xlabel() for ax in panels] == ["", "", "", "", "key", "key", "key", "key"]
    assert cbar.get_ylabel() == "weight ÷ the panel's max"
    assert [t.get_text() for t in cbar.get_yticklabels()] == ["0", "½ max", "max"]
    notes = [t.get_text() for t in fig.texts]
    assert "colour scale: per panel, 0 to its own max" in notes
    vmax = float(max(w.max(), attnkit.viz.rollout(list(w), cumulative=True).max()))
    fig = grid._figure(w, scale="shared", rollout=True)
    cbar = fig.axes[-1]
    assert cbar.get_ylabel() == "weight" and cbar.get_ylim()[1] == pytest.approx(vmax)
    assert "colour scale: shared, 0 to the max of all" in [t.get_text() for t in fig.texts]
    for ax in fig.axes[:-1]:  # every panel on the one scale
        (im,) = ax.get_images()
        assert im.norm.vmax == pytest.approx(vmax)
    with pytest.raises(ValueError, match="scale must be one of .*'panel'.*'shared'.*got 'global'"):
        grid._figure(w, scale="global")


# 2. the CLI's one-head picture ----------------------------------------------------------------------


def test_one_head_grid_like_the_clis_is_tight_not_a_white_sheet(tmp_path):
    """The viz CLI's ``heads_attention.png`` for a dates model: 1 layer, 1 head, 10 output x 15 input
    characters. It was 373 x 212 px with 10-px rows and a 1.5 in margin for a 9-letter name."""
    q, k = list("1789-07-14"), list("14 juillet 1789")
    w = [torch.softmax(torch.randn(1, len(q), len(k)), -1)]
    p = head_grid_png(w, tmp_path / "heads_attention.png", layer_names=["attention"], query_tokens=q, key_tokens=k,
                      title="attention (cross-attention): every head")
    w_px, h_px = png_size(p)
    g = grid._geometry(1, 1, len(q), len(k), title=True, rollout=False, query_tokens=q, key_tokens=k,
                       layer_names=["attention"])
    assert g["ph"] / len(q) * DPI >= 14 and h_px > 212 and w_px > 373
    assert g["left"] < 1.3  # was 1.97 in, whatever the name
    img = mpimg.imread(p)[..., :3]
    assert (img.min(-1) < 0.95).mean() > 0.25  # was 0.22


# 3. the path goes second ---------------------------------------------------------------------------


def test_mask_png_and_head_grid_png_take_the_path_second(tmp_path):
    for fn in (mask_png, head_grid_png, attention_page):
        assert list(inspect.signature(fn).parameters)[1] == "path", fn.__name__
    causal = attnkit.masks.causal()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = mask_png(causal, tmp_path / "new.png", 64, 32, block_q=16, block_k=16)
    assert png_size(p) == mask_size(64, 32)
    with pytest.warns(DeprecationWarning, match=r"call mask_png\(mask, path, num_queries, num_keys, \.\.\.\)"):
        old = mask_png(causal, 64, 32, tmp_path / "old.png", block_q=16, block_k=16)
    assert old == tmp_path / "old.png" and old.read_bytes() == p.read_bytes()
    t = torch.ones(24, 40, dtype=torch.bool).tril()
    assert png_size(mask_png(t, tmp_path / "t.png", block_q=8, block_k=8)) == mask_size(24, 40)  # sizes from the tensor
    with pytest.raises(TypeError, match=r"mask_png needs the sizes .*mask_png\(mask, path, num_queries, num_keys"):
        mask_png(causal, tmp_path / "x.png")
    with pytest.raises(TypeError, match=r"takes its path second: mask_png\(mask, path, num_queries, num_keys"):
        mask_png(causal, 64, 32)
    with pytest.raises(TypeError, match=r"head_grid_png\(layers, path"):
        head_grid_png(str(tmp_path / "x.png"), torch.rand(1, 2, 3, 3))
    assert not (tmp_path / "x.png").exists()


# 4. short reprs -------------------------------------------------------------------------------------


def test_printing_a_capture_or_a_group_shows_sizes_not_values():
    torch.manual_seed(0)
    mhas = torch.nn.ModuleList(attnkit.nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(3))
    x = torch.randn(1, 5, 8)
    with attnkit.capture() as rec:
        for mha in mhas:
            x = mha(x, need_weights=False)[0]
    r = repr(rec[0])
    assert "tensor" not in r and "\n" not in r and len(r) < 160
    assert "(1, 2, 5, 5) float32" in r and "name='MultiheadAttention'" in r
    r = repr(rec)
    assert r.startswith("Recorder(3 records:") and r.count("Record(") == 3 and "tensor" not in r
    (g,) = group_records(rec)
    r = repr(g)
    assert "tensor" not in r and "(2, 5, 5) float32" in r and len(r) < 800

    w = torch.full((8, 64, 64), 0.4242)  # a value to look for; min and max are 0 and 1
    w[0, 0, 0], w[0, 0, 1] = 0.0, 1.0
    layers = [Layer(f"encoder.layers.{i}.self_attn", w.clone(), tuple(range(8)), tuple(range(64)), "sdpa")
              for i in range(12)]
    big = Group("encoder.layers.*.self_attn", layers, words(64), words(64), title="encoder", meta={"x": w})
    r = repr(big)
    assert "0.4242" not in r and "0.424" not in r and "tensor" not in r
    assert len(r) < 1500 and r.count("\n") < 15
    assert "12 layers" in r and "... 4 more layers" in r and "(8, 64, 64) float32 in [0, 1]" in r
    assert "heads=0..7" in r and "rows=0..63" in r and "64 ['tok0'" in r and "meta keys=['x']" in r
    print(big)  # what a researcher types


# 5. CJK fonts in the pages ---------------------------------------------------------------------------

CJK = ("Noto Sans CJK", "Source Han Sans", "PingFang", "Hiragino", "Microsoft YaHei", "Malgun Gothic")


def families(page, selector):
    m = re.search(re.escape(selector) + r"\{[^}]*?font-family:([^;}]+)", page)
    assert m, selector
    return [f.strip().strip('"') for f in m.group(1).split(",")]


def test_pages_fall_back_to_cjk_fonts():
    toks = ["東京", "大学", "에", "x"]
    w = torch.softmax(torch.randn(2, 4, 4), -1)
    view = attention_page([Group("enc.*.self_attn", [Layer("enc.0.self_attn", w, (0, 1), (0, 1, 2, 3))], toks, toks)])
    simple = alignment_html(torch.softmax(torch.randn(4, 4), -1).tolist(), toks, toks)
    for page, selectors in ((view, ("body", ".tok", "table.matrix")), (simple, ("body", ".tok", "table.grid"))):
        for sel in selectors:
            fams = families(page, sel)
            assert fams[-1] in ("sans-serif", "monospace"), (sel, fams)
            for name in CJK:
                assert any(f.startswith(name) for f in fams), (sel, name)
    assert families(view, "body")[-1] == "sans-serif" and families(view, ".tok")[-1] == "monospace"
