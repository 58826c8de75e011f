r"""Ring attention: exact attention over a sequence split across the ranks of a process group.

Each of the ``R`` ranks holds a shard of the sequence (see :mod:`attnkit.distributed.layout`):
its queries ``q (B, H, n_q, D)`` and its keys and values ``k (B, Hkv, n_k, D)``,
``v (B, Hkv, n_k, Dv)``. The K/V shards travel around the ring (``rank → rank + 1``, with
``torch.distributed.batch_isend_irecv``; the next shard is in flight while the current one is
computed), and every rank merges the blocks it computes into its rows' output (Liu et al. 2023,
"Ring Attention with Blockwise Transformers"; Brandon et al. 2023, "Striped Attention"; the
zigzag layout and the backward follow zhuzilin/ring-flash-attention).

Global positions: a rank evaluates masks and score mods on the *global* indices of its
queries and of the shard's keys, with the global lengths ``Tq = R·n_q`` and ``Tk = R·n_k``, so
every mask and bias means what it means on one process (causal alignment, ALiBi distances,
``sliding_window`` bounds, key padding lengths, ...).

Skipping: each block is a grid of tiles (one per pair of chunks). Tiles are classified EMPTY /
PARTIAL / FULL before the ring, by the mask's closed-form ``classify_blocks`` on the global grid
of chunks when it has one (causal, windows, chunked, key padding, block-sparse, BigBird and
their ``&``/``|``/``~``), else by evaluating the mask on each tile. EMPTY tiles are never
computed, and the ring stops after the largest distance any rank needs: a sliding window
narrower than a shard over the contiguous layout needs 2 ring steps, not ``R``.
"""

from __future__ import annotations

import time

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..masks.base import EMPTY, FULL, PARTIAL, And, Mask, Not, Or
from ..normalizers.base import Sigmoid, Softmax
from ..positions.base import FromBias, FromScoreMod, TensorBias
from ..spec import AttentionSpec, canonicalize
from ._group import check_4d, GroupInfo, agree, dtype_code, dtype_name, group_info
from ..kernels.dropout import draw_seed
from ..nonfinite import inputs_finite
from .block import ForwardState, block_backward, block_forward, is_sigmoid, tile_class
from .layout import LAYOUTS, Chunk, check_layout, shard_chunks

Tensor = torch.Tensor
_FN = "ring_attention"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class RingStats:
    """What one :func:`ring_attention` call did on this rank (pass ``stats=RingStats()``; the
    forward fills the first fields, the backward the ``backward_*`` ones).

    Attributes:
        rank, world_size, layout: this rank, the group size and the sequence layout.
        steps: ring steps, i.e. K/V shards that reached this rank (its own included); fewer than
            ``world_size`` when no rank needs the far shards (a narrow sliding window).
        shards_computed: the ranks whose K/V shard this rank computed on in the forward, in ring
            order (its own first); a shard whose tiles are all masked is skipped.
        tiles_computed, tiles_total: (query chunk, key chunk) tiles computed in the forward, out of
            all of this rank's tiles (``world_size`` shards × 1 tile, or 2 × 2 in zigzag).
        backward_shards_computed, backward_tiles_computed: the same for the backward.
        bytes_sent, backward_bytes_sent: bytes this rank sent in the forward and in the backward
            (K/V shards; dK/dV partial sums).
        wait_seconds, backward_wait_seconds: time spent waiting for exchanges to complete (the
            communication that computation did not hide).
    """

    rank: int = -1
    world_size: int = 0
    layout: str = ""
    steps: int = 0
    shards_computed: list[int] = field(default_factory=list)
    tiles_computed: int = 0
    tiles_total: int = 0
    backward_shards_computed: list[int] = field(default_factory=list)
    backward_tiles_computed: int = 0
    #: bytes this rank sent, and seconds it spent waiting on the exchanges, forward and backward
    bytes_sent: int = 0
    wait_seconds: float = 0.0
    backward_bytes_sent: int = 0
    backward_wait_seconds: float = 0.0

    @property
    def num_shards_computed(self) -> int:
        """How many K/V shards this rank computed on in the forward."""
        return len(self.shards_computed)


