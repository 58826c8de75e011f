"""A self-contained interactive HTML view of every attention layer and head -- like bertviz's
head and model views, with the rollout (and, for short inputs, the attention flow) as extra
views. One file: styles, script and data inline, nothing loaded from the network (a
Content-Security-Policy forbids it), so it opens offline.

* pick the group of layers (encoder self-attention, cross-attention, ...), the layer and the head
  (or the mean of the heads), or click a thumbnail of the model view (every layer × head);
* hover (or focus) a query token to see where it attends: lines to the keys, the keys shaded by
  weight, its row of the matrix outlined;
* switch between *attention*, *rollout* and *flow* (:mod:`attnkit.viz.analysis`).

User text is data, never markup: tokens, names and titles travel in one JSON blob inside
``<script type="application/json">`` (with ``<``, ``>``, ``&`` escaped as ``\\u003c`` ...), and
the page builds its DOM with ``textContent``; the only script that runs is the page's own (the
policy admits it by its SHA-256 hash, so an injected script or ``on…=`` handler would not run
either).

Example::

    >>> import torch
    >>> from attnkit.viz.collect import Group, Layer
    >>> from attnkit.viz.view import attention_page
    >>> w = torch.softmax(torch.randn(2, 3, 3), -1)
    >>> toks = ["<b>", "x", "y"]
    >>> g = Group("enc.*.self_attn", [Layer("enc.0.self_attn", w, (0, 1), (0, 1, 2))], toks, toks)
    >>> page = attention_page([g], title="demo")
    >>> "<b>" in page, "\\\\u003cb\\\\u003e" in page
    (False, True)
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
from typing import Any, Sequence

import torch

from .collect import Group
from .html import FONT_MONO, FONT_SANS
from .._io import atomic_write_text

__all__ = ["attention_page", "view_data", "json_for_script"]

PRECISION = 4  # decimals kept for the weights in the page


def json_for_script(data: Any) -> str:
    """JSON text safe inside ``<script type="application/json">``: ``<``, ``>``, ``&``, U+2028 and
    U+2029 are written as ``\\uXXXX`` escapes, so no ``</script>`` or ``<!--`` can end the block
    early; NaN and infinities are refused."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


def _round(t: torch.Tensor, digits: int = PRECISION) -> list:
    return torch.round(t.double(), decimals=digits).tolist()


def _num(x: float) -> float | None:
    return None if (x is None or not math.isfinite(x)) else round(float(x), 4)


def _full_rows(layer, tq: int) -> torch.Tensor:
    """``(H', Tq, Tk)``: a layer's weights with the rows it did not capture as zeros."""
    w = layer.weights
    if tuple(layer.rows) == tuple(range(tq)):
        return w
    full = torch.zeros(w.shape[0], tq, w.shape[2], dtype=w.dtype)
    full[:, list(layer.rows)] = w
    return full


def _encoder_for(group: Group, groups: Sequence[Group]) -> Group | None:
    """A complete self-attention group over this cross-attention group's keys (an encoder)."""
    for g in groups:
        if g is not group and g.is_self and g.num_keys == group.num_keys and \
                (g.key_tokens is None or group.key_tokens is None or g.key_tokens == group.key_tokens):
            return g
    return None


def default_title(g: Group) -> str:
    """``"decoder_layers.*.cross_attn (cross-attention, 6 layers)"``."""
    kind = "self-attention" if g.is_self else "cross-attention" if g.query_tokens != g.key_tokens else "attention"
    n = len(g.layers)
    return f"{g.name} ({kind})" if n == 1 else f"{g.name} ({kind}, {n} layers)"


