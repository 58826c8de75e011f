"""The distributed cases, run inside spawned gloo groups by :mod:`tests.distributed._harness`.

Each case is ``fn(rank, world)`` and asserts numbers: in float64, the ranks' outputs and the
gradients of their shards equal single-process ``attnkit.attention(..., backend="reference")`` on
the full tensors (every rank draws the same full tensors from one seed), within 1e-10.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import attnkit
from attnkit import masks, normalizers, positions
from attnkit.distributed import RingStats, gather, ring_attention, shard, shard_positions, ulysses_attention

DEFAULT_WORLDS = (2, 3)
LAYOUTS = ("zigzag", "contiguous")
TOL = dict(rtol=1e-10, atol=1e-10)
CASES: dict = {}


def case(name: str, worlds=DEFAULT_WORLDS):
    def register(fn):
        fn.worlds = worlds
        CASES[name] = fn
        return fn
    return register


def _close(got, want, what):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


def _full(world, B, H, Hkv, n, nk, D, Dv, seed=1234):
    g = torch.Generator().manual_seed(seed)
    N, Nk = world * n, world * nk

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return r(B, H, N, D), r(B, Hkv, Nk, D), r(B, Hkv, Nk, Dv), r(B, H, N, Dv)


def compare(fn, world, layout, *, B=2, H=4, Hkv=2, n=8, nk=None, D=8, Dv=6, params=(), ref_kwargs=None,
            **kwargs):
    """``fn(q, k, v, layout=..., **kwargs)`` on the shards against the reference on the full
    tensors: output and the gradients of q, k, v, and of ``params`` (summed over the ranks)."""
    nk = n if nk is None else nk
    q, k, v, g = _full(world, B, H, Hkv, n, nk, D, Dv)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = attnkit.attention(*full, backend="reference", **(ref_kwargs if ref_kwargs is not None else kwargs))
    (ref * g).sum().backward()
    ref_pgrads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    shards = [shard(x, layout).detach().requires_grad_() for x in (q, k, v)]
    out = fn(*shards, layout=layout, **kwargs)
    (out * shard(g, layout)).sum().backward()
    _close(out, shard(ref.detach(), layout), "out")
    for name, s, f in zip("qkv", shards, full):
        _close(s.grad, shard(f.grad, layout), f"d{name}")
    for i, (p, want) in enumerate(zip(params, ref_pgrads)):
        got = p.grad.clone()
        dist.all_reduce(got)
        _close(got, want, f"gradient of parameter {i} (summed over the ranks)")
    return out


def ring(world, layout, **kw):
    return compare(ring_attention, world, layout, **kw)


# -- ring attention: equal to the single-process reference ---------------------------------------
def _score_mod(score, b, h, q_idx, kv_idx):
    return score + 0.3 * torch.cos(0.7 * (q_idx - kv_idx).double()) * (h + 1) - 0.1 * b


def _mask_mod(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx) % 3 != 1) & ((kv_idx <= q_idx) | (h == 1))


RING_CONFIGS = {
    "plain": lambda R: {},
    "causal": lambda R: {"mask": masks.causal()},
    "window": lambda R: {"mask": masks.sliding_window(3)},
    "window_bidirectional": lambda R: {"mask": masks.sliding_window(2, 5)},
    "causal_and_window": lambda R: {"mask": masks.causal() & masks.sliding_window(6, 6)},
    "window_or_chunked": lambda R: {"mask": masks.sliding_window(1) | masks.chunked(5)},
    "not_causal": lambda R: {"mask": ~masks.causal()},  # the first row has no key: zero output
    "key_padding": lambda R: {"mask": masks.key_padding(torch.tensor([R * 8 - 5, R * 4 + 1])) & masks.causal()},
    "key_padding_keep": lambda R: {"mask": masks.key_padding(torch.arange(R * 8).remainder(5).ne(2).expand(2, -1))},
    "mask_mod": lambda R: {"mask": _mask_mod},
    "bool_tensor_mask": lambda R: {"mask": torch.rand(R * 8, R * 8, generator=torch.Generator().manual_seed(7)) > 0.3},
    "longformer": lambda R: {"mask": masks.longformer(2, [0, 5])},
    "bigbird": lambda R: {"mask": masks.bigbird(block_size=2, random_blocks=1, seed=3)},
    "alibi_causal": lambda R: {"mask": masks.causal(), "bias": positions.ALiBi(4)},
    "alibi_symmetric_window": lambda R: {"mask": masks.sliding_window(4, 4),
                                         "bias": positions.ALiBi(4, symmetric=True)},
    "softcap": lambda R: {"mask": masks.causal(), "bias": positions.softcap(2.0)},
    "score_mod": lambda R: {"mask": masks.sliding_window(5), "bias": _score_mod},
    "bias_mod_and_softcap": lambda R: {"bias": [positions.bias_mod(lambda b, h, i, j: -0.05 * (i - j).abs().double()),
                                                positions.softcap(3.0)]},
    "sigmoid": lambda R: {"normalizer": "sigmoid"},
    "sigmoid_log_n_causal": lambda R: {"normalizer": normalizers.Sigmoid(bias="log_n"), "mask": masks.causal(),
                                       "bias": positions.ALiBi(4)},
    "softmax_temperature": lambda R: {"normalizer": normalizers.Softmax(temperature=0.7), "mask": masks.causal()},
    "dot_scale": lambda R: {"score": "dot", "scale": 0.2, "mask": masks.causal()},
    "cosine": lambda R: {"score": "cosine", "mask": masks.causal()},
    "mha": lambda R: {"Hkv": 4, "mask": masks.causal()},
    "mqa": lambda R: {"Hkv": 1, "mask": masks.sliding_window(4)},
    "cross_attention": lambda R: {"nk": 6, "n": 4},
    "cross_attention_causal": lambda R: {"nk": 6, "n": 4, "mask": masks.causal()},
}

#: also run with 4 ranks (the group of 4 processes is the slowest on a small machine: a few only)
ALSO_R4 = {"causal", "window", "alibi_causal", "mqa", "cross_attention_causal"}

for _name, _cfg in RING_CONFIGS.items():
    for _layout in LAYOUTS:
        def _run(rank, world, _cfg=_cfg, _layout=_layout):
            ring(world, _layout, **_cfg(world))
        case(f"ring[{_name}-{_layout}]", worlds=(2, 3, 4) if _name in ALSO_R4 else DEFAULT_WORLDS)(_run)


@case("ring[float32_bfloat16]", worlds=(2,))
def _low_precision(rank, world):
    q, k, v, _ = _full(world, 1, 4, 2, 8, 8, 16, 16)
    ref = attnkit.attention(q, k, v, mask=masks.causal(), bias=positions.ALiBi(4), backend="reference")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for layout in LAYOUTS:
            shards = [shard(x.to(dtype), layout).requires_grad_() for x in (q, k, v)]
            out = ring_attention(*shards, mask=masks.causal(), bias=positions.ALiBi(4), layout=layout)
            assert out.dtype == dtype
            out.sum().backward()
            assert all(s.grad.dtype == dtype and bool(s.grad.isfinite().all()) for s in shards)
            torch.testing.assert_close(out.double(), shard(ref, layout), rtol=tol, atol=tol)


@case("ring[t5_learnable]")
def _t5(rank, world):
    torch.manual_seed(5)
    t5 = positions.T5RelativeBias(4, num_buckets=8, max_distance=16).double()
    with torch.no_grad():
        t5.embedding.weight.normal_()
    for layout in LAYOUTS:
        ring(world, layout, mask=masks.causal(), bias=t5, params=(t5.embedding.weight,))
        t5.embedding.weight.grad = None


@case("ring[tensor_bias_learnable]")
def _tensor_bias(rank, world):
    N = world * 8
    bias = torch.randn(1, 4, N, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64).requires_grad_()
    for layout in LAYOUTS:
        ring(world, layout, mask=masks.causal(), bias=bias, params=(bias,))
        bias.grad = None


@case("ring[gather_and_no_grad]")
def _gather(rank, world):
    q, k, v, _ = _full(world, 1, 2, 2, 6, 6, 4, 3)
    ref = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    for layout in LAYOUTS:
        with torch.no_grad():
            out = ring_attention(*(shard(x, layout) for x in (q, k, v)), mask=masks.causal(), layout=layout)
        assert not out.requires_grad
        _close(gather(out, layout), ref, f"gather of the ring output ({layout})")
        _close(gather(shard(q, layout), layout), q, f"gather(shard(q)) ({layout})")
        pos = shard_positions(layout, q.shape[2], rank, world)
        _close(shard(q, layout), q[:, :, pos], "shard == q at shard_positions")


@case("ring[gather_backward]")
def _gather_backward(rank, world):
    """A loss every rank computes on the gathered tensor: each shard's gradient is the sum of the
    ranks' gradients at its positions (here every rank's is w, so world * w)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, world * 4, 3, dtype=torch.float64, generator=g)
    w = torch.randn(x.shape, dtype=torch.float64, generator=g)
    for layout in LAYOUTS:
        xs = shard(x, layout).requires_grad_()
        full = gather(xs, layout)
        _close(full, x, f"gather forward ({layout})")
        (full * w).sum().backward()
        _close(xs.grad, world * shard(w, layout), f"gather backward ({layout})")


