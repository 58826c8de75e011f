import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnkit.nn import AttentionPooling

X = [[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]  # T = 3 positions, D = 2


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def pooled(a):
    return [sum(a[i] * X[i][d] for i in range(3)) for d in range(2)]


def test_query_mode_hand_computed():
    pool = AttentionPooling(2, mode="query")
    with torch.no_grad():
        pool.query.copy_(torch.tensor([[1.0, -0.5]]))
    a = softmax([1.0 * x[0] - 0.5 * x[1] for x in X])  # [1, -1, -1.5]
    z, w = pool(torch.tensor([X]))
    torch.testing.assert_close(w, torch.tensor([a]))
    torch.testing.assert_close(z, torch.tensor([pooled(a)]))


def test_mlp_mode_hand_computed():
    pool = AttentionPooling(2, hidden_dim=2, mode="mlp")
    with torch.no_grad():
        pool.proj.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        pool.proj.bias.copy_(torch.tensor([0.0, -1.0]))
        pool.query.copy_(torch.tensor([[2.0, -1.0]]))  # u_w
    # u_i = tanh([x0, x0 + x1 - 1]);  score = 2 u_i0 - u_i1
    a = softmax([2 * math.tanh(x[0]) - math.tanh(x[0] + x[1] - 1.0) for x in X])
    z, w = pool(torch.tensor([X]))
    torch.testing.assert_close(w, torch.tensor([a]))
    torch.testing.assert_close(z, torch.tensor([pooled(a)]))


@pytest.mark.parametrize("mode", ["query", "mlp"])
def test_multiple_queries_each_pool_independently(mode):
    pool = AttentionPooling(4, mode=mode, num_queries=3)
    single = AttentionPooling(4, mode=mode)
    if mode == "mlp":
        single.proj.load_state_dict(pool.proj.state_dict())
    x = torch.randn(2, 5, 4)
    pad = torch.tensor([[False] * 5, [False, False, True, False, True]])
    z, w = pool(x, key_padding_mask=pad)
    assert z.shape == (2, 3, 4) and w.shape == (2, 3, 5)
    for n in range(3):
        with torch.no_grad():
            single.query.copy_(pool.query[n:n + 1])
        zn, wn = single(x, key_padding_mask=pad)
        torch.testing.assert_close(z[:, n], zn)
        torch.testing.assert_close(w[:, n], wn)
    assert AttentionPooling(4, num_queries=1)(x)[0].shape == (2, 1, 4)


@settings(max_examples=10, deadline=None)
@given(mode=st.sampled_from(["query", "mlp"]), B=st.integers(1, 3), T=st.integers(1, 6), D=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_padding(mode, B, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pool = AttentionPooling(D, mode=mode)
    x = torch.randn(B, T, D, generator=g)
    pad = torch.rand(B, T, generator=g) < 0.4
    z, w = pool(x, key_padding_mask=pad)
    assert (w[pad] == 0).all()
    alive = ~pad.all(-1)
    torch.testing.assert_close(w.sum(-1)[alive], torch.ones(int(alive.sum())))
    assert (z[~alive] == 0).all() and not z.isnan().any()
    x2 = x.clone()
    x2[pad] = 1e3
    z2, w2 = pool(x2, key_padding_mask=pad)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(w2, w)
    # pooling equals the weighted sum of the inputs
    torch.testing.assert_close(z, torch.einsum("bt,btd->bd", w, x))


@pytest.mark.parametrize("mode", ["query", "mlp"])
def test_gradcheck_float64(mode):
    pool = AttentionPooling(3, mode=mode, num_queries=2).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, True, False, False], [False, False, False, False]])
    assert torch.autograd.gradcheck(lambda x: pool(x, key_padding_mask=pad)[0], (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    pool = AttentionPooling(4, mode="mlp")
    x = torch.randn(2, 5, 4)
    gold, _ = pool(x.double())
    z, w = pool(x.to(dtype))
    assert z.dtype == dtype
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(z.double(), gold, atol=tol, rtol=tol)


def test_errors():
    with pytest.raises(ValueError, match="'mlp', 'query'"):
        AttentionPooling(4, mode="max")
    with pytest.raises(TypeError, match="mode must be one of"):
        AttentionPooling(4, mode=1)
    with pytest.raises(ValueError, match="hidden_dim is only used by mode='mlp'"):
        AttentionPooling(4, hidden_dim=3)
    with pytest.raises(ValueError, match="num_queries"):
        AttentionPooling(4, num_queries=0)
    with pytest.raises(ValueError, match="input_dim"):
        AttentionPooling(0)
    pool = AttentionPooling(4)
    with pytest.raises(ValueError, match=r"x must have 4 features"):
        pool(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"x must be a 3-D"):
        pool(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 3\)"):
        pool(torch.randn(2, 3, 4), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
