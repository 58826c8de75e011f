"""The fused tile body: runs of a softmax/dot plan handed whole to torch's fused CPU flash kernel.

On CPU, a run of a softmax/dot plan can be handed to torch's fused flash kernel, which keeps
scores in registers instead of making 4–6 eager passes over each tile: the run's partial mask and
row-separable biases become its additive float mask, the kernel returns the run's (normalized
output, lse), and runs are merged by their log-sum-exps. Its backward, given the *global* output
and lse, returns exactly that run's share of dq and its dk, dv.

Runs of one shape in consecutive query blocks go to the kernel together, as one call
(:class:`~attnkit.kernels.plan.Stack`): the items are overlapping strided views of q, k and v
along the kernel's batch dimension (no copy), so the kernel's threads share out items × heads ×
query splits instead of the heads and splits of one block, and a translation-invariant mask
(causal, windows; ALiBi and T5 biases) is built once for the whole stack. The backward adds each
item's dk, dv back where its keys overlap the next item's. A query block's full runs that no
stack shares (a block-sparse layout scatters them) have their keys gathered side by side into one
call (:class:`~attnkit.kernels.plan.Gather`); the backward adds their dk, dv back by index.
"""

from __future__ import annotations

import torch

from ..normalizers.base import Softmax
from ..spec import AttentionSpec
from .plan import Gather, Plan, Run, Stack
from .tile import NEG_INF as _NEG_INF
from .tile import Tile, expand, reduce_groups

Tensor = torch.Tensor


_FUSED_DTYPES = (torch.float32, torch.float64)
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def fusable(spec: AttentionSpec, qp: Tensor, v: Tensor, seed: int | None, params) -> bool:
    """Whether :func:`fused_forward`/:func:`fused_backward` can serve the request: plain softmax
    over a dot score whose mods are additive biases, no dropout, no learnable tensors inside the
    tiles (so no bias needs a gradient), float32/float64 on CPU, values as wide as the prepared
    queries. Row-separable biases (ALiBi) ride on prescaled queries as one row per tile; other
    biases (T5 buckets, a bias tensor) are evaluated per run into the kernel's float mask."""
    return (type(spec.normalizer) is Softmax and spec.score.tile_is_dot and all(m.additive for m in spec.score_mods)
            and seed is None and not params
            and qp.device.type == "cpu" and qp.dtype in _FUSED_DTYPES and qp.shape[-1] == v.shape[-1])


def _kernel_scale(tile: Tile, plan: Plan) -> float:
    """What the fused kernel multiplies ``q·k`` by: 1 on prescaled queries, else scale/temperature."""
    return 1.0 if plan.prescaled else tile.spec.scale * tile.inv_temp


def _flash_mask(tile: Tile, qs: int, qe: int, r: Run, dtype):
    """The run's additive float mask for the fused kernel (None when the run is full and has no
    bias), its rows with no live key (None when there can be none), and its rows' offsets
    ``(B', H', rows)`` from the exact scores (None when it has none).

    Every log-sum-exp the fused body returns is that of the exact scores. A full run of a
    prescaled plan carries its row-separable biases (ALiBi) as one row relative to its first query
    (:meth:`Tile.row_biases`): the kernel's lse is then off by the row's term, which is added back
    (exact where it matters: the term grows with the row's distance from the run, and the run's
    share of the row's weights falls as fast). A run with partial tiles carries the exact biases:
    they are as large as its mask anyway, and near the diagonal their values stay small whatever
    the height of the query block."""
    spec = tile.spec
    if not r.partial and not spec.score_mods:
        return None, None, None
    grid = tile.grid(qs, qe, r.start, r.stop)
    mask = row_term = None
    rows_only = tile.prescaled and not r.partial
    if rows_only:
        biases = tile.row_biases(qs, grid, dtype)
        row_term = _row_term(tile, qs, grid, dtype)
    else:  # additive biases, evaluated on the run's grid (divided by the temperature, as s is)
        zero = torch.zeros((), dtype=dtype, device=grid[2].device)
        biases = (m.score_mod(zero, *grid, spec.Tq, spec.Tk).to(dtype) * tile.inv_temp for m in spec.score_mods)
    for bias in biases:
        mask = bias if mask is None else mask + bias
    dead = None
    if r.partial and r.full_parts:  # a mixed run: the predicate on its partial tiles only
        cuts = [r.start] + [x for part in r.full_parts for x in part] + [r.stop]
        b, h, q, kv = grid
        pieces = [(a - r.start, z - r.start, tile.allowed((b, h, q, kv[..., a - r.start:z - r.start])))
                  for a, z in zip(cuts[::2], cuts[1::2]) if z > a]
        lead = [1, 1, qe - qs]
        for *_, allowed in pieces:  # broadcast the pieces' leading dims (each is 1 or n)
            lead = [max(n, m) for n, m in zip(lead, ((1,) * 4 + tuple(allowed.shape))[-4:-1])]
        neg = torch.zeros(*lead, r.stop - r.start, dtype=dtype, device=q.device)
        for a, z, allowed in pieces:
            neg[..., a:z].masked_fill_(~allowed, _NEG_INF)
        mask = neg if mask is None else mask + neg  # a full tile leaves no row dead
    elif r.partial:
        allowed = tile.allowed(grid)
        neg = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, _NEG_INF)
        mask = neg if mask is None else mask + neg
        dead = ~allowed.any(-1)
    if not rows_only and not all(m.finite for m in spec.score_mods):
        dead = torch.isneginf(mask).all(-1)  # a bias (a tensor) may itself be -inf on whole rows
    if mask is not None and mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask, dead, row_term


