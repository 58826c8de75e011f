"""Sparsemax, 1.5-entmax and α-entmax against the ``entmax`` package and hand-computed cases."""

import pytest
import torch
from entmax import entmax15 as ref_entmax15
from entmax import entmax_bisect as ref_entmax_bisect
from entmax import sparsemax as ref_sparsemax

import attnkit
import attnkit.testing
from attnkit.normalizers import Entmax, Entmax15, Sparsemax

NEG_INF = float("-inf")

# (ours, the entmax package's function) on float64 rows
PAIRS = [
    (Sparsemax(), lambda x: ref_sparsemax(x, dim=-1)),
    (Entmax15(), lambda x: ref_entmax15(x, dim=-1)),
    (Entmax(alpha=1.5), lambda x: ref_entmax_bisect(x, alpha=1.5, dim=-1, n_iter=100)),
    (Entmax(alpha=2.0), lambda x: ref_sparsemax(x, dim=-1)),
    (Entmax(alpha=1.25), lambda x: ref_entmax_bisect(x, alpha=1.25, dim=-1, n_iter=100)),
    (Entmax(alpha=3.0), lambda x: ref_entmax_bisect(x, alpha=3.0, dim=-1, n_iter=100)),
]
IDS = ["sparsemax", "entmax15", "entmax-1.5", "entmax-2=sparsemax", "entmax-1.25", "entmax-3"]


def _fwd_bwd(fn, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("scale", [0.5, 3.0])
@pytest.mark.parametrize("ours,ref", PAIRS, ids=IDS)
def test_matches_entmax_package(ours, ref, scale):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 9, generator=gen, dtype=torch.float64) * scale
    g = torch.randn(4, 3, 9, generator=gen, dtype=torch.float64)
    y, dx = _fwd_bwd(ours, x, g)
    y_ref, dx_ref = _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(dx, dx_ref, atol=1e-9, rtol=1e-7)
    # sparse ones really are sparse on these inputs (not softmax in disguise)
    if scale == 3.0:
        assert (y == 0).any()


