"""The ``tiled`` backend: exact, memory-efficient attention (see :mod:`attnkit.kernels.tiled`).

Serves softmax (any temperature) and sigmoid over every tileable score (dot, scaled dot,
cosine, bilinear, additive), any mask (empty tiles skipped) and any score mod, with GQA, in
``O(block · chunk)`` memory. Weights, when requested, are recomputed exactly per tile from
the saved log-sum-exp (the output still comes from the tiled kernel), or, when every weight is
asked for and nothing needs a gradient, computed with the output in one pass over the rows
(:mod:`attnkit.kernels.weights`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..kernels.dropout import draw_seed
from ..kernels.fused import fusable, gather_keys
from ..kernels.plan import can_prescale, causal_plan, gather_runs, make_plan, prescales, query_scale, stack_runs
from ..kernels.tiled import TiledAttentionFn
from ..kernels.weights import tiled_weights, weights_pass
from ..kernels.tile import normalizer_kind
from ..normalizers.base import Normalize, Sigmoid, Softmax
from ..normalizers.sparse import Entmax, Entmax15, Sparsemax
from ..positions.base import TensorBias
from ..linear import linear_attention
from ..masks.base import query_offset
from ..masks.basic import Causal
from ..scores import Kernel
from ..spec import AttentionSpec
from .tiled_op import describe

Tensor = torch.Tensor
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def tile_parameters(spec: AttentionSpec) -> list[Tensor]:
    """Tensors read inside tiles that may need gradients (none when autograd is off)."""
    if not torch.is_grad_enabled():
        return []
    params = [p for p in spec.score.tile_parameters() if p.requires_grad]
    for mod in spec.score_mods:
        if isinstance(mod, nn.Module):
            params += [p for p in mod.parameters() if p.requires_grad]
        elif isinstance(mod, TensorBias) and mod.tensor.requires_grad:
            params.append(mod.tensor)
    return params


def _partial_share(plan) -> float:
    """The fraction of a plan's live (query, key) area whose mask must be evaluated."""
    total = partial = 0
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        for r in runs:
            area = (qe - qs) * (r.stop - r.start)
            total += area
            partial += area if r.partial else 0
    return partial / total if total else 0.0


