"""Exact tiled attention in plain PyTorch: FlashAttention's online softmax, forward and backward.

Dao et al. 2022, "FlashAttention" (https://arxiv.org/abs/2205.14135). Queries are processed
in blocks of ``block_q``; for each query block the key blocks that the mask leaves alive are
grouped into *runs* of consecutive blocks (at most ``kv_chunk`` keys) so that one matmul covers
a run. The softmax is accumulated online across runs::

    m_new = max(m, rowmax(s));  l = l·e^(m - m_new) + rowsum(e^(s - m_new));  acc = acc·e^(m - m_new) + e^(s - m_new) v

and the log-sum-exp ``lse = m + log l`` is saved; the backward recomputes each run's
probabilities from it (``p = e^(s - lse)``) instead of storing the ``(Tq, Tk)`` matrix, so memory
is ``O(block_q · kv_chunk)`` per (batch, head) whatever the sequence length.

The plan (tiles classified EMPTY / PARTIAL / FULL, live ones grouped into runs) is
:mod:`attnkit.kernels.plan`; score mods and mask mods are evaluated per run on index tensors
(:mod:`attnkit.kernels.tile`).

Scores are split as ``tile(prepare(q, k))``: ``prepare`` (per token: the cosine normalization,
``q W`` of the bilinear score, the ``W_q q``/``W_k k`` projections of additive attention) runs
once outside the kernel under ordinary autograd; the kernel sees the prepared tensors. When
``tile`` is a plain dot product and every score mod is a parameter-free additive bias, the
backward uses closed-form matmuls; scores with a closed-form tile gradient (additive:
:meth:`Score.tile_vjp`) use it; otherwise the backward re-runs the tile under autograd, which
covers any score, any score mod and learnable bias parameters.

Two tile bodies run the same plan. The eager body (this module) serves every request. The fused
body (:mod:`attnkit.kernels.fused`; plain softmax over a dot score, additive biases
that need no gradient, no dropout, CPU) hands each run to torch's fused CPU flash kernel with
the run's mask and biases as an additive float mask, and merges runs by their log-sum-exps.
"""

from __future__ import annotations

import torch

from ..spec import AttentionSpec
from . import fused
from .denormals import flushing_denormals
from .dropout import keep_mask
from .entmax import entmax_forward
from .plan import Plan
from .tile import NEG_INF as _NEG_INF
from .tile import (Tile, dropout_rows, entmax_alpha, entmax_d, entmax_gates, expand, normalizer_kind, probabilities,
                   reduce_groups)

Tensor = torch.Tensor