# -- skipping: which K/V shards each rank computes on --------------------------------------------
def _expected(mask, layout, world, rank, n):
    N = world * n
    allowed = mask.materialize(N, N)[0, 0]
    mine = shard_positions(layout, N, rank, world)
    live = [src for src in range(world)
            if bool(allowed[mine][:, shard_positions(layout, N, src, world)].any())]
    return [src for src in ((rank - t) % world for t in range(world)) if src in live]


def _stats(world, layout, mask, n=8):
    q, k, v, g = _full(world, 1, 2, 2, n, n, 4, 4)
    st = RingStats()
    shards = [shard(x, layout).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*shards, mask=mask, layout=layout, stats=st)
    (out * shard(g, layout)).sum().backward()
    return st


@case("skip[window]", worlds=(2, 3, 4))
def _skip_window(rank, world):
    w = masks.sliding_window(3)  # narrower than a shard (n = 8) and than a zigzag chunk (4)
    st = _stats(world, "contiguous", w)
    # contiguous: a rank needs only its own shard and its left neighbour's; the ring stops after 2 steps
    want = [rank] if rank == 0 else [rank, rank - 1]
    assert st.shards_computed == want, (st.shards_computed, want)
    assert st.backward_shards_computed == want, (st.backward_shards_computed, want)
    assert st.steps == 2, st.steps
    assert st.tiles_computed == len(want) and st.tiles_total == world
    # zigzag: the neighbours of both chunks (the window never reaches further than a chunk)
    st = _stats(world, "zigzag", w)
    want = _expected(w, "zigzag", world, rank, 8)
    assert st.shards_computed == want, (st.shards_computed, want)
    assert len(want) <= 3 and st.num_shards_computed == len(want)
    assert st.backward_shards_computed == want
    assert st.tiles_total == 4 * world


