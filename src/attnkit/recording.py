"""Capture the attention weights of every ``attnkit.attention`` call inside a block.

    with attnkit.capture(heads=[0, 1], rows=range(0, 512, 64)) as rec:
        logits = model(x)
    for r in rec:
        print(r.name, r.weights.shape)     # e.g. "encoder.layers.0.self_attn (B, 2, 8, Tk)"

The model's outputs are bit-identical with and without capture: each call computes its output
exactly as it would (whatever backend serves it: SDPA, flex, tiled, reference) and the weights
are computed *beside* it, from the same q, k, v and options, only for the requested heads and
rows: on CUDA by attnkit's Triton weights kernel (:mod:`attnkit.kernels.triton.weights`) where it
serves the request, else by the tiled backend (exact weights recomputed per block) or the
reference when the request is one neither serves (local-p, hard normalizers, ...). Captured weights are
detached and moved to the CPU, so memory is bounded by what was asked for.

Names: a call made inside an ``nn.Module`` is named by that module's path from the outermost
module running (``decoder.layers.1.cross_attn``); a call from plain code is named by its call
site (``script.py:42``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import os
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

Tensor = torch.Tensor

_state = threading.local()


@dataclass
class Record:
    """The weights of one attention call.

    Attributes:
        name: module path (``encoder.layers.0.self_attn``) or call site (``file.py:12``).
        index: order of the call inside the capture block (0, 1, ...).
        weights: ``(B, len(heads), len(rows), Tk)`` float32 on the CPU.
        heads: the query heads captured (indices into H).
        rows: the query positions captured (indices into Tq).
        backend: the backend that computed the call's output.
        shape: ``(B, H, Tq, Tk)`` of the full weights.
    """

    name: str
    index: int
    weights: Tensor
    heads: tuple[int, ...]
    rows: tuple[int, ...]
    backend: str
    shape: tuple[int, int, int, int]
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # shapes and dtype, never the weights (a print must stay one line)
        w = self.weights
        if isinstance(w, torch.Tensor):
            desc = f"{tuple(w.shape)} {str(w.dtype).replace('torch.', '')}"
            if w.numel() and w.is_floating_point():
                desc += f" in [{float(w.min()):.3g}, {float(w.max()):.3g}]"
        else:
            desc = type(w).__name__
        return (f"Record(name={self.name!r}, index={self.index}, weights={desc}, shape={tuple(self.shape)}, "
                f"backend={self.backend!r})")


REPR_RECORDS = 12  # records a Recorder's repr lists


class Recorder(list):
    """The records of a :func:`capture` block (a list of :class:`Record`), with lookups by name."""

    def __init__(self, layers, heads, rows, device: str | None):
        super().__init__()
        self.layers, self.heads, self.rows, self.device = layers, heads, rows, device
        self._calls = 0

    def wants(self, name: str, index: int) -> bool:
        if self.layers is None:
            return True
        for sel in self.layers:
            if isinstance(sel, int) and sel == index:
                return True
            if isinstance(sel, str) and fnmatch.fnmatchcase(name, sel):
                return True
        return False

    def __repr__(self) -> str:  # one line a record, at most REPR_RECORDS of them
        shown = [f"  {r!r}," for r in self[:REPR_RECORDS]]
        if len(self) > REPR_RECORDS:
            shown.append(f"  ... {len(self) - REPR_RECORDS} more records ({len(set(self.names()))} names in all)")
        return f"Recorder({len(self)} record{'s' * (len(self) != 1)}" + (":\n" + "\n".join(shown) + "\n)" if shown
                                                                      else ")")

    def by_name(self, pattern: str) -> list[Record]:
        """Records whose name matches a glob pattern (``"*.self_attn"``)."""
        return [r for r in self if fnmatch.fnmatchcase(r.name, pattern)]

    def names(self) -> list[str]:
        return [r.name for r in self]


def _check_selection(name: str, sel) -> Optional[tuple]:
    if sel is None:
        return None
    if isinstance(sel, (int, str)) and not isinstance(sel, bool):
        sel = [sel]
    try:
        out = tuple(sel)
    except TypeError:
        raise TypeError(f"capture {name} must be None, an int, a string or a sequence of them; "
                        f"got {type(sel).__name__}") from None
    for s in out:
        if isinstance(s, bool) or not isinstance(s, (int, str)):
            raise TypeError(f"capture {name} entries must be ints or strings; got {s!r}")
    return out


@contextlib.contextmanager
def capture(layers: Sequence[int | str] | int | str | None = None, heads: Sequence[int] | int | None = None,
            rows: Sequence[int] | int | None = None, device: str | None = "cpu",
            root: torch.nn.Module | None = None) -> Iterator[Recorder]:
    """Record the weights of every ``attnkit.attention`` call in the block.

    Args:
        layers: which calls: None (all), call indices (0 = first call in the block) and/or glob
            patterns on names (``"encoder.*"``).
        heads: query heads to keep (None: all). Heads a call does not have are skipped.
        rows: query positions to keep (None: all). Positions past a call's Tq are skipped.
        device: where captured weights are stored (default CPU; None keeps the call's device).
        root: name calls by their path inside this module (useful when a model runs through a
            method other than ``forward``, e.g. ``model.greedy(...)``, so no outer module is called).

    Example::

        >>> import torch, attnkit
        >>> mha = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> with attnkit.capture() as rec:
        ...     _ = mha(torch.randn(1, 5, 8), need_weights=False)
        >>> rec[0].name, tuple(rec[0].weights.shape)
        ('MultiheadAttention', (1, 2, 5, 5))
    """
    layers = _check_selection("layers", layers)
    heads_t = None if heads is None else tuple(int(h) for h in ([heads] if isinstance(heads, int) else heads))
    rows_t = None if rows is None else tuple(int(r) for r in ([rows] if isinstance(rows, int) else rows))
    rec = Recorder(layers, heads_t, rows_t, device)
    rec.root = root
    stack = _recorders()
    stack.append(rec)
    _install_hooks()
    try:
        yield rec
    finally:
        _uninstall_hooks()
        for i in range(len(stack) - 1, -1, -1):  # by identity: a Recorder is a list, == compares contents
            if stack[i] is rec:
                del stack[i]
                break


# The module-path stack is kept by global forward hooks, installed once however many capture blocks
# are open (in any thread), and per thread (modules called in other threads keep their own stack).
_hooks_lock = threading.Lock()
_hooks: list = []
_hook_users = 0


def _install_hooks() -> None:
    global _hook_users
    with _hooks_lock:
        if _hook_users == 0:
            _hooks.append(torch.nn.modules.module.register_module_forward_pre_hook(_push_module))
            _hooks.append(torch.nn.modules.module.register_module_forward_hook(_pop_module, always_call=True))
        _hook_users += 1


def _uninstall_hooks() -> None:
    global _hook_users
    with _hooks_lock:
        _hook_users -= 1
        if _hook_users == 0:
            while _hooks:
                _hooks.pop().remove()


def _recorders() -> list[Recorder]:
    if not hasattr(_state, "recorders"):
        _state.recorders = []
    return _state.recorders


def _modules() -> list:
    if not hasattr(_state, "modules"):
        _state.modules = []
    return _state.modules


def _push_module(module, args):
    _modules().append(module)


def _pop_module(module, args, output):
    mods = _modules()
    if mods and mods[-1] is module:
        mods.pop()
    else:
        for i in range(len(mods) - 1, -1, -1):
            if mods[i] is module:
                del mods[i]
                break


def recorders() -> list[Recorder]:
    """Every active recorder of this thread, outermost first."""
    return list(getattr(_state, "recorders", ()))


def none_open() -> bool:
    """True when no capture block is open in any thread (cheaper than :func:`active`: the
    attention call's fast path asks it first)."""
    return _hook_users == 0


def active() -> Optional[Recorder]:
    """The innermost active recorder, or None (cheap: called on every attention call)."""
    stack = getattr(_state, "recorders", None)
    return stack[-1] if stack else None


def current_name(root: torch.nn.Module | None = None) -> str:
    """Module path of the running attnkit call, or its call site outside attnkit."""
    mods = getattr(_state, "modules", [])
    if mods and root is not None:
        path = next((n for n, c in root.named_modules() if c is mods[-1]), None)
        if path is not None:
            return path or type(root).__name__
    if mods:
        parts = []
        for parent, child in zip(mods, mods[1:]):
            # a child may sit below containers that are never called (ModuleList, ModuleDict)
            path = next((n for n, c in parent.named_modules() if c is child and n), None)
            parts.append(path if path is not None else type(child).__name__)
        return ".".join(parts) if parts else type(mods[0]).__name__
    here = os.path.dirname(os.path.abspath(__file__))
    for frame in inspect.stack()[2:]:
        if not os.path.abspath(frame.filename).startswith(here):
            return f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return "attention"


def _select(rec: Recorder, spec) -> tuple[str, int, tuple, tuple] | None:
    index = rec._calls
    rec._calls += 1
    name = current_name(getattr(rec, "root", None))
    if not rec.wants(name, index):
        return None
    heads = tuple(h for h in rec.heads if h < spec.H) if rec.heads is not None else tuple(range(spec.H))
    rows = tuple(r for r in rec.rows if r < spec.Tq) if rec.rows is not None else tuple(range(spec.Tq))
    if not heads or not rows:
        return None
    return name, index, heads, rows


def _store(rec: Recorder, w: Tensor, name, index, heads, rows, spec, backend: str) -> None:
    w = w.detach().float()
    if rec.device is not None:
        w = w.to(rec.device)
    rec.append(Record(name, index, w, heads, rows, backend, (spec.B, spec.H, spec.Tq, spec.Tk)))


def record_given(rec: Recorder, weights: Tensor, spec, backend: str) -> None:
    """Store weights the call itself returned (all heads and rows), keeping the requested ones."""
    sel = _select(rec, spec)
    if sel is not None:
        name, index, heads, rows = sel
        _store(rec, weights[:, list(heads)][:, :, list(rows)], name, index, heads, rows, spec, backend)


def record(rec: Recorder, q: Tensor, k: Tensor, v: Tensor, spec, backend: str, guard=None) -> None:
    """Compute and store the weights of one call (called by ``attnkit.attention`` with its
    quarantined inputs and their :class:`attnkit.nonfinite.Guard`, if any)."""
    from .backends import registry
    from .spec import WeightsRequest

    sel = _select(rec, spec)
    if sel is None:
        return
    name, index, heads, rows = sel
    wspec = _replace(spec, return_weights=True, weights=WeightsRequest(heads=heads, rows=rows), dropout_p=0.0)
    with torch.no_grad():
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        # on CUDA attnkit's Triton weights kernel; the tiled engine elsewhere (Triton's interpreter on
        # CPU would be far slower), the reference for what neither serves
        for name_b in ("triton", "tiled", "reference") if qd.is_cuda else ("tiled", "reference"):
            b = registry.REGISTRY.get(name_b)
            if b is not None and not b.not_supported_reasons(wspec):
                _, w = b(qd, kd, vd, wspec)
                break
        if guard is not None:
            w = guard.poison_weights(w, wspec)
    _store(rec, w, name, index, heads, rows, spec, backend)


def _replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)