def tiled_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan,
                  seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Returns ``out (B, H, Tq, Dv)`` and the row statistic the backward needs: ``lse (B, H, Tq)``
    for softmax, the denominator ``Σ_j s_ij + eps`` for :class:`Normalize`, None for sigmoid.
    With a dropout ``seed``, weights are dropped by :mod:`attnkit.kernels.dropout`'s hash (the
    statistic is that of the undropped weights, as in FlashAttention)."""
    keep_scale = 1.0 / (1.0 - spec.dropout_p) if seed is not None else 1.0
    B, H, G = spec.B, spec.H, spec.groups
    tile = Tile(spec, qp.device, plan.prescaled)
    kind = normalizer_kind(spec)
    sigmoid = kind == "sigmoid"
    offset = spec.normalizer.offset(spec.Tk) if sigmoid else 0.0
    out = torch.zeros(B, H, spec.Tq, v.shape[-1], dtype=qp.dtype, device=qp.device)
    lse = None if sigmoid else torch.full((B, H, spec.Tq), _NEG_INF if kind == "softmax" else 1.0,
                                          dtype=qp.dtype, device=qp.device)
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        if not runs:
            continue  # every key is masked for this block: output 0, lse -inf
        qi = qp[:, :, qs:qe]
        rows = dropout_rows(seed, spec, qs, qe, qp.device)
        m = torch.full((B, H, qe - qs, 1), _NEG_INF, dtype=qp.dtype, device=qp.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, H, qe - qs, v.shape[-1], dtype=qp.dtype, device=qp.device)
        for r in runs:
            grid = tile.grid(qs, qe, r.start, r.stop)
            s = tile.scores(qi, expand(kp[:, :, r.start:r.stop], G), qs, r.start, grid)
            vj = expand(v[:, :, r.start:r.stop], G)
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


def tiled_backward(qp, kp, v, out, lse, dout, spec: AttentionSpec, plan: Plan, params: tuple[Tensor, ...],
                   seed: int | None = None):
    """Gradients of ``(qp, kp, v, *params)`` given ``dout``. With dropout (mask ``Z``, scale
    ``1/(1-p)``): ``dV = (P∘Z)ᵀ dO``, ``dP = (dO Vᵀ)∘Z``, ``dS = P∘(dP − rowsum(dO∘O))``. For
    sparsemax/entmax ``lse`` holds the thresholds ``τ`` and ``out`` the forward's ``out_g``
    (:mod:`attnkit.kernels.entmax`), so that ``rowsum(dO∘out)`` is the entmax Jacobian's row term."""
    keep_scale = 1.0 / (1.0 - spec.dropout_p) if seed is not None else 1.0
    G = spec.groups
    tile = Tile(spec, qp.device, plan.prescaled)
    kind = normalizer_kind(spec)
    sigmoid = kind == "sigmoid"
    # dot scores whose mods add a bias or are closed-form functions of the score (soft-capping):
    # dS reaches q and k by two matmuls
    pointwise = [m for m in spec.score_mods if not m.additive]
    fast = spec.score.tile_is_dot and not params and all(m.pointwise for m in pointwise)
    # scores with a closed-form tile gradient (additive): no autograd graph per tile
    own = [p for p in spec.score.tile_parameters() if p.requires_grad]
    closed = (not fast and spec.score.has_tile_vjp and all(m.additive for m in spec.score_mods)
              and len(own) == len(params) and all(a is b for a, b in zip(own, params)))
    wanted = [p.requires_grad for p in spec.score.tile_parameters()]
    c = 1.0 if plan.prescaled else spec.scale * tile.inv_temp  # d s / d (qp·kp) on the fast path
    dq, dk, dv = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(v)
    dparams = [torch.zeros_like(p) for p in params]
    delta = None if sigmoid else (dout * out).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    alpha = entmax_alpha(spec) if kind == "entmax" else None
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        qi, doi = qp[:, :, qs:qe], dout[:, :, qs:qe]
        lse_i = None if sigmoid else lse[:, :, qs:qe]
        rows = dropout_rows(seed, spec, qs, qe, qp.device)
        for r in runs:
            grid = tile.grid(qs, qe, r.start, r.stop)
            vj = expand(v[:, :, r.start:r.stop], G)
            allowed = tile.allowed(grid) if r.partial else None
            slopes = [] if pointwise else None
            if fast:
                kj = expand(kp[:, :, r.start:r.stop], G)
                s = tile.scores(qi, kj, qs, r.start, grid, slopes=slopes)
            elif closed:
                raw, vjp = spec.score.tile_vjp(qi, expand(kp[:, :, r.start:r.stop], G))
                s = tile.scores(qi, None, qs, r.start, grid, raw=raw)
            else:
                with torch.enable_grad():
                    qi_ = qi.detach().requires_grad_()
                    kj_ = kp[:, :, r.start:r.stop].detach().requires_grad_()
                    s = tile.scores(qi_, expand(kj_, G), qs, r.start, grid)
            if kind == "entmax":
                p, g = entmax_gates(entmax_d(s.detach(), lse_i, alpha, allowed), alpha)
            else:
                p = probabilities(s.detach(), lse_i, spec, allowed)
            dv[:, :, r.start:r.stop] += reduce_groups(_drop(p, rows, grid, spec.dropout_p, keep_scale).transpose(-2, -1)
                                                       @ doi, G)
            dp = _drop(doi @ vj.transpose(-2, -1), rows, grid, spec.dropout_p, keep_scale)
            if sigmoid:
                ds = dp.mul_(p * (1.0 - p))
            elif kind == "entmax":  # dS = g ∘ (dP - Σ_j g dp / Σ_j g); out holds Σ g v / Σ g here
                ds = dp.sub_(delta[:, :, qs:qe]).mul_(g)
            elif kind == "normalize":  # out = Σ s v / den: d out / d s_ij = (v_j - out_i) / den_i
                ds = dp.sub_(delta[:, :, qs:qe]).div_(lse_i.unsqueeze(-1))
                if allowed is not None:
                    ds = ds.masked_fill_(~allowed, 0.0)
            else:
                ds = dp.sub_(delta[:, :, qs:qe]).mul_(p)
            if fast:
                if c != 1.0:
                    ds = ds.mul_(c)
                for slope in slopes or ():
                    ds = ds.mul_(slope)
                dq[:, :, qs:qe] += ds @ kj
                dk[:, :, r.start:r.stop] += reduce_groups(ds.transpose(-2, -1) @ qi, G)
            elif closed:
                if c != 1.0:
                    ds = ds.mul_(c)
                g_q, g_k, g_params = vjp(ds)
                dq[:, :, qs:qe] += g_q
                dk[:, :, r.start:r.stop] += reduce_groups(g_k, G)
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


