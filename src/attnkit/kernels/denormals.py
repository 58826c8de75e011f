"""Denormal floats flushed to zero on every intra-op thread while a large tiled call runs.

Scores far below a row's maximum (ALiBi's distant keys, a large-norm query) give weights
``e^(s - m)`` between ``2^-149`` and ``2^-126`` in float32: denormal numbers, which x86 cores
multiply and add through slow microcode assists. A causal + ALiBi call at N = 8,192 spends most
of its time there (5.3 s forward and backward on 2 threads; 1.5 s with denormals flushed). Such a
weight is below ``2^-126`` of the row's largest one, so flushing it to zero cannot change a
float32 (or float64) result that is normalized by a sum ≥ 1.

``torch.set_flush_denormal`` sets the flag of the calling thread only, and the OpenMP threads that
run torch's parallel kernels keep the flag they were created with. :func:`flushing_denormals`
therefore runs one OpenMP parallel region through libgomp's ``GOMP_parallel`` (the entry point
compilers emit for ``#pragma omp parallel``) whose body sets the flag on each thread of the team,
and restores each thread's own setting afterwards. Where torch does not run on libgomp, or the
CPU has no such flag, it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys
import threading

import torch

#: MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) flags
_FLAGS = (1 << 15) | (1 << 6)
_state: dict = {}


def _libgomp_path() -> str | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and "libgomp" in parts[-1].rsplit("/", 1)[-1]:
                    return parts[-1]
    except OSError:
        return None
    return None


def _mxcsr_reader():
    """A function returning the calling thread's MXCSR (glibc's ``fegetenv`` on x86-64: the
    register is the last field of ``fenv_t``), or None."""
    libc = ctypes.CDLL(None)
    env = ctypes.create_string_buffer(32)

    def read() -> int:
        libc.fegetenv(env)
        return int.from_bytes(env.raw[28:32], "little")
    return read


def _setup():
    if "ok" in _state:
        return _state["ok"]
    _state["ok"] = False
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    path = _libgomp_path()
    if path is None:
        return False
    try:
        gomp = ctypes.CDLL(path)
        body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        gomp.GOMP_parallel.argtypes = [body, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel.restype = None
        read = _mxcsr_reader()
        before = read()
        if not torch.set_flush_denormal(True):
            return False
        works = read() & _FLAGS == _FLAGS
        if before & _FLAGS != _FLAGS:
            torch.set_flush_denormal(False)
        if not works or read() & _FLAGS != before & _FLAGS:
            return False
    except (OSError, AttributeError, ValueError):
        return False
    saved: dict[int, int] = {}
    lock = threading.Lock()

    def flush(_):
        old = read() & _FLAGS
        with lock:
            saved[threading.get_native_id()] = old
        if old != _FLAGS:
            torch.set_flush_denormal(True)

    def restore(_):
        with lock:
            old = saved.pop(threading.get_native_id(), _FLAGS)
        if old != _FLAGS:
            torch.set_flush_denormal(False)

    # the callbacks must outlive every call: keep them here
    _state.update(ok=True, gomp=gomp, flush=body(flush), restore=body(restore))
    return True


def supported() -> bool:
    """Whether :func:`flushing_denormals` can set the flag on torch's intra-op threads here."""
    return _setup()


@contextlib.contextmanager
def flushing_denormals(enabled: bool = True):
    """Within the block, every intra-op thread (and the calling one) flushes denormal floats to
    zero; each gets its own setting back on exit. A no-op where not :func:`supported`, when
    ``enabled`` is False, or while traced by ``torch.compile``.

    Example::

        >>> import torch
        >>> from attnkit.kernels.denormals import flushing_denormals, supported
        >>> x = torch.full((4,), 1e-30)
        >>> with flushing_denormals():
        ...     tiny = x * 1e-10          # 1e-40 is a float32 denormal
        >>> bool((tiny == 0).all()) == supported(), bool((x * 1e-10 > 0).all())
        (True, True)
    """
    if not enabled or torch.compiler.is_compiling() or not _setup():
        yield
        return
    threads = torch.get_num_threads()
    _state["gomp"].GOMP_parallel(_state["flush"], None, threads, 0)
    try:
        yield
    finally:
        _state["gomp"].GOMP_parallel(_state["restore"], None, threads, 0)
