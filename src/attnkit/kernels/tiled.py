"""Exact tiled attention in plain PyTorch: FlashAttention's online softmax, forward and backward.

Dao et al. 2022, "FlashAttention" (https://arxiv.org/abs/2205.14135). Queries are processed
in blocks of ``block_q``; for each query block the key blocks that the mask leaves alive are
grouped into *runs* of consecutive blocks (at most ``kv_chunk`` keys) so that one matmul covers
a run. The softmax is accumulated online across runs::

    m_new = max(m, rowmax(s));  l = l·e^(m - m_new) + rowsum(e^(s - m_new));  acc = acc·e^(m - m_new) + e^(s - m_new) v

and the log-sum-exp ``lse = m + log l`` is saved; the backward recomputes each run's
probabilities from it (``p = e^(s - lse)``) instead of storing the ``(Tq, Tk)`` matrix, so memory
is ``O(block_q · kv_chunk)`` per (batch, head) whatever the sequence length.

Masks are classified per tile (EMPTY / PARTIAL / FULL): empty tiles are never computed, full
ones skip the predicate. Score mods and mask mods are evaluated per run on index tensors.

Scores are split as ``tile(prepare(q, k))``: ``prepare`` (per token: the cosine normalization,
``q W`` of the bilinear score, the ``W_q q``/``W_k k`` projections of additive attention) runs
once outside the kernel under ordinary autograd; the kernel sees the prepared tensors. When
``tile`` is a plain dot product and every score mod is a parameter-free additive bias, the
backward uses closed-form matmuls; scores with a closed-form tile gradient (additive:
:meth:`Score.tile_vjp`) use it; otherwise the backward re-runs the tile under autograd, which
covers any score, any score mod and learnable bias parameters.

Two tile bodies run the same plan. The eager body above serves every request. The fused body
(:func:`fused_forward`, :func:`fused_backward`; plain softmax over a dot score, additive biases
that need no gradient, no dropout, CPU) hands each run to torch's fused CPU flash kernel with
the run's mask and biases as an additive float mask, and merges runs by their log-sum-exps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks.base import EMPTY, FULL, index_grid
from .dropout import keep_mask, row_hash
from ..normalizers.base import Normalize, Sigmoid, Softmax
from ..spec import AttentionSpec

Tensor = torch.Tensor
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Run:
    """Consecutive live key blocks ``[start, stop)`` of one query block."""

    start: int
    stop: int
    partial: bool  # the mask predicate must be evaluated on this run
    #: key ranges of a mixed run (``make_plan(mix=True)``) whose tiles are full: the predicate
    #: is evaluated on the rest of the run only
    full_parts: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Plan:
    block_q: int
    block_k: int
    q_blocks: tuple[tuple[int, int], ...]
    runs: tuple[tuple[Run, ...], ...]  # one tuple of runs per query block
    live_tiles: int
    total_tiles: int
    #: the queries arrive pre-multiplied by ``scale / temperature`` (dot scores without score
    #: mods): one pass over q instead of one over every tile of scores, forward and backward
    prescaled: bool = False
    #: runs go to torch's fused flash kernel (:func:`fused_forward`; requires ``prescaled``)
    fused: bool = False


def make_plan(spec: AttentionSpec, block_q: int, block_k: int, kv_chunk: int, device=None,
              partial_chunk: int | None = None, mix: bool = False) -> Plan:
    """Classify tiles and group the live ones into runs of at most ``kv_chunk`` keys
    (``partial_chunk`` for runs whose mask must be evaluated; default ``kv_chunk``). Runs are
    of one class, unless ``mix``: then full tiles may join partial ones in a partial run of at
    most ``partial_chunk`` keys (fewer, larger calls where evaluating a short mask is cheap)."""
    Tq, Tk = spec.Tq, spec.Tk
    nq, nk = -(-Tq // block_q), -(-Tk // block_k)
    if spec.mask is None:
        live = torch.ones(nq, nk, dtype=torch.bool)
        full = live
    else:
        cls = spec.mask.classify_blocks(Tq, Tk, block_q, block_k, spec.B, spec.H, device=device).flatten(0, 1)
        live = (cls != EMPTY).any(0).cpu()
        full = (cls == FULL).all(0).cpu()
    per_run = max(1, kv_chunk // block_k)
    per_partial_run = per_run if partial_chunk is None else max(1, partial_chunk // block_k)
    runs = []
    for i in range(nq):
        row, cur = [], None  # cur: [first tile, stop tile, partial, full tiles]
        for j in torch.nonzero(live[i]).flatten().tolist():
            partial = not bool(full[i, j])
            # a run is consecutive tiles of one class (full runs never evaluate the predicate),
            # or with ``mix`` a short run of both classes, evaluated as partial
            joined = (cur is not None and cur[2]) or partial
            fits = cur is not None and cur[1] == j and (mix or cur[2] == partial)
            if fits and cur[1] + 1 - cur[0] <= (per_partial_run if joined else per_run):
                cur = [cur[0], j + 1, joined, cur[3] + ([] if partial else [j])]
            else:
                if cur is not None:
                    row.append(cur)
                cur = [j, j + 1, partial, [] if partial else [j]]
        if cur is not None:
            row.append(cur)
        runs.append(tuple(
            Run(a * block_k, min(b * block_k, Tk), p,
                tuple((j * block_k, min((j + 1) * block_k, Tk)) for j in fulls) if p else ())
            for a, b, p, fulls in row))
    q_blocks = tuple((i * block_q, min((i + 1) * block_q, Tq)) for i in range(nq))
    return Plan(block_q, block_k, q_blocks, tuple(runs), int(live.sum()), nq * nk, can_prescale(spec))


def can_prescale(spec: AttentionSpec) -> bool:
    """Whether the queries can carry ``scale / temperature``: no mod sits between the dot product
    and the normalizer, or (softmax only) every mod is a row-separable bias added as one row per
    tile (:meth:`ScoreMod.key_bias`)."""
    if not spec.score.tile_is_dot:
        return False
    if not spec.score_mods:
        return True
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    return type(spec.normalizer) is Softmax and all(
        m.key_bias(zero, zero, 0, spec.Tq, spec.Tk) is not None for m in spec.score_mods)


def query_scale(spec: AttentionSpec) -> float:
    """``scale / temperature``: what a prescaled plan multiplies the queries by."""
    return spec.scale / (spec.normalizer.temperature if isinstance(spec.normalizer, Softmax) else 1.0)


def _expand(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_groups(x: Tensor, groups: int) -> Tensor:
    """Sum the gradient of head-expanded keys/values back onto the Hkv heads."""
    if groups == 1:
        return x
    B, H, T, D = x.shape
    return x.view(B, H // groups, groups, T, D).sum(2)


class _Tile:
    """Evaluates scores and the mask on one (query block, run) tile."""

    def __init__(self, spec: AttentionSpec, device, prescaled: bool = False):
        self.spec = spec
        self.device = device
        self.prescaled = prescaled
        self.inv_temp = 1.0 / spec.normalizer.temperature if isinstance(spec.normalizer, Softmax) else 1.0

    def grid(self, qs, qe, ks, ke):
        b, h, q, kv = index_grid(self.spec.B, self.spec.H, qe - qs, ke - ks, self.device)
        return b, h, q + qs, kv + ks

    def row_biases(self, qs: int, grid, dtype):
        """The prescaled plan's row-separable biases: one ``(1, H, 1 or r, tk)`` row each per
        tile, relative to the tile's first query (the row term cancels in the softmax; see
        :meth:`ScoreMod.key_bias`), already divided by the temperature."""
        spec = self.spec
        for mod in spec.score_mods:
            bias = mod.key_bias(grid[1], grid[3], self.q_ref(qs, grid), spec.Tq, spec.Tk).to(dtype)
            yield bias * self.inv_temp if self.inv_temp != 1.0 else bias

    def scores(self, qp: Tensor, kp: Tensor, qs: int, ks: int, grid, raw: Tensor | None = None) -> Tensor:
        """The tile's scores after scale, score mods and temperature (from ``raw``, the score's
        own tile, when the caller has it already)."""
        spec = self.spec
        s = spec.score.tile(qp, kp) if raw is None else raw
        if self.prescaled:
            for bias in self.row_biases(qs, grid, s.dtype):
                s = s.add_(bias)
            return s
        c = spec.scale
        if c != 1.0:
            s = s * c
        for mod in spec.score_mods:
            s = mod.score_mod(s, *grid, spec.Tq, spec.Tk)
        if self.inv_temp != 1.0:
            s = s * self.inv_temp
        return s

    #: set by tiled_weights: the forward's query-block size, so rows use their block's reference
    rows_block: int | None = None

    def q_ref(self, qs: int, grid):
        if self.rows_block is None:
            return qs  # the forward/backward tile's first query
        return (grid[2] // self.rows_block) * self.rows_block  # per row: its forward block's first query

    def allowed(self, grid) -> Tensor:
        return self.spec.mask.mask_mod(*grid, self.spec.Tq, self.spec.Tk)


def _dropout_rows(seed: int | None, spec: AttentionSpec, qs: int, qe: int, device) -> Tensor | None:
    if seed is None:
        return None
    b, h, q, _ = index_grid(spec.B, spec.H, qe - qs, 1, device)
    return row_hash(seed, b, h, q + qs)  # (B, H, bq, 1)


def tiled_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan,
                  seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Returns ``out (B, H, Tq, Dv)`` and the row statistic the backward needs: ``lse (B, H, Tq)``
    for softmax, the denominator ``Σ_j s_ij + eps`` for :class:`Normalize`, None for sigmoid.
    With a dropout ``seed``, weights are dropped by :mod:`attnkit.kernels.dropout`'s hash (the
    statistic is that of the undropped weights, as in FlashAttention)."""
    keep_scale = 1.0 / (1.0 - spec.dropout_p) if seed is not None else 1.0
    B, H, G = spec.B, spec.H, spec.groups
    tile = _Tile(spec, qp.device, plan.prescaled)
    kind = _kind(spec)
    sigmoid = kind == "sigmoid"
    offset = spec.normalizer.offset(spec.Tk) if sigmoid else 0.0
    out = torch.zeros(B, H, spec.Tq, v.shape[-1], dtype=qp.dtype, device=qp.device)
    lse = None if sigmoid else torch.full((B, H, spec.Tq), _NEG_INF if kind == "softmax" else 1.0,
                                          dtype=qp.dtype, device=qp.device)
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        if not runs:
            continue  # every key is masked for this block: output 0, lse -inf
        qi = qp[:, :, qs:qe]
        rows = _dropout_rows(seed, spec, qs, qe, qp.device)
        m = torch.full((B, H, qe - qs, 1), _NEG_INF, dtype=qp.dtype, device=qp.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, H, qe - qs, v.shape[-1], dtype=qp.dtype, device=qp.device)
        for r in runs:
            grid = tile.grid(qs, qe, r.start, r.stop)
            s = tile.scores(qi, _expand(kp[:, :, r.start:r.stop], G), qs, r.start, grid)
            vj = _expand(v[:, :, r.start:r.stop], G)
            if sigmoid:
                p = torch.sigmoid(s + offset)
                if r.partial:
                    p = p.masked_fill(~tile.allowed(grid), 0.0)
                acc = acc + _drop(p, rows, grid, spec.dropout_p, keep_scale) @ vj
                continue
            if kind == "normalize":
                p = s.masked_fill(~tile.allowed(grid), 0.0) if r.partial else s
                l = l + p.sum(-1, keepdim=True)
                acc = acc + _drop(p, rows, grid, spec.dropout_p, keep_scale) @ vj
                continue
            if r.partial:
                s = s.masked_fill(~tile.allowed(grid), _NEG_INF)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)  # rows with nothing alive yet
            p = s.sub_(m_safe).exp_()  # s is a fresh tile: reuse its memory
            corr = torch.exp(m - m_safe)
            l = l * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + _drop(p, rows, grid, spec.dropout_p, keep_scale) @ vj
            m = m_new
        if sigmoid:
            out[:, :, qs:qe] = acc
        elif kind == "normalize":
            den = l + spec.normalizer.eps
            den = den.masked_fill(den == 0, 1.0)
            out[:, :, qs:qe] = acc / den
            lse[:, :, qs:qe] = den.squeeze(-1)
        else:
            out[:, :, qs:qe] = acc / l.masked_fill(l == 0, 1.0)
            lse[:, :, qs:qe] = (m + torch.log(l)).squeeze(-1)  # -inf where nothing was alive
    return out, lse


