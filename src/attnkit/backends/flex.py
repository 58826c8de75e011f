"""``torch.nn.attention.flex_attention``, compiled: block-sparse softmax attention with score and
mask mods, fast in the forward pass.

attnkit masks and score mods are FlexAttention-compatible through ``bind(Tq, Tk)``, so this
backend only translates. It serves softmax over dot-product scores (dot, scaled dot, cosine,
bilinear: ``tile`` is a plain dot product after ``prepare``), any mask without a weight factor,
any score mod, GQA. On CPU FlexAttention has no backward (PyTorch raises NotImplementedError), so
requests that need gradients on CPU are refused. The first call for each shape compiles a kernel
(seconds); later calls with the same shapes reuse it.

Inside ``torch.compile`` flex is traced into the caller's graph. On CPU, torch 2.13's inductor
cannot lower it when a mask or score mod holds a tensor computed inside the compiled region (a
``NoValidChoicesError``), e.g. ``key_padding(tokens != pad)``; masks and biases built outside
(a module's ``__init__``, an input) work. ``auto`` does not take flex there.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch

from ..masks.base import tensor_versions
from ..normalizers.base import Softmax
from ..spec import AttentionSpec

Tensor = torch.Tensor


@functools.lru_cache(maxsize=2)
def _compiled(dynamic: bool | None = False):
    """Compiled flex: static shapes on CPU (measured fastest there); on CUDA torch's default
    (``dynamic=None``), which compiles a kernel with a symbolic length after the second length
    it sees instead of one kernel per length."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


_BLOCK_MASKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _extent(mask, B: int, H: int, Tq: int, Tk: int, device) -> tuple[int | None, int | None]:
    """``(B, H)`` for ``create_block_mask``, None for each the mask does not depend on (found by
    evaluating it at one position per batch and head): a block mask broadcast over the batch and
    heads, as one would build by hand, is what flex reads fastest."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    z = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    try:
        shape = torch.as_tensor(mask.mask_mod(b, h, z, z, Tq, Tk)).shape
    except Exception:  # a predicate that cannot take this probe: per batch and head, as asked
        return B, H
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    return (B if shape[0] > 1 else None), (H if shape[1] > 1 else None)


def _block_mask(mask, B: int, H: int, Tq: int, Tk: int, device):
    """flex's ``BlockMask`` of ``mask`` at these sizes, cached per mask object (a weak reference)
    and sizes: a training loop that reuses its mask builds it once, as when calling flex directly."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (B, H, Tq, Tk, str(device), tensor_versions(mask))
    try:
        per_mask = _BLOCK_MASKS.setdefault(mask, {})
    except TypeError:
        per_mask = {}
    if key not in per_mask:
        if len(per_mask) >= 16:
            per_mask.pop(next(iter(per_mask)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Bm, Hm = _extent(mask, B, H, Tq, Tk, device)
            per_mask[key] = create_block_mask(mask.bind(Tq, Tk), Bm, Hm, Tq, Tk, device=device)
    return per_mask[key]


def available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class FlexBackend:
    name = "flex"

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        why = []
        if not available():
            return ["torch.nn.attention.flex_attention is not available in this torch"]
        if type(spec.normalizer) is not Softmax:
            why.append(f"normalizer {spec.normalizer.name!r} is not softmax")
        if not (spec.score.tile_is_dot and spec.score.tileable):
            why.append(f"score {spec.score.name!r} is not a dot product (mask_mod/score_mod cannot express it)")
        if spec.return_weights:
            why.append("weights were requested and flex does not return them")
        if spec.mask is not None and spec.mask.has_weight_factor:
            why.append("the mask reweights normalized weights (local-p)")
        if spec.dropout_p > 0:
            why.append("flex has no dropout")
        if spec.requires_grad and spec.device.type == "cpu":
            why.append("flex has no backward pass on CPU")
        if spec.dtype not in (torch.float32, torch.bfloat16, torch.float16) and spec.device.type == "cpu":
            why.append(f"compiled flex on CPU does not take {spec.dtype}")
        if min(spec.Tq, spec.Tk) < 1:
            why.append("empty sequence")
        return why

    def auto_reasons(self, spec: AttentionSpec) -> list[str]:
        if torch.compiler.is_compiling():
            if spec.device.type == "cpu":
                # torch 2.13: inductor's CPU flex kernel fails to lower ("NoValidChoicesError") when a
                # mask or score mod captures a tensor computed inside the compiled region, e.g.
                # key_padding(tokens != pad) or ALiBi(H) built in forward; SDPA always lowers
                return ["inside torch.compile on CPU, inductor's flex kernel cannot take a mask or bias "
                        "tensor computed in the compiled region; auto takes SDPA"]
            return []  # compiled anyway: flex becomes part of the caller's graph
        if spec.device.type == "cuda":
            return []  # on CUDA flex's compiled kernels run forward and backward: auto's choice for masks
        # measured (docs/benchmarks.md): the tiled backend's fused body matches or beats compiled
        # flex on the forward-only cases flex serves, without a per-shape compile
        return ["compiling a flex kernel costs seconds per shape and the tiled backend is as fast "
                "once compiled; auto leaves flex to explicit requests"]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
        from torch.nn.attention.flex_attention import create_block_mask

        qp, kp = spec.score.prepare(q, k)
        temp = spec.normalizer.temperature
        scale = spec.scale if spec.score_mods else spec.scale / temp  # temperature divides after the mods
        compiling = torch.compiler.is_compiling()  # then flex is traced into the caller's graph
        block_mask = None
        if spec.mask is not None:
            mask_mod = spec.mask.bind(spec.Tq, spec.Tk)
            if compiling:  # the compiler cannot trace a change of the warning filters or the cache
                block_mask = create_block_mask(mask_mod, spec.B, spec.H, spec.Tq, spec.Tk, device=q.device)
            else:
                block_mask = _block_mask(spec.mask, spec.B, spec.H, spec.Tq, spec.Tk, q.device)
        score_mod = None
        if spec.score_mods:
            mods = [m.on_device(q.device).bind(spec.Tq, spec.Tk) for m in spec.score_mods]

            def score_mod(score, b, h, q_idx, kv_idx):
                for m in mods:
                    score = m(score, b, h, q_idx, kv_idx)
                return score / temp if temp != 1.0 else score

        from torch.nn.attention.flex_attention import flex_attention

        out = (flex_attention if compiling else _compiled(False if q.device.type == "cpu" else None))(qp, kp, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=spec.groups > 1)
        return out, None