@dataclass(frozen=True, eq=False)
class _RingPlan:
    spec: AttentionSpec
    info: GroupInfo
    layout: str
    q_chunks: tuple[Chunk, ...]               # this rank's query chunks
    kv_chunks: tuple[tuple[Chunk, ...], ...]  # every rank's key chunks
    status: tuple                             # status[src][i][j]: this rank's tiles against shard src
    steps: int
    stats: Optional[RingStats]
    seed: Optional[int] = None                # dropout's (rank 0's draw, shared by every rank)
    k_lens: tuple[int, ...] = ()              # every rank's key shard length (contiguous shards may differ)

    def kv_shapes(self, src: int, kp: Tensor, v: Tensor):
        """The shapes of rank ``src``'s K and V shards (this rank's ``kp``, ``v`` give the rest)."""
        n = self.k_lens[src]
        return (*kp.shape[:2], n, kp.shape[3]), (*v.shape[:2], n, v.shape[3])

    def kv_buffer(self, src: int, kp: Tensor, v: Tensor) -> Tensor:
        """An empty packed K/V buffer the size of rank ``src``'s shard."""
        (B, Hkv, n, D), (_, _, _, Dv) = self.kv_shapes(src, kp, v)
        return kp.new_empty(B * Hkv * n * (D + Dv))


# -- checks -------------------------------------------------------------------------------------
def _global_like(x: Tensor, length: int) -> Tensor:
    """A stand-in of ``x`` with the global sequence length (no memory: an expanded scalar), so the
    request can be validated by :func:`attnkit.canonicalize` with the global sizes."""
    t = torch.zeros((), dtype=x.dtype, device=x.device)
    if x.requires_grad:
        t = t.requires_grad_()
    return t.expand(x.shape[0], x.shape[1], length, x.shape[3])


def _unsupported(spec: AttentionSpec) -> Optional[str]:
    n = spec.normalizer
    if type(n) not in (Softmax, Sigmoid):
        return (f"normalizer must be 'softmax' (or normalizers.Softmax(temperature)) or 'sigmoid' (or "
                f"normalizers.Sigmoid(bias)), whose blocks merge exactly across K/V shards; got {n!r}. A "
                "normalizer that needs a whole row at once (sparsemax, entmax, top-k, ...) cannot be split over "
                "the ring: use attnkit.distributed.ulysses_attention, which gives each rank whole rows of "
                "H / R heads")
    s = spec.score
    if not (s.tile_is_dot and s.tileable) or any(p.requires_grad for p in s.tile_parameters()):
        return (f"score must be a dot-product score ('dot', 'scaled_dot', 'cosine', scores.Cosine, "
                f"scores.General); got {s.name!r} ({type(s).__name__}); use attnkit.distributed.ulysses_attention "
                "for other scores")
    if spec.return_weights:
        return ("return_weights must be False: the weights of a sharded sequence are never materialized "
                "(use attnkit.distributed.ulysses_attention, or attnkit.attention on gathered tensors)")
    if spec.mask is not None and spec.mask.has_weight_factor:
        return (f"mask must not have a weight factor (local_p reweights the normalized weights); got "
                f"{spec.mask!r}; use attnkit.distributed.ulysses_attention")
    grad_mods = _grad_mods(spec)
    if grad_mods:
        return (f"bias {', '.join(grad_mods)} is a function that reads a tensor requiring grad, which "
                "the ring backward cannot find: make it an attnkit.positions.ScoreMod that is also a "
                "torch.nn.Module holding the tensor as a parameter (its gradient is then computed)")
    return None


def _grad_mods(spec: AttentionSpec) -> list[str]:
    """The bias functions whose result needs a gradient (they close over a tensor requiring grad),
    found by evaluating each on one score."""
    if not torch.is_grad_enabled():
        return []
    return [repr(m) for m in spec.score_mods
            if isinstance(m, (FromScoreMod, FromBias)) and m.closes_over_grad(spec.dtype, spec.device)]


