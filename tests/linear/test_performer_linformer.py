"""Performer (FAVOR+) random features and attention; Linformer projections."""

import math

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.linear import (linformer_attention, orthogonal_random_matrix, performer_attention,
                            performer_features, quadratic_linear_attention)
from attnkit.testing import assert_close, make_qkv


# -- orthogonal random matrix ---------------------------------------------------------------------

def test_orthogonal_random_matrix_blocks_are_orthogonal_and_rows_chi_distributed():
    g = torch.Generator().manual_seed(0)
    W = orthogonal_random_matrix(4096 + 5, 16, g, dtype=torch.float64)
    assert W.shape == (4101, 16)
    for start in (0, 16 * 100, 4096):                      # full blocks and the truncated last one
        blk = W[start:start + 16]
        unit = blk / blk.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(blk.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    sq = W.norm(dim=1).square()
    # squared lengths ~ chi^2(16): mean 16, variance 32 (standard error of the mean over 4101 rows ~0.09)
    assert abs(sq.mean().item() - 16) < 0.5
    assert abs(sq.var().item() - 32) < 5
    # marginally N(0, I): each coordinate has variance ~1
    assert abs(W.var(dim=0).mean().item() - 1) < 0.1


def test_orthogonal_random_matrix_sqrt_dim_and_reproducibility():
    W = orthogonal_random_matrix(10, 4, torch.Generator().manual_seed(1), scaling="sqrt_dim", dtype=torch.float64)
    torch.testing.assert_close(W.norm(dim=1), torch.full((10,), 2.0, dtype=torch.float64), rtol=0, atol=1e-12)
    a = orthogonal_random_matrix(8, 4, torch.Generator().manual_seed(5))
    b = orthogonal_random_matrix(8, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, orthogonal_random_matrix(8, 4, torch.Generator().manual_seed(6)))


def test_orthogonal_random_matrix_errors():
    with pytest.raises(ValueError, match="num_features"):
        orthogonal_random_matrix(0, 4)
    with pytest.raises(ValueError, match="scaling"):
        orthogonal_random_matrix(4, 4, scaling="unit")


# -- features -------------------------------------------------------------------------------------

def test_positive_features_formula_and_stabilizers():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    W = torch.randn(7, 4, dtype=torch.float64)
    phi = performer_features(x, W)
    expected = torch.exp(x @ W.T - 0.5 * x.square().sum(-1, keepdim=True)) / math.sqrt(7)
    torch.testing.assert_close(phi, expected, rtol=1e-14, atol=0)
    row = performer_features(x, W, stabilizer="row")
    ratio = row / phi                                       # a positive constant per row
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-12, atol=0)
    assert row.amax(-1).allclose(torch.full((2, 3, 5), 1 / math.sqrt(7), dtype=torch.float64))
    allr = performer_features(x, W, stabilizer="all")
    ratio = allr / phi                                      # one constant per (batch, head)
    torch.testing.assert_close(ratio, ratio[..., :1, :1].expand_as(ratio), rtol=1e-12, atol=0)


