"""Input checks shared by the public API.

Every public function validates its inputs here so that errors read the same everywhere:
they name the argument, say what was received, and say what was expected (SPEC §7).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

Tensor = torch.Tensor


def shape_str(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def sizes_text(*sizes) -> str:
    """``"T1 x T2"`` for a message; inside ``torch.compile`` the sizes are symbolic and formatting
    them would specialize the graph to these values, so the text says ``symbolic`` instead."""
    if torch.compiler.is_compiling():
        return "symbolic sizes"
    return " x ".join(str(int(s)) for s in sizes)


def check_tensor(name: str, x: object, ndim: int | None = None, layout: str = "") -> Tensor:
    """Raise ``TypeError`` unless ``x`` is a tensor, ``ValueError`` unless it has ``ndim`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' ' + layout if layout else ''}; got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D tensor{' ' + layout if layout else ''}; got shape {shape_str(x)}"
        )
    return x


def check_floating(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16, ...); got {x.dtype}")


def check_same(names: Iterable[str], values: Iterable[object], what: str) -> None:
    names, values = list(names), list(values)
    if any(v != values[0] for v in values[1:]):
        got = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        raise ValueError(f"{' and '.join(names)} must have the same {what}; got {got}")


def check_probability(name: str, p: object, *, upper_inclusive: bool = False) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1); got {type(p).__name__}")
    ok = 0.0 <= p <= 1.0 if upper_inclusive else 0.0 <= p < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if upper_inclusive else ')'}; got {p}")
    return float(p)


def check_positive(name: str, x: object, *, integer: bool = False, allow_zero: bool = False) -> float | int:
    kinds = (int,) if integer else (int, float)
    if isinstance(x, bool) or not isinstance(x, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}; got {type(x).__name__}")
    if isinstance(x, float) and not math.isfinite(x):  # (an int is finite: no math call on a traced SymInt)
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {x}")
    if x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {x}")
    return x


def check_finite_number(name: str, x: object) -> float:
    """A finite int or float (not a bool), as a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number; got {x}")
    return float(x)


def check_finite_tensor(name: str, x: Tensor) -> Tensor:
    """Raise ``ValueError`` when a parameter tensor holds NaN or inf (with the first bad index).
    Skipped inside ``torch.compile`` (reading the values would break the graph)."""
    if torch.compiler.is_compiling():
        return x
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        where = tuple(torch.nonzero(bad)[0].tolist())
        raise ValueError(f"{name} must be finite; got {x[where].item()} at index {where} "
                         f"({int(bad.sum())} non-finite entries)")
    return x


def lookup(kind: str, name: object, table: Mapping[str, object], obj: str = "", how: str = "") -> object:
    """Resolve a string option, listing the valid names when it is unknown. ``obj`` names the
    class whose instances are accepted too, ``how`` says how to write one's own."""
    if not isinstance(name, str):
        valid = ", ".join(repr(k) for k in sorted(table))
        got = type(name).__name__
        if callable(name) and hasattr(name, "__name__"):
            got += f" {name.__name__!r}"
        accepted = f" or an {obj} object" if obj else " or an object"
        raise TypeError(f"{kind} must be a name ({valid}){accepted}; got {got}" + (f". {how}" if how else ""))
    if name not in table:
        valid = ", ".join(repr(k) for k in sorted(table))
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}")
    return table[name]


def broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    for s, t in zip(reversed(shape), reversed(target)):
        if s != 1 and s != t:
            return False
    return True


def check_qkv(q: object, k: object, v: object, *, same_qk_dim: bool = False) -> None:
    """Validate ``q (B, H, Tq, D)``, ``k (B, Hkv, Tk, D)``, ``v (B, Hkv, Tk, Dv)``: ranks, float dtypes,
    one dtype and device, batch and key/value agreement, ``H % Hkv == 0``."""
    check_tensor("q", q, 4, "(B, H, Tq, D)")
    check_tensor("k", k, 4, "(B, Hkv, Tk, D)")
    check_tensor("v", v, 4, "(B, Hkv, Tk, Dv)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    check_same(("q", "k", "v"), (q.dtype, k.dtype, v.dtype), "dtype")
    check_same(("q", "k", "v"), (q.device, k.device, v.device), "device")
    B, H = q.shape[:2]
    Hkv, Tk = k.shape[1:3]
    if q.shape[-1] == 0 or k.shape[-1] == 0:
        raise ValueError(f"q and k need at least one feature (D >= 1) to compare; got q {shape_str(q)}, k {shape_str(k)}")
    if H == 0 or Hkv == 0:
        raise ValueError(f"q and k need at least one head (H >= 1, Hkv >= 1); got q {shape_str(q)}, k {shape_str(k)}")
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k and v must have the same batch size (dim 0); got q {shape_str(q)}, "
                         f"k {shape_str(k)}, v {shape_str(v)}")
    if v.shape[1] != Hkv:
        raise ValueError(f"k and v must have the same number of heads (dim 1); got k {shape_str(k)}, v {shape_str(v)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads must be a multiple of the key/value heads "
                         f"(H % Hkv == 0); got H = {H} (q {shape_str(q)}) and Hkv = {Hkv} (k {shape_str(k)})")
    if v.shape[2] != Tk:
        raise ValueError(f"k and v must have the same sequence length (dim 2); got k {shape_str(k)}, v {shape_str(v)}")
    if same_qk_dim and k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have the same last dim D; got q {shape_str(q)} and k {shape_str(k)}")


def check_arity(what: str, fn, n: int, form: str, hint: str = "") -> None:
    """A user callable that cannot take ``n`` positional arguments fails here, naming the form it
    must have (``what`` must take ``n`` arguments, ``form``) and, optionally, how to get there.
    Inside ``torch.compile`` the check is skipped (``inspect.signature`` cannot be traced): a wrong
    callable then fails at its call."""
    import inspect

    if torch.compiler.is_compiling():
        return

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        sig.bind(*range(n))
    except TypeError:
        raise TypeError(f"{what} must take {n} arguments, {form}; got {getattr(fn, '__name__', fn)!r} with "
                        f"signature {sig}" + (f". {hint}" if hint else "")) from None