def _row_term(tile: Tile, qs: int, grid, dtype) -> Tensor:
    """``exact score − (score with the run's bias row)`` of each row, ``(B', H', rows)``: the
    row-separable mods' row terms (:meth:`ScoreMod.key_bias`), over the temperature."""
    spec = tile.spec
    b, h, q, kv = grid
    j0 = kv[..., :1]
    zero = torch.zeros((), dtype=torch.float64, device=q.device)
    term = 0.0
    for m in spec.score_mods:
        exact = m.score_mod(zero, b, h, q, j0, spec.Tq, spec.Tk).to(torch.float64)
        term = term + exact - m.key_bias(h, j0, tile.q_ref(qs, grid), spec.Tq, spec.Tk).to(torch.float64)
    return (term * tile.inv_temp).squeeze(-1).to(dtype)


def _heads_stride(x: Tensor) -> int | None:
    """The stride of ``x``'s batch and head dimensions merged into one (None when they cannot be)."""
    B, H = x.shape[:2]
    sB, sH = x.stride()[:2]
    if H == 1:
        return sB
    if B == 1 or sB == H * sH:
        return sH
    return None


def _mergeable(x: Tensor) -> Tensor:
    """``x`` itself when its batch and heads merge into one strided dimension, else a contiguous copy."""
    return x if _heads_stride(x) is not None and x.stride(-1) == 1 else x.contiguous()


def _items(x: Tensor, start: int, step: int, n: int, length: int) -> Tensor:
    """The ``(n, B·H, length, ...)`` view of ``x (B, H, T, ...)`` whose item ``i`` is
    ``x[:, :, start + i·step : start + i·step + length]`` (items overlap when ``step < length``)."""
    sT = x.stride(2)
    return x.as_strided((n, x.shape[0] * x.shape[1], length, *x.shape[3:]),
                        (step * sT, _heads_stride(x), sT, *x.stride()[3:]), x.storage_offset() + start * sT)


def _add_items(x: Tensor, g: Tensor, start: int, step: int) -> None:
    """``x[:, :, start + i·step : ... + L] += g[i]`` for every item ``i`` of ``g (n, B·H, L, D)``,
    where items overlap (``step < L``) one slice of ``step`` keys at a time."""
    n, L = g.shape[0], g.shape[2]
    if n == 1 or step >= L:
        _items(x, start, step, n, L).add_(g)
        return
    for a in range(0, L, step):
        w = min(step, L - a)
        _items(x, start + a, step, n, w).add_(g[:, :, a:a + w])


def _fold_heads(t: Tensor | None, B: int, H: int) -> Tensor | None:
    """A mask ``(B', H', r, L)`` or dead-row flags ``(B', H', r)`` (``B'``, ``H'`` 1 or full) as
    one item along the stacked batch: ``(1, 1, ...)`` or ``(1, B·H, ...)``."""
    if t is None:
        return None
    lead = 4 if t.dim() >= 4 else 3
    while t.dim() < lead:
        t = t.unsqueeze(0)
    if t.shape[0] == 1 and (t.shape[1] == 1 or B == 1):
        return t
    return t.expand(B, H, *t.shape[2:]).reshape(1, B * H, *t.shape[2:])


def _invariant(spec: AttentionSpec, st: Stack) -> bool:
    """Whether every item of ``st`` has the same mask and biases (built once)."""
    if st.n == 1:
        return True
    mask_same = not st.run.partial or spec.mask.translation_invariant
    return mask_same and all(m.translation_invariant for m in spec.score_mods)


def _stack_mask(tile: Tile, st: Stack, dtype, B: int, H: int):
    """The stack's float mask, broadcastable to ``(n, B·H, rows, L)``, its dead rows and its rows'
    offsets from the exact scores (both broadcastable to ``(n, B·H, rows)``); any may be None."""
    parts = [_flash_mask(tile, it.q0, it.q0 + it.rows, it.run, dtype)
             for it in ([st.part(0, 1)] if _invariant(tile.spec, st) else [st.part(i, 1) for i in range(st.n)])]
    out = []
    for j in range(3):
        ts = [_fold_heads(p[j], B, H) for p in parts]
        if ts[0] is None:
            out.append(None)
            continue
        lead = torch.broadcast_shapes(*(t.shape[1:] for t in ts))
        out.append(ts[0] if len(ts) == 1 else torch.cat([t.expand(1, *lead) for t in ts]))
    return tuple(out)


