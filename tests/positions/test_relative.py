"""T5 relative buckets and Shaw et al. relative position representations."""

import math

import pytest
import torch
from torch import nn

import attnkit
from attnkit import masks
from attnkit.positions import ShawRelative, T5RelativeBias, relative_positions, t5_bucket
from attnkit.testing import assert_close, make_qkv


def paper_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucketing, written from its description (Raffel et al. 2020, §2.1 and the Mesh
    TensorFlow code it cites): n = query_pos - key_pos; with bidirectional buckets, keys after the
    query use the upper half; the first half of each half is exact, the rest logarithmic up to
    max_distance, and everything further shares the last bucket."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40), (8, 16), (64, 256), (6, 10)])
def test_t5_bucket_matches_description_on_a_grid(bidirectional, num_buckets, max_distance):
    r = torch.arange(-400, 401)
    got = t5_bucket(r, bidirectional, num_buckets, max_distance)
    expected = [paper_bucket(x, bidirectional, num_buckets, max_distance) for x in r.tolist()]
    assert got.tolist() == expected
    assert got.min() >= 0 and got.max() < num_buckets


def test_t5_bucket_known_values_default():
    # bidirectional, 32 buckets: 16 per side, 8 exact; keys after the query start at bucket 16
    r = torch.tensor([0, -1, -7, -8, -128, -10_000, 1, 7, 8, 200])
    assert t5_bucket(r).tolist() == [0, 1, 7, 8, 15, 15, 17, 23, 24, 31]
    # unidirectional: future keys -> bucket 0, 16 exact buckets
    assert t5_bucket(r, bidirectional=False).tolist() == [0, 1, 7, 8, 31, 31, 0, 0, 0, 0]


