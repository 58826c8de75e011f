r"""attnkit inside Hugging Face ``transformers`` models: ``attn_implementation="attnkit"``.

Importing this module (or calling :func:`register`) adds ``"attnkit"`` to
``transformers.AttentionInterface`` and a matching mask builder to ``AttentionMaskInterface``::

    import transformers, attnkit.integrations.hf as akhf
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("attnkit")          # or from_pretrained(..., attn_implementation="attnkit")
    akhf.configure(model, normalizer="entmax15", mask=attnkit.masks.sliding_window(64))  # optional variant

What it does differently from ``"sdpa"``:

* **Masks stay structured.** HF's mask functions (causal, sliding window, bidirectional,
  padding, chunked, ...) become attnkit mask objects (:class:`~attnkit.masks.Causal`,
  :class:`~attnkit.masks.SlidingWindow`, :class:`~attnkit.masks.Chunked`, :class:`~attnkit.masks.KeyPadding`) aligned on the
  cache's offsets, so the tiled backend skips empty tiles and nothing ``(N, N)`` is built; any
  other ``mask_function(b, h, q_idx, kv_idx)`` becomes an attnkit ``mask_mod``.
* **Weights from the fast path.** ``output_attentions=True`` returns exact weights computed by
  the tiled backend (under ``torch.no_grad()``: with the output, from one set of scores, row block
  by row block; see :mod:`attnkit.kernels.weights`), not by falling back to eager.
* **Variants.** :func:`configure` swaps the normalizer (``"entmax15"``, ``"sigmoid"``, ...),
  the score, adds a mask (a window on a model trained without one) or a bias (ALiBi) on a
  pretrained architecture.

The attention function honours what models pass: ``scaling``, ``dropout``, ``sliding_window``,
``softcap``, attention sinks (``s_aux``), ``is_causal``, grouped-query attention (K/V are never
repeated), the KV cache (mask offsets) and padding; it returns ``(attn_output (B, Tq, H, Dv),
weights (B, H, Tq, Tk) or None)`` as HF expects.

Under ``torch.compile`` the models trace with no graph break (``tests/integrations/test_hf_compile.py``);
traced, the mask functions a model builds in its forward become ``mask_mod`` masks (Dynamo cannot read
their closures), exact but without the analytic masks' tile skipping.

Requires ``pip install -e ".[hf]"`` (transformers 5.x); the core of attnkit never imports
transformers.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .. import masks as _masks
from .. import normalizers as _normalizers
from .. import scores as _scores
from ..functional import attention
from ..masks.base import Mask
from ..positions.base import ScoreMod, as_score_mod, softcap as _softcap

try:
    import transformers
    from transformers import masking_utils as _mu
except ImportError as e:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError("attnkit.integrations.hf needs Hugging Face transformers 5.x: pip install -e \".[hf]\" "
                      "(or pip install 'attnkit[hf]')") from e

Tensor = torch.Tensor

__all__ = ["register", "configure", "Variant", "attention_forward", "build_mask", "HFMask", "draw", "NAME"]

#: the name models use: ``attn_implementation="attnkit"``
NAME = "attnkit"
#: registered shorthands ``"attnkit:<normalizer>"``
NORMALIZER_NAMES = ("softmax", "sigmoid", "sparsemax", "entmax15")

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"attnkit.integrations.hf needs transformers 5.x; found {transformers.__version__}")


# -- variants --------------------------------------------------------------------------------------
@dataclass
class Variant:
    """The attnkit options used by a model's attention (see :func:`configure`).

    Attributes:
        normalizer: a normalizer name or object (default softmax, as the model was trained).
        score: a parameter-free score name or object (default the model's scaled dot product).
        mask: an extra attnkit mask ANDed with the model's own (e.g. ``sliding_window(256)``).
        bias: extra score mods applied after the model's own (e.g. ``ALiBi(num_heads)``).
        backend: an attnkit backend name (default ``"auto"``).
    """

    normalizer: Any = "softmax"
    score: Any = "scaled_dot"
    mask: Optional[Mask] = None
    bias: tuple = field(default_factory=tuple)
    backend: str = "auto"


_DEFAULT = Variant()


def configure(model: torch.nn.Module, *, normalizer: Any = "softmax", score: Any = "scaled_dot",
              mask: Any = None, bias: Any = None, backend: str = "auto") -> torch.nn.Module:
    """Run ``model``'s attention through attnkit with a variant, in place; returns ``model``.

    Sets ``attn_implementation="attnkit"`` and stores the variant on every module, where the
    attention function finds it (``configure(model)`` with no options restores plain attnkit
    attention).

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention goes through
            ``AttentionInterface`` (``_supports_attention_backend``).
        normalizer: ``"softmax"`` (default), ``"sigmoid"``, ``"sparsemax"``, ``"entmax15"``, ... or a
            :class:`~attnkit.normalizers.Normalizer`.
        score: ``"scaled_dot"`` (default; the model's ``scaling`` is kept), ``"dot"``, ``"cosine"``
            or a parameter-free :class:`~attnkit.scores.Score`.
        mask: an attnkit mask ANDed with the model's (``True`` = may attend).
        bias: a score mod or a list of them (ALiBi, softcap, a callable...), after the model's own.
        backend: attnkit backend name.

    Example::

        >>> import torch, transformers, attnkit, attnkit.integrations.hf as akhf
        >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
        >>> model = akhf.configure(transformers.LlamaForCausalLM(cfg), normalizer="entmax15")
        >>> model.config._attn_implementation
        'attnkit'
        >>> model(torch.randint(0, 50, (1, 6))).logits.shape
        torch.Size([1, 6, 50])
    """
    register()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel; got {type(model).__name__}")
    can = getattr(type(model), "_can_set_attn_implementation", None)
    routed = can() if callable(can) else getattr(model, "_supports_attention_backend", False)
    if not routed:
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                         "AttentionInterface (its modeling code calls its own attention), so attn_implementation="
                         f"{NAME!r} cannot reach it")
    norm = _normalizers.get(normalizer)
    sc = _scores.get(score)
    if any(True for _ in sc.parameters()):
        raise ValueError(f"score {sc.name!r} has parameters, which a pretrained model's optimizer would not see; "
                         "configure takes parameter-free scores ('scaled_dot', 'dot', 'cosine')")
    m = None if mask is None else _masks.as_mask(mask)
    mods = () if bias is None else tuple(as_score_mod(b) for b in (bias if isinstance(bias, (list, tuple)) else [bias]))
    for mod in mods:
        if isinstance(mod, torch.nn.Module) and any(True for _ in mod.parameters()):
            raise ValueError(f"bias {mod!r} has parameters, which the model's optimizer would not see; add learned "
                             "biases to the model's own modules instead")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    variant = Variant(norm, sc, m, mods, backend)
    if variant == Variant(_normalizers.get("softmax"), _scores.get("scaled_dot")):
        variant = None  # plain attnkit attention: nothing to override a registered shorthand with
    for module in model.modules():
        module._attnkit_variant = variant
    model.set_attn_implementation(NAME)
    return model


# -- masks -----------------------------------------------------------------------------------------
class HFMask:
    """What the ``"attnkit"`` mask builder hands to the attention function: an attnkit mask over
    ``(q_length, kv_length)`` (or None: every key), instead of a dense ``(B, 1, Tq, Tk)`` tensor.

    Attributes:
        mask: the attnkit mask (``True`` = may attend), offsets already applied.
        q_length, kv_length: the sizes it was built for.
    """

    def __init__(self, mask: Optional[Mask], q_length: int, kv_length: int):
        self.mask, self.q_length, self.kv_length = mask, q_length, kv_length
        self.shape = (None, 1, q_length, kv_length)  # models sometimes read mask.shape[-1]
        self.ndim = 4  # transformers treats a 4-D mask as prepared (static caches build it once, then reuse it)

    def contiguous(self) -> "HFMask":
        return self

    def to(self, *args, **kwargs) -> "HFMask":
        return self

    def to_dense(self, batch_size: int = 1, device=None) -> Tensor:
        """The boolean ``(B', 1, Tq, Tk)`` tensor it stands for (for inspection and tests)."""
        if self.mask is None:
            return torch.ones(1, 1, self.q_length, self.kv_length, dtype=torch.bool, device=device)
        return self.mask.materialize(self.q_length, self.kv_length, batch_size, 1, device=device)

    def __repr__(self) -> str:
        return f"HFMask({self.mask!r}, q_length={self.q_length}, kv_length={self.kv_length})"


def _closure(fn: Callable) -> dict:
    names = fn.__code__.co_freevars
    return {n: c.cell_contents for n, c in zip(names, fn.__closure__ or ())}


def _translate(fn: Callable, d: int, kv_offset: int, kv_length: int, q_offset: int) -> Optional[Mask]:
    """An HF mask function of absolute positions -> an attnkit mask over (Tq, Tk) whose query 0
    sits at key position ``d = q_offset - kv_offset``. None means "every key"."""
    if fn is _mu.causal_mask_function:
        return _masks.Causal(d)
    if fn is _mu.bidirectional_mask_function:
        return None
    # traced, the closures of mask functions the model builds in its forward cannot be read: they
    # become a mask_mod (exact; SDPA materializes it, as it would the analytic masks there)
    if isinstance(fn, types.FunctionType) and not torch.compiler.is_compiling():
        qual = fn.__qualname__
        env = _closure(fn)
        if qual.startswith("and_masks.") or qual.startswith("or_masks."):
            parts = [_translate(f, d, kv_offset, kv_length, q_offset) for f in env["mask_functions"]]
            if qual.startswith("and_masks."):
                parts = _merge_window(p for p in parts if p is not None)
                if not parts:
                    return None
                out = parts[0]
                for p in parts[1:]:
                    out = out & p
                return out
            if any(p is None for p in parts):
                return None
            out = parts[0]
            for p in parts[1:]:
                out = out | p
            return out
        if qual.startswith("sliding_window_overlay."):  # kv > q - w: the w - 1 keys before and any after
            w = int(env["sliding_window"])
            return _masks.SlidingWindow(w - 1, kv_length + abs(d) + 1, d)
        if qual.startswith("sliding_window_bidirectional_overlay."):  # |q - kv| <= w
            w = int(env["sliding_window"])
            return _masks.SlidingWindow(w, w, d)
        if qual.startswith("chunked_overlay."):  # (kv - lp[b]) // c == (q - lp[b]) // c on absolute positions
            lp = env["left_padding"]
            shift = (lp.to(torch.long) - kv_offset) if isinstance(lp, torch.Tensor) else int(lp) - kv_offset
            return _masks.Chunked(int(env["chunk_size"]), shift, d)
        if qual.startswith("padding_mask_function."):
            pm = env["padding_mask"]
            keep = pm[:, kv_offset:kv_offset + kv_length].to(torch.bool)
            if keep.shape[-1] < kv_length:
                keep = torch.nn.functional.pad(keep, (0, kv_length - keep.shape[-1]))
            return _masks.KeyPadding(keep)
    # anything else (packed sequences, block-wise overlays, a user's function): a mask_mod
    # on absolute positions
    return _masks.from_mod(_Shifted(fn, q_offset, kv_offset))


def _merge_window(parts) -> list:
    """``SlidingWindow(l, r, d) & Causal(d)`` is ``SlidingWindow(l, 0, d)``: one analytic mask."""
    parts = list(parts)
    causal = [p for p in parts if type(p) is _masks.Causal]
    windows = [p for p in parts if type(p) is _masks.SlidingWindow]
    if len(causal) == 1 and len(windows) == 1 and causal[0].align == windows[0].align:
        w = windows[0]
        merged = _masks.SlidingWindow(w.left, 0, w.align)
        return [merged] + [p for p in parts if p is not causal[0] and p is not w]
    return parts


class _Shifted:
    """``fn(b, h, q_idx + q_offset, kv_idx + kv_offset)`` as a 4-argument mask_mod."""

    def __init__(self, fn: Callable, q_offset: int, kv_offset: int):
        self.fn, self.q_offset, self.kv_offset = fn, q_offset, kv_offset
        if not torch.compiler.is_compiling():  # a name for messages; Dynamo cannot read __qualname__
            self.__name__ = getattr(fn, "__qualname__", repr(fn))
        else:
            self.__name__ = "hf_mask_function"

    def __call__(self, b, h, q_idx, kv_idx):
        out = self.fn(b, h, q_idx + self.q_offset, kv_idx + self.kv_offset)
        return torch.as_tensor(out, device=q_idx.device).to(torch.bool)


def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               mask_function: Callable = None, attention_mask: Optional[Tensor] = None, **kwargs) -> HFMask:
    """The ``AttentionMaskInterface`` entry for ``"attnkit"``: HF's mask description (a mask function
    of absolute positions, the offsets of a cache, a 2-D padding mask) -> an :class:`HFMask`.

    Example::

        >>> import attnkit.integrations.hf as akhf
        >>> from transformers import masking_utils as mu
        >>> m = akhf.build_mask(1, 3, 5, q_offset=2, mask_function=mu.sliding_window_causal_mask_function(2))
        >>> m.to_dense()[0, 0].int().tolist()
        [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    """
    if isinstance(attention_mask, HFMask):  # already built (a static cache reuses its mask)
        return attention_mask
    if mask_function is None:
        mask_function = _mu.causal_mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    d = q_offset - kv_offset
    mask = _translate(mask_function, d, kv_offset, kv_length, q_offset)
    if attention_mask is not None:
        pm = _mu.prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
        keep = pm[:, kv_offset:kv_offset + kv_length]
        # traced, the values cannot be read (a graph break): the padding mask is kept even when all-True
        if torch.compiler.is_compiling() or not bool(keep.all()):
            pad = _masks.KeyPadding(keep)
            mask = pad if mask is None else mask & pad
    return HFMask(mask, q_length, kv_length)


# -- the attention function -------------------------------------------------------------------------
class _Sink(ScoreMod):
    """Attention sinks: the extra last key's score is ``s_aux[h]`` whatever the query."""

    additive = False

    def __init__(self, s_aux: Tensor, column: int):
        self.s_aux, self.column = s_aux, column

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        sink = self.s_aux.to(score.dtype)[h]
        return torch.where(kv_idx == self.column, sink, score)


def _weights_requested(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - another transformers layout
        return False
    if torch.compiler.is_compiling():
        # traced, the collector's context variable cannot be read (a graph break); transformers keeps
        # what it set during compilation in ``global_var``
        active = _active_collector.global_var if getattr(_active_collector, "compiling", False) else None
    else:
        active = _active_collector.get()
    return bool(active) and "attentions" in active


def _as_mask(attention_mask, Tq: int, Tk: int, dtype) -> tuple[Optional[Mask], Optional[Tensor], bool]:
    """``(mask, additive float bias, given)`` from what the model passed."""
    if attention_mask is None:
        return None, None, False
    if isinstance(attention_mask, HFMask):
        return attention_mask.mask, None, True
    if isinstance(attention_mask, Mask):
        return attention_mask, None, True
    if isinstance(attention_mask, Tensor):
        m = attention_mask[..., :Tk]
        if m.dtype == torch.bool:
            return _masks.FromTensor(m), None, True
        hidden = m <= torch.finfo(m.dtype).min / 2  # HF writes finfo.min (or -inf) where a key is hidden
        bias = m.masked_fill(hidden, 0.0)
        return _masks.FromTensor(~hidden), (bias if bool(bias.any()) else None), True
    raise TypeError(f"attention_mask must be an attnkit mask, a tensor or None; got {type(attention_mask).__name__}")


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      s_aux: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """The ``AttentionInterface`` entry for ``"attnkit"``.

    ``query (B, H, Tq, D)``, ``key (B, Hkv, Tk, D)``, ``value (B, Hkv, Tk, Dv)`` (K/V not repeated
    for GQA) -> ``(out (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None)``. A mask of None is
    read explicitly: causal (bottom-right) when ``is_causal`` (or the module's) says so and
    there is more than one query, else every key.
    """
    variant = kwargs.pop("_attnkit_variant", None) or getattr(module, "_attnkit_variant", None) or _DEFAULT
    Tq, Tk = query.shape[2], key.shape[2]
    mask, extra_bias, given = _as_mask(attention_mask, Tq, Tk, query.dtype)
    if not given:  # no mask from the model: say what None means here, never assume it
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        if causal and Tq > 1:
            mask = _masks.Causal("bottom_right")
        if sliding_window is not None:  # (a given mask already holds the window) HF's window: w - 1 keys a side
            w = int(sliding_window) - 1
            window = _masks.SlidingWindow(w, 0 if causal else w, "bottom_right")
            mask = window if mask is None else mask & window
    if variant.mask is not None:
        mask = variant.mask if mask is None else mask & variant.mask
    bias: list = []
    if softcap is not None:
        bias.append(_softcap(float(softcap)))
    if extra_bias is not None:
        bias.append(extra_bias.to(query.dtype))
    bias += list(variant.bias)
    if s_aux is not None:  # one more key of value zero whose score is the head's sink logit
        key = torch.cat([key, key.new_zeros(*key.shape[:2], 1, key.shape[3])], dim=2)
        value = torch.cat([value, value.new_zeros(*value.shape[:2], 1, value.shape[3])], dim=2)
        sink_col = _masks.from_mod(_SinkColumn(Tk))
        mask = None if mask is None else (_Padded(mask, Tk) | sink_col)
        bias.append(_Sink(s_aux, Tk))
    want = _weights_requested(kwargs)
    kw = dict(score=variant.score, normalizer=variant.normalizer, mask=mask, bias=bias or None, scale=scaling,
              dropout_p=float(dropout or 0.0))
    if want:
        backend = variant.backend
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if backend == "auto" and not differentiable:
            # weights recomputed block by block from the log-sum-exp when the tiled backend can (they carry no
            # gradient: with autograd on, auto's weights do, as eager's)
            from ..functional import explain
            backend = "tiled" if explain(query, key, value, backend="tiled", return_weights=True, **kw).ok else "auto"
        out, w = attention(query, key, value, return_weights=True, backend=backend, **kw)
        if s_aux is not None:
            w = w[..., :Tk]
    else:
        out, w = attention(query, key, value, backend=variant.backend, **kw), None
    return out.transpose(1, 2).contiguous(), w


class _SinkColumn:
    __name__ = "sink_column"

    def __init__(self, column: int):
        self.column = column

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx == self.column


class _Padded(Mask):
    """``inner`` over the first ``Tk`` keys, evaluated as if the key count were ``Tk`` (so
    bottom-right alignment does not move when a sink column is appended); hidden beyond."""

    def __init__(self, inner: Mask, num_keys: int):
        self.inner, self.n = inner, num_keys

    def mask_mod(self, b, h, q_idx, kv_idx, num_queries, num_keys):
        inside = kv_idx < self.n
        return self.inner.mask_mod(b, h, q_idx, kv_idx.clamp(max=self.n - 1), num_queries, self.n) & inside

    def __repr__(self) -> str:
        return f"{self.inner!r}[:{self.n}]"


# -- pictures --------------------------------------------------------------------------------------
def draw(model: torch.nn.Module, input_ids: Tensor, tokens: Optional[list[str]] = None, out: str = "attnkit-viz", *,
         attention_mask: Optional[Tensor] = None, title: Optional[str] = None, pictures: bool = True) -> list:
    """Run one input through a Hugging Face model on attnkit and write its attention, offline:
    ``attention.html`` (every layer and head, rollout, flow) and, with ``pictures``, one PNG grid
    of heads per group of layers. Weights come from :func:`attnkit.capture` (exact, recomputed
    beside the model's own call); the model's outputs are unchanged.

    Args:
        model: a ``transformers`` model whose attention goes through ``AttentionInterface``
            (switched to ``"attnkit"`` for the call if it is not already, then switched back).
        input_ids: ``(1, T)`` or ``(T,)`` token ids.
        tokens: the ``T`` labels of the tokens (default: the ids as strings).
        out: output folder.

    Returns the paths written.

    Example::

        >>> import tempfile, torch, transformers, attnkit.integrations.hf as akhf
        >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
        >>> files = akhf.draw(transformers.LlamaForCausalLM(cfg), torch.arange(6), list("abcdef"),
        ...                   tempfile.mkdtemp(), pictures=False)
        >>> [f.name for f in files]
        ['attention.html']
    """
    from pathlib import Path

    from .. import viz
    from ..recording import capture

    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, T) or (T,); got shape {tuple(ids.shape)}")
    labels = [str(t) for t in (tokens if tokens is not None else ids[0].tolist())]
    if len(labels) != ids.shape[1]:
        raise ValueError(f"tokens must have one label per input id; got {len(labels)} labels for {ids.shape[1]} ids")
    before = model.config._attn_implementation
    if not str(before).startswith(NAME):
        model.set_attn_implementation(NAME)
    try:
        with torch.no_grad(), capture(root=model) as rec:
            model(ids, attention_mask=attention_mask)
    finally:
        if not str(before).startswith(NAME):
            model.set_attn_implementation(before)
    groups = viz.group_records(rec)
    viz.assign_tokens(groups, labels)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "attention.html"]
    name = title or type(model).__name__
    viz.attention_page(groups, files[0], title=name, info=[("model", type(model).__name__), ("input", " ".join(labels))])
    if pictures:
        for g in groups:
            q, k = g.labels()
            slug = "".join(c if c.isalnum() else "_" for c in g.name).strip("_") or "heads"
            files.append(viz.head_grid_png(g, out_dir / f"heads_{slug}.png", query_tokens=q, key_tokens=k,
                                           title=f"{name}: {g.name}, every head"))
    return files


def viz_main(argv: list[str]) -> int:
    """``attnkit viz --hf MODEL_DIR --text TEXT [--out DIR]``: a Hugging Face model saved in a local
    folder (``save_pretrained``; nothing is downloaded) and its tokenizer, one text, pictures."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="attnkit viz --hf", description=viz_main.__doc__.split("\n")[0])
    p.add_argument("--hf", required=True, metavar="MODEL_DIR", help="a folder written by save_pretrained")
    p.add_argument("--text", required=True, help="the input text")
    p.add_argument("--out", default="attnkit-viz", help="output folder (default ./attnkit-viz)")
    p.add_argument("--no-pictures", action="store_true", help="only the HTML view")
    a = p.parse_args(argv)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(a.hf, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(a.hf, local_files_only=True, attn_implementation=NAME)
    except (OSError, ValueError) as e:
        print(f"attnkit viz: error: --hf {a.hf}: cannot load a model and tokenizer from this folder ({e})".splitlines()[0],
              file=sys.stderr)
        return 2
    enc = tok(a.text, return_tensors="pt")
    labels = tok.convert_ids_to_tokens(enc["input_ids"][0])
    for f in draw(model.eval(), enc["input_ids"], labels, a.out, pictures=not a.no_pictures):
        print(f"wrote {f}")
    return 0


# -- registration ----------------------------------------------------------------------------------
def _named(normalizer: str) -> Callable:
    norm = _normalizers.get(normalizer)

    def forward(module, query, key, value, attention_mask, **kwargs):
        # the shorthand names the normalizer; the rest of a configured variant (mask, bias) stays
        base = getattr(module, "_attnkit_variant", None) or _DEFAULT
        kwargs["_attnkit_variant"] = dataclasses.replace(base, normalizer=norm)
        return attention_forward(module, query, key, value, attention_mask, **kwargs)

    forward.__name__ = f"attnkit_{normalizer}_attention"
    return forward


_registered = False


def register() -> None:
    """Register ``"attnkit"`` (and ``"attnkit:<normalizer>"`` for softmax, sigmoid, sparsemax and
    entmax15) with ``transformers.AttentionInterface`` and ``AttentionMaskInterface``. Idempotent;
    importing this module calls it."""
    global _registered
    if _registered:
        return
    transformers.AttentionInterface.register(NAME, attention_forward)
    transformers.AttentionMaskInterface.register(NAME, build_mask)
    for n in NORMALIZER_NAMES:
        transformers.AttentionInterface.register(f"{NAME}:{n}", _named(n))
        transformers.AttentionMaskInterface.register(f"{NAME}:{n}", build_mask)
    _registered = True


register()