def view_data(groups: Sequence[Group], *, title: str = "attention", info: Sequence[tuple[str, str]] = (),
              rollout: bool = True, flow: bool = False, flow_max_tokens: int | None = None) -> dict:
    """The JSON-able data the page shows (see :func:`attention_page` for the arguments)."""
    from . import analysis

    gs = list(groups)
    if not gs or not all(isinstance(g, Group) for g in gs):
        raise TypeError("groups must be a non-empty sequence of attnkit.viz.collect.Group; got "
                        + (", ".join(sorted({type(g).__name__ for g in gs})) if gs else "none"))
    if not isinstance(title, str):
        raise TypeError(f"title must be a string; got {type(title).__name__}")
    info_rows = []
    for item in info:
        if len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise TypeError(f"info must be (label, text) pairs of strings; got {item!r}")
        info_rows.append([item[0], item[1]])
    rollouts: dict[int, torch.Tensor] = {}
    out_groups = []
    for gi, g in enumerate(gs):
        if not g.layers:
            raise ValueError(f"group {g.name!r} has no layers")
        queries, keys = g.labels()
        tq, tk = len(queries), len(keys)
        layers, stats = [], []
        for layer in g.layers:
            w = _full_rows(layer, tq)
            if w.shape[2] < tk:  # a stitched layer whose keys grew: pad
                w = torch.nn.functional.pad(w, (0, tk - w.shape[2]))
            layers.append({"name": layer.name, "heads": list(layer.heads), "backend": layer.backend,
                           "rows": list(layer.rows), "w": _round(w)})
            ent = analysis.head_entropy(layer.weights)
            dist = analysis.head_distance(layer.weights, rows=layer.rows,
                                          query_offset=(tk - tq) if tq != tk else 0)
            stats.append([{"entropy": _num(float(e)), "distance": _num(float(d))} for e, d in zip(ent, dist)])
        derived: dict[str, Any] = {}
        if rollout and g.is_self:
            R = analysis.rollout(g.stack(), cumulative=True)
            rollouts[gi] = R[-1]
            derived["rollout"] = {
                "layers": [_round(r) for r in R],
                "note": "Rollout (Abnar & Zuidema 2020): each layer's head mean, plus the identity for the residual "
                        "(0.5 each), rows renormalized, multiplied from the first layer up to the one selected. "
                        "Row i: how much output token i draws on each input token."}
        out_groups.append({"name": g.name, "title": g.title or default_title(g), "queries": list(queries),
                           "keys": list(keys),
                           "layers": layers, "stats": stats, "derived": derived})
        if flow and g.is_self:
            limit = analysis.FLOW_MAX_TOKENS if flow_max_tokens is None else flow_max_tokens
            if tq <= limit:
                F = analysis.flow(g.stack(), max_tokens=limit)
                derived["flow"] = {"layers": [_round(F)], "note": (
                    "Attention flow (Abnar & Zuidema 2020): the maximum flow from each output token through "
                    "the layer graph (capacities: the rollout's residual-augmented head means) to each input "
                    "token, rows normalized. Computed for the whole stack.")}
            else:
                derived["flow_unavailable"] = (f"Attention flow is computed for inputs of at most {limit} tokens; "
                                               f"this one has {tq}.")
    if rollout:  # cross-attention: compose with the encoder's rollout
        for gi, g in enumerate(gs):
            if g.is_self or gi in rollouts:
                continue
            if g.num_queries == g.num_keys and g.query_tokens == g.key_tokens:  # self-attention, partly captured
                out_groups[gi]["derived"]["rollout_unavailable"] = (
                    "Rollout needs every row of every layer of a self-attention stack; this capture kept only some "
                    "(attnkit.capture(rows=...)) or its layers differ in size.")
                continue
            enc = _encoder_for(g, gs)
            R_enc = rollouts.get(gs.index(enc)) if enc is not None else None
            mats = []
            for layer in out_groups[gi]["layers"]:
                m = torch.tensor(layer["w"], dtype=torch.float64).mean(0)  # (Tq, Tk)
                mats.append(m @ R_enc if R_enc is not None else m)
            note = ("Cross-attention rollout: the selected layer's head mean, multiplied by the rollout of "
                    f"{enc.name!r} (the attention stack that built its keys), so row i shows which input tokens "
                    "output token i draws on." if R_enc is not None else
                    "Cross-attention rollout: the selected layer's head mean (no attention stack built its keys "
                    "-- e.g. an RNN encoder -- so there is nothing to compose it with).")
            out_groups[gi]["derived"]["rollout"] = {"layers": [_round(m) for m in mats], "note": note}
    return {"title": title, "info": info_rows, "groups": out_groups, "precision": PRECISION}