def test_trig_features_formula():
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    W = torch.randn(5, 4, dtype=torch.float64)
    phi = performer_features(x, W, kind="trig")
    amp = torch.exp(0.5 * x.square().sum(-1, keepdim=True)) / math.sqrt(5)
    torch.testing.assert_close(phi, amp * torch.cat(((x @ W.T).sin(), (x @ W.T).cos()), -1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", ["positive", "trig"])
def test_features_estimate_exp_kernel(kind):
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    y = 0.3 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    W = orthogonal_random_matrix(32768, 8, g, dtype=torch.float64)
    est = performer_features(x, W, kind) @ performer_features(y, W, kind).T
    rel = ((est - torch.exp(x @ y.T)) / torch.exp(x @ y.T)).abs()
    assert rel.max() < 0.05


def test_features_errors():
    with pytest.raises(ValueError, match="projection"):
        performer_features(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="kind"):
        performer_features(torch.randn(3, 4), torch.randn(5, 4), kind="cosine")
    with pytest.raises(ValueError, match="stabilizer"):
        performer_features(torch.randn(3, 4), torch.randn(5, 4), stabilizer="max")


# -- Performer attention ----------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_performer_equals_linear_attention_with_its_features(causal, eps):
    """With a fixed projection, Performer is linear attention with φ = unstabilized FAVOR+ features of
    q/d^¼, k/d^¼: the stabilizing constants cancel exactly, eps included."""
    q, k, v = make_qkv(2, 4, 7, 9, D=8, Hkv=2, dtype=torch.float64)
    W = orthogonal_random_matrix(20, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    out = performer_attention(q, k, v, causal=causal, projection=W, eps=eps, chunk_size=3)
    phi = lambda x: performer_features(x / 8 ** 0.25, W)  # noqa: E731
    expected = quadratic_linear_attention(q, k, v, feature_map=phi, causal=causal, eps=eps)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_performer_causal_output_ignores_future_keys():
    """Future keys set the key stabilizer (a max over all keys); it must not leak into past outputs."""
    q, k, v = make_qkv(1, 2, 10, D=8, dtype=torch.float64)
    W = orthogonal_random_matrix(32, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    base = performer_attention(q, k, v, projection=W, causal=True, chunk_size=4)
    k2 = k.clone()
    k2[:, :, 7:] *= 6.0                                       # raises the max over keys a lot
    out = performer_attention(q, k2, v, projection=W, causal=True, chunk_size=4)
    torch.testing.assert_close(out[:, :, :7], base[:, :, :7], rtol=1e-10, atol=1e-13)
    assert (out[:, :, 7:] - base[:, :, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_shrinks_with_more_features(causal):
    """Bound tested: with q, k ~ N(0, 0.5²), D = 16, T = 32, the mean |performer - softmax| over 8 seeds at
    m = 2048 is below half of that at m = 64 (measured: 0.0078 vs 0.034 non-causal, 0.011 vs 0.045 causal,
    a ratio of ~0.23), and below 0.02 in absolute terms."""
    def mean_err(m):
        errs = []
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            q, k, v = torch.randn(3, 1, 4, 32, 16, generator=g, dtype=torch.float64).unbind(0)
            q, k = 0.5 * q, 0.5 * k
            exact = attnkit.attention(q, k, v, mask=masks.causal() if causal else None, backend="reference")
            approx = performer_attention(q, k, v, num_features=m, causal=causal, generator=g)
            errs.append((approx - exact).abs().mean().item())
        return sum(errs) / len(errs)
    e64, e2048 = mean_err(64), mean_err(2048)
    assert e2048 < 0.5 * e64
    assert e2048 < 0.02


def test_performer_key_padding_no_influence():
    q, k, v = make_qkv(2, 2, 6, D=8, dtype=torch.float64)
    W = orthogonal_random_matrix(16, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    keep = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    for causal in (False, True):
        base = performer_attention(q, k, v, projection=W, key_padding=keep, causal=causal)
        k2, v2 = k.clone(), v.clone()
        k2[1, :, [1, 4]] = 50.0                                 # would dominate a shared max if counted
        v2[1, :, [1, 4]] = float("nan")
        torch.testing.assert_close(performer_attention(q, k2, v2, projection=W, key_padding=keep, causal=causal),
                                   base, rtol=0, atol=0)


def test_performer_generator_reproducible_and_gqa_shapes():
    q, k, v = make_qkv(2, 4, 5, 7, D=8, Dv=3, Hkv=1)
    a = performer_attention(q, k, v, num_features=16, generator=torch.Generator().manual_seed(3))
    b = performer_attention(q, k, v, num_features=16, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 4, 5, 3) and torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_gradcheck(causal):
    q, k, v = make_qkv(1, 2, 4, D=4, Dv=2, dtype=torch.float64, requires_grad=True)
    W = orthogonal_random_matrix(6, 4, torch.Generator().manual_seed(0), dtype=torch.float64)
    f = lambda q, k, v: performer_attention(q, k, v, projection=W, causal=causal, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_performer_bfloat16_close_to_float64():
    q, k, v = make_qkv(1, 2, 16, D=8, dtype=torch.float64)
    W = orthogonal_random_matrix(64, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    gold = performer_attention(q, k, v, projection=W, causal=True)
    low = performer_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), projection=W, causal=True)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), gold, rtol=0, atol=5e-2)


def test_performer_errors():
    q, k, v = make_qkv(1, 2, 4, D=4)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_features"):
            performer_attention(q, k, v, num_features=bad)
    with pytest.raises(TypeError, match="num_features"):
        performer_attention(q, k, v, num_features=2.5)
    with pytest.raises(ValueError, match="projection"):
        performer_attention(q, k, v, projection=torch.randn(8, 5))
    with pytest.raises(ValueError, match="kind"):
        performer_attention(q, k, v, kind="exp")


# -- Linformer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_linformer_identity_projection_is_exact_softmax(dtype, Hkv):
    q, k, v = make_qkv(2, 4, 5, 9, D=8, Dv=3, Hkv=Hkv, dtype=dtype)
    I = torch.eye(9, dtype=dtype)
    out = linformer_attention(q, k, v, I, I)
    g = 4 // Hkv
    expected = torch.softmax(q @ k.repeat_interleave(g, 1).transpose(-2, -1) / math.sqrt(8), -1) \
        @ v.repeat_interleave(g, 1)
    assert_close(out, expected, name="linformer(I, I) vs softmax")


def test_linformer_matches_explicit_projection_and_weights_over_projected_rows():
    q, k, v = make_qkv(2, 2, 6, 10, D=4, dtype=torch.float64)
    E, Fm = torch.randn(2, 3, 10, dtype=torch.float64).unbind(0)
    out, w = linformer_attention(q, k, v, E, Fm, return_weights=True)
    s = q @ torch.einsum("pt,bhtd->bhpd", E, k).transpose(-2, -1) / 2.0
    expected = torch.softmax(s, -1) @ torch.einsum("pt,bhtd->bhpd", Fm, v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)
    assert w.shape == (2, 2, 6, 3)


def test_linformer_key_padding_zeroes_padded_rows():
    q, k, v = make_qkv(2, 2, 6, D=4, dtype=torch.float64)
    E, Fm = torch.randn(2, 3, 6, dtype=torch.float64).unbind(0)
    lengths = torch.tensor([4, 6])
    base = linformer_attention(q, k, v, E, Fm, key_padding=lengths)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:], v2[0, :, 4:] = float("nan"), 7.0
    torch.testing.assert_close(linformer_attention(q, k2, v2, E, Fm, key_padding=lengths), base, rtol=0, atol=0)
    # the documented semantics: same as zeroed padded keys/values
    k3, v3 = k.clone(), v.clone()
    k3[0, :, 4:], v3[0, :, 4:] = 0.0, 0.0
    torch.testing.assert_close(linformer_attention(q, k3, v3, E, Fm), base, rtol=0, atol=1e-15)


def test_linformer_gradcheck():
    q, k, v = make_qkv(1, 2, 3, 5, D=3, dtype=torch.float64, requires_grad=True)
    E = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    Fm = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, E, Fm: linformer_attention(q, k, v, E, Fm), (q, k, v, E, Fm))


def test_linformer_errors():
    q, k, v = make_qkv(1, 2, 4, 6, D=4)
    with pytest.raises(ValueError, match=r"E must have shape \(proj_len > 0, Tk = 6\)"):
        linformer_attention(q, k, v, torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(ValueError, match="same proj_len"):
        linformer_attention(q, k, v, torch.randn(3, 6), torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"F must be a 2-D"):
        linformer_attention(q, k, v, torch.randn(3, 6), torch.randn(1, 3, 6))


@pytest.mark.parametrize("kind,stabilizer", [("positive", None), ("positive", "row"), ("positive", "all"),
                                             ("trig", "row")])
def test_performer_features_gradcheck(kind, stabilizer):
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x, W: performer_features(x, W, kind, stabilizer=stabilizer)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, W))
