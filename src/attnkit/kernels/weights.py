"""Attention weights from the tiled engine, for ``return_weights`` (``output_attentions``).

Two ways, both exact and both writing the returned ``(B, H', Tq', Tk)`` tensor directly, one
row block at a time, so that the only ``Tq x Tk`` memory is the result itself:

* :func:`tiled_weights` recomputes chosen heads and rows from the log-sum-exp the forward saved
  (``p = e^(s - lse)``), at a cost ``O(len(heads) · len(rows) · Tk)``: what
  :func:`attnkit.capture` uses for a few rows of a long sequence.
* :func:`weights_pass` serves a request for *every* weight that needs no gradient (a model run
  under ``torch.no_grad()`` with ``output_attentions=True``): one pass over the rows computes
  each row block's scores over its live key range, normalizes them in place, copies them into
  the result and multiplies them by ``v`` for the output, so the scores are computed once
  instead of once by the forward and again for the weights.
"""

from __future__ import annotations

import mmap

import torch

from ..spec import AttentionSpec
from .plan import Plan
from .tile import NEG_INF, Tile, expand, normalizer_kind, probabilities

Tensor = torch.Tensor

#: the row stripe of scores a :func:`weights_pass` step holds (reused; glibc maps and zeroes fresh
#: pages for every allocation over 32 MiB, so one buffer is kept under it where the rows allow)
STRIPE_BYTES = 32 << 20


#: results at least this large are fresh private mappings (zero until written; see :func:`zeros_result`)
LAZY_ZEROS_BYTES = 64 << 20


