"""From :func:`attnkit.capture` records to layers and groups of layers, the structure the pictures
and the HTML view show.

A *layer* is one attention module's weights for one example, ``(H, Tq, Tk)``. Calls of one module
that each hold a single query (a decoder run step by step, with or without a KV cache) are
stitched into one layer, row after row (keys right-padded with zeros when they grow). A *group*
gathers the layers whose names differ only by numbers (``encoder_layers.0.self_attn``,
``encoder_layers.1.self_attn`` → ``encoder_layers.*.self_attn``), in call order.

Example::

    >>> import torch, attnkit
    >>> from attnkit.viz.collect import group_records
    >>> net = torch.nn.ModuleDict({"a0": attnkit.nn.MultiheadAttention(8, 2, batch_first=True)})
    >>> with attnkit.capture() as rec:
    ...     _ = net["a0"](torch.randn(1, 4, 8))
    >>> [(g.name, len(g.layers), tuple(g.layers[0].weights.shape)) for g in group_records(rec)]
    [('MultiheadAttention', 1, (2, 4, 4))]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

Tensor = torch.Tensor

__all__ = ["Layer", "Group", "group_records", "group_name", "assign_tokens"]


@dataclass
class Layer:
    """One attention module's weights for one example: ``weights (H', Tq', Tk)`` float32 for the
    captured ``heads`` and query ``rows``; ``calls`` is how many calls were stitched into it;
    ``num_queries`` the call's ``Tq`` (default: one past the last row captured)."""

    name: str
    weights: Tensor
    heads: tuple[int, ...]
    rows: tuple[int, ...]
    backend: str = ""
    calls: int = 1
    num_queries: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.weights, torch.Tensor) or self.weights.dim() != 3:
            got = tuple(self.weights.shape) if isinstance(self.weights, torch.Tensor) else type(self.weights).__name__
            raise ValueError(f"Layer weights must be an (H, Tq, Tk) tensor; got {got}")
        self.weights = self.weights.detach().to("cpu", torch.float32)
        if len(self.heads) != self.weights.shape[0] or len(self.rows) != self.weights.shape[1]:
            raise ValueError(f"Layer {self.name!r}: heads ({len(self.heads)}) and rows ({len(self.rows)}) must match "
                             f"the weights' shape {tuple(self.weights.shape)}")
        self.num_queries = max(self.num_queries, max(self.rows, default=-1) + 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weights.shape)  # type: ignore[return-value]

    def __repr__(self) -> str:  # names, sizes and the weights' range; never the weights themselves
        return (f"Layer({self.name!r}, weights={_describe(self.weights)}, heads={_indices(self.heads)}, "
                f"rows={_indices(self.rows)}" + (f", backend={self.backend!r}" if self.backend else "")
                + (f", calls={self.calls}" if self.calls != 1 else "") + ")")


@dataclass
class Group:
    """Layers of one kind (``name`` is their common pattern), bottom first, with optional token
    labels for the queries (rows) and the keys (columns)."""

    name: str
    layers: list[Layer]
    query_tokens: list[str] | None = None
    key_tokens: list[str] | None = None
    title: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return max(layer.num_queries for layer in self.layers)

    @property
    def num_keys(self) -> int:
        return max(layer.weights.shape[2] for layer in self.layers)

    @property
    def is_self(self) -> bool:
        """Every layer is square self-attention over the same tokens with every row captured."""
        shapes = {layer.shape[1:] for layer in self.layers}
        if len(shapes) != 1:
            return False
        tq, tk = next(iter(shapes))
        same = self.query_tokens is None or self.key_tokens is None or self.query_tokens == self.key_tokens
        return tq == tk and same and all(layer.rows == tuple(range(tq)) for layer in self.layers)

    def stack(self) -> Tensor:
        """``(L, H, Tq, Tk)``: the layers stacked (they must have one shape)."""
        shapes = {layer.shape for layer in self.layers}
        if len(shapes) != 1:
            raise ValueError(f"group {self.name!r}: layers of different shapes {sorted(shapes)} cannot be stacked")
        return torch.stack([layer.weights for layer in self.layers])

    def __repr__(self) -> str:  # one line a layer (at most REPR_LAYERS of them); never the weights
        shown = [f"    {layer!r}," for layer in self.layers[:REPR_LAYERS]]
        if len(self.layers) > REPR_LAYERS:
            shown.append(f"    ... {len(self.layers) - REPR_LAYERS} more layers,")
        extra = "".join(f", {k}={_tokens(v)}" for k, v in (("query_tokens", self.query_tokens),
                                                             ("key_tokens", self.key_tokens)) if v is not None)
        extra += f", title={_clip(self.title)!r}" if self.title else ""
        extra += f", meta keys={sorted(map(str, self.meta))}" if self.meta else ""
        return f"Group({self.name!r}, {len(self.layers)} layer{'s' * (len(self.layers) != 1)}{extra}, layers=[\n" \
               + "\n".join(shown) + "\n])"

    def labels(self) -> tuple[list[str], list[str]]:
        """Query and key labels (positions ``"0"``, ``"1"``, ... where none were given)."""
        q = self.query_tokens if self.query_tokens is not None else [str(i) for i in range(self.num_queries)]
        k = self.key_tokens if self.key_tokens is not None else [str(j) for j in range(self.num_keys)]
        return list(q), list(k)