@case("skip[causal_balance]", worlds=(2, 3, 4))
def _skip_causal(rank, world):
    c = masks.causal()
    st = _stats(world, "contiguous", c)
    assert st.shards_computed == list(range(rank, -1, -1)), st.shards_computed  # itself and every rank before
    assert st.tiles_computed == rank + 1
    st = _stats(world, "zigzag", c)
    # zigzag: every rank computes on every shard, but only 2R+1 of its 4R tiles: balanced
    assert sorted(st.shards_computed) == list(range(world))
    assert st.tiles_computed == 2 * world + 1 and st.backward_tiles_computed == 2 * world + 1, st
    assert st.steps == world


@case("skip[bytes_sent]", worlds=(2, 3, 4))
def _skip_bytes(rank, world):
    """The analytic minimum of a ring: each rank sends its K/V shard (steps - 1) times forward, and
    K/V plus a partial dK/dV (steps - 1) times each backward."""
    shard_bytes = 2 * (1 * 2 * 8 * 4) * 8  # K and V: (B=1, Hkv=2, n=8, D=4) float64
    for mask, layout in ((masks.causal(), "zigzag"), (masks.sliding_window(3), "contiguous")):
        st = _stats(world, layout, mask)
        assert st.bytes_sent == (st.steps - 1) * shard_bytes, (st.bytes_sent, st.steps)
        assert st.backward_bytes_sent == 2 * (st.steps - 1) * shard_bytes, (st.backward_bytes_sent, st.steps)
        assert st.wait_seconds >= 0 and st.backward_wait_seconds >= 0


@case("skip[mask_mod_fallback]")
def _skip_mask_mod(rank, world):
    # a mask_mod callable has no closed form: tiles are classified by evaluating it, with the same result
    fn = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (kv_idx >= q_idx - 3)  # noqa: E731
    for layout in LAYOUTS:
        st = _stats(world, layout, fn)
        want = _expected(masks.sliding_window(3), layout, world, rank, 8)
        assert st.shards_computed == want, (layout, st.shards_computed, want)


# -- Ulysses ---------------------------------------------------------------------------------
def uly(world, layout, **kw):
    kw.setdefault("H", 2 * world)
    kw.setdefault("Hkv", world)
    return compare(ulysses_attention, world, layout, **kw)


ULYSSES_CONFIGS = {
    "sparsemax_causal": lambda R: {"normalizer": "sparsemax", "mask": masks.causal()},
    "entmax15_causal": lambda R: {"normalizer": "entmax15", "mask": masks.causal()},
    "softmax_alibi_window": lambda R: {"mask": masks.sliding_window(3), "bias": positions.ALiBi(2 * R)},
    "head_dependent_mods": lambda R: {"mask": lambda b, h, i, j: (j <= i) | (h == 1),
                                      "bias": [lambda s, b, h, i, j: s + 0.2 * h * (i - j).double().abs().sqrt(),
                                               positions.bias_mod(lambda b, h, i, j: 0.1 * h.double())]},
    "per_head_tensor_bias": lambda R: {"bias": torch.randn(1, 2 * R, R * 8, R * 8, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(2))},
    "mha_sigmoid": lambda R: {"Hkv": 2 * R, "normalizer": "sigmoid", "mask": masks.causal()},
    "cross_attention": lambda R: {"n": 4, "nk": 6, "normalizer": "entmax15"},
    "general_per_head": lambda R: {"score": attnkit.scores.General(weight=torch.randn(
        2 * R, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))), "mask": masks.causal()},
}