#: bytes of kernel outputs and temporaries (and per-item masks) per stacked call: large enough to
#: give every thread many items, small enough for the allocator to reuse (glibc maps and zeroes
#: fresh pages for every block over 32 MiB)
_CALL_BYTES = 16 << 20


def gather_keys(spec: AttentionSpec, Dv: int, size: int) -> int:
    """The most keys one :class:`Gather` copies: their keys and values about :data:`_CALL_BYTES`."""
    return max(128, _CALL_BYTES // (spec.B * spec.H * 2 * Dv * size))


def _gathered(ga: Gather, kp: Tensor, v: Tensor, block: int):
    """The gather's keys and values side by side, and a function adding a gradient of theirs back
    into a ``kp``-shaped tensor. Runs on whole key blocks of ``block`` move block by block (whole
    contiguous rows of keys: twice as fast as key by key)."""
    nb = kp.shape[2] // block
    if all(r.start % block == 0 and r.stop % block == 0 and r.stop <= nb * block for r in ga.runs):
        idx = torch.cat([torch.arange(r.start // block, r.stop // block, device=kp.device) for r in ga.runs])

        def pick(x):
            return x[:, :, :nb * block].unflatten(2, (nb, block)).index_select(2, idx).flatten(2, 3)

        def add(dx, g):
            dx[:, :, :nb * block].unflatten(2, (nb, block)).index_add_(2, idx, g.unflatten(2, (-1, block)))
    else:
        idx = ga.keys(kp.device)

        def pick(x):
            return x.index_select(2, idx)

        def add(dx, g):
            dx.index_add_(2, idx, g)
    return pick(kp), pick(v), add


def _chunks(n: int, per_item: int):
    """``(first, count)`` pieces of ``n`` items, each about :data:`_CALL_BYTES`."""
    size = max(1, _CALL_BYTES // max(1, per_item))
    for a in range(0, n, size):
        yield a, min(size, n - a)


def fused_forward(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan) -> tuple[Tensor, Tensor]:
    """:func:`tiled_forward` for a fusable request: ``out``, ``lse``. One kernel call per piece of
    each stack; a query block's runs are merged by their log-sum-exps."""
    B, H, G = spec.B, spec.H, spec.groups
    tile = Tile(spec, qp.device, plan.prescaled)
    scale = _kernel_scale(tile, plan)
    Dv = v.shape[-1]
    out = torch.zeros(B, H, spec.Tq, Dv, dtype=qp.dtype, device=qp.device)
    lse = torch.full((B, H, spec.Tq), _NEG_INF, dtype=qp.dtype, device=qp.device)
    qp = _mergeable(qp)
    kp, v = _mergeable(expand(kp, G)), _mergeable(expand(v, G))  # once, not per run
    g = plan.block_q
    touched = [False] * -(-spec.Tq // g)  # per block of g rows: a row's first run is copied, later ones merged
    for st in plan.stacks:
        L = st.run.stop - st.run.start
        same = _invariant(spec, st)
        mask = dead = row = None
        if same:
            mask, dead, row = _stack_mask(tile, st, qp.dtype, B, H)
        per_item = B * H * (st.rows * Dv + (0 if same else st.rows * L)) * qp.element_size()
        for a, n in _chunks(st.n, per_item):
            part = st.part(a, n)
            if not same:
                mask, dead, row = _stack_mask(tile, part, qp.dtype, B, H)
            o, l = _FLASH(_items(qp, part.q0, st.step, n, st.rows), _items(kp, part.run.start, st.step, n, L),
                         _items(v, part.run.start, st.step, n, L), 0.0, st.run.causal, attn_mask=mask,
                          scale=scale)
            if row is not None:
                l = l + row
            if dead is not None:
                l = l.masked_fill(dead, _NEG_INF)  # the kernel reports lse 0 (and output 0) there
            # items whose rows have not been written yet take the kernel's result, the others
            # merge with it (out and lse start at 0 and -inf, so a part-written item merges)
            spans = [((part.q0 + t * st.step) // g, -(-(part.q0 + t * st.step + st.rows) // g)) for t in range(n)]
            fresh = [not any(touched[a:b]) for a, b in spans]
            i = 0
            while i < n:
                j = i + 1
                while j < n and fresh[j] == fresh[i]:
                    j += 1
                ov = _items(out, part.q0 + i * st.step, st.step, j - i, st.rows)
                lv = _items(lse, part.q0 + i * st.step, st.step, j - i, st.rows)
                if fresh[i]:
                    ov.copy_(o[i:j])
                    lv.copy_(l[i:j])
                else:
                    _merge(ov, lv, o[i:j], l[i:j])
                i = j
            for a, b in spans:
                touched[a:b] = [True] * (b - a)
    for ga in plan.gathers:
        kg, vg, _ = _gathered(ga, kp, v, plan.block_k)
        o, l = _FLASH(qp[:, :, ga.q0:ga.q0 + ga.rows], kg, vg, 0.0, False, scale=scale)
        a, b = ga.q0 // g, -(-(ga.q0 + ga.rows) // g)
        ov, lv = out[:, :, ga.q0:ga.q0 + ga.rows], lse[:, :, ga.q0:ga.q0 + ga.rows]
        if any(touched[a:b]):
            _merge(ov, lv, o, l)
        else:
            ov.copy_(o)
            lv.copy_(l)
        touched[a:b] = [True] * (b - a)
    return out, lse


def _merge(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> None:
    """``(out, lse) ← (out, lse) ⊕ (o, l)`` in place: two normalized partial results of the same
    rows over disjoint keys, combined by their log-sum-exps."""
    new_l = torch.logaddexp(lse, l)
    safe = new_l.masked_fill(new_l == _NEG_INF, 0.0)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(o * torch.exp(l - safe).unsqueeze(-1))
    lse.copy_(new_l)


def fused_backward(qp, kp, v, out, lse, dout, spec: AttentionSpec, plan: Plan):
    """:func:`tiled_backward` for a fusable request: ``dq, dk, dv`` (``dq`` w.r.t. ``qp`` as given,
    prescaled or not)."""
    B, H, G = spec.B, spec.H, spec.groups
    tile = Tile(spec, qp.device, plan.prescaled)
    scale = _kernel_scale(tile, plan)
    qp, out, dout = _mergeable(qp), _mergeable(out), _mergeable(dout)
    kp, v = _mergeable(expand(kp, G)), _mergeable(expand(v, G))
    D, Dv, size = kp.shape[-1], v.shape[-1], qp.element_size()
    dq = torch.zeros(qp.shape, dtype=qp.dtype, device=qp.device)
    dk = torch.zeros(kp.shape, dtype=kp.dtype, device=kp.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    lse = lse.masked_fill(lse == _NEG_INF, float("inf"))  # dead rows: e^(s - lse) = 0, not NaN
    # the kernel returns dk, dv as long as the run: a full run is cut so that one item's stay small
    cap = max(plan.block_k, (_CALL_BYTES // (B * H * (D + Dv) * size)) // plan.block_k * plan.block_k)
    for st in plan.stacks:
        L = st.run.stop - st.run.start
        whole_run = st.run.partial or st.run.causal  # a mask or a causal square is not cut
        cuts = [(a, min(a + cap, L)) for a in range(0, L, cap)] if not whole_run else [None]
        same = _invariant(spec, st)
        for keys in cuts:
            width = L if keys is None else keys[1] - keys[0]
            whole = st.part(0, st.n, keys)
            mask = row = None
            if same:
                mask, _, row = _stack_mask(tile, whole, qp.dtype, B, H)
            per_item = B * H * (st.rows * D + width * (D + Dv) + (0 if same else st.rows * width)) * size
            for a, n in _chunks(st.n, per_item):
                part = st.part(a, n, keys)
                if not same:
                    mask, _, row = _stack_mask(tile, part, qp.dtype, B, H)
                q0, k0 = part.q0, part.run.start
                li = _items(lse, q0, st.step, n, st.rows)
                g_q, g_k, g_v = _FLASH_BACKWARD(_items(dout, q0, st.step, n, st.rows), _items(qp, q0, st.step, n, st.rows),
                                          _items(kp, k0, st.step, n, width), _items(v, k0, st.step, n, width),
                                          _items(out, q0, st.step, n, st.rows), li if row is None else li - row,
                                          0.0, st.run.causal, attn_mask=mask, scale=scale)
                _add_items(dq, g_q, q0, st.step)
                _add_items(dk, g_k, k0, st.step)
                _add_items(dv, g_v, k0, st.step)
    for ga in plan.gathers:
        kg, vg, add = _gathered(ga, kp, v, plan.block_k)
        rows = slice(ga.q0, ga.q0 + ga.rows)
        g_q, g_k, g_v = _FLASH_BACKWARD(dout[:, :, rows], qp[:, :, rows], kg, vg, out[:, :, rows], lse[:, :, rows],
                                        0.0, False, scale=scale)
        dq[:, :, rows] += g_q
        add(dk, g_k)
        add(dv, g_v)
    return dq, reduce_groups(dk, G), reduce_groups(dv, G)
