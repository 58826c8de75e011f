"""The fused tile body: runs of a softmax/dot plan handed whole to torch's fused CPU flash kernel.

On CPU, a run of a softmax/dot plan can be handed to torch's fused flash kernel, which keeps
scores in registers instead of making 4–6 eager passes over each tile: the run's partial mask and
row-separable biases become its additive float mask, the kernel returns the run's (normalized
output, lse), and runs are merged by their log-sum-exps. Its backward, given the *global* output
and lse, returns exactly that run's share of dq and its dk, dv.
"""

from __future__ import annotations

import torch

from ..normalizers.base import Softmax
from ..spec import AttentionSpec
from .plan import Plan, Run
from .tile import NEG_INF as _NEG_INF
from .tile import Tile, expand, reduce_groups

Tensor = torch.Tensor


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


def _kernel_scale(tile: Tile, plan: Plan) -> float:
    """What the fused kernel multiplies ``q·k`` by: 1 on prescaled queries, else scale/temperature."""
    return 1.0 if plan.prescaled else tile.spec.scale * tile.inv_temp


def _flash_mask(tile: Tile, qs: int, qe: int, r: Run, dtype):
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
    tile = Tile(spec, qp.device, plan.prescaled)
    scale = _kernel_scale(tile, plan)
    out = torch.zeros(B, H, spec.Tq, v.shape[-1], dtype=qp.dtype, device=qp.device)
    lse = torch.full((B, H, spec.Tq), _NEG_INF, dtype=qp.dtype, device=qp.device)
    kp, v = expand(kp, G), expand(v, G)  # once, not per run: full runs span whole rows
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
    tile = Tile(spec, qp.device, plan.prescaled)
    scale = _kernel_scale(tile, plan)
    kp, v = expand(kp, G), expand(v, G)
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
    return dq, reduce_groups(dk, G), reduce_groups(dv, G)
