"""torch's ``scaled_dot_product_attention``: fused and fast for plain softmax attention.

Serves ``dot``/``scaled_dot`` scores with softmax (any temperature folds into the scale),
boolean masks and additive biases (materialized into SDPA's ``attn_mask``), GQA and dropout.
It never returns weights. Fully masked rows, where SDPA may give NaN, are handled here: their
mask is opened and their output set to 0, matching the reference.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .._checks import sizes_text
from ..masks.base import FromTensor, query_offset
from ..masks.basic import Causal
from ..normalizers.base import Softmax
from ..positions.base import TensorBias
from ..scores import Dot
from ..spec import AttentionSpec
from .registry import Prepared
from .reference import expand_kv

Tensor = torch.Tensor
_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # added in torch 2.5


class SDPABackend:
    name = "sdpa"
    compile_fallback = True  # traced, a dense mask in torch's kernel still beats the reference

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        why = []
        if not (isinstance(spec.score, Dot) and spec.score.tile_is_dot):
            why.append(f"score {spec.score.name!r} is not a dot product")
        if type(spec.normalizer) is not Softmax:
            why.append(f"normalizer {spec.normalizer.name!r} is not softmax")
        if spec.return_weights:
            why.append("weights were requested and SDPA does not return them")
        if spec.mask is not None and spec.mask.has_weight_factor:
            why.append("the mask reweights normalized weights (local-p)")
        plain = [repr(m) for m in spec.score_mods if not m.additive]
        if plain:
            why.append(f"score mod {', '.join(plain)} is not declared additive (SDPA takes only a float bias): write "
                       "an additive bias as attnkit.positions.bias_mod(lambda b, h, q_idx, kv_idx: ...), a float "
                       "tensor, or a ScoreMod subclass with additive = True")
        if spec.dropout_p > 0 and spec.generator is not None:
            why.append("dropout with an explicit generator (SDPA uses the global RNG)")
        return why

    #: from this many (query, key) pairs on, auto prefers a block-sparse backend to a dense mask
    #: (measured, one thread, fwd+bwd, H=8, D=64: at N=512 the tiled backend's fused body takes
    #: 0.020 s for ALiBi+causal and 0.015 s for a window of 128 where SDPA with the dense tensor
    #: takes 0.033 s and 0.027 s; at N=256 they tie)
    auto_dense_limit: int = 1 << 18
    #: the same with dropout, which the tiled backend runs in its eager body
    auto_dense_limit_dropout: int = 1 << 22

    def native_causal(self, spec: AttentionSpec) -> bool:
        m = spec.mask
        return (isinstance(m, Causal) and query_offset(m.align, spec.Tq, spec.Tk) == 0  # SDPA's is_causal is top-left
                and len(spec.score_mods) == 0)

    @staticmethod
    def key_slice(spec: AttentionSpec) -> tuple[int, int] | None:
        """The keys ``[lo, hi)`` that are every query's only live keys (:meth:`Mask.key_range`: a
        window or causal mask at one query), read as a slice with no mask; None otherwise."""
        m = spec.mask
        if m is None or spec.score_mods or torch.compiler.is_compiling():
            return None
        return m.key_range(spec.Tq, spec.Tk)

    def auto_reasons(self, spec: AttentionSpec) -> list[str]:
        """SDPA serves masks and biases by materializing a (Tq, Tk) tensor and doing all Tq·Tk work;
        past ``auto_dense_limit`` pairs the tiled backend, which skips masked tiles, wins.

        Inside ``torch.compile`` with symbolic (dynamic) sizes there is no size test, so a dynamic
        sequence length gets no guard at the limit; with static sizes the tiled backend's operator
        takes the long masked requests it describes (``backends/tiled_op.py``)."""
        pairs = spec.Tq * spec.Tk
        # a query-invariant mask (key padding) materializes as one row broadcast over the queries
        dense_mask = (spec.mask is not None and not isinstance(spec.mask, FromTensor)
                      and not spec.mask.query_invariant and not self.native_causal(spec)
                      and self.key_slice(spec) is None)
        dense_bias = any(not isinstance(m, TensorBias) for m in spec.score_mods)
        limit = self.auto_dense_limit_dropout if spec.dropout_p > 0 else self.auto_dense_limit
        if torch.compiler.is_compiling():
            # true only when known without a guard: static sizes; a symbolic length stays with SDPA
            big = statically_known_true(pairs >= limit)
        else:
            big = pairs >= limit
        if big and (dense_mask or dense_bias):
            return [f"the mask or bias would be materialized densely ({sizes_text(spec.Tq, spec.Tk)}) and every pair "
                    "computed; a block-sparse backend is faster"]
        return []

    def describe(self, spec: AttentionSpec) -> str:
        """How this backend will run ``spec`` (for :func:`attnkit.explain`)."""
        if self.native_causal(spec):
            how = "torch's fused kernel with is_causal, nothing materialized"
        elif spec.mask is None and not spec.score_mods:
            how = "torch's fused kernel, no mask"
        elif (span := self.key_slice(spec)) is not None:
            how = f"torch's fused kernel on keys [{span[0]}, {span[1]}), the mask's only live keys, no mask"
        else:
            what = " and ".join(w for w, on in (("the mask", spec.mask is not None), ("the bias", spec.score_mods)) if on)
            how = (f"torch's kernel with {what} as a dense ({spec.Tq} x {spec.Tk}) tensor; "
                   f"{spec.Tq * spec.Tk} pairs is below the {self.auto_dense_limit} where a block-sparse backend wins")
        return how + (", GQA without copying K/V" if spec.groups > 1 and _HAS_GQA else "")

    def _plain(self, spec: AttentionSpec) -> tuple[tuple[int, int] | None, dict] | None:
        """A request with no mask or bias to build (none, SDPA's own ``is_causal``, or a slice of the
        keys): that slice (None: every key) and SDPA's keyword arguments; None for the others."""
        if spec.score_mods or (spec.mask is not None and not self.native_causal(spec)
                               and self.key_slice(spec) is None):
            return None
        kw = {"scale": spec.scale / spec.normalizer.temperature, "is_causal": self.native_causal(spec),
              "dropout_p": spec.dropout_p}
        if spec.groups > 1 and _HAS_GQA:
            kw["enable_gqa"] = True
        return self.key_slice(spec), kw

    def prepare(self, spec: AttentionSpec):
        """This backend's call for ``spec``, planned once (``attnkit.request_cache`` keeps it for
        requests of the same shapes and options): a request with no mask to build goes straight to
        torch's kernel with its arguments fixed; others take :meth:`__call__`."""
        plain = self._plain(spec)
        if plain is None or (spec.groups > 1 and not _HAS_GQA):
            return self
        span, kw = plain
        if spec.scale == 1 / math.sqrt(spec.D) and spec.normalizer.temperature == 1.0:
            del kw["scale"]  # SDPA's own default, computed as torch does: fewer arguments to parse
        for name, default in (("is_causal", False), ("dropout_p", 0.0)):
            if kw[name] == default:
                del kw[name]
        sdpa = functools.partial(F.scaled_dot_product_attention, **kw)
        if span is not None:
            lo, hi = span
            return Prepared(lambda q, k, v: sdpa(q, k[:, :, lo:hi], v[:, :, lo:hi]))
        return Prepared(sdpa)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
        plain = self._plain(spec)
        if plain is not None:
            span, kw = plain
            if span is not None:  # a decoding step's window: its keys as a slice, nothing materialized
                k, v = k[:, :, span[0]:span[1]], v[:, :, span[0]:span[1]]
            if spec.groups > 1 and not _HAS_GQA:
                k, v = expand_kv(k, spec.groups), expand_kv(v, spec.groups)
            return F.scaled_dot_product_attention(q, k, v, **kw), None
        scale = spec.scale / spec.normalizer.temperature
        mask, dead = None, None
        if spec.mask is not None:
            mask = spec.mask.materialize(spec.Tq, spec.Tk, spec.B, spec.H, device=q.device)
            # rows with no live key: let them read every key (no NaN from an all -inf row), zeroed
            # below; eagerly only when there are any, compiled without asking (a graph break)
            dead = ~mask.any(-1, keepdim=True)
            if torch.compiler.is_compiling() or dead.any():
                mask = mask | dead
            else:
                dead = None
        if spec.score_mods:
            bias = sum(mod.materialize_bias(spec.Tq, spec.Tk, spec.B, spec.H, device=q.device, dtype=q.dtype)
                       for mod in spec.score_mods)
            if spec.normalizer.temperature != 1.0:  # softmax((s + bias) / T): the bias is divided too
                bias = bias / spec.normalizer.temperature
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        kw = {}
        if spec.groups > 1:
            if _HAS_GQA:
                kw["enable_gqa"] = True
            else:
                k, v = expand_kv(k, spec.groups), expand_kv(v, spec.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=spec.dropout_p, scale=scale, **kw)
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
        return out, None