class TiledBackend:
    name = "tiled"
    @staticmethod
    def traces(spec: AttentionSpec) -> bool:
        """Inside ``torch.compile`` a request that :func:`~attnkit.backends.tiled_op.describe`
        states runs as one opaque operator (``torch.ops.attnkit.tiled_attention``); any other runs
        the Python tile loop, a graph break, and ``auto`` passes over it. (On a GPU ``auto`` passes
        over it anyway: there compiled flex is the block-sparse kernel.)"""
        return spec.device.type == "cpu" and describe(spec) is not None

    def __init__(self, block_q: int = 128, block_k: int = 128, kv_chunk: int = 1024, fuse: bool = True):
        self.block_q, self.block_k, self.kv_chunk = block_q, block_k, kv_chunk
        #: hand softmax/dot runs to torch's fused CPU flash kernel (see kernels.fused)
        self.fuse = fuse

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        why = []
        if type(spec.normalizer) not in (Softmax, Sigmoid, Normalize, Sparsemax, Entmax15, Entmax):
            why.append(f"normalizer {spec.normalizer.name!r} is not softmax, sigmoid, normalize, sparsemax or entmax")
        elif isinstance(spec.normalizer, Entmax) and not spec.normalizer.alpha <= 2.0:
            why.append(f"entmax with alpha = {spec.normalizer.alpha} > 2 (the tiled threshold search needs "
                       "alpha in (1, 2])")
        if normalizer_kind(spec) == "entmax" and spec.dropout_p > 0:
            why.append("dropout with sparsemax or entmax (the reference draws it)")
        if not spec.score.tileable:
            why.append(f"score {spec.score.name!r} cannot be evaluated tile by tile")
        if spec.mask is not None and spec.mask.has_weight_factor:
            why.append("the mask reweights normalized weights (local-p)")
        if spec.grad_mods:
            why.append(f"{', '.join(spec.grad_mods)} reads a tensor that requires grad, which the tiled backward "
                       "does not differentiate: use backend='reference', or detach that tensor (or run under "
                       "torch.no_grad()) if it is not being trained")
        return why

    #: below this many score entries (B·H·Tq·Tk) auto prefers the reference: fewer Python steps
    auto_min_scores: int = 1 << 20

    def auto_reasons(self, spec: AttentionSpec) -> list[str]:
        n = spec.B * spec.H * spec.Tq * spec.Tk
        if n < self.auto_min_scores:
            return [f"small problem ({n} scores < {self.auto_min_scores}): the reference is faster"]
        return []

    #: fused plans whose query blocks see on average at least ``long_row_keys`` keys use the
    #: tallest query blocks of ``long_row_blocks`` that leave at most a quarter of the live area
    #: in partial tiles (the kernel runs faster on more rows: 194 -> 218 GFLOP/s forward and
    #: 167 -> 223 backward from 256 to 1,024 rows, 2 threads, keys 4,096, D 64)
    long_row_keys: int = 1024
    long_row_blocks: tuple[int, ...] = (1024, 512, 256)
    #: a causal mask over long rows: full runs in blocks of the first size, the diagonal in blocks
    #: of the second, each block's own square under the kernel's causal masking (``causal_plan``)
    causal_blocks: tuple[int, int] = (1024, 256)

    #: additive scores build a (B, H, tq, tk, hidden) tile and make a few passes over it: keep it
    #: near this size so the passes run from cache (4 MiB: 2.7 s -> 1.65 s forward, B=4, T=1024)
    wide_tile_bytes: int = 4 << 20

    def blocks_for(self, spec: AttentionSpec, kp: Tensor) -> tuple[int, int, int]:
        """``(block_q, block_k, kv_chunk)`` for this request."""
        if spec.score.tile_is_dot:
            return self.block_q, self.block_k, self.kv_chunk
        per_pair = spec.B * spec.H * kp.shape[-1] * kp.element_size()
        block = min(self.block_q, self.block_k, 32)
        chunk = max(block, min(self.kv_chunk, self.wide_tile_bytes // (per_pair * block) // block * block))
        return block, block, chunk

    @staticmethod
    def chunked_linear(spec: AttentionSpec) -> bool:
        """Linear attention (kernel score, sum normalization) with no mask or a bottom-right causal
        one runs in the O(T·D²) chunked form of :func:`attnkit.linear.linear_attention`."""
        m = spec.mask
        return (isinstance(spec.score, Kernel) and type(spec.normalizer) is Normalize and not spec.score_mods
                and spec.dropout_p == 0 and not spec.return_weights
                and (m is None or (isinstance(m, Causal)
                                   and query_offset(m.align, spec.Tq, spec.Tk) == spec.Tk - spec.Tq)))

    def describe(self, spec: AttentionSpec) -> str:
        """How this backend will run ``spec`` (for :func:`attnkit.explain`)."""
        if self.chunked_linear(spec):
            return "linear attention in its O(T·D²) chunked form"
        return ("tile by tile: masked-out tiles skipped, no (Tq x Tk) tensor kept"
                + ("; weights computed with the output in one pass when every weight is asked for and nothing "
                   "needs a gradient, else recomputed for the rows asked for" if spec.return_weights else ""))

    @staticmethod
    def one_pass_weights(spec: AttentionSpec, seed, params, *tensors: Tensor) -> bool:
        """Every weight asked for, no dropout, no gradient: :func:`~attnkit.kernels.weights.weights_pass`
        computes the output and the weights from one set of scores (``output_attentions`` under
        ``torch.no_grad()``); otherwise the output comes from the tiled kernel and the weights
        asked for are recomputed from its log-sum-exp."""
        if not spec.return_weights or seed is not None or params or normalizer_kind(spec) == "entmax":
            return False
        if spec.weights is not None and not spec.weights.everything:
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def setup(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
        """``(qp, kp, v, plan, seed, params)``: the prepared (and, for a prescaled plan, scaled)
        queries and keys, the values in the working dtype (float32 for half precision), the tile
        plan, the dropout seed and the tensors that may need gradients. Deterministic for a given
        request (the dropout seed aside), so the backward of the traced operator rebuilds it."""
        qp, kp = spec.score.prepare(q, k)
        dtype = v.dtype
        if dtype in _LOW_PRECISION:  # accumulate in float32
            qp, kp, v = qp.float(), kp.float(), v.float()
        seed = draw_seed(spec.generator) if spec.dropout_p > 0 else None
        params = tile_parameters(spec)
        fused = self.fuse and fusable(spec, qp, v, seed, params)
        block_q, block_k, chunk = self.blocks_for(spec, kp)
        partial_chunk = chunk
        if fused and can_prescale(spec):  # the fused kernel's memory does not grow with a full run:
            chunk = max(spec.Tk, block_k)  # let it span the row; runs that carry a (block_q, run)
            # mask or non-separable bias stay short
        # long rows: more queries per call let the fused kernel use larger GEMM blocks (causal +
        # ALiBi, N=8192, fwd+bwd, 1 thread: 4.05 s at 128 rows -> 3.52 s at 256) unless the taller
        # blocks turn full tiles partial (block-sparse layouts of 128); a causal mask takes tall
        # blocks for its full runs and the kernel's causal masking for the diagonal (no masked half
        # computed): causal_plan. Prescaled plans only (other biases would make its long full runs
        # carry a (rows, keys) bias each), and not when weights are asked for (the one-pass weights
        # and the eager body read disjoint query blocks)
        two_level = fused and can_prescale(spec) and not spec.return_weights
        plan = causal_plan(spec, *self.causal_blocks, block_k) if two_level else None
        if plan is not None and plan.live_area < self.long_row_keys * spec.Tq:
            plan = None
        if plan is None:
            plan = make_plan(spec, block_q, block_k, chunk, device=q.device, partial_chunk=partial_chunk, mix=fused)
            if fused and plan.live_tiles * block_k >= self.long_row_keys * len(plan.q_blocks):
                for rows in self.long_row_blocks:
                    if rows <= block_q:
                        break
                    tall = make_plan(spec, rows, block_k, chunk, device=q.device, partial_chunk=partial_chunk,
                                     mix=True)
                    if _partial_share(tall) <= 0.25:
                        plan = tall
                        break
        if fused:
            stacks, gathers = stack_runs(plan), ()
            if not spec.score_mods:  # a bias would need the gathered keys' positions
                stacks, gathers = gather_runs(stacks, gather_keys(spec, v.shape[-1], qp.element_size()))
            plan = replace(plan, fused=True, stacks=stacks, gathers=gathers, prescaled=prescales(spec, fused=True))
        if plan.prescaled:
            qp = qp * query_scale(spec)
        return qp, kp, v, plan, seed, params

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
        if torch.compiler.is_compiling():
            described = describe(spec)
            if described is not None:
                desc, data = described
                return torch.ops.attnkit.tiled_attention(q, k, v, data, desc)[0], None
        if self.chunked_linear(spec):
            # c·s / (c·Σs + eps) = s / (Σs + eps / c): the scale only moves eps
            out = linear_attention(q, k, v, feature_map=spec.score.feature_map, causal=spec.mask is not None,
                                   eps=spec.normalizer.eps / spec.scale)
            return out, None
        dtype = v.dtype
        qp, kp, v, plan, seed, params = self.setup(q, k, v, spec)
        if self.one_pass_weights(spec, seed, params, qp, kp, v):
            out, weights = weights_pass(qp, kp, v, spec, plan, weights_dtype=dtype,
                                        average=spec.weights is not None and spec.weights.average)
            return out.to(dtype), weights
        out, lse = TiledAttentionFn.apply(qp, kp, v, spec, plan, seed, *params)
        weights = None
        if spec.return_weights:
            with torch.no_grad():
                weights = tiled_weights(qp.detach(), kp.detach(), spec,
                                        None if isinstance(spec.normalizer, Sigmoid) else lse,
                                        spec.weights.heads, spec.weights.rows, plan.block_q, self.kv_chunk,
                                        plan.prescaled, average=spec.weights.average,
                                        lse_block=1 if plan.fused else plan.block_q).to(dtype)
        return out.to(dtype), weights