def _has_closed_form(mask: Mask) -> bool:
    """Whether ``classify_blocks`` avoids evaluating the predicate on the whole grid."""
    if isinstance(mask, (And, Or)):
        return _has_closed_form(mask.left) and _has_closed_form(mask.right)
    if isinstance(mask, Not):
        return _has_closed_form(mask.inner)
    return type(mask).classify_blocks is not Mask.classify_blocks


def _status_table(spec: AttentionSpec, q_chunks: Sequence[Chunk], kv_chunks: Sequence[Sequence[Chunk]],
                  device) -> tuple:
    """``status[src][i][j]``: the class of the tile (this rank's query chunk ``i``, key chunk ``j``
    of rank ``src``)."""
    if spec.mask is None:
        return tuple(tuple(tuple(FULL for _ in kcs) for _ in q_chunks) for kcs in kv_chunks)
    cq, ck = q_chunks[0].length, kv_chunks[0][0].length
    uniform = all(c.length == cq and c.start % cq == 0 for c in q_chunks) and all(
        c.length == ck and c.start % ck == 0 for kcs in kv_chunks for c in kcs)
    if uniform and _has_closed_form(spec.mask):  # (uneven contiguous shards: evaluated tile by tile below)
        cls = spec.mask.classify_blocks(spec.Tq, spec.Tk, cq, ck, spec.B, spec.H, device=device).flatten(0, 1)
        empty, full = (cls == EMPTY).all(0).cpu(), (cls == FULL).all(0).cpu()
        table = torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).tolist()
        return tuple(tuple(tuple(table[qc.start // cq][kc.start // ck] for kc in kcs) for qc in q_chunks)
                     for kcs in kv_chunks)
    return tuple(tuple(tuple(tile_class(spec, spec.B, spec.H, qc, kc, device) for kc in kcs) for qc in q_chunks)
                 for kcs in kv_chunks)


def _bias_params(spec: AttentionSpec) -> list[Tensor]:
    """Tensors read by the score mods that need gradients (learnable bias tables, bias tensors)."""
    if not torch.is_grad_enabled():
        return []
    params: list[Tensor] = []
    for mod in spec.score_mods:
        if isinstance(mod, torch.nn.Module):
            params += [p for p in mod.parameters() if p.requires_grad]
        elif isinstance(mod, TensorBias) and mod.source.requires_grad:
            params.append(mod.source)
    return params


def _describe(s: Sequence[int]) -> str:
    B, H, Hkv, nq, nk, D, Dv, dt, lay = s
    nq, nk = ("n" if nq < 0 else nq), ("n" if nk < 0 else nk)  # contiguous: any length
    return (f"q ({B}, {H}, {nq}, {D}), k ({B}, {Hkv}, {nk}, {D}), v ({B}, {Hkv}, {nk}, {Dv}), "
            f"{dtype_name(dt)}, layout {LAYOUTS[lay] if 0 <= lay < len(LAYOUTS) else '?'!r}")


# -- communication ------------------------------------------------------------------------------
class _Traffic:
    """Bytes sent and seconds waited by one pass of the ring."""

    def __init__(self):
        self.bytes, self.seconds = 0, 0.0

    def exchange(self, info: GroupInfo, send: Tensor, recv: Tensor, to: int, frm: int, tag: int) -> list:
        """Post ``send → rank to`` and ``recv ← rank frm`` (group ranks) and return the works."""
        import torch.distributed as dist

        self.bytes += send.numel() * send.element_size()
        ops = [dist.P2POp(dist.isend, send, info.peer(to), info.group, tag),
               dist.P2POp(dist.irecv, recv, info.peer(frm), info.group, tag)]
        return dist.batch_isend_irecv(ops)

    def wait(self, works: list) -> None:
        t = time.perf_counter()
        for w in works:
            w.wait()
        self.seconds += time.perf_counter() - t


def _pack(k: Tensor, v: Tensor) -> Tensor:
    return torch.cat([k.reshape(-1), v.reshape(-1).to(k.dtype)])


def _unpack(buf: Tensor, k_shape, v_shape) -> tuple[Tensor, Tensor]:
    nk = 1
    for s in k_shape:
        nk *= s
    return buf[:nk].view(k_shape), buf[nk:].view(v_shape)


def _live(status_src) -> bool:
    return any(c != EMPTY for row in status_src for c in row)


# -- forward and backward -----------------------------------------------------------------------
def _ring_forward(qp: Tensor, kp: Tensor, v: Tensor, plan: _RingPlan) -> tuple[Tensor, Optional[Tensor]]:
    info, spec = plan.info, plan.spec
    rank, R = info.rank, info.world_size
    state = ForwardState.new(qp, v.shape[-1], is_sigmoid(spec))
    buf = _pack(kp, v) if plan.steps > 1 else None
    shards, tiles, net = [], 0, _Traffic()
    for t in range(plan.steps):
        src = (rank - t) % R
        works, nxt = [], None
        if t + 1 < plan.steps:  # the next shard travels while this one is computed
            nxt = plan.kv_buffer((src - 1) % R, kp, v)
            works = net.exchange(info, buf, nxt, rank + 1, rank - 1, tag=0)
        k_t, v_t = (kp, v) if t == 0 else _unpack(buf, *plan.kv_shapes(src, kp, v))
        if _live(plan.status[src]):
            shards.append(src)
            tiles += block_forward(qp, k_t, v_t, spec, plan.q_chunks, plan.kv_chunks[src], plan.status[src], state,
                                   plan.seed)
        net.wait(works)
        buf = nxt if nxt is not None else buf
    if plan.stats is not None:
        st = plan.stats
        st.rank, st.world_size, st.layout, st.steps = rank, R, plan.layout, plan.steps
        st.shards_computed, st.tiles_computed = shards, tiles
        st.tiles_total = R * len(plan.q_chunks) * len(plan.kv_chunks[0])
        st.backward_shards_computed, st.backward_tiles_computed = [], 0
        st.bytes_sent, st.wait_seconds, st.backward_bytes_sent, st.backward_wait_seconds = net.bytes, net.seconds, 0, 0.0
    return state.finish()


def _ring_backward(qp: Tensor, kp: Tensor, v: Tensor, out: Tensor, lse: Optional[Tensor], dout: Tensor,
                   plan: _RingPlan, params: Sequence[Tensor]):
    """K/V travel around the ring again, followed by the buffer that accumulates their gradient:
    at step ``t >= 1`` rank ``r`` adds its block's ``dK``, ``dV`` for shard ``r - t`` to the partial
    sum received from rank ``r - 1`` and passes it on; the last step hands the sum to the shard's
    owner, which adds its own part (kept since step 0). So each rank sends its K/V and a partial
    dK/dV ``steps - 1`` times: with every shard visited, ``2 (R - 1) / R`` of the full K and V,
    the least a ring can send."""
    info, spec = plan.info, plan.spec
    rank, R, S = info.rank, info.world_size, plan.steps
    sigmoid = is_sigmoid(spec)
    dq = torch.zeros_like(qp)
    dparams = [torch.zeros_like(p) for p in params]
    delta = None if sigmoid else (dout * out).sum(-1, keepdim=True)
    kv = _pack(kp, v)
    incoming, in_works, own = None, [], None
    shards, tiles, net = [], 0, _Traffic()
    for t in range(S):
        src = (rank - t) % R
        kv_works, kv_next = [], None
        if t + 1 < S:
            kv_next = plan.kv_buffer((src - 1) % R, kp, v)
            kv_works = net.exchange(info, kv, kv_next, rank + 1, rank - 1, tag=0)
        shapes = plan.kv_shapes(src, kp, v)
        k_t, v_t = _unpack(kv, *shapes)
        if incoming is not None:  # the partial dK/dV of shard src from the ranks before this one:
            net.wait(in_works)    # this rank adds its part to it
            dkv = incoming
        else:
            dkv = torch.zeros_like(kv)
        dk_t, dv_t = _unpack(dkv, *shapes)
        if _live(plan.status[src]):
            shards.append(src)
            tiles += block_backward(qp, k_t, v_t, dout, lse, delta, spec, plan.q_chunks, plan.kv_chunks[src],
                                    plan.status[src], params, dq, dk_t, dv_t, dparams, plan.seed)
        if t == 0:
            own = dkv  # this rank's part of its own shard's gradient: the others' parts come back at the end
        else:
            if t + 1 < S:
                incoming = plan.kv_buffer((src - 1) % R, kp, v)
                in_works = net.exchange(info, dkv, incoming, rank + 1, rank - 1, tag=1)
            else:  # the others' sum for shard src goes to its owner; ours comes to us
                back = torch.empty_like(own)
                net.wait(net.exchange(info, dkv, back, src, rank + S - 1, tag=2))
                own += back
        net.wait(kv_works)
        kv = kv_next if kv_next is not None else kv
    dk, dv = _unpack(own, kp.shape, v.shape)
    if plan.stats is not None:
        st = plan.stats
        st.backward_shards_computed, st.backward_tiles_computed = shards, tiles
        st.backward_bytes_sent, st.backward_wait_seconds = net.bytes, net.seconds
    return dq, dk, dv.to(v.dtype), dparams  # views of one buffer: no copy


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp, kp, v, plan, *params):
        dtype = qp.dtype
        if dtype in _LOW_PRECISION:  # accumulate (and pass around) in float32, as fused kernels do
            qp, kp, v = qp.float(), kp.float(), v.float()
        out, lse = _ring_forward(qp, kp, v, plan)
        ctx.save_for_backward(qp, kp, v, out, *(() if lse is None else (lse,)))
        ctx.plan, ctx.params, ctx.dtype = plan, params, dtype
        return out.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        qp, kp, v, out = saved[:4]
        lse = saved[4] if len(saved) > 4 else None
        dq, dk, dv, dparams = _ring_backward(qp, kp, v, out, lse, dout.to(qp.dtype).contiguous(), ctx.plan,
                                             ctx.params)
        dt = ctx.dtype
        return (dq.to(dt), dk.to(dt), dv.to(dt), None, *(g.to(p.dtype) for g, p in zip(dparams, ctx.params)))


# -- the public function ------------------------------------------------------------------------
def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, mask=None, bias=None, score="scaled_dot",
                   normalizer="softmax", scale: Optional[float] = None, layout: str = "zigzag",
                   dropout_p: float = 0.0, return_weights: bool = False,
                   stats: Optional[RingStats] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""Exact attention over a sequence sharded across the ranks of ``group``, K/V passed around a ring.

    With ``R`` ranks, rank ``r`` holds the positions ``P_r`` of the global sequence (``layout``) and
    computes its rows of the single-process result

    .. math::
        \mathrm{out}_i = \sum_{j} w_{ij} v_j,\qquad
        w_{i\cdot} = \mathrm{normalizer}\big(\mathrm{mod}(\mathrm{scale}\cdot q_i\cdot k_j,\ b, h, i, j)
        \ \text{over the keys } j \text{ the mask allows}\big),\qquad i \in P_r,

    where ``i``, ``j`` are global positions and every mask and score mod sees the global lengths
    ``Tq``, ``Tk`` (the sums of the ranks' shard lengths: ``R·n`` in the zigzag layout, whose shards
    are equal; contiguous shards may differ in length, rank ``r`` then holding the positions after
    those of ranks ``0 … r-1``). Softmax blocks merge by log-sum-exp (online softmax); sigmoid
    blocks add. The backward (a custom autograd function) passes K/V around the ring again with the
    accumulating dK/dV and recomputes each block's weights from the saved log-sum-exp.

    Args:
        q: this rank's queries ``(B, H, n_q, D)``.
        k: this rank's keys ``(B, Hkv, n_k, D)``, ``H % Hkv == 0`` (GQA/MQA).
        v: this rank's values ``(B, Hkv, n_k, Dv)``. ``n_q != n_k`` is allowed (cross-attention with
            both sequences sharded in the same layout).
        group: a ``torch.distributed`` process group (None: the default group).
        mask: an :mod:`attnkit.masks` object (causal, sliding window, chunked, key padding with
            global lengths, block sparse, Longformer, BigBird, ... and their ``&``, ``|``, ``~``), a
            ``mask_mod(b, h, q_idx, kv_idx)`` callable, or a bool tensor broadcastable to the *global*
            ``(B, H, Tq, Tk)`` (every rank passes the whole tensor).
        bias: score mods as in :func:`attnkit.attention`: ALiBi, T5 relative buckets (learnable),
            softcap, ``score_mod(score, b, h, q_idx, kv_idx)`` callables, ``bias_mod`` functions, float
            tensors broadcastable to the global ``(B, H, Tq, Tk)``, or a list of these.
        score: ``"scaled_dot"`` (default), ``"dot"``, ``"cosine"`` or another dot-product score
            (``scores.Cosine``, ``scores.General``; their per-token ``prepare`` runs on each shard).
        normalizer: ``"softmax"`` (``normalizers.Softmax(temperature)``) or ``"sigmoid"``
            (``normalizers.Sigmoid(bias)``; ``"log_n"`` uses the global ``Tk``).
        scale: multiplies the score; default ``1/sqrt(D)`` for ``scaled_dot``, else 1.
        layout: ``"zigzag"`` (default; balances causal work) or ``"contiguous"``; how the shards were
            cut (see :func:`shard`).
        dropout_p: dropout on the weights, with the counter-based mask of
            :mod:`attnkit.kernels.dropout` at global positions: the weights one process drops for
            the same seed. The seed is drawn from ``generator`` (default torch's) on rank 0 and
            shared with every rank.
        return_weights: must be False (not supported here).
        generator: a ``torch.Generator`` making dropout reproducible.
        stats: a :class:`RingStats` to fill with what this rank computed (shards, tiles, steps).

    Returns:
        ``out (B, H, n_q, Dv)``: this rank's rows, equal to the single-process
        ``attnkit.attention`` on the gathered tensors. Rows with no allowed key give 0. NaN and inf
        inputs follow attnkit's policy (:mod:`attnkit.nonfinite`) as one process applies it: the
        output entries that read them are NaN, nothing else, and gradients stay finite (the check
        is one sum per rank; the ranks share where the bad entries are only when there are any).

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: on every rank, when any rank's arguments are invalid or unsupported (a
            normalizer other than softmax/sigmoid, weights, ...; the message names the
            argument and what is supported), when the ranks' shapes, dtypes, layouts or
            ``requires_grad`` differ, or when a zigzag shard has an odd length. No rank is left
            waiting: one ``all_gather`` of the request precedes the ring.

    Gradients: ``q``, ``k``, ``v`` get the gradient of the sum of every rank's loss (what one process
    would give for the whole sequence). Learnable bias parameters (a ``T5RelativeBias``'s table, a
    bias tensor requiring grad) get this rank's share: sum them over the group (the all-reduce that
    data/context-parallel training does anyway) for the full gradient.

    Example (``torchrun --nproc-per-node 2 script.py``; float64 is exact to rounding)::

        import torch, torch.distributed as dist, attnkit
        from attnkit.distributed import ring_attention, shard, gather
        dist.init_process_group("gloo")
        torch.manual_seed(0)                                  # the same full tensors on every rank
        q, k, v = torch.randn(3, 1, 4, 64, 16, dtype=torch.float64).unbind(0)
        mask = attnkit.masks.sliding_window(8)
        out = ring_attention(*(shard(x, "zigzag") for x in (q, k, v)), mask=mask, layout="zigzag")
        full = gather(out, "zigzag")                          # (1, 4, 64, 16) on every rank
        assert torch.allclose(full, attnkit.attention(q, k, v, mask=mask))
    """
    info = group_info(group, _FN)
    R = info.world_size
    # 1. every rank's shapes: equal on every rank, but for the shard lengths of the contiguous layout
    error: Optional[BaseException] = None
    shared: list[int] = []
    lengths = [0, 0]
    try:
        layout = check_layout(layout, _FN)
        check_4d(_FN, q=q, k=k, v=v)
        if stats is not None and not isinstance(stats, RingStats):
            raise TypeError(f"{_FN}: stats must be None or an attnkit.distributed.RingStats; got "
                            f"{type(stats).__name__}")
        n_q, n_k = q.shape[2], k.shape[2]
        for name, n in (("q", n_q), ("k", n_k)):
            if n == 0:
                raise ValueError(f"{_FN}: every rank needs at least one position; {name} has shard length 0")
            if layout == "zigzag" and n % 2:
                raise ValueError(f"{_FN}: layout 'zigzag' gives each rank two chunks of equal length, so the shard "
                                 f"length must be even (the global length a multiple of 2·R = {2 * R}); "
                                 f"{name} has shard length {n} (shape {tuple(q.shape if name == 'q' else k.shape)}). "
                                 "Pad the sequence or use layout='contiguous'")
        even = layout == "zigzag"  # zigzag shards are equal; contiguous ones may differ
        shared = [q.shape[0], q.shape[1], k.shape[1], n_q if even else -1, n_k if even else -1, q.shape[3],
                  v.shape[3], dtype_code(q.dtype), LAYOUTS.index(layout)]
        lengths = [n_q, n_k]
    except Exception as e:  # noqa: BLE001 -- re-raised after every rank has heard of it
        error = e
    rows = agree(info, _FN, shared or [0] * 9, lengths, error=error, describe=_describe,
                 what="shards of the same shapes and dtype (contiguous shards may differ in length), in the same "
                      "layout")
    q_lens, k_lens = tuple(r[0] for r in rows), tuple(r[1] for r in rows)
    Tq, Tk = sum(q_lens), sum(k_lens)
    # 2. the request at global sizes, this rank's tiles, and how far round the ring they reach
    need = seed = bad = 0
    plan_parts = None
    try:
        try:
            spec = canonicalize(_global_like(q, Tq), _global_like(k, Tk), _global_like(v, Tk),
                                score=score, normalizer=normalizer, mask=mask, bias=bias, scale=scale,
                                dropout_p=dropout_p, return_weights=return_weights, generator=generator)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{_FN} (global sizes Tq = {Tq}, Tk = {Tk} over {R} ranks): {e}") from e
        why = _unsupported(spec)
        if why is not None:
            raise ValueError(f"{_FN}: {why}")
        q_chunks = _rank_chunks(layout, q_lens, info.rank)
        kv_chunks = tuple(_rank_chunks(layout, k_lens, r) for r in range(R))
        status = _status_table(spec, q_chunks, kv_chunks, q.device)
        need = max([(info.rank - src) % R for src in range(R) if _live(status[src])], default=0)
        plan_parts = (spec, q_chunks, kv_chunks, status)
        seed = draw_seed(spec.generator) if spec.dropout_p > 0 else 0
        grad = int(spec.requires_grad)
        if not torch.compiler.is_compiling():
            bad = int(not inputs_finite(q, k, v))  # the NaN policy's one sum (attnkit.nonfinite)
    except Exception as e:  # noqa: BLE001
        error, grad = e, 0
    needs = agree(info, _FN, [grad], [need, seed, bad], error=error,
                  describe=lambda r: f"requires grad {bool(r[0])}", what="all requiring grad or none")
    spec, q_chunks, kv_chunks, status = plan_parts
    steps = max(n[0] for n in needs) + 1
    plan = _RingPlan(spec, info, layout, q_chunks, kv_chunks, status, steps, stats,
                     needs[0][1] if spec.dropout_p > 0 else None, k_lens)
    guard = None
    if any(n[2] for n in needs):  # a NaN or inf on some rank: attnkit's policy, as one process applies it
        q, k, v, guard = _quarantine(q, k, v, plan, q_lens)
    qp, kp = spec.score.prepare(q, k)
    out = _RingAttention.apply(qp, kp, v, plan, *_bias_params(spec))
    return out if guard is None else out.masked_fill(guard, float("nan"))


def _rank_chunks(layout: str, lens: Sequence[int], r: int) -> tuple[Chunk, ...]:
    """The chunks of rank ``r``'s shard given every rank's shard length ``lens``: contiguous
    shards may differ (rank ``r`` holds the positions after ranks ``0 … r-1``), zigzag ones are equal."""
    if layout == "contiguous":
        return (Chunk(0, lens[r], sum(lens[:r])),)
    return shard_chunks(layout, lens[r], r, len(lens))


def _positions(chunks: Sequence[Chunk], device) -> Tensor:
    """The global positions of a shard made of ``chunks``, in the shard's order."""
    return torch.cat([torch.arange(c.start, c.start + c.length, device=device) for c in chunks])


