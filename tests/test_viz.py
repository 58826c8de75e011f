"""Alignment pictures: PNG heatmaps (pixel size, odd labels) and the self-contained HTML page
(escaping, no network, the weights it carries)."""

import html as htmllib
import json
import re
import struct

import numpy as np
import pytest
import torch

from attnkit import viz
from attnkit.viz.heatmap import alignment_size, alignment_png
from attnkit.viz.html import Alignment, alignment_html, alignment_page


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.mark.parametrize("n_src,n_tgt", [(5, 3), (15, 11), (100, 100), (100, 7)])
def test_png_has_the_documented_pixel_size(tmp_path, n_src, n_tgt):
    src = [f"s{i}" for i in range(n_src)]
    tgt = [f"t{i}" for i in range(n_tgt)]
    w = torch.softmax(torch.randn(n_tgt, n_src), -1)
    p = alignment_png(w, src, tgt, tmp_path / "sub" / "a.png", title="title")
    wi, hi = alignment_size(src, tgt, title=True)
    assert _png_size(p) == (wi, hi)
    assert p.stat().st_size > 2000
    if n_src == 100:  # still readable: cells of at least 0.16 in (16 px) a side
        assert wi >= 100 * 16 and hi >= n_tgt * 16
    p2 = alignment_png(w, src, tgt, tmp_path / "b.png", dpi=50)
    assert _png_size(p2) == alignment_size(src, tgt, title=False, dpi=50)


def test_png_draws_odd_labels_as_text(tmp_path, recwarn):
    src = ["$x$", "<b>", "年", "\\", "␣", "a" * 60]
    p = alignment_png(np.full((2, 6), 1 / 6), src, ["_", "%"], tmp_path / "a.png", title="$5 & <i>")
    assert _png_size(p)[0] > 0
    assert not [w for w in recwarn if "Glyph" in str(w.message)]  # missing glyphs are labelled U+XXXX


def test_png_pixels_show_the_weights(tmp_path):
    """A permutation matrix drawn with viridis: the yellow (weight 1) cells of the plot, top row
    first, sit in the permuted columns (the colour bar, at the far right, is left out)."""
    import matplotlib.image as mpimg

    perm = [2, 0, 3, 1]
    w = np.zeros((4, 4))
    w[np.arange(4), perm] = 1.0
    img = mpimg.imread(alignment_png(w, list("abcd"), list("wxyz"), tmp_path / "a.png"))[..., :3]
    yellow = (img[..., 0] > 0.9) & (img[..., 1] > 0.8) & (img[..., 2] < 0.3)
    ys, xs = np.nonzero(yellow)
    gap = np.argmax(np.diff(np.unique(xs)))  # the widest gap separates the plot from the colour bar
    plot_right = np.unique(xs)[gap]
    ys, xs = ys[xs <= plot_right], xs[xs <= plot_right]
    bands = np.array_split(np.unique(ys), 4)  # the four rows, top first
    centres = [xs[np.isin(ys, b)].mean() for b in bands]
    assert list(np.argsort(np.argsort(centres))) == perm


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"weights must have shape \(len\(tgt_tokens\), len\(src_tokens\)\) "
                                         r"= \(2, 3\); got \(3, 2\)"):
        alignment_png(np.ones((3, 2)), list("abc"), list("xy"), tmp_path / "a.png")
    with pytest.raises(ValueError, match="weights must be a 2-D"):
        alignment_html(np.ones(3), list("abc"), [])
    with pytest.raises(ValueError, match="weights must be finite"):
        alignment_html([[float("nan")]], ["a"], ["b"])
    with pytest.raises(TypeError, match="src_tokens must be a sequence of strings"):
        alignment_html([[1.0]], "a", ["b"])
    with pytest.raises(TypeError, match=r"tgt_tokens must be a sequence of strings .* holding \['int'\]"):
        alignment_html([[1.0]], ["a"], [1])
    with pytest.raises(ValueError, match="unknown cmap 'nope'"):
        alignment_png([[1.0]], ["a"], ["b"], tmp_path / "a.png", cmap="nope")
    assert not (tmp_path / "a.png").exists()


EVIL = "<script>alert(1)</script>"


def test_html_escapes_every_user_text_and_needs_no_network(tmp_path):
    w = [[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]
    page = alignment_html(w, [EVIL, '"quoted"', "a&b"], ["<i>", "</s>"], tmp_path / "p.html",
                          title=f"title {EVIL}", caption=f"cap {EVIL}")
    assert (tmp_path / "p.html").read_text(encoding="utf-8") == page
    assert "alert(1)</script>" not in page and "<i>" not in page and "</s><" not in page
    assert page.count("<script>") == 1  # our own, inline
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&amp;" in page and "&quot;quoted&quot;" in page
    assert not re.search(r"(https?:)?//[a-z]", page.replace("</", ""))  # no links: works offline
    assert not re.search(r"\b(src|href)=", page)


def test_html_carries_the_weights_per_target_row():
    w = np.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    page = alignment_page([Alignment(w, list("abc"), ["x", "y"], "one"), Alignment(w[:, :2] * 2, list("ab"), ["x", "y"])])
    assert page.count('<section class="al"') == 2
    rows = [json.loads(htmllib.unescape(m)) for m in re.findall(r'<tr data-i="\d+" data-w="([^"]*)"', page)]
    assert rows == [[0.7, 0.2, 0.1], [0.0, 0.5, 0.5], [1.4, 0.4], [0.0, 1.0]]
    assert page.count('class="tok t"') == 4 and page.count('class="tok s"') == 5


def test_viz_package_exports_lazily():
    assert viz.alignment_png is alignment_png and viz.Alignment is Alignment
    with pytest.raises(AttributeError):
        viz.nope
