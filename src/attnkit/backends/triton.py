"""The ``triton`` backend: attnkit's own GPU kernels for what SDPA and FlexAttention cannot
express (:mod:`attnkit.kernels.triton`).

Serves the sigmoid normalizer (``b`` a number or ``-log Tk``) over dot-product scores (dot,
scaled dot, cosine, bilinear after ``prepare``), any mask without a weight factor (live tiles
from the analytic classification, partial tiles packed), ALiBi, GQA, float16 / bfloat16 /
float32, forward and backward, in ``O(block²)`` memory per program. On CUDA ``auto`` takes it
for those requests; on CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``),
which the tests use and ``auto`` never picks.

Example (needs ``triton``; on a machine without a GPU set ``TRITON_INTERPRET=1`` first)::

    out = attnkit.attention(q, k, v, normalizer=attnkit.normalizers.Sigmoid(bias="log_n"),
                            mask=attnkit.masks.causal(), bias=attnkit.positions.ALiBi(H),
                            backend="triton")
"""

from __future__ import annotations

import torch

from ..kernels import triton as _kt
from ..normalizers.base import Sigmoid
from ..positions.alibi import ALiBi
from ..spec import AttentionSpec

Tensor = torch.Tensor

#: tile sizes and launch settings per kernel: (block of queries, block of keys), warps, stages.
#: GPU values: the fastest of the settings swept on an H200 at bfloat16, D=128, causal N=8,192
#: (docs/benchmarks.md, GPU section; benchmarks/results/gpu_sweep.json); the interpreter uses small tiles.
GPU_CONFIG = {
    "fwd": {"block": (128, 64), "num_warps": 8, "num_stages": 3},
    "dq": {"block": (128, 128), "num_warps": 8, "num_stages": 2},
    "dkdv": {"block": (64, 64), "num_warps": 4, "num_stages": 2},
}
GPU_CONFIG_FP32 = {
    "fwd": {"block": (64, 64), "num_warps": 4, "num_stages": 2},
    "dq": {"block": (64, 64), "num_warps": 4, "num_stages": 1},
    "dkdv": {"block": (64, 64), "num_warps": 4, "num_stages": 1},
}
INTERPRETER_CONFIG = {name: {"block": (16, 16)} for name in ("fwd", "dq", "dkdv")}
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
        if type(spec.normalizer) is not Sigmoid:
            why.append(f"normalizer {spec.normalizer.name!r}: attnkit's Triton kernels serve sigmoid")
        if not (spec.score.tile_is_dot and spec.score.tileable):
            why.append(f"score {spec.score.name!r} is not a dot product")
        other = [repr(m) for m in spec.score_mods if not (isinstance(m, ALiBi) and not m.symmetric)]
        if other or len(spec.score_mods) > 1:
            why.append("score mods other than one (non-symmetric) ALiBi: "
                       + ", ".join(other or [repr(m) for m in spec.score_mods]))
        if spec.return_weights:
            why.append("weights were requested and the Triton sigmoid kernel does not return them")
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
        return f"attnkit's Triton sigmoid kernel, forward and backward ({what})"

    def config_for(self, spec: AttentionSpec) -> dict:
        if self.config is not None:
            return self.config
        if spec.device.type == "cpu":
            return INTERPRETER_CONFIG
        return GPU_CONFIG_FP32 if spec.dtype == torch.float32 or max(spec.D, spec.Dv) > 128 else GPU_CONFIG

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
        from ..kernels.triton.blocks import block_tables
        from ..kernels.triton.sigmoid import SigmoidAttentionFn

        qp, kp = spec.score.prepare(q, k)
        cfg = self.config_for(spec)
        tables = {}
        if spec.mask is not None:
            for name in ("fwd", "dq", "dkdv") if spec.requires_grad else ("fwd",):
                bm, bn = cfg[name]["block"]
                tables[name] = block_tables(spec.mask, spec.Tq, spec.Tk, spec.B, spec.H, bm, bn, q.device)
        slopes = None
        if spec.score_mods:
            slopes = spec.score_mods[0].slopes.to(device=q.device, dtype=torch.float32)
        offset = spec.normalizer.offset(spec.Tk)
        return SigmoidAttentionFn.apply(qp, kp, v, spec.scale, offset, slopes, tables, cfg), None