for _name, _cfg in ULYSSES_CONFIGS.items():
    for _layout in LAYOUTS:
        def _run(rank, world, _cfg=_cfg, _layout=_layout):
            uly(world, _layout, **_cfg(world))
        case(f"ulysses[{_name}-{_layout}]", worlds=(2, 3, 4) if _name == "sparsemax_causal" else DEFAULT_WORLDS)(_run)


@case("ulysses[weights]")
def _uly_weights(rank, world):
    H = 2 * world
    q, k, v, _ = _full(world, 1, H, world, 8, 8, 4, 4)
    ref_out, ref_w = attnkit.attention(q, k, v, normalizer="entmax15", mask=masks.causal(), return_weights=True,
                                       backend="reference")
    for layout in LAYOUTS:
        out, w = ulysses_attention(*(shard(x, layout) for x in (q, k, v)), layout=layout, normalizer="entmax15",
                                   mask=masks.causal(), return_weights=True)
        _close(out, shard(ref_out, layout), "out")
        _close(w, ref_w[:, 2 * rank:2 * rank + 2], "this rank's heads' weights")  # global positions, in order


@case("ulysses[t5_learnable]")
def _uly_t5(rank, world):
    torch.manual_seed(5)
    t5 = positions.T5RelativeBias(2 * world, num_buckets=8, max_distance=16).double()
    with torch.no_grad():
        t5.embedding.weight.normal_()
    uly(world, "zigzag", mask=masks.causal(), bias=t5, params=(t5.embedding.weight,), normalizer="sparsemax")


# -- bad use: the same error on every rank, never a hang ------------------------------------------
def _raises(exc, *fragments):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, typ, val, tb):
            assert typ is not None, f"expected {exc.__name__} mentioning {fragments}; nothing was raised"
            assert issubclass(typ, exc), f"expected {exc.__name__}, got {typ.__name__}: {val}"
            for f in fragments:
                assert f in str(val), f"{f!r} not in the message: {val}"
            return True
    return _Ctx()


@case("bad[zigzag_length]")
def _bad_zigzag(rank, world):
    N = 2 * world + 2  # not a multiple of 2R
    x = torch.zeros(1, 1, N, 2)
    with _raises(ValueError, "zigzag", f"multiple of {2 * world}", str(N)):
        shard(x, "zigzag")
    assert shard(x, "contiguous").shape[2] == N // world if N % world == 0 else True
    with _raises(ValueError, "shard_positions", "zigzag"):
        shard_positions("zigzag", N, rank, world)
    q = torch.zeros(1, 2, 3, 4)  # odd shard length: every rank raises, before any traffic
    with _raises(ValueError, "zigzag", "even"):
        ring_attention(q, q, q, layout="zigzag")
    with _raises(ValueError, "layout must be one of"):
        ring_attention(q, q, q, layout="striped")


@case("bad[uneven_contiguous]")
def _bad_uneven(rank, world):
    with _raises(ValueError, "contiguous", f"multiple of {world}"):
        shard(torch.zeros(1, 1, world * 4 + 1, 2), "contiguous")


@case("bad[ulysses_heads]")
def _bad_heads(rank, world):
    q = torch.zeros(1, world + 1, 4, 4)
    with _raises(ValueError, "ulysses_attention", f"multiple of {world}", f"H = {world + 1}"):
        ulysses_attention(q, q, q, layout="contiguous")
    kv = torch.zeros(1, 1, 4, 4)  # MQA: one key head cannot be split
    with _raises(ValueError, "Hkv"):
        ulysses_attention(torch.zeros(1, world, 4, 4), kv, kv, layout="contiguous")


@case("bad[ulysses_arguments]")
def _bad_uly_args(rank, world):
    q = torch.zeros(1, world, 4, 4)
    with _raises(TypeError, "unexpected keyword", "layouts"):
        ulysses_attention(q, q, q, layouts="zigzag")
    with _raises(ValueError, "sdpa"):  # the local request is validated before any exchange
        ulysses_attention(q, q, q, normalizer="sparsemax", backend="sdpa")
    with _raises(ValueError, "dropout_p"):
        ulysses_attention(q, q, q, dropout_p=0.5)
    bad = torch.ones(1, 1, 3, 3, dtype=torch.bool) if rank == 0 else None  # one rank's mask is wrong
    with _raises(ValueError, "mask" if rank == 0 else "rank(s) [0]"):
        ulysses_attention(q, q, q, mask=bad)


