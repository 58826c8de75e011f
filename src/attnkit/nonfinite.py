"""One NaN/inf policy for every backend.

Fused kernels disagree about non-finite inputs: torch's CPU flash kernel turns a NaN query row
into a row of zeros, a NaN in a padded key poisons every row (``0 · NaN``), and an ``inf`` in a
key can give a ``-inf`` score that silently hides that key. attnkit settles it once, here, before
any backend runs, so that the reference, SDPA, flex and the tiled kernels all give the same answer:

* NaN or ±inf in a *live* position (a query row that has at least one key, a key or value that
  the mask lets a row read, a bias entry the mask lets through) propagates to exactly the rows
  that read it: the whole output row for a query, a key or a bias entry, the output column ``d``
  for ``v[..., j, d]``; weights of such a row are NaN on its live keys (0 on masked ones).
* Anything in a masked-out key or value, or in a query row with no key at all, reaches no output
  row and no gradient; such a row still gives zeros.
* Gradients are always finite: non-finite inputs are replaced by 0 before the backend sees them
  (their gradient is 0) and the NaN is written into the result afterwards, outside autograd's
  reach (``masked_fill``). A NaN output row therefore never returns NaN gradients to parameters
  that other rows read.

"Live" means allowed by the mask: a ``-inf`` bias hides a key from the normalizer, but like
IEEE arithmetic (``NaN + -inf = NaN``) it does not shield the row from a NaN key or value.
A bias of ``+inf`` or NaN on a live position (a bias tensor) poisons that row too.

The check costs one summation of q, k and v; when everything is finite nothing else happens.
A tensor found finite is remembered until it is changed in place or freed (its version counter,
a weak reference), so keys and values read again unchanged (cross-attention to an encoder's
memory at every decoding step, :class:`attnkit.nn.KVCache`'s views, which it checks as they are
appended) cost no second summation.

Example::

    >>> import torch, attnkit
    >>> q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    >>> k[0, 0, 4] = float("nan")                                   # a padded key
    >>> out = attnkit.attention(q, k, v, mask=attnkit.masks.key_padding(torch.tensor([4])))
    >>> bool(out.isfinite().all())                                  # the padding never leaks
    True
    >>> q[0, 0, 1, 0] = float("inf")                                # a live query row
    >>> attnkit.attention(q, k, v, backend="sdpa", mask=attnkit.masks.key_padding(torch.tensor([4])))[0, 0, :, 0].isnan().tolist()
    [False, True, False]
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass

import torch

from .positions.base import TensorBias
from .spec import AttentionSpec

Tensor = torch.Tensor
_NAN = float("nan")
#: rows of the mask evaluated at once when finding which rows read a bad key
_ROW_CHUNK = 1024


@dataclass
class Guard:
    """Where the non-finite inputs of one call were (each None when clean)."""

    q_rows: Tensor | None    # (B, H, Tq) bool: the query row has a non-finite entry
    k_keys: Tensor | None    # (B, Hkv, Tk) bool: the key has a non-finite entry
    v_bad: Tensor | None     # (B, Hkv, Tk, Dv) bool
    bias_bad: Tensor | None  # broadcastable to (B, H, Tq, Tk) bool: NaN or +inf in a bias tensor

    def poisoned(self, spec: AttentionSpec) -> tuple[Tensor, Tensor | None]:
        """``rows (B, H, Tq)``: outputs (and weights) that are NaN in full; ``cols (B, H, Tq, Dv)``
        or None: output entries that read a non-finite value."""
        rows = torch.zeros(spec.B, spec.H, spec.Tq, dtype=torch.bool, device=spec.device)
        if self.q_rows is not None:  # a query row is live when any key is allowed
            idx = _nonzero_index(self.q_rows.any(0).any(0))
            live_any = _live(spec, idx, torch.arange(spec.Tk, device=spec.device)).any(-1)  # (B', H', r)
            rows[:, :, idx] |= self.q_rows[:, :, idx] & live_any
        if self.k_keys is not None:
            rows |= _reads(spec, _expand(self.k_keys, spec.groups))
        if self.bias_bad is not None:
            rows |= _reads_entries(spec, self.bias_bad)
        cols = None
        if self.v_bad is not None:
            vb = _expand(self.v_bad, spec.groups)                     # (B, H, Tk, Dv)
            keys = _nonzero_index(vb.any(-1).any(0).any(0))
            cols = torch.zeros(spec.B, spec.H, spec.Tq, spec.Dv, dtype=torch.bool, device=spec.device)
            for r0 in range(0, spec.Tq, _ROW_CHUNK):
                r = torch.arange(r0, min(r0 + _ROW_CHUNK, spec.Tq), device=spec.device)
                live = _live(spec, r, keys).to(torch.float32)         # (B', H', r, J)
                cols[:, :, r] = (live @ vb[:, :, keys].to(torch.float32)) > 0
        return rows, cols

    def apply(self, out: Tensor, weights: Tensor | None, spec: AttentionSpec) -> tuple[Tensor, Tensor | None]:
        """Write NaN where the policy says so into the backend's ``out`` and (selected) ``weights``."""
        rows, cols = self.poisoned(spec)
        bad = rows.unsqueeze(-1) if cols is None else rows.unsqueeze(-1) | cols
        out = out.masked_fill(bad, _NAN)
        if weights is not None:
            weights = self.poison_weights(weights, spec, rows)
        return out, weights

    def poison_weights(self, weights: Tensor, spec: AttentionSpec, rows: Tensor | None = None,
                       heads_sel=None, rows_sel=None) -> Tensor:
        """NaN on the live keys of poisoned rows of ``weights (B, h', r', Tk)``, the heads and rows
        of ``spec.weights`` (or ``heads_sel``/``rows_sel``)."""
        if rows is None:
            rows, _ = self.poisoned(spec)
        req = spec.weights
        heads_sel = heads_sel if heads_sel is not None else (req.heads if req is not None else None)
        rows_sel = rows_sel if rows_sel is not None else (req.rows if req is not None else None)
        h = torch.arange(spec.H, device=spec.device) if heads_sel is None else torch.tensor(heads_sel, device=spec.device)
        r = torch.arange(spec.Tq, device=spec.device) if rows_sel is None else torch.tensor(rows_sel, device=spec.device)
        sel = rows.index_select(1, h).index_select(2, r)                # (B, h', r')
        if not sel.any():
            return weights
        live = _live(spec, r, torch.arange(spec.Tk, device=spec.device))  # (B', H', r', Tk)
        if live.shape[1] != 1:
            live = live.index_select(1, h)
        poison = sel.unsqueeze(-1) & live
        if req is not None and req.average:   # a head's NaN makes the mean NaN
            poison = poison.any(1, keepdim=True)
        return weights.masked_fill(poison, _NAN)


