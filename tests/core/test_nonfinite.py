"""The NaN/inf policy (attnkit.nonfinite), the same on every backend, and bad parameters.

Each backend must give: NaN in exactly the rows that read a non-finite live input (the column,
for a value), nothing from a masked-out key or value, zeros for rows with no key, finite
gradients. The expected pattern is computed here by brute force from a dense mask.
"""

import math

import pytest
import torch

import attnkit
from attnkit import masks, normalizers as N, positions as P, scores as S
from attnkit.backends.tiled import TiledBackend
from attnkit.testing import assert_close, make_qkv

NAN, INF = float("nan"), float("inf")
BACKENDS = ["reference", "sdpa", "tiled", "tiled_eager", "auto"]


def attend(q, k, v, backend, **kw):
    if backend == "tiled_eager":
        old = attnkit.backends.REGISTRY["tiled"]
        attnkit.backends.REGISTRY["tiled"] = TiledBackend(block_q=16, block_k=8, fuse=False)
        try:
            return attnkit.attention(q, k, v, backend="tiled", **kw)
        finally:
            attnkit.backends.REGISTRY["tiled"] = old
    return attnkit.attention(q, k, v, backend=backend, **kw)


def expected_rows(live, q_bad, k_bad):
    """Brute force: row (b, h, i) is NaN iff its query is bad and it has a key, or it may read a bad key."""
    B, H, Tq, Tk = live.shape
    out = torch.zeros(B, H, Tq, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                reads = [j for j in range(Tk) if live[b, h, i, j]]
                out[b, h, i] = (bool(q_bad[b, h, i]) and bool(reads)) or any(bool(k_bad[b, h, j]) for j in reads)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [4, 600])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_a_non_finite_live_query_row_gives_that_row_nan_on_every_backend(backend, T, value):
    q, k, v = make_qkv(1, 1, T, D=8)
    q[0, 0, 1, 2] = value
    out = attend(q, k, v, backend)
    assert out[0, 0, 1].isnan().all()
    assert torch.isfinite(out[0, 0, [0] + list(range(2, T))]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v", "kv"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nan_in_padded_keys_and_values_reaches_no_output_and_no_gradient(backend, where, value):
    B, H, Tq, Tk = 2, 4, 5, 7
    lengths = torch.tensor([7, 4])
    q, k, v = make_qkv(B, H, Tq, Tk, D=6, Hkv=2, dtype=torch.float64)
    clean = [x.clone().requires_grad_() for x in (q, k, v)]
    for name in where:
        x = k if name == "k" else v
        x[1, :, 4:] = value
    dirty = [x.clone().requires_grad_() for x in (q, k, v)]
    m = masks.key_padding(lengths)
    dout = torch.randn(B, H, Tq, 6, dtype=torch.float64)
    o1 = attend(*clean, backend, mask=m)
    o2 = attend(*dirty, backend, mask=m)
    assert torch.isfinite(o2).all()
    assert_close(o2, o1)
    g1 = torch.autograd.grad(o1, clean, dout)
    g2 = torch.autograd.grad(o2, dirty, dout)
    for a, b in zip(g2, g1):
        assert torch.isfinite(a).all()
        # padded positions get no gradient; the rest is that of the clean inputs
        assert_close(a[:, :, :].masked_fill(~torch.isfinite(a), 0), b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_nan_key_poisons_exactly_the_rows_the_mask_lets_read_it(backend):
    B, H, T = 1, 2, 12
    q, k, v = make_qkv(B, H, T, D=4, dtype=torch.float64)
    k[0, 1, 5, 0] = NAN   # head 1, key 5
    q[0, 0, 3, 1] = INF   # head 0, query 3
    m = masks.sliding_window(3)
    out, w = attend(q, k, v, backend if backend not in ("sdpa",) else "tiled", mask=m, return_weights=True)
    live = m.materialize(T, T, B, H).expand(B, H, T, T)
    q_bad = torch.zeros(B, H, T, dtype=torch.bool); q_bad[0, 0, 3] = True
    k_bad = torch.zeros(B, H, T, dtype=torch.bool); k_bad[0, 1, 5] = True
    rows = expected_rows(live, q_bad, k_bad)
    assert torch.equal(out.isnan().all(-1), rows) and torch.equal(out.isnan().any(-1), rows)
    # weights: NaN on the live keys of those rows, 0 on their masked keys, finite elsewhere
    assert torch.equal(w.isnan(), rows.unsqueeze(-1) & live)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_value_entry_poisons_its_column_in_the_rows_that_read_it(backend):
    q, k, v = make_qkv(1, 1, 6, D=4, Dv=3, dtype=torch.float64)
    v[0, 0, 2, 1] = NAN
    out = attend(q, k, v, backend, mask=masks.causal())
    expect = torch.zeros(6, 3, dtype=torch.bool)
    expect[2:, 1] = True  # rows 2.. read key 2 (causal); only feature 1 is NaN
    assert torch.equal(out[0, 0].isnan(), expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_with_no_key_gives_zeros_even_when_its_query_is_nan(backend):
    q, k, v = make_qkv(1, 2, 6, D=4, dtype=torch.float64, requires_grad=False)
    q[0, :, 0] = NAN  # row 0 has no key under this mask
    m = masks.from_mod(lambda b, h, i, j: (i > 0) & (j < i))
    q.requires_grad_()
    out = attend(q, k, v, backend, mask=m)
    assert (out[0, :, 0] == 0).all() and torch.isfinite(out).all()
    (g,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(g).all() and (g[0, :, 0] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled", "tiled_eager"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_a_non_finite_bias_entry_poisons_its_row_unless_masked(backend, value):
    q, k, v = make_qkv(1, 1, 5, D=4, dtype=torch.float64)
    bias = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    bias[0, 0, 3, 1] = value   # live under causal: row 3 is NaN
    bias[0, 0, 1, 4] = value   # masked under causal: no effect
    bias[0, 0, 2, 0] = -INF    # -inf hides a key: that is a mask
    out = attend(q, k, v, backend, mask=masks.causal(), bias=bias)
    assert out[0, 0].isnan().any(-1).tolist() == [False, False, False, True, False]
    ref_bias = bias.masked_fill(torch.isnan(bias) | torch.isposinf(bias), 0.0)
    assert_close(out[0, 0, [0, 1, 2, 4]], attend(q, k, v, "reference", mask=masks.causal(), bias=ref_bias)[0, 0, [0, 1, 2, 4]])


def test_a_minus_inf_bias_hides_a_key_but_does_not_shield_a_row_from_its_nan():
    # like IEEE arithmetic (NaN + -inf = NaN): only the mask decides what a row reads
    q, k, v = make_qkv(1, 1, 3, D=4, dtype=torch.float64)
    v[0, 0, 2] = NAN
    bias = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    bias[0, 0, :, 2] = -INF
    for backend in BACKENDS:
        assert attend(q, k, v, backend, bias=bias).isnan().all(), backend
        assert torch.isfinite(attend(q, k, v, backend, bias=bias, mask=masks.key_padding(torch.tensor([2])))).all()


def test_location_scores_ignore_a_nan_key_but_not_its_value():
    loc = S.Location(4, 8)
    q, k, v = make_qkv(1, 1, 3, 5, D=4, dtype=torch.float32)
    k[0, 0, 1] = NAN
    assert torch.isfinite(attnkit.attention(q, k, v, score=loc)).all()
    v[0, 0, 1, 0] = NAN
    assert attnkit.attention(q, k, v, score=loc)[..., 0].isnan().all()


def test_nan_in_a_live_position_reaches_every_normalizer_as_a_nan_row():
    s = torch.tensor([[0.5, NAN, 1.0, -1.0], [0.1, 0.2, 0.3, 0.4]])
    keep = torch.tensor([[True, True, True, False], [True] * 4])
    for name in ["softmax", "sparsemax", "entmax15", "entmax", "hardmax", "topk", "gumbel", "stochastic_hard"]:
        w = N.get(name)(s, keep)
        assert w[0, :3].isnan().all() and w[0, 3] == 0 and torch.isfinite(w[1]).all(), name
    w = N.Sigmoid()(s, keep)  # elementwise: only that weight
    assert w[0].isnan().tolist() == [False, True, False, False] and w[0, 3] == 0


def test_stochastic_hard_marks_a_poisoned_row_instead_of_crashing():
    sh = N.StochasticHard(generator=torch.Generator().manual_seed(0))
    w = sh(torch.tensor([[0.0, INF, 1.0], [0.0, 1.0, 2.0]]))
    assert w[0].isnan().all() and w[1].sum() == 1
    assert sh.last_sample.index[0] == -1 and math.isnan(sh.last_sample.log_prob[0])


@pytest.mark.parametrize("make", [
    lambda x: N.Softmax(temperature=x), lambda x: N.Gumbel(tau=x), lambda x: N.Hardmax(temperature=x),
    lambda x: N.TopK(temperature=x), lambda x: S.Cosine(tau=x), lambda x: S.Cosine(eps=x), lambda x: P.softcap(x),
    lambda x: N.Sigmoid(bias=x), lambda x: N.Normalize(eps=x), lambda x: N.Entmax(alpha=x),
], ids=["softmax_t", "gumbel_tau", "hardmax_t", "topk_t", "cosine_tau", "cosine_eps", "softcap", "sigmoid_bias",
        "normalize_eps", "entmax_alpha"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_parameters_reject_nan_and_inf_naming_the_argument(make, value):
    with pytest.raises(ValueError, match=r"(temperature|tau|eps|cap|bias|alpha).*(finite|> 1|> 0)"):
        make(value)


@pytest.mark.parametrize("value", [NAN, INF])
def test_scale_and_projections_reject_nan_and_inf(value):
    q, k, v = make_qkv(1, 1, 4, D=8)
    with pytest.raises(ValueError, match="scale"):
        attnkit.attention(q, k, v, scale=value)
    E = torch.eye(4)
    E[0, 0] = value
    with pytest.raises(ValueError, match="E must be finite"):
        attnkit.linear.linformer_attention(q, k, v, E, torch.eye(4))
    W = torch.randn(16, 8)
    W[3, 3] = value
    with pytest.raises(ValueError, match="projection must be finite"):
        attnkit.linear.performer_attention(q, k, v, projection=W)
    centers = torch.tensor([[0.0, value, 1.0, 2.0]])
    with pytest.raises(ValueError, match="local_p centers must be finite"):
        attnkit.attention(q, k, v, mask=masks.local_p(centers, 2))


@pytest.mark.parametrize("normalizer", sorted(N.NAMED))
def test_normalizers_reject_integer_scores_with_a_type_error(normalizer):
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        N.get(normalizer)(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        N.get(normalizer)(torch.zeros(3), torch.tensor([1, 0, 1]))


def test_entmax15_on_integers_no_longer_returns_zeros():
    with pytest.raises(TypeError):
        N.Entmax15()(torch.tensor([1, 2, 3]))
    for fn in (N.sparsemax, N.entmax15, N.entmax_bisect):
        with pytest.raises(TypeError, match="floating-point"):
            fn(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_a_score_mod_returning_the_wrong_shape_or_dtype_is_named(backend):
    q, k, v = make_qkv(1, 2, 5, D=4)

    def wrong_shape(s, b, h, i, j):
        return torch.zeros(3)

    def integer(s, b, h, i, j):
        return i - j

    with torch.no_grad():  # with autograd on, tiled leaves score_mod callables to the reference
        with pytest.raises(ValueError, match="score_mod 'wrong_shape' returned shape \\(3\\)"):
            attnkit.attention(q, k, v, bias=wrong_shape, backend=backend)
        with pytest.raises(TypeError, match="score_mod 'integer' must return floating-point scores"):
            attnkit.attention(q, k, v, bias=integer, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled"])
def test_a_mask_mod_returning_the_wrong_shape_or_dtype_is_named(backend):
    q, k, v = make_qkv(1, 2, 5, D=4)

    def wrong_shape(b, h, i, j):
        return torch.ones(3, dtype=torch.bool)

    def integer(b, h, i, j):
        return i - j

    with pytest.raises(ValueError, match="mask_mod 'wrong_shape' returned shape \\(3\\)"):
        attnkit.attention(q, k, v, mask=wrong_shape, backend=backend)
    with pytest.raises(TypeError, match="mask_mod 'integer' must return a bool tensor"):
        attnkit.attention(q, k, v, mask=integer, backend=backend)
    # a plain Python bool is a valid (constant) predicate
    out = attnkit.attention(q, k, v, mask=lambda b, h, i, j: True, backend=backend)
    assert_close(out, attnkit.attention(q, k, v, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled", "auto"])
def test_empty_shapes_give_a_clear_error_or_a_correct_empty_result(backend):
    with pytest.raises(ValueError, match=r"D >= 1"):
        attnkit.attention(torch.randn(1, 2, 3, 0), torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 2), backend=backend)
    with pytest.raises(ValueError, match=r"H >= 1"):
        attnkit.attention(torch.randn(1, 0, 3, 2), torch.randn(1, 0, 4, 2), torch.randn(1, 0, 4, 2), backend=backend)
    assert attnkit.attention(torch.randn(1, 2, 0, 2), torch.randn(1, 2, 4, 2), torch.randn(1, 2, 4, 3),
                             backend=backend).shape == (1, 2, 0, 3)
    assert attnkit.attention(torch.randn(0, 2, 3, 2), torch.randn(0, 2, 4, 2), torch.randn(0, 2, 4, 3),
                             backend=backend).shape == (0, 2, 3, 3)
    no_keys = attnkit.attention(torch.randn(1, 2, 3, 2), torch.randn(1, 2, 0, 2), torch.randn(1, 2, 0, 3),
                                backend=backend)
    assert no_keys.shape == (1, 2, 3, 3) and (no_keys == 0).all()  # a row with no key gives zeros


@pytest.mark.skipif(not attnkit.backends.flex.available(), reason="torch has no flex_attention")
def test_compiled_flex_follows_the_same_policy():
    import warnings

    q, k, v = make_qkv(1, 2, 16, 20, D=8)
    k[0, :, 18:] = NAN            # padding
    q[0, 1, 3, 0] = NAN           # a live query row
    m = masks.key_padding(torch.tensor([18])) & masks.causal()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = attnkit.attention(q, k, v, mask=m, backend="flex")
    ref = attnkit.attention(q, k, v, mask=m, backend="reference")
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == out.shape[-1]
    assert_close(out.nan_to_num(), ref.nan_to_num(), scale=10)


def test_the_finiteness_screen_is_exact():
    from attnkit.nonfinite import all_finite

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum overflows: the exact check decides
    assert all_finite(big) and all_finite(torch.zeros(0)) and all_finite(torch.randn(3, 5, dtype=torch.bfloat16))
    for value in (NAN, INF, -INF):
        x = torch.randn(7)
        x[3] = value
        assert not all_finite(x)
    x = torch.tensor([INF, -INF])  # sums to NaN
    assert not all_finite(x)
    # a normalizer whose scores overflow when summed still normalizes them exactly
    s = torch.tensor([3e38, 3e38, 1.0])
    assert_close(N.Softmax()(s), torch.softmax(s, -1))


# -- the check remembers clean tensors (decoding reads the same keys again) --------------------

def test_a_key_found_clean_is_not_summed_again_until_it_changes_in_place():
    from attnkit import nonfinite

    q, k, v = make_qkv(1, 2, 1, 12, D=4)
    kw = dict(mask=masks.key_padding(torch.tensor([9])))
    first = attnkit.attention(q, k, v, **kw)
    assert nonfinite.known_finite(k) and nonfinite.known_finite(v) and not nonfinite.known_finite(q)
    assert torch.equal(attnkit.attention(q, k, v, **kw), first)
    k[0, 1, 3, 0] = NAN  # in place: the version counter moves, the memo no longer holds
    assert not nonfinite.known_finite(k)
    out = attnkit.attention(q, k, v, **kw)
    assert out[0, 1].isnan().all() and out[0, 0].isfinite().all()  # the policy applied: head 1 reads it
    v[0, 0, 10, 0] = NAN  # a padded value, changed after it was found clean: still reaches nothing
    assert attnkit.attention(q, k, v, **kw)[0, 0].isfinite().all()


def test_the_memo_is_per_tensor_object_not_per_address():
    from attnkit import nonfinite

    q, k, v = make_qkv(1, 1, 2, 6, D=3)
    attnkit.attention(q, k, v)
    view = k[:, :, :]  # same storage and version, another object: checked afresh
    assert nonfinite.known_finite(k) and not nonfinite.known_finite(view)
    key = id(k)
    del k, view  # (a view keeps its base alive)
    import gc

    gc.collect()
    assert key not in nonfinite._FINITE  # a freed tensor is forgotten (its address may be reused)


def test_marked_tensors_skip_the_sum():
    """``mark_finite`` is a promise: a tensor marked clean is not summed (so a lying caller gets
    what the backend gives); attention marks only what it checked."""
    from attnkit import nonfinite

    q, k, v = make_qkv(1, 1, 2, 6, D=3)
    k[0, 0, 1, 0] = NAN
    assert not nonfinite.inputs_finite(q, k, v) and not nonfinite.known_finite(k)
    nonfinite.mark_finite(k)
    assert nonfinite.inputs_finite(q, k, v)


def test_a_kv_cache_checks_what_it_appends_and_hands_out_views_known_clean():
    from attnkit import nonfinite

    for max_length in (None, 8):
        cache = attnkit.nn.KVCache(max_length=max_length)
        q, k, v = make_qkv(1, 2, 1, 3, D=4)
        keys, values = cache.append(k, v)
        assert nonfinite.known_finite(keys) and nonfinite.known_finite(values)
        bad = k[:, :, :1].clone()
        bad[0, 0, 0, 0] = INF
        keys, values = cache.append(bad, v[:, :, :1])
        assert not nonfinite.known_finite(keys)
        out = attnkit.attention(q, keys, values)  # the policy: the live inf key poisons head 0
        assert out[0, 0].isnan().all() and out[0, 1].isfinite().all()
        keys, values = cache.append(k[:, :, :1], v[:, :, :1])
        assert not nonfinite.known_finite(keys)  # the cache still holds the bad key
        cache.reset()
        assert nonfinite.known_finite(cache.append(k, v)[0])
