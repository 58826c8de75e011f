"""A self-contained interactive HTML view of attention alignments: inline CSS and JavaScript,
no network needed to open it. Hover (or focus) a target token to highlight the source tokens it
attends to, in proportion to the weight; every cell of the matrix shows its weight on hover.
Every piece of user text (tokens, captions, title) is HTML-escaped, so a token such as
``<script>`` shows as text.

Example::

    >>> from attnkit.viz.html import alignment_html
    >>> page = alignment_html([[0.9, 0.1], [0.2, 0.8]], ["<b>", "x"], ["1", "2"])
    >>> "&lt;b&gt;" in page and "<b>" not in page
    True
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from . import _matrix
from .._io import atomic_write_text


@dataclass
class Alignment:
    """One alignment to show: ``weights (T_out, T_in)`` (tensor, array or nested lists), the
    source (column) and target (row) token labels, and an optional caption. Validated on creation."""

    weights: Any
    src_tokens: Sequence[str]
    tgt_tokens: Sequence[str]
    caption: str = ""

    def __post_init__(self) -> None:
        w, self.src_tokens, self.tgt_tokens = _matrix(self.weights, self.src_tokens, self.tgt_tokens)
        self.weights = w.tolist()
        if not isinstance(self.caption, str):
            raise TypeError(f"caption must be a string; got {type(self.caption).__name__}")


#: CJK-capable fonts, tried after the Latin ones, so that Chinese, Japanese and Korean tokens show
#: as text, not boxes, wherever one of them is installed (a browser's default sans-serif often has none).
CJK_FONTS = ('"Noto Sans CJK SC"', '"Noto Sans CJK JP"', '"Noto Sans CJK KR"', '"Noto Sans CJK TC"',
             '"Source Han Sans SC"', '"Source Han Sans"', '"PingFang SC"', '"Hiragino Sans"',
             '"Hiragino Kaku Gothic ProN"', '"Microsoft YaHei"', '"Microsoft JhengHei"', '"Yu Gothic"', "Meiryo",
             '"Malgun Gothic"', '"Apple SD Gothic Neo"', '"WenQuanYi Micro Hei"', '"Droid Sans Fallback"',
             '"Arial Unicode MS"')
#: ``font-family`` values of the pages: text, and tokens (monospace, CJK monospace, then the same fallbacks).
FONT_SANS = ",".join(('system-ui', '-apple-system', '"Segoe UI"', 'Roboto', '"Noto Sans"', 'Arial') + CJK_FONTS
                     + ('sans-serif',))
FONT_MONO = ",".join(('ui-monospace', 'Menlo', 'Consolas', '"DejaVu Sans Mono"', '"Noto Sans Mono CJK SC"',
                      '"Noto Sans Mono CJK JP"', '"Sarasa Mono SC"') + CJK_FONTS + ('monospace',))

_CSS = """
body{font-family:%SANS%;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.3em} h2{font-size:1.05em;margin:1.2em 0 .4em;font-weight:600}
p.help{color:#555;font-size:.9em}
section.al{border-top:1px solid #ddd;padding-bottom:.8em}
.line{margin:.3em 0;line-height:2em} .line .lab{display:inline-block;width:4.5em;color:#666}
.tok{display:inline-block;min-width:.8em;padding:0 .2em;margin:0 1px;border:1px solid #ccc;border-radius:3px;
     font-family:%MONO%;white-space:pre;text-align:center;background:#fff}
.tok.t{cursor:pointer} .tok.t.on{border-color:#d33;outline:2px solid #d33}
table.grid{border-collapse:collapse;margin-top:.5em;font-family:%MONO%;font-size:12px}
table.grid td{width:16px;height:16px;border:1px solid #f3f3f3;padding:0}
table.grid th{font-weight:normal;white-space:pre;padding:0 3px}
table.grid th.col{writing-mode:vertical-rl;transform:rotate(180deg);height:auto;vertical-align:bottom;padding:3px 0}
table.grid th.row{text-align:right;cursor:pointer}
table.grid tr.on th.row{color:#d33;font-weight:bold}
""".replace("%SANS%", FONT_SANS).replace("%MONO%", FONT_MONO)

_JS = """
(function(){
  function clear(sec){
    sec.querySelectorAll('.tok.s').forEach(function(s){s.style.background='#fff';s.title='';});
    sec.querySelectorAll('.on').forEach(function(e){e.classList.remove('on');});
  }
  function show(sec,i){
    clear(sec);
    var row=sec.querySelector('tr[data-i="'+i+'"]'); if(!row) return;
    var w=JSON.parse(row.getAttribute('data-w'));
    sec.querySelectorAll('.tok.s').forEach(function(s,j){
      var a=w[j]||0; s.style.background='rgba(220,50,40,'+Math.min(1,a).toFixed(3)+')';
      s.title='weight '+a.toFixed(3);
    });
    row.classList.add('on');
    var t=sec.querySelector('.tok.t[data-i="'+i+'"]'); if(t) t.classList.add('on');
  }
  document.querySelectorAll('section.al').forEach(function(sec){
    sec.querySelectorAll('[data-i]').forEach(function(el){
      var i=el.getAttribute('data-i');
      el.addEventListener('mouseenter',function(){show(sec,i);});
      el.addEventListener('focus',function(){show(sec,i);});
    });
    sec.addEventListener('mouseleave',function(){clear(sec);});
  });
})();
"""


def _e(s: str) -> str:
    return html.escape(s, quote=True)


def _cell_color(a: float, vmax: float) -> str:
    x = 0.0 if vmax <= 0 else min(1.0, max(0.0, a / vmax))
    return f"rgba(30,90,200,{x:.3f})"


def _section(k: int, al: Alignment) -> str:
    w = al.weights
    vmax = max((max(r) for r in w if r), default=0.0)
    out = [f'<section class="al" id="al{k}">']
    if al.caption:
        out.append(f"<h2>{_e(al.caption)}</h2>")
    out.append('<div class="line"><span class="lab">source</span>' + "".join(
        f'<span class="tok s" data-j="{j}">{_e(t)}</span>' for j, t in enumerate(al.src_tokens)) + "</div>")
    out.append('<div class="line"><span class="lab">output</span>' + "".join(
        f'<span class="tok t" tabindex="0" data-i="{i}">{_e(t)}</span>' for i, t in enumerate(al.tgt_tokens))
        + "</div>")
    out.append('<table class="grid"><tr><th></th>' + "".join(
        f'<th class="col">{_e(t)}</th>' for t in al.src_tokens) + "</tr>")
    for i, (t, row) in enumerate(zip(al.tgt_tokens, w)):
        data = _e(json.dumps([round(a, 4) for a in row]))
        cells = "".join(f'<td style="background:{_cell_color(a, vmax)}" title="{_e(t)} → {_e(s)}: {a:.3f}"></td>'
                        for a, s in zip(row, al.src_tokens))
        out.append(f'<tr data-i="{i}" data-w="{data}"><th class="row">{_e(t)}</th>{cells}</tr>')
    out.append("</table></section>")
    return "\n".join(out)


def alignment_page(alignments: Sequence[Alignment], path: str | os.PathLike | None = None, *,
                   title: str = "attention alignment") -> str:
    """One HTML page showing several alignments; written to ``path`` (atomically) when given.

    Returns:
        The page's HTML text.
    """
    items = list(alignments)
    if not all(isinstance(a, Alignment) for a in items):
        raise TypeError("alignments must be a sequence of attnkit.viz.html.Alignment; got "
                        + ", ".join(sorted({type(a).__name__ for a in items if not isinstance(a, Alignment)})))
    if not isinstance(title, str):
        raise TypeError(f"title must be a string; got {type(title).__name__}")
    body = "\n".join(_section(k, a) for k, a in enumerate(items))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n<h1>{_e(title)}</h1>\n"
            '<p class="help">Hover or focus an output token (or a row of the matrix) to highlight the source tokens '
            "it attends to; darker = more weight. Rows: output tokens; columns: source tokens.</p>\n"
            f"{body}\n<script>{_JS}</script>\n</body></html>\n")
    if path is not None:
        atomic_write_text(path, page)
    return page


def alignment_html(weights: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str],
                   path: str | os.PathLike | None = None, *, title: str = "attention alignment",
                   caption: str = "") -> str:
    """A page for one alignment ``weights (T_out, T_in)`` (see :func:`alignment_page`)."""
    return alignment_page([Alignment(weights, src_tokens, tgt_tokens, caption)], path, title=title)


__all__ = ["Alignment", "alignment_html", "alignment_page"]