def test_entmax_alpha2_is_sparsemax_and_alpha15_is_entmax15():
    x = torch.randn(50, 12, dtype=torch.float64) * 2
    torch.testing.assert_close(Entmax(alpha=2.0)(x), Sparsemax()(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(Entmax(alpha=1.5)(x), Entmax15()(x), atol=1e-12, rtol=0)
    # float32 default n_iter is accurate to float32 resolution
    x32 = x.float()
    torch.testing.assert_close(Entmax(alpha=1.5)(x32), Entmax15()(x32), atol=2e-6, rtol=0)


def test_sparsemax_hand_case_has_exact_zeros():
    z = torch.tensor([1.0, 0.5, -1.0], requires_grad=True)
    p = Sparsemax()(z)
    assert p.tolist() == [0.75, 0.25, 0.0]  # tau = -0.75: exact in binary
    p.backward(torch.tensor([1.0, 2.0, 3.0]))
    # g - mean of g over the support {0, 1}, 0 outside it
    assert z.grad.tolist() == [-0.5, 0.5, 0.0]
    # all equal -> uniform; one dominant -> one-hot
    assert Sparsemax()(torch.zeros(4)).tolist() == [0.25] * 4
    assert Sparsemax()(torch.tensor([5.0, 0.0, 1.0])).tolist() == [1.0, 0.0, 0.0]


def test_entmax15_hand_case():
    # x = z/2 - max = [0, -0.2, -1]; tau = -0.8 solves 0.8^2 + 0.6^2 = 1; key 2 lies below tau
    p = Entmax15()(torch.tensor([1.0, 0.6, -1.0], dtype=torch.float64))
    torch.testing.assert_close(p, torch.tensor([0.64, 0.36, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert p[2].item() == 0.0


@pytest.mark.parametrize("ours,ref", PAIRS, ids=IDS)
def test_neg_inf_entries_are_excluded(ours, ref):
    """-inf keys (masked) get 0 weight and 0 gradient; the rest equals the normalizer applied to
    the finite keys alone (an explicit per-row loop with the entmax package)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 7, generator=gen, dtype=torch.float64) * 2
    keep = torch.rand(6, 7, generator=gen) > 0.4
    keep[:, 0] = True
    keep[5] = torch.tensor([True] + [False] * 6)  # a single live key
    x = x.masked_fill(~keep, NEG_INF)
    g = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    y, dx = _fwd_bwd(ours, x, g)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y[~keep] == 0).all() and (dx[~keep] == 0).all()
    for i in range(6):
        idx = keep[i].nonzero().squeeze(-1)
        y_i, dx_i = _fwd_bwd(ref, x[i, idx], g[i, idx])
        torch.testing.assert_close(y[i, idx], y_i, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(dx[i, idx], dx_i, atol=1e-9, rtol=1e-7)
    assert y[5].tolist() == [1.0] + [0.0] * 6


@pytest.mark.parametrize("norm", [Sparsemax(), Entmax15(), Entmax(1.5), Entmax(1.25), Entmax(3.0)],
                         ids=["sparsemax", "entmax15", "entmax-1.5", "entmax-1.25", "entmax-3"])
def test_all_neg_inf_row_gives_zeros_without_nan(norm):
    x = torch.tensor([[NEG_INF] * 4, [0.0, 1.0, NEG_INF, 2.0]], requires_grad=True)
    y = norm.normalize(x)  # straight to normalize: no help from the base class
    assert y[0].tolist() == [0.0] * 4
    assert abs(y[1].sum().item() - 1) < 1e-6
    y.backward(torch.randn(2, 4))
    assert torch.isfinite(x.grad).all()
    assert x.grad[0].tolist() == [0.0] * 4 and x.grad[1, 2].item() == 0.0


@pytest.mark.parametrize("norm", [Sparsemax(), Entmax15(), Entmax(1.5), Entmax(2.5)],
                         ids=["sparsemax", "entmax15", "entmax-1.5", "entmax-2.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(norm, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 10, generator=gen, dtype=torch.float64) * 2
    x[:, 3] = NEG_INF
    g = torch.randn(8, 10, generator=gen, dtype=torch.float64)
    y64, dx64 = _fwd_bwd(norm, x, g)
    y, dx = _fwd_bwd(norm, x.to(dtype), g.to(dtype))
    assert y.dtype == dtype and dx.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # inputs rounded to bf16 move the result by a few bf16 ulps of the scores
    torch.testing.assert_close(y.double(), y64, atol=tol * 3, rtol=0)
    torch.testing.assert_close(dx.double(), dx64, atol=tol * 10, rtol=0)
    assert (y[:, 3] == 0).all() and (dx[:, 3] == 0).all()
    torch.testing.assert_close(y.double().sum(-1), torch.ones(8, dtype=torch.float64), atol=tol * 2, rtol=0)


def test_large_scores_are_stable():
    x = torch.tensor([[1e6, 1e6 - 0.5, -1e6, NEG_INF]], dtype=torch.float32)
    for norm in (Sparsemax(), Entmax15(), Entmax(1.5)):
        y = norm(x)
        assert torch.isfinite(y).all() and abs(y.sum().item() - 1) < 1e-5 and y[0, 2:].tolist() == [0.0, 0.0]


def test_default_n_iter_depends_on_dtype():
    from attnkit.normalizers.sparse import default_n_iter
    assert default_n_iter(torch.float64) > default_n_iter(torch.float32)
    # too few iterations are visibly inaccurate: the default is what makes it exact
    x = torch.randn(20, 9, dtype=torch.float64)
    exact = Entmax15()(x)
    assert (Entmax(1.5, n_iter=3)(x) - exact).abs().max() > 1e-4
    assert (Entmax(1.5)(x) - exact).abs().max() < 1e-13


def test_entmax_parameter_errors():
    for bad in (1.0, 0.5, -2, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            Entmax(alpha=bad)
    with pytest.raises(TypeError, match="alpha"):
        Entmax(alpha="1.5")
    with pytest.raises(ValueError, match="n_iter"):
        Entmax(alpha=1.5, n_iter=0)
    with pytest.raises(TypeError, match="n_iter"):
        Entmax(alpha=1.5, n_iter=2.5)


def test_named_and_through_attention():
    assert isinstance(attnkit.normalizers.get("entmax"), Entmax)
    assert attnkit.normalizers.get("entmax").alpha == 1.5
    q, k, v = attnkit.testing.make_qkv(1, 2, 3, 5, 4, dtype=torch.float64)
    for name, norm in (("sparsemax", Sparsemax()), ("entmax15", Entmax15()), ("entmax", Entmax(1.5))):
        out, w = attnkit.attention(q, k, v, normalizer=name, return_weights=True)
        s = q @ k.transpose(-2, -1) / 2.0  # scaled_dot, D = 4
        torch.testing.assert_close(w, norm(s), atol=1e-12, rtol=0)
        torch.testing.assert_close(out, norm(s) @ v, atol=1e-12, rtol=0)