_CSS = """
:root{--ink:#1d2330;--muted:#5b6475;--line:#d9dde5;--acc:#c0392b;--q:#2c6bd6}
*{box-sizing:border-box}
body{font-family:%SANS%;margin:0;color:var(--ink);background:#fafbfc}
header{padding:14px 20px 8px;background:#fff;border-bottom:1px solid var(--line)}
h1{font-size:1.25em;margin:0 0 6px}
dl.info{margin:0;display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;font-size:.92em}
dl.info dt{color:var(--muted)}
dl.info dd{margin:0;white-space:pre-wrap;font-family:%MONO%}
main{padding:12px 20px}
.bar{display:flex;flex-wrap:wrap;align-items:center;gap:6px;margin:6px 0}
.bar .lab{color:var(--muted);font-size:.9em;min-width:4.5em}
button{font:inherit;font-size:.85em;padding:3px 9px;border:1px solid var(--line);border-radius:4px;background:#fff;
       cursor:pointer;color:var(--ink)}
button:hover{border-color:#9aa3b5} button.on{background:var(--ink);color:#fff;border-color:var(--ink)}
button:disabled{opacity:.4;cursor:not-allowed}
select{font:inherit;font-size:.9em;padding:2px 4px}
p.note{color:var(--muted);font-size:.88em;max-width:70em;margin:4px 0 10px}
.views{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.panel h2{font-size:.95em;margin:6px 0;color:var(--muted);font-weight:600}
.headview{position:relative;display:flex;align-items:flex-start}
.tcol{display:flex;flex-direction:column}
.tcol.q{text-align:right} .tcol.k{text-align:left}
.tok{font-family:%MONO%;font-size:13px;line-height:18px;height:18px;padding:0 5px;
     white-space:pre;border-radius:3px;cursor:default;max-width:16em;overflow:hidden;text-overflow:ellipsis}
.tok.q{cursor:pointer} .tok.q.hover{outline:2px solid var(--acc)} .tok:focus{outline:2px solid var(--q)}
svg.lines{display:block;flex:none}
table.matrix{border-collapse:collapse;font-family:%MONO%;font-size:11px}
table.matrix td{width:14px;height:14px;min-width:14px;padding:0;border:1px solid #eef0f4}
table.matrix th{font-weight:normal;white-space:pre;padding:0 3px;max-width:10em;overflow:hidden;text-overflow:ellipsis}
table.matrix th.col{vertical-align:bottom;padding:3px 0;max-width:none}
table.matrix th.col div{writing-mode:vertical-rl;transform:rotate(180deg);max-height:10em;overflow:hidden;
                        text-overflow:ellipsis;margin:0 auto}
table.matrix th.row{text-align:right;cursor:pointer}
table.matrix tr.hl td{border-top:1px solid var(--acc);border-bottom:1px solid var(--acc)}
table.matrix tr.hl th.row{color:var(--acc);font-weight:bold}
.model{display:grid;gap:6px;align-items:center}
.model .rl{font-size:.78em;color:var(--muted);text-align:right;white-space:nowrap;max-width:14em;overflow:hidden;
           text-overflow:ellipsis}
.model .ch{font-size:.78em;color:var(--muted);text-align:center}
.model canvas{border:2px solid transparent;cursor:pointer;image-rendering:pixelated;display:block}
.model canvas.on{border-color:var(--acc)}
""".replace("%SANS%", FONT_SANS).replace("%MONO%", FONT_MONO)

