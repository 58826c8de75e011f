"""The plan of the tiled engine: which (query block, key block) tiles a mask leaves alive, grouped
into runs of consecutive live key blocks that one matmul covers.

Masks are classified per tile (EMPTY / PARTIAL / FULL) by :meth:`attnkit.masks.Mask.classify_blocks`:
empty tiles are never computed, full ones skip the predicate. A plan is *prescaled* when the
queries can carry ``scale / temperature`` (a dot score whose mods are row-separable biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks.base import EMPTY, FULL
from ..normalizers.base import Softmax
from ..spec import AttentionSpec

@dataclass(frozen=True)
class Run:
    """Consecutive live key blocks ``[start, stop)`` of one query block."""

    start: int
    stop: int
    partial: bool  # the mask predicate must be evaluated on this run
    #: key ranges of a mixed run (``make_plan(mix=True)``) whose tiles are full: the predicate
    #: is evaluated on the rest of the run only
    full_parts: tuple[tuple[int, int], ...] = ()
    #: the run is its query block's diagonal square and the mask on it is causal from the block's
    #: first query and first key (:func:`causal_plan`): the fused kernel's own causal masking
    #: serves it, skipping the upper triangle (``partial`` is False: no predicate to evaluate)
    causal: bool = False


@dataclass(frozen=True)
class Plan:
    """Query blocks and their runs. Blocks are disjoint, except in a :func:`causal_plan`, whose tall
    blocks hold the full runs of the finer blocks they contain."""

    block_q: int
    block_k: int
    q_blocks: tuple[tuple[int, int], ...]
    runs: tuple[tuple[Run, ...], ...]  # one tuple of runs per query block
    live_tiles: int
    total_tiles: int
    #: the queries arrive pre-multiplied by ``scale / temperature`` (dot scores without score
    #: mods): one pass over q instead of one over every tile of scores, forward and backward
    prescaled: bool = False
    #: runs go to torch's fused flash kernel (:func:`fused_forward`), which takes the scale
    #: itself unless ``prescaled`` (prescaled when row-separable biases ride on the queries)
    fused: bool = False
    #: every run, grouped into stacks of equal shape (:func:`stack_runs`; fused plans)
    stacks: tuple["Stack", ...] = ()
    #: full runs that no stack shares, one query block's read as one call (:func:`gather_runs`)
    gathers: tuple["Gather", ...] = ()
    #: (query, key) pairs the runs compute, when known exactly (:func:`causal_plan`)
    live_area: int | None = None


@dataclass(frozen=True)
class Stack:
    """``n`` runs of one shape, one per consecutive query block: item ``i`` covers queries
    ``[q0 + i·step, q0 + i·step + rows)`` and keys ``run`` shifted by ``i·step``. One kernel call
    serves them all, its items along the batch dimension: the threads get ``n`` times more
    independent work than a call per block gives them, and a translation-invariant mask or bias
    (:attr:`Mask.translation_invariant`) is the same for every item, so it is built once."""

    q0: int
    rows: int
    step: int
    n: int
    run: Run  # the first item's

    def part(self, first: int, count: int, keys: tuple[int, int] | None = None) -> "Stack":
        """Items ``first .. first + count - 1``, optionally only keys ``[a, b)`` of each item's run
        (offsets into the run; a full run's keys can be cut anywhere)."""
        shift = first * self.step
        r = self.run
        start, stop = (r.start, r.stop) if keys is None else (r.start + keys[0], r.start + keys[1])
        if keys is not None and (r.partial or r.causal):
            raise ValueError("only a full run's keys can be cut")
        return Stack(self.q0 + shift, self.rows, self.step, count,
                     Run(start + shift, stop + shift, r.partial,
                         tuple((a + shift, b + shift) for a, b in r.full_parts), r.causal))


def stack_runs(plan: Plan) -> tuple[Stack, ...]:
    """Every run of ``plan`` in a :class:`Stack`: runs of equal query rows, length, class (and full
    parts) at the same offset from their query block, in query blocks evenly spaced (consecutive
    blocks, or every tall block's sub-block of a :func:`causal_plan`), stack."""
    groups: dict[tuple, list[tuple[int, Run]]] = {}
    for (qs, qe), runs in zip(plan.q_blocks, plan.runs):
        for r in runs:
            key = (qe - qs, r.start - qs, r.stop - r.start, r.partial, r.causal,
                   tuple((a - r.start, b - r.start) for a, b in r.full_parts))
            groups.setdefault(key, []).append((qs, r))
    stacks = []
    for (rows, *_), items in groups.items():
        items.sort(key=lambda item: item[0])
        first = 0
        while first < len(items):
            step = items[first + 1][0] - items[first][0] if first + 1 < len(items) else rows
            last = first + 1
            while last < len(items) and items[last][0] - items[last - 1][0] == step:
                last += 1
            stacks.append(Stack(items[first][0], rows, step, last - first, items[first][1]))
            first = last
    return tuple(stacks)


@dataclass(frozen=True)
class Gather:
    """Full runs of one query block, rows ``[q0, q0 + rows)``, that no other block shares in a
    stack (a block-sparse layout scatters them): their keys, gathered side by side, make one call
    instead of one short call per run."""

    q0: int
    rows: int
    runs: tuple[Run, ...]

    @property
    def length(self) -> int:
        return sum(r.stop - r.start for r in self.runs)

    def keys(self, device=None) -> torch.Tensor:
        """The gathered key positions, in order."""
        return torch.cat([torch.arange(r.start, r.stop, device=device) for r in self.runs])


#: stacks of fewer items than this are gathered (:func:`gather_runs`) where they can be
GATHER_BELOW = 4


def gather_runs(stacks: tuple[Stack, ...], max_keys: int) -> tuple[tuple[Stack, ...], tuple[Gather, ...]]:
    """Split ``stacks`` into those kept and the :class:`Gather` of each query block with at least
    two full runs in short stacks (fewer than ``GATHER_BELOW`` items, neither partial nor causal:
    their masks and biases need no key positions; a block-sparse layout scatters its runs so that
    few blocks share one), at most ``max_keys`` keys per gather."""
    def short(st: Stack) -> bool:
        return st.n < GATHER_BELOW and not st.run.partial and not st.run.causal

    single: dict[tuple[int, int], list[Run]] = {}
    for st in stacks:
        if short(st):
            for i in range(st.n):
                item = st.part(i, 1)
                single.setdefault((item.q0, item.rows), []).append(item.run)
    gathers, leftover = [], []
    for (q0, rows), runs in single.items():
        if len(runs) < 2:
            leftover.append(Stack(q0, rows, rows, 1, runs[0]))
            continue
        cur: list[Run] = []
        for r in sorted(runs, key=lambda r: r.start):
            if cur and sum(x.stop - x.start for x in cur) + r.stop - r.start > max_keys:
                gathers.append(Gather(q0, rows, tuple(cur)))
                cur = []
            cur.append(r)
        gathers.append(Gather(q0, rows, tuple(cur)))
    return tuple(st for st in stacks if not short(st)) + tuple(leftover), tuple(gathers)


def causal_plan(spec: AttentionSpec, tall: int, fine: int, block_k: int) -> Plan | None:
    """A two-level plan for a causal mask whose last query sees the last key (self-attention, a
    prefill): every ``tall``-row block reads the keys before its own rows as one full run (the
    kernel runs faster on more rows); each ``fine``-row block inside it reads the full keys between
    the tall block's first row and its own, then its diagonal square with the kernel's causal
    masking (no masked half computed). None when the mask is not such a causal mask."""
    from ..masks.basic import Causal
    from ..masks.base import query_offset

    m, Tq, Tk = spec.mask, spec.Tq, spec.Tk
    if type(m) is not Causal or tall % fine:
        return None
    o = query_offset(m.align, Tq, Tk)
    if o < 0 or Tq + o != Tk:
        return None
    blocks, runs, area = [], [], 0
    for a in range(0, Tq, tall):
        b = min(a + tall, Tq)
        if a + o > 0:
            blocks.append((a, b))
            runs.append((Run(0, a + o, False),))
            area += (b - a) * (a + o)
        for s in range(a, b, fine):
            e = min(s + fine, b)
            row = ([Run(a + o, s + o, False)] if s > a else []) + [Run(s + o, e + o, False, causal=True)]
            blocks.append((s, e))
            runs.append(tuple(row))
            area += (e - s) * (s - a) + (e - s) * (e - s + 1) // 2
    live = -(-area // (fine * block_k))
    total = -(-Tq // fine) * -(-Tk // block_k)
    return Plan(fine, block_k, tuple(blocks), tuple(runs), live, total, can_prescale(spec), live_area=area)


def make_plan(spec: AttentionSpec, block_q: int, block_k: int, kv_chunk: int, device=None,
              partial_chunk: int | None = None, mix: bool = False) -> Plan:
    """Classify tiles and group the live ones into runs of at most ``kv_chunk`` keys
    (``partial_chunk`` for runs whose mask must be evaluated; default ``kv_chunk``). Runs are
    of one class, unless ``mix``: then full tiles may join partial ones in a partial run of at
    most ``partial_chunk`` keys (fewer, larger calls where evaluating a short mask is cheap)."""
    Tq, Tk = spec.Tq, spec.Tk
    nq, nk = -(-Tq // block_q), -(-Tk // block_k)
    if spec.mask is None:
        live = torch.ones(nq, nk, dtype=torch.bool)
        full = live
    else:
        cls = spec.mask.classify_blocks(Tq, Tk, block_q, block_k, spec.B, spec.H, device=device).flatten(0, 1)
        live = (cls != EMPTY).any(0).cpu()
        full = (cls == FULL).all(0).cpu()
    per_run = max(1, kv_chunk // block_k)
    per_partial_run = per_run if partial_chunk is None else max(1, partial_chunk // block_k)
    runs = []
    for i in range(nq):
        row, cur = [], None  # cur: [first tile, stop tile, partial, full tiles]
        for j in torch.nonzero(live[i]).flatten().tolist():
            partial = not bool(full[i, j])
            # a run is consecutive tiles of one class (full runs never evaluate the predicate),
            # or with ``mix`` a short run of both classes, evaluated as partial
            joined = (cur is not None and cur[2]) or partial
            fits = cur is not None and cur[1] == j and (mix or cur[2] == partial)
            if fits and cur[1] + 1 - cur[0] <= (per_partial_run if joined else per_run):
                cur = [cur[0], j + 1, joined, cur[3] + ([] if partial else [j])]
            else:
                if cur is not None:
                    row.append(cur)
                cur = [j, j + 1, partial, [] if partial else [j]]
        if cur is not None:
            row.append(cur)
        runs.append(tuple(
            Run(a * block_k, min(b * block_k, Tk), p,
                tuple((j * block_k, min((j + 1) * block_k, Tk)) for j in fulls) if p else ())
            for a, b, p, fulls in row))
    q_blocks = tuple((i * block_q, min((i + 1) * block_q, Tq)) for i in range(nq))
    return Plan(block_q, block_k, q_blocks, tuple(runs), int(live.sum()), nq * nk, can_prescale(spec))


def can_prescale(spec: AttentionSpec) -> bool:
    """Whether the queries can carry ``scale / temperature``: no mod sits between the dot product
    and the normalizer, or (softmax only) every mod is a row-separable bias added as one row per
    tile (:meth:`ScoreMod.key_bias`)."""
    if not spec.score.tile_is_dot:
        return False
    if not spec.score_mods:
        return True
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    return type(spec.normalizer) is Softmax and all(
        m.key_bias(zero, zero, 0, spec.Tq, spec.Tk) is not None for m in spec.score_mods)


def prescales(spec: AttentionSpec, fused: bool) -> bool:
    """Whether a plan's queries carry ``scale / temperature`` (:func:`can_prescale`): where the
    eager tile body reads them (one pass over q instead of one over every tile; the weights are
    computed there too) or a row-separable bias rides on them. Otherwise torch's fused kernel
    takes the scale itself: no pass over q, nor over dq in the backward."""
    return can_prescale(spec) and (not fused or bool(spec.score_mods) or spec.return_weights)


def query_scale(spec: AttentionSpec) -> float:
    """``scale / temperature``: what a prescaled plan multiplies the queries by."""
    return spec.scale / (spec.normalizer.temperature if isinstance(spec.normalizer, Softmax) else 1.0)
