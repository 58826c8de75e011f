"""Mask kinds under test, each with an independent oracle written as plain Python.

``CASES[kind](Tq, Tk, B, H)`` returns ``(mask, oracle)`` where ``oracle(b, h, q, kv) -> bool``
says, with Python ints only, whether query ``q`` may attend key ``kv``. Test functions that take
an argument named ``kind`` are parametrized over every kind (``pytest_generate_tests`` below);
``cases`` is the table itself (a session fixture, so hypothesis tests can use it).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from attnkit import masks


def _br(Tq, Tk):
    """Bottom-right offset: absolute position of query 0."""
    return Tk - Tq


def _gen(*key):
    """A generator seeded from the case's sizes, so a case is the same every time it is built."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def causal(Tq, Tk, B, H):
    return masks.causal(), lambda b, h, q, kv: kv <= q + _br(Tq, Tk)


def causal_top_left(Tq, Tk, B, H):
    return masks.causal(align="top_left"), lambda b, h, q, kv: kv <= q


def sliding_window(Tq, Tk, B, H):
    return masks.sliding_window(2), lambda b, h, q, kv: q + _br(Tq, Tk) - 2 <= kv <= q + _br(Tq, Tk)


def sliding_window_lr_top_left(Tq, Tk, B, H):
    return masks.sliding_window(1, 2, align="top_left"), lambda b, h, q, kv: q - 1 <= kv <= q + 2


def key_padding_lengths(Tq, Tk, B, H):
    lengths = [max(Tk - 3 * b, 0) for b in range(B)]  # batch 1 may have no key at all
    return masks.key_padding(torch.tensor(lengths)), lambda b, h, q, kv: kv < lengths[b]


def key_padding_keep(Tq, Tk, B, H):
    keep = torch.rand(B, Tk, generator=_gen("kp", B, Tk)) < 0.6
    rows = keep.tolist()
    return masks.key_padding(keep), lambda b, h, q, kv: rows[b][kv]


def local_m(Tq, Tk, B, H):
    return masks.local_m(1), lambda b, h, q, kv: abs(q - kv) <= 1


def local_p(Tq, Tk, B, H):
    centers = torch.rand(B, Tq, generator=_gen("lp", B, Tq, Tk)) * (Tk - 1)
    c = centers.tolist()
    return masks.local_p(centers, D=2), lambda b, h, q, kv: c[b][q] - 2 <= kv <= c[b][q] + 2


def local_p_heads(Tq, Tk, B, H):
    centers = torch.rand(B, H, Tq, generator=_gen("lph", B, H, Tq, Tk), dtype=torch.float64) * (Tk + 2) - 1
    c = centers.tolist()
    return masks.local_p(centers, D=1), lambda b, h, q, kv: c[b][h][q] - 1 <= kv <= c[b][h][q] + 1