def loop_t5_bias(t5, Tq, Tk):
    w = t5.embedding.weight.detach().double()
    bias = torch.empty(1, t5.num_heads, Tq, Tk, dtype=torch.float64)
    for h in range(t5.num_heads):
        for i in range(Tq):
            for j in range(Tk):
                rel = j - (i + Tk - Tq)
                bias[0, h, i, j] = w[paper_bucket(rel, t5.bidirectional, t5.num_buckets, t5.max_distance), h]
    return bias


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(12, 12), (3, 40), (20, 6)])
def test_t5_bias_matches_loop(bidirectional, Tq, Tk):
    t5 = T5RelativeBias(3, num_buckets=8, max_distance=20, bidirectional=bidirectional)
    torch.testing.assert_close(t5(Tq, Tk).double(), loop_t5_bias(t5, Tq, Tk), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_t5_sdpa_equals_reference(dtype):
    t5 = T5RelativeBias(4, num_buckets=16, max_distance=32).to(dtype)
    q, k, v = make_qkv(2, 4, 9, 13, D=8, Hkv=2, dtype=dtype)
    ref = attnkit.attention(q, k, v, score="dot", bias=t5, mask=masks.causal(), backend="reference")
    sdpa = attnkit.attention(q, k, v, score="dot", bias=t5, mask=masks.causal(), backend="sdpa")
    explicit = attnkit.attention(q, k, v, score="dot", bias=loop_t5_bias(t5, 9, 13).to(dtype),
                                 mask=masks.causal(), backend="reference")
    assert_close(sdpa, ref, name="sdpa vs reference")
    assert_close(ref, explicit, name="T5 vs explicit bias")


def _as_input(module, name, tensor):
    """Replace parameter ``name`` of ``module`` by a plain tensor, so gradcheck can perturb it in place."""
    delattr(module, name)
    setattr(module, name, tensor)


def test_t5_gradcheck_through_reference_including_embedding():
    t5 = T5RelativeBias(2, num_buckets=6, max_distance=8).double()
    w = t5.embedding.weight.detach().clone().requires_grad_()
    _as_input(t5.embedding, "weight", w)
    q, k, v = make_qkv(1, 2, 4, 5, D=3, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, w: attnkit.attention(q, k, v, bias=t5, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, w))


def test_t5_embedding_receives_gradient_from_attention():
    t5 = T5RelativeBias(2, num_buckets=8, max_distance=16)
    q, k, v = make_qkv(1, 2, 4, D=8)
    attnkit.attention(q, k, v, bias=t5, backend="reference").square().sum().backward()
    g = t5.embedding.weight.grad
    used = torch.unique(t5.buckets(4, 4))
    assert g is not None and g[used].abs().sum() > 0
    unused = torch.ones(8, dtype=torch.bool)
    unused[used] = False
    assert torch.all(g[unused] == 0)


def test_t5_is_a_module_and_a_score_mod():
    t5 = T5RelativeBias(4)
    assert isinstance(t5, nn.Module) and isinstance(t5, attnkit.positions.ScoreMod) and t5.additive
    model = nn.Sequential(nn.Linear(3, 3), t5)
    assert "1.embedding.weight" in model.state_dict()
    model.apply(lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Embedding) else None)  # nn.Module.apply
    assert torch.all(t5.embedding.weight == 0)
    s = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(t5.apply_to_scores(s), s)               # ScoreMod.apply_to_scores with a zero embedding
    with pytest.raises(ValueError, match="num_heads = 4"):
        attnkit.attention(*make_qkv(1, 2, 3, D=4), bias=t5)
    with pytest.raises(ValueError, match="num_buckets"):
        T5RelativeBias(2, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(2, num_buckets=32, max_distance=4)


def test_relative_positions_bottom_right():
    assert relative_positions(2, 4).tolist() == [[-2, -1, 0, 1], [-3, -2, -1, 0]]


# -- Shaw et al. 2018 ---------------------------------------------------------------------------

def loop_shaw(q, k, v, aK, aV, kmax, causal=False):
    """Shaw et al. eqs. (3)-(5), double loop: e_ij = q_i (k_j + aK_ij) / sqrt(d); z_i = Σ α_ij (v_j + aV_ij).
    aK/aV: (2k+1, d) shared, or (H, 2k+1, d) per head. k/v may have fewer heads (GQA)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            tK = aK if aK.dim() == 2 else aK[h]
            tV = aV if aV.dim() == 2 else aV[h]
            for i in range(Tq):
                ip = i + Tk - Tq
                e = []
                for j in range(Tk):
                    r = min(max(j - ip, -kmax), kmax) + kmax
                    e.append((q[b, h, i] @ (k[b, kh, j] + tK[r])).item() / math.sqrt(D))
                e = torch.tensor(e, dtype=torch.float64)
                if causal:
                    e = e.masked_fill(torch.arange(Tk) > ip, float("-inf"))
                if torch.isinf(e).all():
                    continue
                a = torch.softmax(e, 0)
                for j in range(Tk):
                    r = min(max(j - ip, -kmax), kmax) + kmax
                    out[b, h, i] += a[j] * (v[b, kh, j] + tV[r])
    return out


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk,Hkv", [(5, 5, 2), (3, 7, 1), (6, 4, 2)])
def test_shaw_matches_double_loop(per_head, causal, Tq, Tk, Hkv):
    torch.manual_seed(3)
    shaw = ShawRelative(4, max_relative_position=2, num_heads=2 if per_head else None).double()
    q, k, v = make_qkv(2, 2, Tq, Tk, D=4, Hkv=Hkv, dtype=torch.float64)
    out = shaw.attention(q, k, v, mask=masks.causal() if causal else None)
    expected = loop_shaw(q, k, v, shaw.key_table.detach(), shaw.value_table.detach(), 2, causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_shaw_key_bias_gives_shaws_scores_through_attention():
    shaw = ShawRelative(4, max_relative_position=1).double()
    q, k, v = make_qkv(1, 1, 4, D=4, dtype=torch.float64)
    _, w = attnkit.attention(q, k, v, bias=shaw.key_bias(q, 4), return_weights=True)
    aK = shaw.key_table.detach()
    e = torch.empty(4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            e[i, j] = q[0, 0, i] @ (k[0, 0, j] + aK[min(max(j - i, -1), 1) + 1]) / 2.0
    torch.testing.assert_close(w[0, 0], torch.softmax(e, -1), rtol=0, atol=1e-14)


def test_shaw_value_term_matches_loop_and_values_dim():
    shaw = ShawRelative(4, max_relative_position=3, value_dim=5).double()
    w = torch.rand(2, 3, 4, 9, dtype=torch.float64)
    aV = shaw.value_table.detach()
    expected = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    for i in range(4):
        for j in range(9):
            expected[:, :, i] += w[:, :, i, j, None] * aV[min(max(j - (i + 5), -3), 3) + 3]
    torch.testing.assert_close(shaw.value_term(w), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("per_head", [False, True])
def test_shaw_gradcheck(per_head):
    shaw = ShawRelative(3, max_relative_position=1, num_heads=2 if per_head else None).double()
    aK = shaw.key_table.detach().clone().requires_grad_()
    aV = shaw.value_table.detach().clone().requires_grad_()
    _as_input(shaw, "key_table", aK)
    _as_input(shaw, "value_table", aV)
    q, k, v = make_qkv(1, 2, 3, 4, D=3, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, aK, aV: shaw.attention(q, k, v, mask=masks.causal())  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, aK, aV))


def test_shaw_dropout_uses_the_same_dropped_weights_for_both_terms():
    shaw = ShawRelative(4, max_relative_position=2).double()
    q, k, v = make_qkv(1, 2, 5, D=4, dtype=torch.float64)
    out, w = shaw.attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(7), return_weights=True)
    # replay the reference's counter-based dropout mask from the same generator state
    from attnkit.kernels.dropout import draw_seed, keep_mask, row_hash
    from attnkit.masks.base import index_grid

    b, h, i, j = index_grid(*w.shape)
    keep = keep_mask(row_hash(draw_seed(torch.Generator().manual_seed(7)), b, h, i), j, 0.5)
    wd = w * keep / 0.5
    expected = wd @ v + shaw.value_term(wd)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


def test_shaw_errors():
    shaw = ShawRelative(4, max_relative_position=2, num_heads=2)
    with pytest.raises(ValueError, match="head_dim D = 4"):
        shaw.key_bias(torch.randn(1, 2, 3, 5), 3)
    with pytest.raises(ValueError, match="num_heads = 2"):
        shaw.key_bias(torch.randn(1, 3, 3, 4), 3)
    with pytest.raises(ValueError, match="value_dim"):
        shaw.attention(*make_qkv(1, 2, 3, D=4, Dv=6))
    with pytest.raises(ValueError, match="dropout_p"):
        shaw.attention(*make_qkv(1, 2, 3, D=4), dropout_p=1.5)
    with pytest.raises(ValueError, match="max_relative_position"):
        ShawRelative(4, -1)


def test_t5_and_shaw_bfloat16_close_to_float64():
    t5 = T5RelativeBias(2, num_buckets=8, max_distance=16)
    shaw = ShawRelative(8, max_relative_position=3)
    q, k, v = make_qkv(1, 2, 12, D=8, dtype=torch.float64)
    for run in (lambda q, k, v: attnkit.attention(q, k, v, bias=t5, mask=masks.causal()),
                lambda q, k, v: shaw.attention(q, k, v)):
        gold = run(q, k, v)
        with torch.no_grad():
            low = run(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.double(), gold.detach(), rtol=0, atol=6e-2)


def test_t5_embedding_gradient_same_through_sdpa_and_reference():
    t5 = T5RelativeBias(2, num_buckets=8, max_distance=16).double()
    q, k, v = make_qkv(1, 2, 5, D=4, dtype=torch.float64)
    grads = []
    for backend in ("reference", "sdpa"):
        t5.zero_grad()
        attnkit.attention(q, k, v, bias=t5, backend=backend).square().sum().backward()
        grads.append(t5.embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