def quarantine(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
    """Replace non-finite entries of ``q``, ``k``, ``v`` (and NaN/+inf of bias tensors) by 0.

    Returns ``(q, k, v, spec, guard)``; ``guard`` is None when every input is finite (then the
    inputs come back untouched), else a :class:`Guard` whose :meth:`Guard.apply` writes the NaN
    back into the result.

    Under ``torch.compile`` the check is skipped (it asks the data whether it is finite, which
    would break the graph): compiled attention on non-finite inputs gives what torch's kernels
    give (NaN spreads through the rows and columns it reaches)."""
    if torch.compiler.is_compiling():
        return q, k, v, spec, None
    fine = inputs_finite(q, k, v)
    if fine and not spec.score_mods:
        return q, k, v, spec, None  # the common case, first: a small call pays for little else here
    bad = [None] * 3 if fine else [None if all_finite(x) else ~torch.isfinite(x) for x in (q, k, v)]
    bias_bad, mods = None, list(spec.score_mods)
    for i, m in enumerate(mods):
        if isinstance(m, TensorBias) and not all_finite(m.tensor):
            t = m.tensor
            b = torch.isnan(t) | torch.isposinf(t)  # -inf hides a key: that is a mask, not an error
            if bool(b.any()):
                mods[i] = TensorBias(t.masked_fill(b, 0.0))
                bias_bad = b if bias_bad is None else bias_bad | b
    if all(b is None for b in bad) and bias_bad is None:
        return q, k, v, spec, None
    q, k, v = (x if b is None else x.masked_fill(b, 0.0) for x, b in zip((q, k, v), bad))
    if bias_bad is not None:
        spec = dataclasses.replace(spec, score_mods=tuple(mods))
    guard = Guard(q_rows=None if bad[0] is None else bad[0].any(-1),
                  k_keys=None if bad[1] is None or not spec.score.reads_keys else bad[1].any(-1),
                  v_bad=bad[2], bias_bad=bias_bad)
    return q, k, v, spec, guard


def pending_check(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
    """On CUDA: start :func:`quarantine`'s one-sum check without waiting for it, so that the
    caller can queue the attention kernels first (no idle GPU while the host waits). Returns a
    function that waits for the check alone (not for the kernels queued after it) and says whether
    every input is finite; None where the caller should use :func:`quarantine` directly (CPU,
    inside torch.compile, bias tensors, dropout: a rerun would draw another mask). As on CPU, only
    the inputs not known finite are summed, and keys and values found clean are remembered: a
    decoding step against a KV cache sums its query alone."""
    if (q.device.type != "cuda" or torch.compiler.is_compiling() or spec.dropout_p > 0
            or any(isinstance(m, TensorBias) for m in spec.score_mods)):
        return None
    todo = unchecked(q, k, v)
    if not todo:   # keys and values of a KV cache, say, and a query known clean: no sum, no wait
        return _finite
    with torch.no_grad():
        total = todo[0].sum(dtype=torch.float32)
        for x in todo[1:]:
            total = total + x.sum(dtype=torch.float32)
        flag = torch.isfinite(total)
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def finite() -> bool:
        done.synchronize()
        fine = bool(host)
        if fine:
            remember(todo, q)
        return fine

    return finite


def _finite() -> bool:
    return True


#: tensors found finite: id -> (weak reference, version counter when found)
_FINITE: dict[int, tuple[weakref.ref, int]] = {}


def _forget(key: int):
    return lambda _ref: _FINITE.pop(key, None)


def mark_finite(x: Tensor) -> None:
    """Remember that ``x`` holds only finite values, until it is changed in place (its version
    counter moves) or freed. Only for a caller that knows: :class:`attnkit.nn.KVCache` marks its
    views after checking each appended piece; :func:`inputs_finite` marks what it checked."""
    if torch.compiler.is_compiling() or x.is_inference():  # inference tensors keep no version counter
        return
    key = id(x)
    _FINITE[key] = (weakref.ref(x, _forget(key)), x._version)


def known_finite(x: Tensor) -> bool:
    """Whether ``x`` was found finite and has not changed since (:func:`mark_finite`)."""
    seen = _FINITE.get(id(x))
    # (an inference tensor is never marked: one that reuses a freed tensor's id fails "is x")
    return seen is not None and seen[0]() is x and seen[1] == x._version


def sum_finite(*xs: Tensor) -> bool:
    """Whether every tensor of ``xs`` holds only finite values, by one summation (a finite sum
    proves them clean; entries whose sum overflows read as not finite)."""
    if not any(x.requires_grad for x in xs):  # (entering no_grad costs more than a small sum)
        return math.isfinite(_sum(xs))
    with torch.no_grad():
        return math.isfinite(_sum(xs))


def _sum(xs) -> float:
    total = xs[0].sum()
    for x in xs[1:]:
        total = total + x.sum().to(total.dtype)
    return total.item()  # one number: no kernel call needed to test it


def unchecked(q: Tensor, k: Tensor, v: Tensor) -> list[Tensor]:
    """Those of ``q``, ``k`` and ``v`` not known finite (:func:`known_finite`), in that order."""
    todo = []
    for x in (q, k, v):  # known_finite, inlined: this runs on every call
        seen = _FINITE.get(id(x))
        if seen is None or seen[0]() is not x or seen[1] != x._version:
            todo.append(x)
    return todo


def remember(checked: list[Tensor], q: Tensor) -> None:
    """Mark the tensors of ``checked`` found finite, except the query ``q`` (a fresh one each
    call: the keys and values are what a later call reads again)."""
    for x in checked:
        if x is not q:
            mark_finite(x)


def inputs_finite(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``q``, ``k`` and ``v`` hold only finite values, in one sum of those not known finite
    already (a NaN or inf makes it non-finite; a finite sum proves all of them clean). Keys and
    values found clean are remembered (:func:`known_finite`)."""
    todo = unchecked(q, k, v)
    if not todo:
        return True
    if len(todo) == 1 and todo[0] is q and not q.requires_grad:
        return math.isfinite(q.sum().item())  # a decoding step against known keys: the query alone
    fine = sum_finite(*todo)
    if fine:
        remember(todo, q)
    return fine


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or inf. A finite sum proves it in one pass without allocating
    (an inf or NaN entry makes the sum inf or NaN); only a sum that is not finite (a bad entry, or
    finite entries whose sum overflows) pays for the exact check."""
    with torch.no_grad():
        return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _expand(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _nonzero_index(flags: Tensor) -> Tensor:
    return torch.nonzero(flags).flatten()


def _live(spec: AttentionSpec, rows: Tensor, keys: Tensor) -> Tensor:
    """Whether the mask lets each row read each key: ``(B', H', len(rows), len(keys))`` bool."""
    if spec.mask is None:
        return torch.ones(1, 1, len(rows), len(keys), dtype=torch.bool, device=spec.device)
    b = torch.arange(spec.B, device=spec.device).view(-1, 1, 1, 1)
    h = torch.arange(spec.H, device=spec.device).view(1, -1, 1, 1)
    m = spec.mask.mask_mod(b, h, rows.view(1, 1, -1, 1), keys.view(1, 1, 1, -1), spec.Tq, spec.Tk)
    m = torch.as_tensor(m, device=spec.device)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.expand(m.shape[0], m.shape[1], len(rows), len(keys))


def _reads(spec: AttentionSpec, key_bad: Tensor) -> Tensor:
    """``(B, H, Tq)``: rows that may read a key flagged in ``key_bad (B, H, Tk)``."""
    keys = _nonzero_index(key_bad.any(0).any(0))
    out = torch.zeros(spec.B, spec.H, spec.Tq, dtype=torch.bool, device=spec.device)
    for r0 in range(0, spec.Tq, _ROW_CHUNK):
        r = torch.arange(r0, min(r0 + _ROW_CHUNK, spec.Tq), device=spec.device)
        out[:, :, r] = (_live(spec, r, keys) & key_bad[:, :, keys].unsqueeze(2)).any(-1)
    return out


def _reads_entries(spec: AttentionSpec, bad: Tensor) -> Tensor:
    """``(B, H, Tq)``: rows with a flagged entry of ``bad`` (``(B', H', Tq', Tk')``, broadcastable
    to ``(B, H, Tq, Tk)``) that the mask lets through."""
    dev = spec.device

    def index(flags: Tensor, n: int) -> Tensor:  # positions flagged, all of them for a broadcast dim
        if flags.numel() == n:
            return _nonzero_index(flags)
        return torch.arange(n, device=dev) if bool(flags.any()) else torch.zeros(0, dtype=torch.long, device=dev)

    rows = index(bad.any(-1).any(0).any(0), spec.Tq)
    keys = index(bad.any(-2).any(0).any(0), spec.Tk)
    out = torch.zeros(spec.B, spec.H, spec.Tq, dtype=torch.bool, device=dev)
    if len(rows) == 0:
        return out
    sub = bad if bad.shape[-2] == 1 else bad.index_select(2, rows)
    sub = sub if sub.shape[-1] == 1 else sub.index_select(3, keys)      # (B', H', r or 1, j or 1)
    hit = (_live(spec, rows, keys) & sub).any(-1)                          # (B'', H'', r)
    out[:, :, rows] = hit.expand(spec.B, spec.H, len(rows))
    return out
