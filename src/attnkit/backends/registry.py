"""Backend registry: each backend declares what it supports and says why it refuses.

A backend is an object with a ``name``, ``not_supported_reasons(spec) -> list[str]`` and
``__call__(q, k, v, spec) -> (out, weights | None)``; optionally ``auto_reasons(spec)``, reasons
that only ``auto`` heeds (a request the backend serves correctly but slower than the next one),
``traces`` (a bool, or a function of the request) False for a request the backend serves only
with a ``torch.compile`` graph break, and
``compile_fallback = True`` for one that inside ``torch.compile`` beats the reference on every
request it supports; and ``prepare(spec)``, the call for one request with the decisions that
depend on the request alone taken once (a :class:`Prepared`, or the backend itself), which
``attnkit.request_cache`` keeps for repeated requests. ``auto`` walks
:data:`PRIORITY` and takes the first backend with no reasons; a forced backend that cannot serve
a request raises an error listing its reasons.

Inside ``torch.compile`` (and ``torch.export``), ``auto`` passes over the backends that do not
trace, and when the only one left without reasons is ``reference``, takes the first
``compile_fallback`` backend that serves the request (SDPA with a dense mask, still faster than
the reference).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from ..spec import AttentionSpec

Tensor = torch.Tensor
log = logging.getLogger("attnkit.backends")


class Prepared:
    """A backend's call planned for one request (its optional ``prepare(spec)``): ``out =
    direct(q, k, v)``. Called as a backend, ``(q, k, v, spec) -> (out, None)``, it ignores
    ``spec``: it is only ever called with the request it was planned for."""

    __slots__ = ("direct",)

    def __init__(self, direct):
        self.direct = direct

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
        return self.direct(q, k, v), None


class Backend(Protocol):
    name: str

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]: ...

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor | None]: ...


class _Table(dict):
    """The registry's table: counts its changes, so that choices remembered for a request
    (``attnkit.attention``'s request cache) are dropped when a backend is added or replaced,
    however it is done (``register``, or ``REGISTRY[name] = ...`` as tests do)."""

    version = 0

    def __setitem__(self, name, backend):
        type(self).version += 1
        super().__setitem__(name, backend)

    def __delitem__(self, name):
        type(self).version += 1
        super().__delitem__(name)

    def pop(self, *args):
        type(self).version += 1
        return super().pop(*args)


REGISTRY: dict[str, Backend] = _Table()
#: the order in which ``auto`` tries backends; ``reference`` serves everything and comes last
PRIORITY: list[str] = []
_forced: list[str] = []


def state() -> tuple[int, str | None]:
    """What a choice depends on beyond the request: the table's version (:func:`register`
    changes it) and the backend :func:`use_backend` forces, if any."""
    return _Table.version, _forced[-1] if _forced else None


#: why ``auto`` passes over a backend whose ``traces`` attribute is False inside ``torch.compile``
NOT_TRACED = ("inside torch.compile: this backend runs Python the compiler cannot trace into the graph (a graph "
              "break); auto takes one that traces")


def _traces(backend, spec: AttentionSpec) -> bool:
    """Whether ``backend`` serves ``spec`` inside ``torch.compile`` without a graph break: its
    ``traces`` attribute, a bool or a function of the request (default True)."""
    t = getattr(backend, "traces", True)
    return t(spec) if callable(t) else bool(t)


def register(backend: Backend, *, priority: int | None = None) -> Backend:
    """Add a backend (replacing one of the same name). ``priority`` is its index in the ``auto``
    order (default: just before ``reference``)."""
    REGISTRY[backend.name] = backend  # (a new version: remembered choices are dropped)
    if backend.name in PRIORITY:
        PRIORITY.remove(backend.name)
    if priority is None:
        priority = PRIORITY.index("reference") if "reference" in PRIORITY else len(PRIORITY)
    PRIORITY.insert(priority, backend.name)
    return backend


def names() -> list[str]:
    return list(PRIORITY)


@dataclass
class Choice:
    """Which backend serves a request, why, and why the others refused.

    ``backend`` is None when none can (or when the backend asked for cannot): then
    ``reasons`` says why and ``ok`` is False. ``because`` says why the chosen one was taken.
    """

    backend: str | None
    reasons: dict[str, list[str]]
    because: str = ""

    @property
    def ok(self) -> bool:
        return self.backend is not None

    def __str__(self) -> str:
        if self.backend is None:
            lines = ["no backend: " + ("the one asked for cannot serve this request" if len(self.reasons) == 1
                                       else "none can serve this request")]
        else:
            lines = [f"backend: {self.backend}" + (f" ({self.because})" if self.because else "")]
        for name, why in self.reasons.items():
            lines.append(f"  {name}: " + ("selected" if name == self.backend else
                                          ("ok" if not why else "; ".join(why))))
        return "\n".join(lines)


def _because(name: str, spec: AttentionSpec, skipped: list[str]) -> str:
    b = REGISTRY[name]
    how = b.describe(spec) if hasattr(b, "describe") else ""
    first = "the first backend in auto's order that serves this request" if skipped else "first in auto's order"
    return f"{first}{': ' + how if how else ''}"


def choose(spec: AttentionSpec, backend: str = "auto", *, strict: bool = True) -> Choice:
    """Pick the backend for ``spec``. When none can serve it (or the one asked for cannot),
    raise (``strict``) or return a :class:`Choice` whose ``backend`` is None (``strict=False``,
    what :func:`attnkit.explain` does)."""
    if backend == "auto" and _forced:
        backend = _forced[-1]
    if backend == "auto":
        compiling = torch.compiler.is_compiling()
        reasons: dict[str, list[str]] = {}
        supported: list[str] = []
        for name in PRIORITY:
            b = REGISTRY[name]
            if compiling and not _traces(b, spec):
                why = [NOT_TRACED]  # decided before any size test: no shape guard for a backend never taken
            else:
                why = b.not_supported_reasons(spec)
            if not why:
                if getattr(b, "compile_fallback", False):
                    supported.append(name)
                if hasattr(b, "auto_reasons"):
                    why = b.auto_reasons(spec)  # preferences that apply to auto only (e.g. size)
            reasons[name] = why
            if not why and not (compiling and name == "reference" and supported):
                if compiling:  # no logging (a graph break), no text with the sizes (it would specialize them)
                    return Choice(name, reasons, "first in auto's order that traces")
                log.debug("attnkit: auto picked %s", name)
                return Choice(name, reasons, _because(name, spec, [n for n in reasons if n != name]))
        if compiling and supported:
            # traced, a backend auto passed over for speed (sdpa's dense mask) still beats the reference
            name = supported[0]
            return Choice(name, reasons, "the first backend in auto's order that serves this request and traces "
                                         "under torch.compile")
        if not strict:
            return Choice(None, reasons)
        raise RuntimeError("no backend can serve this request:\n" + "\n".join(
            f"  {n}: {'; '.join(w)}" for n, w in reasons.items()))
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    if backend not in REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; valid names: 'auto', "
                         + ", ".join(repr(n) for n in PRIORITY))
    why = REGISTRY[backend].not_supported_reasons(spec)
    if why:
        if not strict:
            return Choice(None, {backend: why})
        raise ValueError(f"backend {backend!r} cannot serve this request: " + "; ".join(why))
    b = REGISTRY[backend]
    return Choice(backend, {backend: []}, "asked for" + (f": {b.describe(spec)}" if hasattr(b, "describe") else ""))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``backend="auto"`` calls inside the block to use ``name``; restores on exit."""
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; valid names: 'auto', " + ", ".join(repr(n) for n in PRIORITY))
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