def run_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan, seed=None):
    """``(out, lse, saved)`` of the plan's body (fused, entmax or eager), with denormals flushed
    around large calls; ``saved`` is what the backward reads in place of ``out`` (entmax's
    ``out_g``), else None."""
    with flushing_denormals(large_call(spec, plan)):
        if plan.fused:
            return (*fused.fused_forward(qp, kp, v, spec, plan), None)
        if normalizer_kind(spec) == "entmax":
            return entmax_forward(qp, kp, v, spec, plan)
        return (*tiled_forward(qp, kp, v, spec, plan, seed), None)


def run_backward(qp, kp, v, out, lse, dout, spec: AttentionSpec, plan: Plan, params=(), seed=None):
    """``(dq, dk, dv, dparams)`` of the plan's body (``dq`` w.r.t. ``qp`` as given), with denormals
    flushed around large calls."""
    with flushing_denormals(large_call(spec, plan)):
        if plan.fused:
            return (*fused.fused_backward(qp, kp, v, out, lse, dout, spec, plan), ())
        return tiled_backward(qp, kp, v, out, lse, dout, spec, plan, params, seed)


class TiledAttentionFn(torch.autograd.Function):
    """``out = attention(prepared q, prepared k, v)`` with the tiled forward and backward.

    ``params`` are the tensors the tile computation reads that may need gradients (score
    parameters used inside ``tile``, learnable bias tables); they are passed as inputs so
    autograd routes their gradients.
    """

    @staticmethod
    def forward(ctx, qp, kp, v, spec, plan, seed, *params):
        out, lse, saved_out = run_forward(qp, kp, v, spec, plan, seed)
        ctx.save_for_backward(qp, kp, v, out if saved_out is None else saved_out, *(() if lse is None else (lse,)))
        ctx.spec, ctx.plan, ctx.seed, ctx.params, ctx.has_lse = spec, plan, seed, params, lse is not None
        ctx.mark_non_differentiable(*(() if lse is None else (lse,)))
        return out, (lse if lse is not None else out.new_zeros(()))

    @staticmethod
    def backward(ctx, dout, _dlse):
        saved = ctx.saved_tensors
        qp, kp, v, out = saved[:4]
        lse = saved[4] if ctx.has_lse else None
        dq, dk, dv, dparams = run_backward(qp, kp, v, out, lse, dout.contiguous(), ctx.spec, ctx.plan,
                                           ctx.params, ctx.seed)
        return (dq, dk, dv, None, None, None, *dparams)


#: calls with at least this many live scores flush denormals on every thread (two OpenMP regions,
#: tens of microseconds: kernels/denormals.py)
FLUSH_MIN_SCORES = 1 << 22


def large_call(spec: AttentionSpec, plan: Plan) -> bool:
    """Whether a call is large enough to flush denormals around (:data:`FLUSH_MIN_SCORES`)."""
    return spec.B * spec.H * plan.live_tiles * plan.block_q * plan.block_k >= FLUSH_MIN_SCORES
