"""Find the learnable parts of the objects a module is configured with, so that they train.

A score mod, mask or normalizer is a plain object unless it is also an ``nn.Module`` (such as
:class:`~attnkit.positions.T5RelativeBias`); a ``score_mod`` callable may be a module, a bound
method of one, or a closure over parameters. Stored in a tuple, none of these would appear in
``parameters()`` or ``state_dict()``: an optimizer built from ``model.parameters()`` would never
update them. :func:`register` adds what it finds as a submodule.
"""

from __future__ import annotations

import types
from typing import Iterable, Union

from torch import nn

Part = Union[nn.Module, nn.Parameter]


def _from_function(fn: types.FunctionType, seen: set[int]) -> list[Part]:
    """Parameters a function closes over or takes as defaults. A module found there is
    registered by its parameters, never as a child: the closure of a lambda written inside a
    model's ``__init__`` may hold that very model (its ``self`` is skipped by name; any other
    route would make the module tree a cycle)."""
    names = fn.__code__.co_freevars
    values = [c.cell_contents for name, c in zip(names, fn.__closure__ or ())
              if name not in ("self", "cls") and _filled(c)]
    values += list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    found: list[Part] = []
    for value in values:
        for p in _parts(value, seen):
            found += [p] if isinstance(p, nn.Parameter) else [q for q in p.parameters() if id(q) not in seen]
            seen.update(id(q) for q in found)
    return found


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell (a closure variable not yet assigned)
        return False
    return True


def _parts(obj, seen: set[int]) -> list[Part]:
    """Modules and parameters reachable from ``obj`` (its attributes, closures, containers)."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, nn.Parameter):
        return [obj]
    if isinstance(obj, nn.Module):
        return [obj] if any(True for _ in obj.parameters()) or any(True for _ in obj.buffers()) else []
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [p for x in obj for p in _parts(x, seen)]
    if isinstance(obj, dict):
        return [p for x in obj.values() for p in _parts(x, seen)]
    if isinstance(obj, types.FunctionType):
        return _from_function(obj, seen)
    if callable(obj) and not hasattr(obj, "__dict__") or isinstance(obj, (types.MethodType, type)):
        return []  # a bound method's module is its owner's business (often the model itself)
    # attnkit's score mods, masks and normalizers (and a user's own): look at their attributes
    if type(obj).__module__.split(".")[0] in ("builtins", "torch", "numpy", "functools"):
        return []
    found: list[Part] = []
    for value in vars(obj).values():
        found += _parts(value, seen)
    return found


def learnable_parts(objs: Iterable) -> list[list[Part]]:
    """For each object, the modules and parameters it holds (none for plain objects)."""
    seen: set[int] = set()
    return [_parts(o, seen) for o in objs]


def register(module: nn.Module, name: str, objs: Iterable) -> None:
    """Add the learnable parts of ``objs`` to ``module`` as a submodule ``name`` whose child
    ``str(i)`` holds those of ``objs[i]`` (the object itself when it is an ``nn.Module``), so that
    ``module.parameters()`` and ``module.state_dict()`` include them. Nothing is added when no
    object holds any."""
    objs = list(objs)
    parts = learnable_parts(objs)
    if not any(parts):
        return
    holder = nn.Module()
    for i, (obj, found) in enumerate(zip(objs, parts)):
        if not found:
            continue
        if isinstance(obj, nn.Module):
            holder.add_module(str(i), obj)
            continue
        inner = nn.Module()
        for j, p in enumerate(found):
            if isinstance(p, nn.Parameter):
                inner.register_parameter(str(j), p)
            else:
                inner.add_module(str(j), p)
        holder.add_module(str(i), inner)
    module.add_module(name, holder)