def _drop(p: Tensor, rows: Tensor | None, grid, dropout_p: float, keep_scale: float) -> Tensor:
    if rows is None:
        return p
    return p * (keep_mask(rows, grid[3], dropout_p).to(p.dtype) * keep_scale)


def _kind(spec: AttentionSpec) -> str:
    n = spec.normalizer
    return "sigmoid" if isinstance(n, Sigmoid) else "normalize" if isinstance(n, Normalize) else "softmax"


def _weights(s: Tensor, lse_i: Tensor | None, spec: AttentionSpec, allowed: Tensor | None) -> Tensor:
    kind = _kind(spec)
    if kind == "sigmoid":
        p = torch.sigmoid(s + spec.normalizer.offset(spec.Tk))
    elif kind == "normalize":
        p = s / lse_i.unsqueeze(-1)  # lse_i holds the denominators
    else:
        # dead rows have lse = -inf: make their probabilities 0 instead of e^(+inf)
        p = torch.exp(s - lse_i.masked_fill(lse_i == _NEG_INF, float("inf")).unsqueeze(-1))
    if allowed is not None:
        p = p.masked_fill(~allowed, 0.0)
    return p


def tiled_weights(qp: Tensor, kp: Tensor, spec: AttentionSpec, lse: Tensor | None,
                  heads: tuple[int, ...] | None = None, rows: tuple[int, ...] | None = None,
                  block_q: int = 128, kv_chunk: int = 1024, prescaled: bool = False) -> Tensor:
    """Exact weights ``(B, len(heads), len(rows), Tk)`` (all heads / rows when None), recomputed
    from the saved log-sum-exp block by block: cost ``O(len(heads) · len(rows) · Tk)``."""
    dev = qp.device
    heads_t = torch.arange(spec.H, device=dev) if heads is None else torch.tensor(heads, device=dev)
    rows_t = torch.arange(spec.Tq, device=dev) if rows is None else torch.tensor(rows, device=dev)
    q_sel = qp.index_select(1, heads_t)                        # (B, h', Tq, D)
    k_sel = kp.index_select(1, heads_t // spec.groups)         # key head of each query head
    lse_sel = None if lse is None else lse.index_select(1, heads_t)
    # every entry is written below (each row block sweeps all key chunks): no zero fill of a tensor that may be GiBs
    w = torch.empty(spec.B, len(heads_t), len(rows_t), spec.Tk, dtype=qp.dtype, device=dev)
    tile = _Tile(spec, dev, prescaled)
    tile.rows_block = block_q  # the lse of row i was taken relative to its forward block's first query
    b = torch.arange(spec.B, device=dev).view(-1, 1, 1, 1)
    h = heads_t.view(1, -1, 1, 1)
    for r0 in range(0, len(rows_t), block_q):
        r = rows_t[r0:r0 + block_q]
        qi = q_sel.index_select(2, r)
        lse_i = None if lse_sel is None else lse_sel.index_select(2, r)
        for ks in range(0, spec.Tk, kv_chunk):
            ke = min(ks + kv_chunk, spec.Tk)
            grid = (b, h, r.view(1, 1, -1, 1), torch.arange(ks, ke, device=dev).view(1, 1, 1, -1))
            allowed = None if spec.mask is None else tile.allowed(grid)
            if allowed is not None and not bool(allowed.any()):  # a masked-out chunk (e.g. above the diagonal)
                w[:, :, r0:r0 + len(r), ks:ke] = 0
                continue
            s = tile.scores(qi, k_sel[:, :, ks:ke], 0, ks, grid)
            w[:, :, r0:r0 + len(r), ks:ke] = _weights(s, lse_i, spec, allowed)
    return w


def tiled_backward(qp, kp, v, out, lse, dout, spec: AttentionSpec, plan: Plan, params: tuple[Tensor, ...],
                   seed: int | None = None):
    """Gradients of ``(qp, kp, v, *params)`` given ``dout``. With dropout (mask ``Z``, scale
    ``1/(1-p)``): ``dV = (P∘Z)ᵀ dO``, ``dP = (dO Vᵀ)∘Z``, ``dS = P∘(dP − rowsum(dO∘O))``."""
    keep_scale = 1.0 / (1.0 - spec.dropout_p) if seed is not None else 1.0
    G = spec.groups
    tile = _Tile(spec, qp.device, plan.prescaled)
    kind = _kind(spec)
    sigmoid = kind == "sigmoid"
    fast = spec.score.tile_is_dot and not params and all(m.additive for m in spec.score_mods)
    # scores with a closed-form tile gradient (additive): no autograd graph per tile
    own = [p for p in spec.score.tile_parameters() if p.requires_grad]
    closed = (not fast and spec.score.has_tile_vjp and all(m.additive for m in spec.score_mods)
              and len(own) == len(params) and all(a is b for a, b in zip(own, params)))
    wanted = [p.requires_grad for p in spec.score.tile_parameters()]
    c = 1.0 if plan.prescaled else spec.scale * tile.inv_temp  # d s / d (qp·kp) on the fast path
    dq, dk, dv = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(v)
    dparams = [torch.zeros_like(p) for p in params]
    delta = None if sigmoid else (dout * out).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        qi, doi = qp[:, :, qs:qe], dout[:, :, qs:qe]
        lse_i = None if sigmoid else lse[:, :, qs:qe]
        rows = _dropout_rows(seed, spec, qs, qe, qp.device)
        for r in runs:
            grid = tile.grid(qs, qe, r.start, r.stop)
            vj = _expand(v[:, :, r.start:r.stop], G)
            allowed = tile.allowed(grid) if r.partial else None
            if fast:
                kj = _expand(kp[:, :, r.start:r.stop], G)
                s = tile.scores(qi, kj, qs, r.start, grid)
            elif closed:
                raw, vjp = spec.score.tile_vjp(qi, _expand(kp[:, :, r.start:r.stop], G))
                s = tile.scores(qi, None, qs, r.start, grid, raw=raw)
            else:
                with torch.enable_grad():
                    qi_ = qi.detach().requires_grad_()
                    kj_ = kp[:, :, r.start:r.stop].detach().requires_grad_()
                    s = tile.scores(qi_, _expand(kj_, G), qs, r.start, grid)
            p = _weights(s.detach(), lse_i, spec, allowed)
            dv[:, :, r.start:r.stop] += _reduce_groups(_drop(p, rows, grid, spec.dropout_p, keep_scale).transpose(-2, -1)
                                                       @ doi, G)
            dp = _drop(doi @ vj.transpose(-2, -1), rows, grid, spec.dropout_p, keep_scale)
            if sigmoid:
                ds = dp.mul_(p * (1.0 - p))
            elif kind == "normalize":  # out = Σ s v / den: d out / d s_ij = (v_j - out_i) / den_i
                ds = dp.sub_(delta[:, :, qs:qe]).div_(lse_i.unsqueeze(-1))
                if allowed is not None:
                    ds = ds.masked_fill_(~allowed, 0.0)
            else:
                ds = dp.sub_(delta[:, :, qs:qe]).mul_(p)
            if fast:
                if c != 1.0:
                    ds = ds.mul_(c)
                dq[:, :, qs:qe] += ds @ kj
                dk[:, :, r.start:r.stop] += _reduce_groups(ds.transpose(-2, -1) @ qi, G)
            elif closed:
                if c != 1.0:
                    ds = ds.mul_(c)
                g_q, g_k, g_params = vjp(ds)
                dq[:, :, qs:qe] += g_q
                dk[:, :, r.start:r.stop] += _reduce_groups(g_k, G)
                for acc, g in zip(dparams, [g for g, w in zip(g_params, wanted) if w]):
                    acc += g
            else:
                grads = torch.autograd.grad(s, (qi_, kj_, *params), ds, allow_unused=True)
                dq[:, :, qs:qe] += grads[0]
                dk[:, :, r.start:r.stop] += grads[1]
                for acc, g in zip(dparams, grads[2:]):
                    if g is not None:
                        acc += g
    return dq, dk, dv, dparams


# --- fused tile bodies -------------------------------------------------------------------------
# On CPU, a run of a softmax/dot plan can be handed whole to torch's fused flash kernel, which
# keeps scores in registers instead of making 4–6 eager passes over each tile: the run's
# partial mask and row-separable biases become its additive float mask, the kernel returns the
# run's (normalized output, lse), and runs are merged by their log-sum-exps. Its backward,
# given the *global* output and lse, returns exactly that run's share of dq and its dk, dv.

_FUSED_DTYPES = (torch.float32, torch.float64)


def fusable(spec: AttentionSpec, qp: Tensor, v: Tensor, seed: int | None, params) -> bool:
    """Whether :func:`fused_forward`/:func:`fused_backward` can serve the request: plain softmax
    over a dot score whose mods are additive biases, no dropout, no learnable tensors inside the
    tiles (so no bias needs a gradient), float32/float64 on CPU, values as wide as the prepared
    queries. Row-separable biases (ALiBi) ride on prescaled queries as one row per tile; other
    biases (T5 buckets, a bias tensor) are evaluated per run into the kernel's float mask."""
    return (type(spec.normalizer) is Softmax and spec.score.tile_is_dot and all(m.additive for m in spec.score_mods)
            and seed is None and not params
            and qp.device.type == "cpu" and qp.dtype in _FUSED_DTYPES and qp.shape[-1] == v.shape[-1])


def _kernel_scale(tile: _Tile, plan: Plan) -> float:
    """What the fused kernel multiplies ``q·k`` by: 1 on prescaled queries, else scale/temperature."""
    return 1.0 if plan.prescaled else tile.spec.scale * tile.inv_temp


def _flash_mask(tile: _Tile, qs: int, qe: int, r: Run, dtype):
    """The run's additive float mask for the fused kernel (None when the run is full and has no
    bias) and its rows with no live key (None when there can be none)."""
    spec = tile.spec
    if not r.partial and not spec.score_mods:
        return None, None
    grid = tile.grid(qs, qe, r.start, r.stop)
    mask = None
    if tile.prescaled:
        biases = tile.row_biases(qs, grid, dtype)
    else:  # additive biases, evaluated on the run's grid (divided by the temperature, as s is)
        zero = torch.zeros((), dtype=dtype, device=grid[2].device)
        biases = (m.score_mod(zero, *grid, spec.Tq, spec.Tk).to(dtype) * tile.inv_temp for m in spec.score_mods)
    for bias in biases:
        mask = bias if mask is None else mask + bias
    dead = None
    if r.partial and r.full_parts:  # a mixed run: the predicate on its partial tiles only
        cuts = [r.start] + [x for part in r.full_parts for x in part] + [r.stop]
        b, h, q, kv = grid
        pieces = [(a - r.start, z - r.start, tile.allowed((b, h, q, kv[..., a - r.start:z - r.start])))
                  for a, z in zip(cuts[::2], cuts[1::2]) if z > a]
        lead = [1, 1, qe - qs]
        for *_, allowed in pieces:  # broadcast the pieces' leading dims (each is 1 or n)
            lead = [max(n, m) for n, m in zip(lead, ((1,) * 4 + tuple(allowed.shape))[-4:-1])]
        neg = torch.zeros(*lead, r.stop - r.start, dtype=dtype, device=q.device)
        for a, z, allowed in pieces:
            neg[..., a:z].masked_fill_(~allowed, _NEG_INF)
        mask = neg if mask is None else mask + neg  # a full tile leaves no row dead
    elif r.partial:
        allowed = tile.allowed(grid)
        neg = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, _NEG_INF)
        mask = neg if mask is None else mask + neg
        dead = ~allowed.any(-1)
    if not tile.prescaled and spec.score_mods:  # a bias (a tensor) may itself be -inf on whole rows
        dead = torch.isneginf(mask).all(-1)
    if mask is not None and mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask, dead