def block_sparse(Tq, Tk, B, H):
    # one spare block row/column: a layout larger than needed is cropped
    layout = torch.rand(-(-Tq // 2) + 1, -(-Tk // 3) + 1, generator=_gen("bs", Tq, Tk)) < 0.5
    lay = layout.tolist()
    return masks.block_sparse(layout, (2, 3)), lambda b, h, q, kv: lay[q // 2][kv // 3]


def block_sparse_heads(Tq, Tk, B, H):
    layout = torch.rand(H, -(-Tq // 2), -(-Tk // 2), generator=_gen("bsh", H, Tq, Tk)) < 0.5
    lay = layout.tolist()
    return masks.block_sparse(layout, 2), lambda b, h, q, kv: lay[h][q // 2][kv // 2]


def strided(Tq, Tk, B, H):
    def oracle(b, h, q, kv):
        d = q + _br(Tq, Tk) - kv
        return d >= 0 and (d < 3 or d % 3 == 0)
    return masks.strided(3), oracle


def strided_noncausal(Tq, Tk, B, H):
    def oracle(b, h, q, kv):
        d = q + _br(Tq, Tk) - kv
        return abs(d) < 2 or d % 2 == 0
    return masks.strided(2, causal=False), oracle


def fixed(Tq, Tk, B, H):
    def oracle(b, h, q, kv):
        pos = q + _br(Tq, Tk)
        return kv <= pos and (math.floor(kv / 3) == math.floor(pos / 3) or kv % 3 == 2)
    return masks.fixed(3), oracle


def fixed_noncausal_top_left(Tq, Tk, B, H):
    def oracle(b, h, q, kv):
        return kv // 4 == q // 4 or kv % 4 in (2, 3)
    return masks.fixed(4, summary=2, causal=False, align="top_left"), oracle


def longformer(Tq, Tk, B, H):
    glob = sorted({0, Tk // 2})

    def oracle(b, h, q, kv):
        pos = q + _br(Tq, Tk)
        return abs(pos - kv) <= 1 or kv in glob or pos in glob
    return masks.longformer(1, glob), oracle


def longformer_bool(Tq, Tk, B, H):
    flags = torch.rand(Tk, generator=_gen("lf", Tk)) < 0.25
    glob = [i for i, f in enumerate(flags.tolist()) if f]

    def oracle(b, h, q, kv):
        pos = q + _br(Tq, Tk)
        return abs(pos - kv) <= 2 or kv in glob or pos in glob
    return masks.longformer(2, flags), oracle


def _bigbird(m, Tq, Tk, bs, w, g, off):
    rnd = m.random_layout(Tk).tolist()  # the random draw is the implementation's; the rest is not

    def oracle(b, h, q, kv):
        qb, kb = (q + off) // bs, kv // bs  # Python's // floors, as block indices must
        return abs(qb - kb) <= w or kb < g or 0 <= qb < g or (0 <= qb < len(rnd) and rnd[qb][kb])
    return m, oracle


def bigbird(Tq, Tk, B, H):
    return _bigbird(masks.bigbird(2, window_blocks=1, global_blocks=1, random_blocks=1, seed=3),
                    Tq, Tk, 2, 1, 1, _br(Tq, Tk))


def bigbird_top_left(Tq, Tk, B, H):
    return _bigbird(masks.bigbird(3, window_blocks=0, global_blocks=1, random_blocks=2, seed=1, align="top_left"),
                    Tq, Tk, 3, 0, 1, 0)


def dilated(Tq, Tk, B, H):
    def oracle(b, h, q, kv):
        pos = q + _br(Tq, Tk)
        return kv in {pos - 2 * m for m in range(3)}
    return masks.dilated_window(2, dilation=2), oracle


def dilated_top_left(Tq, Tk, B, H):
    return (masks.dilated_window(3, 1, dilation=3, align="top_left"),
            lambda b, h, q, kv: kv in {q - 3 * m for m in range(4)} | {q + 3})


def chunked(Tq, Tk, B, H):
    return masks.chunked(3), lambda b, h, q, kv: (q + _br(Tq, Tk)) // 3 == kv // 3


def chunked_shift_per_batch(Tq, Tk, B, H):
    shift = [(2 * b + 1) % 4 for b in range(B)]  # each sequence's chunks start elsewhere (left padding)
    return (masks.chunked(4, torch.tensor(shift), align="top_left"),
            lambda b, h, q, kv: math.floor((q - shift[b]) / 4) == math.floor((kv - shift[b]) / 4))


def bool_tensor(Tq, Tk, B, H):
    t = torch.rand(B, 1, Tq, Tk, generator=_gen("bt", B, Tq, Tk)) < 0.5
    rows = t.tolist()
    return masks.as_mask(t), lambda b, h, q, kv: rows[b][0][q][kv]


def mask_mod_callable(Tq, Tk, B, H):
    def fn(b, h, q_idx, kv_idx):
        return (q_idx + kv_idx + h) % 3 != 0
    return masks.as_mask(fn), lambda b, h, q, kv: (q + kv + h) % 3 != 0


def combined(Tq, Tk, B, H):
    lengths = [max(Tk - b, 0) for b in range(B)]
    m = (masks.strided(2) | masks.longformer(1, [0])) & ~masks.dilated_window(0, 0, 1) \
        & masks.key_padding(torch.tensor(lengths))

    def oracle(b, h, q, kv):
        pos = q + _br(Tq, Tk)
        d = pos - kv
        st = d >= 0 and (d < 2 or d % 2 == 0)
        lf = abs(d) <= 1 or kv == 0 or pos == 0
        return (st or lf) and kv != pos and kv < lengths[b]
    return m, oracle


CASES = {f.__name__: f for f in [
    causal, causal_top_left, sliding_window, sliding_window_lr_top_left, key_padding_lengths, key_padding_keep,
    local_m, local_p, local_p_heads, block_sparse, block_sparse_heads, strided, strided_noncausal, fixed,
    fixed_noncausal_top_left, longformer, longformer_bool, bigbird, bigbird_top_left, dilated, dilated_top_left,
    chunked, chunked_shift_per_batch, bool_tensor, mask_mod_callable, combined,
]}
KINDS = sorted(CASES)
#: kinds that reweight the normalized weights (SDPA cannot serve them)
WEIGHT_FACTOR_KINDS = {"local_p", "local_p_heads"}
#: kinds where query position ``pos`` never sees a key after ``pos`` (bottom-right aligned)
CAUSAL_KINDS = {"causal", "sliding_window", "strided", "fixed", "dilated"}


def oracle_dense(oracle, Tq, Tk, B, H) -> torch.Tensor:
    """``(B, H, Tq, Tk)`` bool tensor from the oracle, by an explicit loop."""
    return torch.tensor([[[[bool(oracle(b, h, q, kv)) for kv in range(Tk)] for q in range(Tq)]
                          for h in range(H)] for b in range(B)], dtype=torch.bool).reshape(B, H, Tq, Tk)


def brute_classify(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Tile classes of a dense ``(B, H, Tq, Tk)`` mask by looping over every tile and every
    in-range position in it (independent of :func:`attnkit.masks.classify_dense`)."""
    Bn, Hn, Tq, Tk = dense.shape
    d = dense.tolist()
    nq, nk = -(-Tq // bq), -(-Tk // bk)
    out = torch.empty(Bn, Hn, nq, nk, dtype=torch.int8)
    for b in range(Bn):
        for h in range(Hn):
            for i in range(nq):
                for j in range(nk):
                    cells = [d[b][h][q][kv] for q in range(i * bq, min((i + 1) * bq, Tq))
                             for kv in range(j * bk, min((j + 1) * bk, Tk))]
                    out[b, h, i, j] = masks.FULL if all(cells) else (masks.EMPTY if not any(cells) else masks.PARTIAL)
    return out


@pytest.fixture(scope="session")
def classify_brute():
    return brute_classify


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny; with several intra-op threads some CPU kernels (float64 softmax)
    pay ~ms of thread synchronization per call on a busy machine, 1000x the work itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cases():
    return CASES


@pytest.fixture(scope="session")
def dense_oracle():
    return oracle_dense


@pytest.fixture(scope="session")
def kind_sets():
    return {"all": KINDS, "weight_factor": WEIGHT_FACTOR_KINDS, "causal": CAUSAL_KINDS}


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", KINDS)
    if "causal_kind" in metafunc.fixturenames:
        metafunc.parametrize("causal_kind", sorted(CAUSAL_KINDS))
