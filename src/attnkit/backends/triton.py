"""The ``triton`` backend: attnkit's own GPU kernels for what SDPA and FlexAttention cannot
express (:mod:`attnkit.kernels.triton`).

Serves the sigmoid normalizer (``b`` a number or ``-log Tk``; :mod:`~attnkit.kernels.triton.sigmoid`)
and sparsemax, 1.5-entmax and α-entmax with 1 < α <= 2 (:mod:`~attnkit.kernels.triton.entmax`) over
dot-product scores,
additive (Bahdanau) scores under softmax (:mod:`~attnkit.kernels.triton.additive`), and the weights
of softmax, sigmoid and entmax for ``return_weights`` and :func:`attnkit.capture`
(:mod:`~attnkit.kernels.triton.weights`; the output of softmax then comes from the backend ``auto``
picks without weights). Dot-product scores: dot, scaled dot, cosine, bilinear after
``prepare``. Any mask without a weight factor (live tiles from the analytic classification,
partial tiles packed), ALiBi (not with additive scores), GQA, float16 / bfloat16 / float32,
forward and backward, in ``O(block²)`` memory per program (``O(block² · hidden)`` for additive). On CUDA ``auto`` takes it
for those requests; on CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``),
which the tests use and ``auto`` never picks.

Example (needs ``triton``; on a machine without a GPU set ``TRITON_INTERPRET=1`` first)::

    out = attnkit.attention(q, k, v, normalizer=attnkit.normalizers.Sigmoid(bias="log_n"),
                            mask=attnkit.masks.causal(), bias=attnkit.positions.ALiBi(H),
                            backend="triton")
    out = attnkit.attention(q, k, v, normalizer="entmax15", mask=attnkit.masks.causal(), backend="triton")
    out = attnkit.attention(q, k, v, score=attnkit.scores.Additive(D, D, 128), backend="triton")
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..kernels import triton as _kt
from ..normalizers.base import Sigmoid, Softmax
from ..kernels.tile import entmax_alpha
from ..normalizers.sparse import Entmax, Entmax15, Sparsemax
from ..scores import Additive
from ..positions.alibi import ALiBi
from ..spec import AttentionSpec

Tensor = torch.Tensor

#: tile sizes and launch settings per kernel: (block of queries, block of keys), warps, stages;
#: "candidates": the keys per query row the entmax forward keeps while it finds the row maxima
#: (:mod:`attnkit.kernels.triton.entmax`; 0: threshold passes over the keys only).
#: GPU values: the fastest of the sigmoid kernel's settings swept on an H200 at bfloat16, D=128, causal
#: N=8,192 (docs/benchmarks.md, GPU section; benchmarks/results/gpu_sweep.json); the interpreter uses small
#: tiles. The entmax, weights and additive settings are not swept yet: ``python benchmarks/gpu.py --cases
#: entmax_sweep,additive_sweep`` times them on a GPU.
GPU_CONFIG = {
    "fwd": {"block": (128, 64), "num_warps": 8, "num_stages": 3},
    "dq": {"block": (128, 128), "num_warps": 8, "num_stages": 2},
    "dkdv": {"block": (64, 64), "num_warps": 4, "num_stages": 2},
    "weights": {"block": (64, 64), "num_warps": 4, "num_stages": 2},
    "candidates": 128,
}
GPU_CONFIG_FP32 = {
    "fwd": {"block": (64, 64), "num_warps": 4, "num_stages": 2},
    "dq": {"block": (64, 64), "num_warps": 4, "num_stages": 1},
    "dkdv": {"block": (64, 64), "num_warps": 4, "num_stages": 1},
    "weights": {"block": (64, 64), "num_warps": 4, "num_stages": 1},
    "candidates": 128,
}
#: the additive kernel holds a (block_m, block_n, hidden) tile of tanh: small tiles
GPU_CONFIG_ADDITIVE = {name: {"block": (16, 16), "num_warps": 4, "num_stages": 1} for name in ("fwd", "dq", "dkdv")}
INTERPRETER_CONFIG = {**{name: {"block": (16, 16)} for name in ("fwd", "dq", "dkdv", "weights")}, "candidates": 16}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


class TritonBackend:
    name = "triton"
    #: an autograd.Function around Triton launches with Python planning: a graph break under
    #: torch.compile, where auto takes the tiled backend's traced operator instead
    traces = False

    def __init__(self, config: dict | None = None):
        self.config = config

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        if not _kt.available():
            return ['triton is not installed (pip install -e ".[gpu]")']
        why = []
        if spec.device.type == "cpu" and not _kt.interpreting():
            why.append("on CPU, Triton kernels run only under Triton's interpreter (TRITON_INTERPRET=1)")
        elif spec.device.type not in ("cuda", "cpu"):
            why.append(f"device {spec.device.type!r}: attnkit's Triton kernels run on CUDA")
        kind = kernel_for(spec)
        if kind is None and type(spec.score) is Additive:
            why.append(f"additive scores with normalizer {_describe(spec.normalizer)}: the Triton additive "
                       "kernel takes softmax")
        elif kind is None:
            why.append(f"normalizer {_describe(spec.normalizer)}: attnkit's Triton kernels serve sigmoid, "
                       "sparsemax and α-entmax with α <= 2 (and softmax's weights)")
        elif kind == "softmax" and not spec.return_weights:
            why.append("normalizer 'softmax' without weights: SDPA and flex compute it; the Triton kernels "
                       "serve softmax only for its weights (return_weights, capture)")
        if kind == "additive":
            if spec.return_weights:
                why.append("weights of additive scores: the Triton weights kernel takes dot-product scores")
            if spec.score_mods:
                why.append("score mods with additive scores: the Triton additive kernel has none")
            if spec.score.query_proj.out_features > MAX_HEAD_DIM:
                why.append(f"additive hidden size {spec.score.query_proj.out_features} is above {MAX_HEAD_DIM}")
        elif not (spec.score.tile_is_dot and spec.score.tileable):
            why.append(f"score {spec.score.name!r} is not a dot product (nor additive)")
        other = [repr(m) for m in spec.score_mods if not (isinstance(m, ALiBi) and not m.symmetric)]
        if other or len(spec.score_mods) > 1:
            why.append("score mods other than one (non-symmetric) ALiBi: "
                       + ", ".join(other or [repr(m) for m in spec.score_mods]))
        if spec.mask is not None and spec.mask.has_weight_factor:
            why.append("the mask reweights normalized weights (local-p)")
        if spec.dropout_p > 0:
            why.append("the Triton kernels have no dropout")
        if spec.dtype not in _DTYPES:
            why.append(f"dtype {spec.dtype}: the Triton kernels take float16, bfloat16 and float32")
        if max(spec.D, spec.Dv) > MAX_HEAD_DIM:
            why.append(f"head dimension {max(spec.D, spec.Dv)} is above {MAX_HEAD_DIM}")
        if min(spec.Tq, spec.Tk) < 1:
            why.append("empty sequence")
        return why

    def auto_reasons(self, spec: AttentionSpec) -> list[str]:
        if spec.device.type == "cpu":
            return ["Triton's interpreter runs each program in Python, far slower than the tiled backend; "
                    "auto leaves it to explicit requests"]
        return []

    def describe(self, spec: AttentionSpec) -> str:
        what = "no mask" if spec.mask is None else "live tiles of the mask only"
        weights = "; the weights asked for recomputed by the Triton weights kernel" if spec.return_weights else ""
        if kernel_for(spec) == "softmax":
            return "the output by the backend auto picks without weights" + weights
        return f"attnkit's Triton {kernel_for(spec)} kernel, forward and backward ({what})" + weights

    def config_for(self, spec: AttentionSpec) -> dict:
        if self.config is not None:
            return self.config
        if spec.device.type == "cpu":
            return INTERPRETER_CONFIG
        if kernel_for(spec) == "additive":
            return GPU_CONFIG_ADDITIVE
        return GPU_CONFIG_FP32 if spec.dtype == torch.float32 or max(spec.D, spec.Dv) > 128 else GPU_CONFIG

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
        from ..kernels.triton.blocks import block_tables

        qp, kp = spec.score.prepare(q, k)
        cfg = self.config_for(spec)
        kind = kernel_for(spec)
        tables = {}
        if spec.mask is not None and kind != "softmax":
            for name in ("fwd", "dq", "dkdv") if spec.requires_grad else ("fwd",):
                bm, bn = cfg[name]["block"]
                tables[name] = block_tables(spec.mask, spec.Tq, spec.Tk, spec.B, spec.H, bm, bn, q.device)
        slopes = None
        if spec.score_mods:
            slopes = spec.score_mods[0].slopes.to(device=q.device, dtype=torch.float32)
        stat = None
        if kind == "softmax":   # weights asked for: the output from the backend auto picks without them
            from . import registry

            plain = replace(spec, return_weights=False, weights=None)
            with registry.use_backend("auto"):   # auto's own order, also inside use_backend("triton")
                name = registry.choose(plain).backend
            out = registry.REGISTRY[name](q, k, v, plain)[0]
        elif kind == "additive":
            from ..kernels.triton.additive import AdditiveAttentionFn

            scale = spec.scale / spec.normalizer.temperature
            out = AdditiveAttentionFn.apply(qp, kp, v, spec.score.v.weight.view(-1), scale, tables, cfg)
        elif kind == "sigmoid":
            from ..kernels.triton.sigmoid import SigmoidAttentionFn

            out = SigmoidAttentionFn.apply(qp, kp, v, spec.scale, spec.normalizer.offset(spec.Tk), slopes, tables, cfg)
        else:
            from ..kernels.triton.entmax import EntmaxAttentionFn

            out, stat = EntmaxAttentionFn.apply(qp, kp, v, spec.scale, entmax_alpha(spec), slopes, tables, cfg)
        if not spec.return_weights:
            return out, None
        from ..kernels.triton.weights import triton_weights

        # the weights carry no gradient (as the tiled backend's); the statistic's scale is the kernel's
        factor = (1.0 / spec.normalizer.temperature if kind == "softmax" else
                  entmax_alpha(spec) - 1.0 if stat is not None else 1.0)
        with torch.no_grad():
            w = triton_weights(qp.detach(), kp.detach(), kind, scale=spec.scale * factor,
                               heads=spec.weights.heads, rows=spec.weights.rows, stat=stat,
                               offset=spec.normalizer.offset(spec.Tk) if kind == "sigmoid" else 0.0,
                               slopes=None if slopes is None else slopes * factor, mask=spec.mask,
                               average=spec.weights.average, config=cfg.get("weights"),
                               alpha=entmax_alpha(spec) if stat is not None else 1.5)
        return out, w


def kernel_for(spec: AttentionSpec) -> str | None:
    """Which of attnkit's Triton kernels computes ``spec``: ``"additive"`` (additive scores under
    softmax), ``"sigmoid"``, ``"sparsemax"`` (also ``Entmax(alpha=2)``), ``"entmax15"`` (also
    ``Entmax(alpha=1.5)``), ``"entmax"`` (``Entmax(alpha)``, 1 < α < 2), ``"softmax"`` (its
    weights only), or None."""
    n = spec.normalizer
    if type(spec.score) is Additive:
        return "additive" if type(n) is Softmax else None
    if type(n) is Softmax:
        return "softmax"
    if type(n) is Sigmoid:
        return "sigmoid"
    if type(n) is Sparsemax or type(n) is Entmax and n.alpha == 2.0:
        return "sparsemax"
    if type(n) is Entmax15 or type(n) is Entmax and n.alpha == 1.5:
        return "entmax15"
    if type(n) is Entmax and 1.0 < n.alpha < 2.0:
        return "entmax"
    return None


def _describe(n) -> str:
    return f"{n.name!r}" + (f" with alpha = {n.alpha}" if type(n) is Entmax else "")