def zeros_result(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """A zero tensor for weights that are mostly written once. A large CPU result is a fresh
    private anonymous mapping (``mmap``, as ``calloc`` gives): its pages read as zero and take no
    memory until written, so the keys a mask hides (half of a causal matrix, all but a band for a
    sliding window) cost neither the time to write zeros nor the RAM to hold them."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu" and nbytes > 0 and nbytes >= LAZY_ZEROS_BYTES and hasattr(mmap, "MAP_PRIVATE"):
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
    return torch.zeros(shape, dtype=dtype, device=device)


def weights_pass(qp: Tensor, kp: Tensor, v: Tensor, spec: AttentionSpec, plan: Plan,
                 weights_dtype: torch.dtype | None = None, average: bool = False) -> tuple[Tensor, Tensor]:
    """``out (B, H, Tq, Dv)`` and every weight ``(B, H, Tq, Tk)`` in one pass (no dropout, no
    autograd: the caller checks); with ``average``, their mean over the heads ``(B, 1, Tq, Tk)``,
    each stripe's heads summed as it is computed. For each query block of ``plan``, its live keys
    ``[first run start, last run stop)`` are scored in one matmul (``s = q kᵀ`` with GQA's query
    heads grouped over their key head, so K is never repeated), the mask is applied where the
    plan says a tile is partial (or skipped), and then, in place::

        softmax:   p = e^(s - rowmax) / Σ e^(s - rowmax)     (rows with no live key: 0)
        sigmoid:   p = σ(s + offset)
        normalize: p = s / (Σ s + eps)

    ``p`` is copied into the result (zeros outside the live range) and ``out = p v``.

    Example::

        >>> import torch, attnkit
        >>> q = k = v = torch.randn(1, 2, 300, 8)
        >>> with torch.no_grad():
        ...     out, w = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), return_weights=True, backend="tiled")
        >>> ref = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), return_weights=True, backend="reference")
        >>> torch.allclose(w, ref[1], atol=1e-6) and torch.allclose(out, ref[0], atol=1e-5)
        True
    """
    B, H, G, Tq, Tk = spec.B, spec.H, spec.groups, spec.Tq, spec.Tk
    Hkv, D, Dv = H // G, qp.shape[-1], v.shape[-1]
    dev, dt = qp.device, qp.dtype
    kind = normalizer_kind(spec)
    offset = spec.normalizer.offset(Tk) if kind == "sigmoid" else 0.0
    tile = Tile(spec, dev, plan.prescaled)
    dot = spec.score.tile_is_dot
    w = zeros_result((B, 1 if average else H, Tq, Tk), weights_dtype or dt, dev)  # keys outside a block's live range stay 0
    out = torch.zeros(B, H, Tq, Dv, dtype=dt, device=dev)
    kT = kp.transpose(-2, -1)                                   # (B, Hkv, D, Tk)
    per_row = B * H * Tk * qp.element_size()
    rows_per = max(1, min(plan.block_q, STRIPE_BYTES // per_row))
    buf = torch.empty(B * H * rows_per * Tk, dtype=dt, device=dev) if dot else None
    for (bs, be), runs in zip(plan.q_blocks, plan.runs):
        if not runs:  # no live key for the whole block: its weights stay 0
            continue
        ks, ke = runs[0].start, runs[-1].stop
        # what the mask hides inside [ks, ke): the partial runs (evaluated) and the gaps between runs
        gaps = [(a.stop - ks, b.start - ks) for a, b in zip(runs, runs[1:]) if a.stop != b.start]
        partial = [r for r in runs if r.partial]
        for qs in range(bs, be, rows_per):
            qe = min(qs + rows_per, be)
            n, kw = qe - qs, ke - ks
            grid = tile.grid(qs, qe, ks, ke)
            if dot:  # (B, Hkv, G·n, D) @ (B, Hkv, D, kw): the group's queries share their key head
                qi = qp[:, :, qs:qe].reshape(B, Hkv, G * n, D)
                raw = torch.matmul(qi, kT[..., ks:ke], out=buf[:B * H * n * kw].view(B, Hkv, G * n, kw))
                s = tile.scores(None, None, qs, ks, grid, raw=raw.view(B, H, n, kw))
            else:
                s = tile.scores(qp[:, :, qs:qe], expand(kp[:, :, ks:ke], G), qs, ks, grid)

            def hide(x: Tensor, value: float) -> Tensor:
                for a, z in gaps:
                    x[..., a:z] = value
                for r in partial:
                    allowed = tile.allowed(tile.grid(qs, qe, r.start, r.stop))
                    x[..., r.start - ks:r.stop - ks].masked_fill_(~allowed, value)
                return x

            if kind == "sigmoid":
                p = hide(s.add_(offset).sigmoid_(), 0.0)
            elif kind == "normalize":
                p = hide(s, 0.0)
                den = p.sum(-1, keepdim=True).add_(spec.normalizer.eps)
                p = p.div_(den.masked_fill_(den == 0, 1.0))
            else:
                s = hide(s, NEG_INF)
                m = s.amax(-1, keepdim=True)
                p = s.sub_(m.masked_fill_(m == NEG_INF, 0.0)).exp_()
                den = p.sum(-1, keepdim=True)
                p = p.div_(den.masked_fill_(den == 0, 1.0))
            if average:
                w[:, 0, qs:qe, ks:ke] = p.sum(1).div_(H)
            else:
                w[:, :, qs:qe, ks:ke] = p
            out[:, :, qs:qe] = (p.reshape(B, Hkv, G * n, kw) @ v[:, :, ks:ke]).view(B, H, n, Dv)
    return out, w


def tiled_weights(qp: Tensor, kp: Tensor, spec: AttentionSpec, lse: Tensor | None,
                  heads: tuple[int, ...] | None = None, rows: tuple[int, ...] | None = None,
                  block_q: int = 128, kv_chunk: int = 1024, prescaled: bool = False,
                  average: bool = False, lse_block: int | None = None) -> Tensor:
    """Exact weights ``(B, len(heads), len(rows), Tk)`` (all heads / rows when None), recomputed
    from the saved log-sum-exp block by block: cost ``O(len(heads) · len(rows) · Tk)``; with
    ``average``, their mean over those heads ``(B, 1, len(rows), Tk)``, summed block by block.
    ``lse_block``: the rows whose lse shares one bias reference on a prescaled plan (the eager
    body's query block, the default ``block_q``; 1 for the fused body's exact-score lse)."""
    dev = qp.device
    heads_t = torch.arange(spec.H, device=dev) if heads is None else torch.tensor(heads, device=dev)
    rows_t = torch.arange(spec.Tq, device=dev) if rows is None else torch.tensor(rows, device=dev)
    q_sel = qp.index_select(1, heads_t)                        # (B, h', Tq, D)
    k_sel = kp.index_select(1, heads_t // spec.groups)         # key head of each query head
    lse_sel = None if lse is None else lse.index_select(1, heads_t)
    w = zeros_result((spec.B, 1 if average else len(heads_t), len(rows_t), spec.Tk), qp.dtype, dev)  # masked-out chunks stay 0
    tile = Tile(spec, dev, prescaled)
    tile.rows_block = block_q if lse_block is None else lse_block  # the reference of row i's lse
    b = torch.arange(spec.B, device=dev).view(-1, 1, 1, 1)
    h = heads_t.view(1, -1, 1, 1)
    for r0 in range(0, len(rows_t), block_q):
        r = rows_t[r0:r0 + block_q]
        qi = q_sel.index_select(2, r)
        lse_i = None if lse_sel is None else lse_sel.index_select(2, r)
        for ks in range(0, spec.Tk, kv_chunk):
            ke = min(ks + kv_chunk, spec.Tk)
            grid = (b, h, r.view(1, 1, -1, 1), torch.arange(ks, ke, device=dev).view(1, 1, 1, -1))
            allowed = None if spec.mask is None else tile.allowed(grid)
            if allowed is not None and not bool(allowed.any()):  # a masked-out chunk (e.g. above the diagonal)
                continue
            s = tile.scores(qi, k_sel[:, :, ks:ke], 0, ks, grid)
            p = probabilities(s, lse_i, spec, allowed)
            if average:
                w[:, 0, r0:r0 + len(r), ks:ke] = p.sum(1).div_(len(heads_t))
            else:
                w[:, :, r0:r0 + len(r), ks:ke] = p
    return w