REPR_LAYERS = 8   # layers a Group's repr lists
REPR_TOKENS = 6   # token labels it shows a side


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _describe(t: Tensor) -> str:
    """``"(2, 7, 7) float32 in [0, 0.93]"``: a tensor's shape, dtype and range, not its values."""
    shape = tuple(t.shape)
    kind = str(t.dtype).replace("torch.", "")
    if t.numel() == 0 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        return f"{shape} {kind}"
    return f"{shape} {kind} in [{float(t.min()):.3g}, {float(t.max()):.3g}]"


def _indices(ix: Sequence[int]) -> str:
    """``"0..511"`` for a contiguous range, else the first few and a count."""
    ix = tuple(ix)
    if not ix:
        return "()"
    if len(ix) > 2 and ix == tuple(range(ix[0], ix[-1] + 1)):
        return f"{ix[0]}..{ix[-1]}"
    if len(ix) <= 6:
        return str(ix).replace(",)", ")")
    return f"({', '.join(map(str, ix[:4]))}, ... {len(ix)} in all)"


def _tokens(toks: Sequence[str]) -> str:
    """``"7 ['a', 'man', 'reads', …]"``: how many labels and the first few."""
    head = ", ".join(repr(_clip(str(t), 12)) for t in toks[:REPR_TOKENS])
    return f"{len(toks)} [{head}{', …' if len(toks) > REPR_TOKENS else ''}]"


_NUMBER = re.compile(r"(?:(?<=\.)|^)\d+(?=\.|$)")


def group_name(name: str) -> str:
    """``"decoder_layers.3.cross_attn"`` → ``"decoder_layers.*.cross_attn"`` (numeric path parts
    become ``*``)."""
    return _NUMBER.sub("*", name)


def _stitch(name: str, recs: list, batch: int) -> Layer:
    """Single-query calls of one module, one row each, into one layer (keys right-padded)."""
    heads = recs[0].heads
    if any(r.heads != heads for r in recs):
        raise ValueError(f"records of {name!r} captured different heads; cannot stitch them")
    tk = max(r.weights.shape[-1] for r in recs)
    rows = [torch.nn.functional.pad(r.weights[batch], (0, tk - r.weights.shape[-1])) for r in recs]
    w = torch.cat(rows, dim=1)  # (H', n, Tk)
    return Layer(name, w, tuple(heads), tuple(range(w.shape[1])), recs[0].backend, calls=len(recs))


