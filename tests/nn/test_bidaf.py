import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnkit.nn import BidirectionalAttention


def materializing_bidaf(flow, c, q, c_keep, q_keep):
    """Seo et al. 2017 §2.4 as written: build the (B, T, J, 3d) tensor [c_t; q_j; c_t ∘ q_j]."""
    c, q = c.double(), q.double()
    B, T, d = c.shape
    J = q.shape[1]
    ct = c.unsqueeze(2).expand(B, T, J, d)
    qj = q.unsqueeze(1).expand(B, T, J, d)
    S = torch.cat([ct, qj, ct * qj], dim=-1) @ flow.similarity.weight.double()   # (B, T, J)
    a = torch.zeros(B, T, J, dtype=torch.float64)
    b = torch.zeros(B, T, dtype=torch.float64)
    G = torch.zeros(B, T, 4 * d, dtype=torch.float64)
    for n in range(B):
        real_j = q_keep[n].nonzero().flatten()
        real_t = c_keep[n].nonzero().flatten()
        m = torch.zeros(T, dtype=torch.float64)
        if len(real_j):
            for t in real_t:
                a[n, t, real_j] = torch.softmax(S[n, t, real_j], 0)
            m = S[n][:, real_j].max(-1).values
        if len(real_t):
            b[n, real_t] = torch.softmax(m[real_t], 0)
        u = a[n] @ q[n]                       # (T, d)
        h = b[n] @ c[n]                       # (d,)
        Gn = torch.cat([c[n], u, c[n] * u, c[n] * h.expand(T, d)], -1)
        G[n, real_t] = Gn[real_t]
    return G, a, b


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), J=st.integers(1, 5), d=st.integers(1, 4),
       seed=st.integers(0, 10_000), pad_context=st.booleans(), pad_query=st.booleans())
def test_matches_materializing_implementation(B, T, J, d, seed, pad_context, pad_query):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flow = BidirectionalAttention(d)
    c, q = torch.randn(B, T, d, generator=g), torch.randn(B, J, d, generator=g)
    c_pad = (torch.rand(B, T, generator=g) < 0.3) if pad_context else torch.zeros(B, T, dtype=torch.bool)
    q_pad = (torch.rand(B, J, generator=g) < 0.3) if pad_query else torch.zeros(B, J, dtype=torch.bool)
    G, a, b = flow(c, q, c_pad if pad_context else None, q_pad if pad_query else None)
    G_ref, a_ref, b_ref = materializing_bidaf(flow, c, q, ~c_pad, ~q_pad)
    assert G.shape == (B, T, 4 * d) and a.shape == (B, T, J) and b.shape == (B, T)
    torch.testing.assert_close(G.double(), G_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.double(), a_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.double(), b_ref, atol=1e-6, rtol=1e-5)


def test_padding_zero_weight_and_invariance():
    flow = BidirectionalAttention(3)
    c, q = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    c_pad = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    q_pad = torch.tensor([[False, False, True, False], [False, False, False, True]])
    G, a, b = flow(c, q, c_pad, q_pad)
    assert (a.masked_select(q_pad.unsqueeze(1).expand_as(a)) == 0).all()
    assert (b[c_pad] == 0).all() and (a[c_pad] == 0).all() and (G[c_pad] == 0).all()
    torch.testing.assert_close(b.sum(-1), torch.ones(2))
    torch.testing.assert_close(a.sum(-1), (~c_pad).float())
    c2, q2 = c.clone(), q.clone()
    c2[c_pad], q2[q_pad] = 50.0, -50.0
    G2, a2, b2 = flow(c2, q2, c_pad, q_pad)
    for x, y in ((G2, G), (a2, a), (b2, b)):
        torch.testing.assert_close(x, y)


def test_fully_padded_query_or_context_gives_zeros_not_nan():
    flow = BidirectionalAttention(2)
    c, q = torch.randn(2, 3, 2), torch.randn(2, 2, 2)
    q_pad = torch.tensor([[True, True], [False, False]])
    c_pad = torch.tensor([[False, False, False], [True, True, True]])
    G, a, b = flow(c, q, c_pad, q_pad)
    for x in (G, a, b):
        assert not x.isnan().any()
    assert (a[0] == 0).all()                  # no query word: ũ = 0
    torch.testing.assert_close(b[0], torch.full((3,), 1 / 3))  # max_j over nothing -> 0 for every t
    assert (G[1] == 0).all() and (b[1] == 0).all()


def test_gradcheck_float64():
    flow = BidirectionalAttention(2).double()
    c = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    c_pad = torch.tensor([[False, False, False, True], [False] * 4])
    q_pad = torch.tensor([[False, True, False], [False] * 3])
    assert torch.autograd.gradcheck(lambda c, q: torch.cat([x.flatten() for x in flow(c, q, c_pad, q_pad)]), (c, q))
    assert torch.autograd.gradcheck(lambda c, q: flow(c, q)[0], (c, q))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    flow = BidirectionalAttention(4)
    c, q = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    gold, _, _ = flow(c.double(), q.double())
    G, a, b = flow(c.to(dtype), q.to(dtype))
    assert G.dtype == dtype and a.dtype == dtype and b.dtype == dtype
    tol = 1e-1 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(G.double(), gold, atol=tol, rtol=tol)


def test_errors():
    with pytest.raises(ValueError, match="dim"):
        BidirectionalAttention(0)
    flow = BidirectionalAttention(3)
    c, q = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="query must have 3 features"):
        flow(c, torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="same batch size"):
        flow(c, torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=r"context_padding_mask must have shape \(2, 5\)"):
        flow(c, q, context_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query_padding_mask must have shape \(2, 4\)"):
        flow(c, q, query_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_padding_mask must be a bool"):
        flow(c, q, query_padding_mask=torch.zeros(2, 4, dtype=torch.long))