@case("bad[mismatched_shapes]")
def _bad_shapes(rank, world):
    n = 4 if rank == 0 else 6  # rank 0 disagrees: every rank raises, listing every rank's shapes
    q = torch.zeros(1, 2, n, 4)
    with _raises(ValueError, "disagree", "rank 0: q (1, 2, 4, 4)", "rank 1: q (1, 2, 6, 4)"):
        ring_attention(q, q, q, layout="zigzag")  # (contiguous shards may differ in length)
    with _raises(ValueError, "disagree", "rank 0: q (1, 2, n, 4)", "rank 1: q (1, 3, n, 4)"):
        ring_attention(*(torch.zeros(1, 2 if rank == 0 else 3, n, 4),) * 3, layout="contiguous")
    with _raises(ValueError, "disagree"):
        kv = torch.zeros(1, world, n, 4)
        ulysses_attention(torch.zeros(1, 2 * world, n, 4), kv, kv, layout="contiguous")
    with _raises(ValueError, "gather", "disagree"):
        gather(q, "contiguous")
    dt = torch.float64 if rank == world - 1 else torch.float32
    with _raises(ValueError, "disagree", "float64", "float32"):
        ring_attention(*(torch.zeros(1, 2, 4, 4, dtype=dt),) * 3, layout="contiguous")


@case("bad[one_rank_invalid]")
def _bad_one_rank(rank, world):
    q = torch.zeros(1, 2, 4, 4)
    norm = "sparsemax" if rank == 1 else "softmax"
    if rank == 1:
        with _raises(ValueError, "normalizer", "sparsemax", "ulysses_attention"):
            ring_attention(q, q, q, normalizer=norm, layout="contiguous")
    else:
        with _raises(ValueError, "rank(s) [1]"):
            ring_attention(q, q, q, normalizer=norm, layout="contiguous")


@case("bad[unsupported_arguments]")
def _bad_args(rank, world):
    q = torch.zeros(1, 2, 4, 4)
    with _raises(ValueError, "normalizer", "entmax", "ulysses_attention"):
        ring_attention(q, q, q, normalizer="entmax15")
    with _raises(ValueError, "return_weights"):
        ring_attention(q, q, q, return_weights=True)
    with _raises(ValueError, "score", "additive"):
        ring_attention(q, q, q, score=attnkit.scores.Additive(4, 4, 3))
    with _raises(ValueError, "weight factor"):
        ring_attention(q, q, q, mask=masks.local_p(torch.zeros(1, 4 * world), 2))
    w = torch.ones((), requires_grad=True)
    with _raises(ValueError, "bias", "ScoreMod"):
        ring_attention(q, q, q, bias=lambda s, b, h, i, j: s * w)
    with _raises(ValueError, "global sizes", "mask"):  # a tensor mask must cover the global sequence
        ring_attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.bool))
    with _raises(ValueError, "ALiBi"):
        ring_attention(q, q, q, bias=positions.ALiBi(3))
    with _raises(TypeError, "group"):
        ring_attention(q, q, q, group=object())
    with _raises(TypeError, "stats"):
        ring_attention(q, q, q, stats={})
    # after all of that the group still works
    out = ring_attention(q + 1, q + 1, q + 1, layout="zigzag")
    assert torch.equal(out, torch.ones_like(out))


# -- data parallelism: attnkit.training.fit over the group -------------------------------------------
def _fit_run(parallel: bool, steps: int = 50, sizes=(7, 16, 1, 12), by_tokens: bool = True, bad_rank=None,
             max_seconds=None):
    """A small float64 model trained by ``fit`` for ``steps`` steps on global batches whose sizes
    cycle through ``sizes`` (one smaller than some worlds: a rank gets no rows); the loss is a mean
    over 'tokens' (a row's count varies) when ``by_tokens``. Returns (losses per step, parameters)."""
    from attnkit.training import fit

    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    if parallel:  # rank 0's weights reach every rank
        with torch.no_grad():
            for p in model.parameters():
                p.add_(dist.get_rank())
    g = torch.Generator().manual_seed(3)
    data = []
    for i in range(steps):
        B = sizes[i % len(sizes)]
        x, y = torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
        tokens = torch.randint(1, 4, (B,), generator=g)  # each row's weight in the mean
        data.append((x, y, tokens))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []

    def step(batch):
        x, y, tokens = batch
        per_row = ((model(x) - y) ** 2).mean(-1)
        if bad_rank is not None and parallel and dist.get_rank() == bad_rank and len(losses) == 3:
            per_row = per_row * float("nan")
        if by_tokens:
            return (per_row * tokens).sum() / tokens.sum(), tokens.sum()
        return per_row.mean()

    def remember(epoch, hist):
        losses.append(hist.losses[-1])

    hist = fit(model, opt, lambda e: data[e:e + 1], step, epochs=steps, progress=False, log=None,
               on_epoch_end=remember, grad_clip=1.0, max_seconds=max_seconds, data_parallel=parallel)
    return losses, [p.detach().clone() for p in model.parameters()], hist