# The page's only script. It reads the JSON blob and builds every element with createElement and
# textContent (never innerHTML), so tokens stay text.
_JS = r"""
(function () {
'use strict';
var DATA = JSON.parse(document.getElementById('attnkit-data').textContent);
var S = {g: 0, mode: 'attention', layer: 0, head: 'mean', hover: null};  // what is shown

function $(id) { return document.getElementById(id); }
function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }
function grp() { return DATA.groups[S.g]; }
function fmt(x) { return (Math.round(x * 1e4) / 1e4).toFixed(4); }
function color(a) { return 'rgba(192,57,43,' + Math.max(0, Math.min(1, a)).toFixed(3) + ')'; }
function derived(g, mode) { return g.derived[mode] || null; }
function maxOf(M) {
  var mx = 0;
  for (var i = 0; i < M.length; i++) for (var j = 0; j < M[i].length; j++) if (M[i][j] > mx) mx = M[i][j];
  return mx;
}
function meanHeads(w) {
  var H = w.length, n = w[0].length, m = w[0][0].length, out = [];
  for (var i = 0; i < n; i++) {
    var r = new Array(m).fill(0);
    for (var h = 0; h < H; h++) for (var j = 0; j < m; j++) r[j] += w[h][i][j] / H;
    out.push(r);
  }
  return out;
}
function current() {  // the (Tq, Tk) matrix shown
  var g = grp();
  if (S.mode === 'attention') {
    var L = g.layers[S.layer];
    return S.head === 'mean' ? meanHeads(L.w) : L.w[L.heads.indexOf(S.head)];
  }
  var d = derived(g, S.mode);
  return d.layers[Math.min(S.layer, d.layers.length - 1)];
}
function setOn(b, on) { b.classList.toggle('on', on); b.setAttribute('aria-pressed', String(on)); }

function buildHeader() {
  document.querySelector('h1').textContent = DATA.title;
  var dl = $('info');
  clear(dl);
  DATA.info.forEach(function (kv) { dl.appendChild(el('dt', null, kv[0])); dl.appendChild(el('dd', null, kv[1])); });
  var sel = $('group');
  clear(sel);
  DATA.groups.forEach(function (g, i) {
    var o = el('option', null, g.title);
    o.value = String(i);
    sel.appendChild(o);
  });
  sel.addEventListener('change', function () {
    S.g = +sel.value; S.layer = 0; S.head = 'mean'; S.hover = null;
    if (!derived(grp(), S.mode)) S.mode = 'attention';
    buildGroup(); render();
  });
  document.querySelectorAll('#modes button').forEach(function (b) {
    b.addEventListener('click', function () {
      if (b.disabled) return;
      S.mode = b.getAttribute('data-mode'); S.hover = null; render();
    });
  });
}

function buildGroup() {
  var g = grp();
  var lb = $('layers');
  clear(lb);
  lb.appendChild(el('span', 'lab', 'layer'));
  g.layers.forEach(function (L, i) {
    var b = el('button', 'layer', String(i));
    b.setAttribute('data-layer', String(i));
    b.title = L.name + (L.backend ? ' (computed by ' + L.backend + ')' : '');
    b.addEventListener('click', function () { S.layer = i; render(); });
    lb.appendChild(b);
  });
  var heads = [];  // the union of the layers' heads
  g.layers.forEach(function (L) { L.heads.forEach(function (h) { if (heads.indexOf(h) < 0) heads.push(h); }); });
  heads.sort(function (a, b) { return a - b; });
  var hb = $('heads');
  clear(hb);
  hb.appendChild(el('span', 'lab', 'head'));
  ['mean'].concat(heads).forEach(function (h) {
    var b = el('button', 'head', String(h));
    b.setAttribute('data-head', String(h));
    b.addEventListener('click', function () { S.head = h; S.mode = 'attention'; render(); });
    hb.appendChild(b);
  });
  // head view: query tokens, lines, key tokens
  var qc = $('qcol'), kc = $('kcol');
  clear(qc); clear(kc);
  g.queries.forEach(function (t, i) {
    var s = el('div', 'tok q', t);
    s.setAttribute('data-i', String(i));
    s.tabIndex = 0;
    s.addEventListener('mouseenter', function () { hover(i); });
    s.addEventListener('focus', function () { hover(i); });
    qc.appendChild(s);
  });
  g.keys.forEach(function (t, j) {
    var s = el('div', 'tok k', t);
    s.setAttribute('data-j', String(j));
    kc.appendChild(s);
  });
  $('headview').addEventListener('mouseleave', function () { hover(null); });
  // the matrix
  var tb = $('matrix');
  clear(tb);
  var hr = el('tr');
  hr.appendChild(el('th'));
  g.keys.forEach(function (t) { var th = el('th', 'col'); th.appendChild(el('div', null, t)); hr.appendChild(th); });
  tb.appendChild(hr);
  g.queries.forEach(function (t, i) {
    var tr = el('tr');
    tr.setAttribute('data-i', String(i));
    var th = el('th', 'row', t);
    th.addEventListener('mouseenter', function () { hover(i); });
    tr.appendChild(th);
    for (var j = 0; j < g.keys.length; j++) {
      var td = el('td');
      td.setAttribute('data-j', String(j));
      tr.appendChild(td);
    }
    tb.appendChild(tr);
  });
  tb.addEventListener('mouseleave', function () { hover(null); });
  buildModel();
}

function drawCanvas(cv, M) {
  var n = M.length, m = n ? M[0].length : 0, mx = maxOf(M) || 1;
  var c = Math.max(1, Math.floor(112 / Math.max(n, m, 1)));
  cv.width = Math.max(1, m * c);
  cv.height = Math.max(1, n * c);
  var ctx = cv.getContext('2d');
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, cv.width, cv.height);
  for (var i = 0; i < n; i++) {
    for (var j = 0; j < m; j++) { ctx.fillStyle = color(M[i][j] / mx); ctx.fillRect(j * c, i * c, c, c); }
  }
}

function thumbnail(li, head, M, title, onclick) {
  var cv = el('canvas');
  cv.setAttribute('data-layer', String(li));
  cv.setAttribute('data-head', String(head));
  cv.title = title;
  drawCanvas(cv, M);
  cv.addEventListener('click', onclick);
  return cv;
}

function buildModel() {  // every layer x head as a thumbnail (and the rollout through each layer)
  var g = grp(), box = $('model');
  clear(box);
  var heads = 0;
  g.layers.forEach(function (L) { heads = Math.max(heads, L.heads.length); });
  var roll = derived(g, 'rollout');
  box.style.gridTemplateColumns = 'max-content repeat(' + (heads + (roll ? 1 : 0)) + ', max-content)';
  box.appendChild(el('div'));
  for (var h = 0; h < heads; h++) {
    box.appendChild(el('div', 'ch', 'head ' + (h < g.layers[0].heads.length ? g.layers[0].heads[h] : h)));
  }
  if (roll) box.appendChild(el('div', 'ch', 'rollout'));
  g.layers.forEach(function (L, li) {
    var rl = el('div', 'rl', li + ': ' + L.name);
    rl.title = L.name;
    box.appendChild(rl);
    for (var hi = 0; hi < heads; hi++) {
      if (hi >= L.heads.length) { box.appendChild(el('div')); continue; }
      box.appendChild(thumbnail(li, L.heads[hi], L.w[hi], 'layer ' + li + ', head ' + L.heads[hi], (function (h) {
        return function () { S.mode = 'attention'; S.layer = li; S.head = h; render(); };
      })(L.heads[hi])));
    }
    if (roll) {
      box.appendChild(thumbnail(li, 'rollout', roll.layers[Math.min(li, roll.layers.length - 1)],
        'rollout through layer ' + li, function () { S.mode = 'rollout'; S.layer = li; render(); }));
    }
  });
}

function drawLines(M) {  // all lines when small and nothing is hovered, else the hovered token's
  var svg = $('lines'), qc = $('qcol'), kc = $('kcol');
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  var n = M.length, m = n ? M[0].length : 0;
  svg.setAttribute('height', String(Math.max(qc.offsetHeight, kc.offsetHeight, 1)));
  svg.setAttribute('width', '160');
  var qs = qc.children, ks = kc.children, ns = 'http://www.w3.org/2000/svg', mx = maxOf(M) || 1;
  var rows = S.hover === null ? (n * m <= 2500 ? M.map(function (_, i) { return i; }) : []) : [S.hover];
  rows.forEach(function (i) {
    var yq = qs[i].offsetTop + qs[i].offsetHeight / 2 - qc.offsetTop;
    for (var j = 0; j < m; j++) {
      var a = M[i][j] / mx;
      if (a < 0.02) continue;
      var ln = document.createElementNS(ns, 'line');
      ln.setAttribute('x1', '2');
      ln.setAttribute('x2', '158');
      ln.setAttribute('y1', String(yq));
      ln.setAttribute('y2', String(ks[j].offsetTop + ks[j].offsetHeight / 2 - kc.offsetTop));
      ln.setAttribute('stroke', '#c0392b');
      ln.setAttribute('stroke-opacity', a.toFixed(3));
      ln.setAttribute('stroke-width', S.hover === null ? '1' : '2');
      svg.appendChild(ln);
    }
  });
}

function hover(i) { S.hover = i; paintHover(current()); drawLines(current()); }

function paintHover(M) {
  var g = grp(), qs = $('qcol').children, ks = $('kcol').children;
  for (var a = 0; a < qs.length; a++) qs[a].classList.toggle('hover', a === S.hover);
  document.querySelectorAll('#matrix tr[data-i]').forEach(function (tr) {
    tr.classList.toggle('hl', +tr.getAttribute('data-i') === S.hover);
  });
  var row = S.hover === null ? null : M[S.hover];
  var rmx = row ? (Math.max.apply(null, row.concat([0])) || 1) : 1;
  for (var j = 0; j < ks.length; j++) {
    if (row) {
      ks[j].style.backgroundColor = color(row[j] / rmx);
      ks[j].setAttribute('data-w', fmt(row[j]));
      ks[j].title = g.queries[S.hover] + ' → ' + g.keys[j] + ': ' + fmt(row[j]);
    } else {
      ks[j].style.backgroundColor = '';
      ks[j].removeAttribute('data-w');
      ks[j].title = '';
    }
  }
}

function headTitle(st) {
  if (!st) return 'mean of the heads';
  var f = function (x) { return x === null ? 'n/a' : x.toFixed(2); };
  return 'entropy ' + f(st.entropy) + ' nats, mean distance ' + f(st.distance);
}

function render() {
  var g = grp(), M = current(), mx = maxOf(M) || 1, L = g.layers[S.layer];
  document.querySelectorAll('#modes button').forEach(function (b) {
    var m = b.getAttribute('data-mode');
    b.disabled = m !== 'attention' && !derived(g, m);
    setOn(b, m === S.mode);
  });
  document.querySelectorAll('#layers button').forEach(function (b) {
    setOn(b, +b.getAttribute('data-layer') === S.layer);
  });
  document.querySelectorAll('#heads button').forEach(function (b) {
    var h = b.getAttribute('data-head');
    setOn(b, S.mode === 'attention' && String(S.head) === h);
    b.disabled = h !== 'mean' && L.heads.indexOf(+h) < 0;
    b.title = headTitle(g.stats[S.layer][L.heads.indexOf(+h)]);
  });
  document.querySelectorAll('#matrix tr[data-i]').forEach(function (tr) {
    var i = +tr.getAttribute('data-i'), tds = tr.querySelectorAll('td');
    for (var j = 0; j < tds.length; j++) {
      var v = M[i] ? M[i][j] : 0;
      tds[j].style.backgroundColor = color(v / mx);
      tds[j].setAttribute('data-v', fmt(v));
      tds[j].title = g.queries[i] + ' → ' + g.keys[j] + ': ' + fmt(v);
    }
  });
  document.querySelectorAll('#model canvas').forEach(function (cv) {
    var l = +cv.getAttribute('data-layer'), h = cv.getAttribute('data-head');
    var shown = (S.mode === 'attention' && h === String(S.head)) || (S.mode === 'rollout' && h === 'rollout');
    cv.classList.toggle('on', l === S.layer && shown);
  });
  var note;
  if (S.mode === 'attention') {
    $('what').textContent = 'layer ' + S.layer + ' (' + L.name + '), ' +
      (S.head === 'mean' ? 'mean of the heads' : 'head ' + S.head);
    note = 'Rows: queries; columns: keys. Colours scale from 0 to the largest weight shown (' + fmt(mx) + '). ' +
      'Hover a query token to see where it attends.';
    if (L.backend) note += ' Computed by the ' + L.backend + ' backend; weights captured with attnkit.capture.';
    if (g.derived.flow_unavailable) note += ' ' + g.derived.flow_unavailable;
    if (g.derived.rollout_unavailable) note += ' ' + g.derived.rollout_unavailable;
  } else {
    var d = derived(g, S.mode);
    $('what').textContent = S.mode + (d.layers.length > 1 ? ' through layer ' + S.layer : '');
    note = d.note;
  }
  $('note').textContent = note;
  paintHover(M);
  drawLines(M);
}

buildHeader();
buildGroup();
render();
document.body.setAttribute('data-ready', '1');
})();
"""