def fused_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan) -> tuple[Tensor, Tensor]:
    """:func:`tiled_forward` for a fusable request: ``out``, ``lse``."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    B, H, G = spec.B, spec.H, spec.groups
    tile = _Tile(spec, qp.device, plan.prescaled)
    scale = _kernel_scale(tile, plan)
    out = torch.zeros(B, H, spec.Tq, v.shape[-1], dtype=qp.dtype, device=qp.device)
    lse = torch.full((B, H, spec.Tq), _NEG_INF, dtype=qp.dtype, device=qp.device)
    kp, v = _expand(kp, G), _expand(v, G)  # once, not per run: full runs span whole rows
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        qi = qp[:, :, qs:qe]
        acc = big_l = None
        for r in runs:
            mask, dead = _flash_mask(tile, qs, qe, r, qp.dtype)
            o, l = flash(qi, kp[:, :, r.start:r.stop], v[:, :, r.start:r.stop], 0.0, False, attn_mask=mask,
                         scale=scale)
            if dead is not None:
                l = l.masked_fill(dead, _NEG_INF)  # the kernel reports lse 0 (and output 0) there
            if acc is None:
                acc, big_l = o, l
                continue
            new_l = torch.logaddexp(big_l, l)
            safe = new_l.masked_fill(new_l == _NEG_INF, 0.0)
            acc = acc * torch.exp(big_l - safe).unsqueeze(-1) + o * torch.exp(l - safe).unsqueeze(-1)
            big_l = new_l
        if acc is not None:
            out[:, :, qs:qe] = acc
            lse[:, :, qs:qe] = big_l
    return out, lse


_BWD_TEMP_BYTES = 16 << 20


def _split_full_runs(runs, cap: int):
    """Runs, with full ones longer than ``cap`` keys cut into pieces (each piece's share of the
    gradient is independent given the global output and log-sum-exp)."""
    for r in runs:
        if r.partial or r.stop - r.start <= cap:
            yield r
        else:
            for a in range(r.start, r.stop, cap):
                yield Run(a, min(a + cap, r.stop), False)


def fused_backward(qp, kp, v, out, lse, dout, spec: AttentionSpec, plan: Plan):
    """:func:`tiled_backward` for a fusable request: ``dq, dk, dv`` (``dq`` w.r.t. ``qp`` as given,
    prescaled or not)."""
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    G = spec.groups
    tile = _Tile(spec, qp.device, plan.prescaled)
    scale = _kernel_scale(tile, plan)
    kp, v = _expand(kp, G), _expand(v, G)
    dq, dk, dv = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(v)
    lse = lse.masked_fill(lse == _NEG_INF, float("inf"))  # dead rows: e^(s - lse) = 0, not NaN
    # the kernel returns dk, dv as long as the run: keep those temporaries small enough for the
    # allocator to reuse (glibc maps and zeroes fresh pages for every block over 32 MiB)
    cap = max(plan.block_k, (_BWD_TEMP_BYTES // (kp.shape[0] * kp.shape[1] * kp.shape[-1] * kp.element_size()))
              // plan.block_k * plan.block_k)
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        qi, doi, oi, li = qp[:, :, qs:qe], dout[:, :, qs:qe], out[:, :, qs:qe], lse[:, :, qs:qe]
        for r in _split_full_runs(runs, cap):
            mask, _ = _flash_mask(tile, qs, qe, r, qp.dtype)
            g_q, g_k, g_v = flash_bwd(doi, qi, kp[:, :, r.start:r.stop], v[:, :, r.start:r.stop], oi, li, 0.0,
                                      False, attn_mask=mask, scale=scale)
            dq[:, :, qs:qe] += g_q
            dk[:, :, r.start:r.stop] += g_k
            dv[:, :, r.start:r.stop] += g_v
    return dq, _reduce_groups(dk, G), _reduce_groups(dv, G)


class TiledAttentionFn(torch.autograd.Function):
    """``out = attention(prepared q, prepared k, v)`` with the tiled forward and backward.

    ``params`` are the tensors the tile computation reads that may need gradients (score
    parameters used inside ``tile``, learnable bias tables); they are passed as inputs so
    autograd routes their gradients.
    """

    @staticmethod
    def forward(ctx, qp, kp, v, spec, plan, seed, *params):
        if plan.fused:
            out, lse = fused_forward(qp, kp, v, spec, plan)
        else:
            out, lse = tiled_forward(qp, kp, v, spec, plan, seed)
        ctx.save_for_backward(qp, kp, v, out, *(() if lse is None else (lse,)))
        ctx.spec, ctx.plan, ctx.seed, ctx.params, ctx.has_lse = spec, plan, seed, params, lse is not None
        ctx.mark_non_differentiable(*(() if lse is None else (lse,)))
        return out, (lse if lse is not None else out.new_zeros(()))

    @staticmethod
    def backward(ctx, dout, _dlse):
        saved = ctx.saved_tensors
        qp, kp, v, out = saved[:4]
        lse = saved[4] if ctx.has_lse else None
        if ctx.plan.fused:
            return (*fused_backward(qp, kp, v, out, lse, dout.contiguous(), ctx.spec, ctx.plan), None, None, None)
        dq, dk, dv, dparams = tiled_backward(qp, kp, v, out, lse, dout.contiguous(), ctx.spec, ctx.plan, ctx.params,
                                             ctx.seed)
        return (dq, dk, dv, None, None, None, *dparams)