@case("ddp[fit_equals_one_process]", worlds=(2, 3, 4))
def _ddp_fit(rank, world):
    for by_tokens in (True, False):
        got, params, _ = _fit_run(True, by_tokens=by_tokens)
        want, want_params, _ = _fit_run(False, by_tokens=by_tokens)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-12, atol=1e-12)
        for a, b in zip(params, want_params):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        gathered = [torch.zeros_like(params[0]) for _ in range(world)]
        dist.all_gather(gathered, params[0])
        assert all(torch.equal(t, gathered[0]) for t in gathered)  # every rank holds the same model


@case("ddp[nonfinite_on_one_rank]")
def _ddp_nan(rank, world):
    with _raises(FloatingPointError, "non-finite"):
        _fit_run(True, steps=6, bad_rank=world - 1)


@case("ddp[unsplittable_batch]")
def _ddp_unsplittable(rank, world):
    from attnkit.training import fit

    model = torch.nn.Linear(2, 1)
    batch = (torch.zeros(4, 2), torch.zeros(3))
    with _raises(ValueError, "cannot split", "[3, 4]"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda e: [batch],
            lambda b: model(b[0]).sum(), epochs=1, progress=False, log=None)


@case("ddp[time_limit_stops_every_rank]")
def _ddp_time(rank, world):
    _, _, hist = _fit_run(True, steps=50, max_seconds=1e-9)
    assert hist.stopped == "time" and hist.steps == 1, (hist.stopped, hist.steps)


# -- attnkit.nn.MultiheadAttention(context_parallel=group): shards in, shards out ---------------------
def _cp_mha_case(layout, *, cross=False, rope=False, batch_first=True, Hkv=None, bias=True, padding=True,
                 causal=True, dropout=0.0):
    def run(rank, world):
        E, H, B = 16, 4, 2
        n, nk = 4, (6 if cross else 4)
        N, Nk = world * n, world * nk
        kw = dict(batch_first=batch_first, num_kv_heads=Hkv, rope=rope, dtype=torch.float64,
                  score_mod=[positions.ALiBi(H)] if bias else None, dropout=dropout)
        torch.manual_seed(11)
        # (SDPA draws its own dropout mask; the reference draws the counter-based one the ring does)
        single = attnkit.nn.MultiheadAttention(E, H, backend="reference" if dropout else "auto", **kw)
        split = attnkit.nn.MultiheadAttention(E, H, context_parallel=True, cp_layout=layout, **kw)
        split.load_state_dict(single.state_dict())
        g = torch.Generator().manual_seed(5)
        x = torch.randn(B, N, E, generator=g, dtype=torch.float64)
        mem = torch.randn(B, Nk, E, generator=g, dtype=torch.float64) if cross else x
        pad = (torch.arange(Nk)[None, :] >= torch.tensor([[Nk], [Nk - 3]])) if padding else None
        dout = torch.randn(B, N, E, generator=g, dtype=torch.float64)
        call = dict(need_weights=False, is_causal=causal and not cross, attn_mask=masks.sliding_window(5, 5))

        def t(a):  # (B, T, E) -> the module's layout
            return a if batch_first else a.transpose(0, 1)

        xs = x.clone().requires_grad_()
        ms = mem.clone().requires_grad_() if cross else xs
        torch.manual_seed(99)  # the dropout seed each call draws
        want = t(single(t(xs), t(ms), t(ms), key_padding_mask=pad, **call)[0])
        (want * dout).sum().backward()
        xl = shard(x, layout, dim=1).requires_grad_()
        ml = shard(mem, layout, dim=1).requires_grad_() if cross else xl
        torch.manual_seed(99)
        got = t(split(t(xl), t(ml), t(ml), key_padding_mask=None if pad is None else shard(pad, layout, dim=1),
                      **call)[0])
        (got * shard(dout, layout, dim=1)).sum().backward()
        _close(got, shard(want.detach(), layout, dim=1), "out")
        _close(xl.grad, shard(xs.grad, layout, dim=1), "x grad")
        if cross:
            _close(ml.grad, shard(ms.grad, layout, dim=1), "memory grad")
        for (name, a), b in zip(split.named_parameters(), single.parameters()):
            summed = a.grad.clone()
            dist.all_reduce(summed)  # each rank holds its share of a parameter's gradient
            _close(summed, b.grad, f"{name} grad")
    return run


for _layout in LAYOUTS:
    for _name, _kw in {"causal_padding_alibi": {}, "rope_gqa": dict(rope=True, Hkv=2, bias=False),
                       "cross_attention": dict(cross=True), "seq_first": dict(batch_first=False),
                       "dropout": dict(dropout=0.25)}.items():
        case(f"cp[mha-{_name}-{_layout}]")(_cp_mha_case(_layout, **_kw))