_BODY = """<header><h1></h1><dl class="info" id="info"></dl></header>
<main>
<div class="bar"><span class="lab">attention</span><select id="group" aria-label="group of layers"></select>
<span id="modes"><button data-mode="attention">attention</button> <button data-mode="rollout">rollout</button>
<button data-mode="flow">flow</button></span></div>
<div class="bar" id="layers"></div>
<div class="bar" id="heads"></div>
<p class="note" id="note"></p>
<div class="views">
<div class="panel"><h2>head view: <span id="what"></span></h2>
<div class="headview" id="headview"><div class="tcol q" id="qcol"></div>
<svg class="lines" id="lines" width="160" height="10"></svg><div class="tcol k" id="kcol"></div></div></div>
<div class="panel"><h2>matrix</h2><table class="matrix" id="matrix"></table></div>
<div class="panel"><h2>model view: every layer and head (click one)</h2><div class="model" id="model"></div></div>
</div>
</main>"""


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "base-uri 'none'; form-action 'none'")


def attention_page(groups: Sequence[Group], path: str | os.PathLike | None = None, *, title: str = "attention",
                   info: Sequence[tuple[str, str]] = (), rollout: bool = True, flow: bool = False,
                   flow_max_tokens: int | None = None) -> str:
    """Write the interactive view of ``groups`` (see the module docstring) as one HTML file.

    Args:
        groups: :class:`attnkit.viz.collect.Group` s (from :func:`attnkit.viz.collect.group_records`),
            with token labels (:func:`attnkit.viz.collect.assign_tokens`) or position labels.
        path: where to write the page (atomically; folders are created). None: only return it.
        title: the page's title.
        info: ``(label, text)`` lines shown under the title (e.g. the input and the model's output).
        rollout: add the rollout view: for self-attention groups the rollout through each layer;
            for cross-attention, each layer's head mean times the rollout of the encoder group
            whose tokens are its keys (or the head mean alone when there is none).
        flow: add the attention-flow view for self-attention groups of at most
            ``flow_max_tokens`` tokens (default :data:`attnkit.viz.analysis.FLOW_MAX_TOKENS`).

    Returns:
        The page's HTML text.
    """
    data = view_data(groups, title=title, info=info, rollout=rollout, flow=flow, flow_max_tokens=flow_max_tokens)
    script = _JS
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_csp(script)}\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{_BODY}\n"
            f"<script type=\"application/json\" id=\"attnkit-data\">{json_for_script(data)}</script>\n"
            f"<script>{script}</script>\n</body></html>\n")
    if path is not None:
        atomic_write_text(path, page)
    return page