def group_records(records: Sequence[Any], *, batch: int = 0) -> list[Group]:
    """Layers and groups of one example of a capture.

    Args:
        records: capture records (``attnkit.capture`` yields them), in call order.
        batch: which example of the batch.

    Returns:
        Groups in order of their first call; in each, layers in order of their first call. A
        module called several times with several queries each gives one layer per call
        (``"name (call 2)"``, ...); one called with a single query each time gives one stitched layer.
    """
    recs = list(records)
    if not recs:
        raise ValueError("records must hold at least one capture record; the capture recorded no attention call "
                         "(did the model run inside `with attnkit.capture()`? does it use attnkit attention?)")
    for r in recs:
        if not all(hasattr(r, a) for a in ("name", "weights", "heads", "rows", "shape")):
            raise TypeError(f"records must be attnkit.capture records; got {type(r).__name__}")
        if not -r.weights.shape[0] <= batch < r.weights.shape[0]:
            raise ValueError(f"batch must lie in [0, {r.weights.shape[0]}) (the records' batch size); got {batch}")
    by_name: dict[str, list] = {}
    for r in recs:
        by_name.setdefault(r.name, []).append(r)
    layers: list[tuple[int, Layer]] = []  # (first call index, layer)
    for name, rs in by_name.items():
        if len(rs) > 1 and all(r.shape[2] == 1 for r in rs):
            layers.append((recs.index(rs[0]), _stitch(name, rs, batch)))
        else:
            for k, r in enumerate(rs):
                lname = name if len(rs) == 1 else f"{name} (call {k + 1})"
                layers.append((recs.index(r), Layer(lname, r.weights[batch], tuple(r.heads), tuple(r.rows), r.backend,
                                                    num_queries=r.shape[2])))
    layers.sort(key=lambda t: t[0])
    groups: dict[str, Group] = {}
    for _, layer in layers:
        base = layer.name.split(" (call ")[0]
        g = group_name(base)
        groups.setdefault(g, Group(g, [])).layers.append(layer)
    return list(groups.values())


_CROSS = re.compile(r"cross|enc_?dec|src_attn|encoder_attn|context", re.I)
_DEC = re.compile(r"decoder|(^|[._])dec", re.I)
_ENC = re.compile(r"encoder|(^|[._])enc", re.I)


Role = Any  # "src", "tgt", a list of labels, or None (position labels)


def assign_tokens(groups: Sequence[Group], src_tokens: Sequence[str], tgt_tokens: Sequence[str] | None = None, *,
                  roles: dict[str, tuple[Role, Role]] | None = None) -> None:
    """Label each group's queries and keys with source or target tokens (in place).

    ``roles`` decides first: ``{group name (a glob): (query role, key role)}``, each role
    ``"src"``, ``"tgt"``, a list of labels or None. Then names (``cross``/``enc_dec`` → target ×
    source, ``decoder`` → target × target, ``encoder`` → source × source), then lengths: a side
    whose length equals the number of source (target) tokens gets the source (target) labels.
    A role whose labels do not match the side's length leaves position labels.
    """
    import fnmatch

    src = list(src_tokens)
    tgt = list(tgt_tokens) if tgt_tokens is not None else None
    for g in groups:
        tq, tk = g.num_queries, g.num_keys
        given = next((r for pat, r in (roles or {}).items() if fnmatch.fnmatchcase(g.name, pat)), None)
        if given is not None:
            roles_g = given
        elif _CROSS.search(g.name):
            roles_g = ("tgt", "src")
        elif _DEC.search(g.name) and tgt is not None:
            roles_g = ("tgt", "tgt")
        elif _ENC.search(g.name):
            roles_g = ("src", "src")
        else:
            q_role = "src" if tq == len(src) and (tq == tk or tgt is None or tq != len(tgt)) else \
                "tgt" if tgt is not None and tq == len(tgt) else None
            k_role = "src" if tk == len(src) else "tgt" if tgt is not None and tk == len(tgt) else None
            roles_g = (q_role, k_role)

        def labels(role: Role) -> list[str] | None:
            if role is None:
                return None
            if isinstance(role, str):
                if role not in ("src", "tgt"):
                    raise ValueError(f"roles entries must be 'src', 'tgt', a list of labels or None; got {role!r}")
                return src if role == "src" else tgt
            return [str(t) for t in role]

        q, k = labels(roles_g[0]), labels(roles_g[1])
        g.query_tokens = list(q) if q is not None and len(q) == tq else None
        g.key_tokens = list(k) if k is not None and len(k) == tk else None