@case("cp[mha_refusals]", worlds=(2,))
def _cp_mha_refusals(rank, world):
    m = attnkit.nn.MultiheadAttention(8, 2, batch_first=True, context_parallel=True)
    x = torch.zeros(1, 4, 8)
    with _raises(ValueError, "need_weights=False"):
        m(x)
    with _raises(ValueError, "tensor attn_mask"):
        m(x, need_weights=False, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with _raises(ValueError, "cache"):
        m(x, need_weights=False, cache=attnkit.nn.KVCache())


def _cp_transformer_case(layout, positions):
    def run(rank, world):
        B, S, T = 2, 4 * world, 2 * world
        torch.manual_seed(3)
        kw = dict(d_model=16, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=24,
                  dropout=0.0, positions=positions, max_len=64)
        single = attnkit.models.Transformer(30, 40, **kw).double()
        split = attnkit.models.Transformer(30, 40, **kw, context_parallel=True, cp_layout=layout).double()
        split.load_state_dict(single.state_dict())
        g = torch.Generator().manual_seed(9)
        src, tgt = torch.randint(3, 30, (B, S), generator=g), torch.randint(3, 40, (B, T), generator=g)
        pad = torch.arange(S)[None, :] >= torch.tensor([[S], [S - 3]])
        src = src.masked_fill(pad, 0)
        want = single(src, pad, tgt)
        dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
        (want * dout).sum().backward()
        got = split(shard(src, layout, dim=1), shard(pad, layout, dim=1), shard(tgt, layout, dim=1))
        (got * shard(dout, layout, dim=1)).sum().backward()
        _close(got, shard(want.detach(), layout, dim=1), "logits")
        for (name, a), b in zip(split.named_parameters(), single.parameters()):
            summed = a.grad.clone()
            dist.all_reduce(summed)
            _close(summed, b.grad, f"{name} grad")
    return run


for _layout in LAYOUTS:
    for _positions in ("sinusoidal", "learned", "rope"):
        case(f"cp[transformer-{_positions}-{_layout}]")(_cp_transformer_case(_layout, _positions))


@case("ring[sub_tiles]", worlds=(2, 3))
def _ring_sub_tiles(rank, world):
    """Tiles computed in many ragged sub-tiles (3 x 5 here; 256 x 1024 by default) give the same
    result: windows, causal, ALiBi, sigmoid, learned T5 bias (its autograd path), GQA."""
    from attnkit.distributed import block

    saved = block.SUB_Q, block.SUB_K
    block.SUB_Q, block.SUB_K = 3, 5
    try:
        for layout in LAYOUTS:
            ring(world, layout, n=12, mask=masks.causal() & masks.sliding_window(7), bias=positions.ALiBi(4))
            ring(world, layout, n=12, mask=masks.causal(), normalizer="sigmoid")
            t5 = positions.T5RelativeBias(4, num_buckets=8, max_distance=16).double()
            ring(world, layout, n=12, mask=masks.sliding_window(5, 5), bias=t5, params=tuple(t5.parameters()))
    finally:
        block.SUB_Q, block.SUB_K = saved


@case("ring[dropout]", worlds=(2, 3, 4))
def _ring_dropout(rank, world):
    """Dropout over the ring drops exactly the weights one process drops for the same seed (the
    counter-based mask at global positions): outputs and gradients equal the reference's."""
    from attnkit.distributed import block

    saved = block.SUB_Q, block.SUB_K
    block.SUB_Q, block.SUB_K = 3, 5  # several sub-tiles per tile too
    try:
        for layout in LAYOUTS:
            for kw in (dict(mask=masks.causal()), dict(mask=masks.sliding_window(5), bias=positions.ALiBi(4)),
                       dict(normalizer="sigmoid", mask=masks.causal())):
                gen = lambda: torch.Generator().manual_seed(1234)  # noqa: E731 -- same seed, fresh generators
                compare(ring_attention, world, layout, n=8, dropout_p=0.3, generator=gen(),
                        ref_kwargs=dict(dropout_p=0.3, generator=gen(), **kw), **kw)
    finally:
        block.SUB_Q, block.SUB_K = saved


@case("ring[uneven_contiguous]", worlds=(2, 3, 4))
def _ring_uneven(rank, world):
    """Contiguous shards of different lengths (rank r holds 3 + 2r queries and 5 + r keys): outputs
    and gradients of q, k, v and of a learned bias equal the reference on the whole sequences."""
    from attnkit.distributed import block

    q_lens = [3 + 2 * r for r in range(world)]
    k_lens = [5 + r for r in range(world)]
    Tq, Tk = sum(q_lens), sum(k_lens)
    qo, ko = sum(q_lens[:rank]), sum(k_lens[:rank])
    g = torch.Generator().manual_seed(77)
    H, Hkv, D = 4, 2, 6
    q = torch.randn(2, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, Tk, D, generator=g, dtype=torch.float64)
    dout = torch.randn(2, H, Tq, D, generator=g, dtype=torch.float64)
    t5 = positions.T5RelativeBias(H, num_buckets=8, max_distance=16).double()
    saved = block.SUB_Q, block.SUB_K
    block.SUB_Q, block.SUB_K = 4, 3
    try:
        for kw in (dict(mask=masks.causal()), dict(mask=masks.sliding_window(4), bias=positions.ALiBi(H)),
                   dict(mask=masks.key_padding(torch.tensor([Tk, Tk - 4])), bias=t5),
                   dict(normalizer="sigmoid"), dict(mask=masks.causal(), dropout_p=0.2)):
            params = list(t5.parameters()) if kw.get("bias") is t5 else []
            gen = (lambda: torch.Generator().manual_seed(5)) if "dropout_p" in kw else (lambda: None)  # noqa: E731
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            want = attnkit.attention(*full, backend="reference", generator=gen(), **kw)
            wg = torch.autograd.grad((want * dout).sum(), full + params)
            part = [q[:, :, qo:qo + q_lens[rank]], k[:, :, ko:ko + k_lens[rank]], v[:, :, ko:ko + k_lens[rank]]]
            part = [x.clone().requires_grad_() for x in part]
            got = ring_attention(*part, layout="contiguous", generator=gen(), **kw)
            gg = torch.autograd.grad((got * dout[:, :, qo:qo + q_lens[rank]]).sum(), part + params)
            what = str(kw)
            _close(got, want[:, :, qo:qo + q_lens[rank]].detach(), f"out {what}")
            _close(gg[0], wg[0][:, :, qo:qo + q_lens[rank]], f"dq {what}")
            _close(gg[1], wg[1][:, :, ko:ko + k_lens[rank]], f"dk {what}")
            _close(gg[2], wg[2][:, :, ko:ko + k_lens[rank]], f"dv {what}")
            for a, b in zip(gg[3:], wg[3:]):
                a = a.clone()
                dist.all_reduce(a)
                _close(a, b, f"bias grad {what}")
    finally:
        block.SUB_Q, block.SUB_K = saved


@case("ring[nonfinite]", worlds=(2, 3))
def _ring_nonfinite(rank, world):
    """attnkit's NaN policy over the ring: NaN/inf in a live query, a live key, a padded key, a value
    entry (on whichever rank holds them) give exactly the NaN one process gives, and finite gradients
    equal to its gradients."""
    for layout in LAYOUTS:
        N = 4 * world
        g = torch.Generator().manual_seed(21)
        q, k, v, dout = (torch.randn(2, 2, N, 4, generator=g, dtype=torch.float64) for _ in range(4))
        q[0, 1, 1, 2] = float("nan")            # a live query row
        k[1, 0, N - 1, 0] = float("inf")        # a key only late rows read (causal)
        k[0, 0, N - 2, 1] = float("nan")        # padded away for batch 0 below
        v[1, 1, 2, 3] = float("nan")            # one value column
        kw = dict(mask=masks.causal() & masks.key_padding(torch.tensor([N - 2, N])))
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        want = attnkit.attention(*full, backend="reference", **kw)
        wg = torch.autograd.grad(want.nan_to_num(0.0).mul(dout).sum(), full)
        part = [shard(x, layout).requires_grad_() for x in (q, k, v)]
        got = ring_attention(*part, layout=layout, **kw)
        gg = torch.autograd.grad(got.nan_to_num(0.0).mul(shard(dout, layout)).sum(), part)
        torch.testing.assert_close(got, shard(want.detach(), layout), equal_nan=True, **TOL)
        assert bool(got.isnan().any()) and not bool(got.isnan().all())
        for a, b, what in zip(gg, wg, "qkv"):
            assert bool(a.isfinite().all()), what
            _close(a, shard(b, layout), f"d{what}")
    x = torch.randn(1, 2, 4, 4)  # clean inputs: nothing changes, the check is one sum
    assert bool(ring_attention(x, x, x, layout="contiguous").isfinite().all())


@case("ddp[main_rank_finishes]")
def _ddp_main_finishes(rank, world):
    """Inside main_rank_finishes (what `attnkit train` under torchrun uses), ranks other than 0 end
    with RankFinished once training is over: the final evaluation is rank 0's alone."""
    from attnkit.training import RankFinished, main_rank_finishes

    with main_rank_finishes():
        if rank == 0:
            _, _, hist = _fit_run(True, steps=4)
            assert hist.steps == 4
        else:
            with _raises(RankFinished, "rank 0 finishes"):
                _fit_run(True, steps=4)
    _, _, hist = _fit_run(True, steps=2)  # outside it every rank returns
    assert hist.steps == 2