def _gather_global(x: Tensor, plan: _RingPlan, lens: Sequence[int], chunks_of, length: int) -> Tensor:
    """``x (B, H, n_r, ...)`` of every rank put at its global positions along dim 2 (shards may
    differ in length: padded to the longest for the all_gather)."""
    import torch.distributed as dist

    info, longest = plan.info, max(lens)
    flags = x.dtype == torch.bool
    x = x.to(torch.uint8) if flags else x  # (gloo gathers no bool)
    pad = x.new_zeros(*x.shape[:2], longest - x.shape[2], *x.shape[3:])
    mine = torch.cat([x, pad], 2)
    parts = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(parts, mine, group=info.group)
    out = torch.zeros(*x.shape[:2], length, *x.shape[3:], dtype=torch.bool if flags else x.dtype, device=x.device)
    for r, part in enumerate(parts):
        out[:, :, _positions(chunks_of(r), x.device)] = part[:, :, :lens[r]].to(out.dtype)
    return out


def _quarantine(q: Tensor, k: Tensor, v: Tensor, plan: _RingPlan, q_lens: Sequence[int]):
    """attnkit's NaN policy (:mod:`attnkit.nonfinite`) over the ring: every rank zeroes its
    non-finite inputs, the ranks share where they were (global positions), and each finds the
    rows of its own queries that one process would make NaN. Returns ``(q, k, v, bad)`` with
    ``bad`` the ``(B, H, n_q, Dv)`` output entries to set to NaN."""
    from ..nonfinite import Guard

    spec = plan.spec
    with torch.no_grad():
        bq, bk, bv = (~torch.isfinite(x) for x in (q, k, v))
        q_rows = _gather_global(bq.any(-1), plan, q_lens, lambda r: _rank_chunks(plan.layout, q_lens, r), spec.Tq)
        k_keys = _gather_global(bk.any(-1), plan, plan.k_lens, lambda r: plan.kv_chunks[r], spec.Tk)
        v_bad = _gather_global(bv, plan, plan.k_lens, lambda r: plan.kv_chunks[r], spec.Tk)
        guard = Guard(q_rows=q_rows if bool(q_rows.any()) else None,
                      k_keys=k_keys if bool(k_keys.any()) and spec.score.reads_keys else None,
                      v_bad=v_bad if bool(v_bad.any()) else None, bias_bad=None)
        rows, cols = guard.poisoned(spec)                              # (B, H, Tq), (B, H, Tq, Dv) or None
        mine = _positions(plan.q_chunks, q.device)
        bad = rows[:, :, mine].unsqueeze(-1).expand(*rows.shape[:2], len(mine), spec.Dv)
        if cols is not None:
            bad = bad | cols[:, :, mine]
    return q.masked_fill(bq, 0.0), k.masked_fill(bk, 0.0), v.masked_fill(bv, 0.0), bad
