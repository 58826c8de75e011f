"""Score functions: hand-computed 2x3 cases, gradcheck, and bad input."""

import math

import pytest
import torch
from torch import nn

import attnkit
from attnkit import scores
from attnkit.testing import assert_close

# Two queries, three keys, feature size 2, one batch and one head.
Q = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
K = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
V = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)


def run(score, **kw):
    return attnkit.attention(Q[None, None], K[None, None], V[None, None], score=score, return_weights=True,
                             backend="reference", **kw)


def softmax_rows(rows):
    out = []
    for r in rows:
        e = [math.exp(x) for x in r]
        out.append([x / sum(e) for x in e])
    return torch.tensor(out, dtype=torch.float64)


def test_dot_and_scaled_dot_by_hand():
    raw = [[1.0, 2.0, 0.0], [2.0, 0.0, -2.0]]
    out, w = run("dot")
    expect = softmax_rows(raw)
    assert_close(w[0, 0], expect)
    assert_close(out[0, 0], expect @ V)
    _, w = run("scaled_dot")
    assert_close(w[0, 0], softmax_rows([[x / math.sqrt(2) for x in r] for r in raw]))


def test_cosine_by_hand():
    # cos(q1,k1)=1/sqrt2, cos(q1,k2)=1, cos(q1,k3)=0; cos(q2,k1)=1/sqrt2, cos(q2,k2)=0, cos(q2,k3)=-1
    r = 1 / math.sqrt(2)
    tau = 0.5
    _, w = run(scores.Cosine(tau=tau))
    assert_close(w[0, 0], softmax_rows([[r / tau, 1 / tau, 0.0], [r / tau, 0.0, -1 / tau]]))


def test_general_by_hand():
    W = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # swaps the key's features
    # q W k: q1=[1,0] -> [0,1]·k = k_y: [1, 0, -1]; q2=[0,2] -> [2,0]·k = 2 k_x: [2, 4, 0]
    _, w = run(scores.General(weight=W))
    assert_close(w[0, 0], softmax_rows([[1.0, 0.0, -1.0], [2.0, 4.0, 0.0]]))


def test_general_per_head_weights():
    W = torch.stack([torch.eye(2), 2 * torch.eye(2)]).double()
    q, k = torch.randn(1, 2, 3, 2, dtype=torch.float64), torch.randn(1, 2, 4, 2, dtype=torch.float64)
    s = scores.General(weight=W)(q, k)
    assert_close(s[:, 0], q[:, 0] @ k[:, 0].transpose(-1, -2))
    assert_close(s[:, 1], 2 * q[:, 1] @ k[:, 1].transpose(-1, -2))


def test_additive_by_hand():
    s = scores.Additive(query_dim=2, key_dim=2, hidden_dim=2).double()
    with torch.no_grad():
        s.query_proj.weight.copy_(torch.eye(2))
        s.key_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        s.key_proj.bias.copy_(torch.tensor([0.5, 0.0]))
        s.v.weight.copy_(torch.tensor([[1.0, 2.0]]))
    raw = []
    for q in Q.tolist():
        row = []
        for k in K.tolist():
            h0 = math.tanh(q[0] + k[0] + 0.5)
            h1 = math.tanh(q[1] - k[1])
            row.append(1.0 * h0 + 2.0 * h1)
        raw.append(row)
    out, w = run(s)
    assert_close(w[0, 0], softmax_rows(raw))
    assert_close(out[0, 0], softmax_rows(raw) @ V)


def test_additive_project_combine_equals_forward_on_blocks():
    s = scores.Additive(3, 5, 4).double()
    q, k = torch.randn(2, 2, 7, 3, dtype=torch.float64), torch.randn(2, 2, 6, 5, dtype=torch.float64)
    full = s(q, k)
    a, b = s.project(q, k)
    assert_close(s.combine(a[:, :, 2:5], b[:, :, 1:4]), full[:, :, 2:5, 1:4])


def test_location_ignores_key_content():
    s = scores.Location(query_dim=2, max_keys=5).double()
    w1 = run(s)[1]
    K2 = torch.randn_like(K)
    w2 = attnkit.attention(Q[None, None], K2[None, None], V[None, None], score=s, return_weights=True)[1]
    assert_close(w1, w2)
    with torch.no_grad():
        expect = torch.softmax(s.proj(Q)[:, :3], -1)
    assert_close(w1[0, 0], expect)


@pytest.mark.parametrize("make", [
    lambda: scores.General(3, 3),
    lambda: scores.General(3, 3, heads=2),
    lambda: scores.Additive(3, 3, 4),
    lambda: scores.Location(3, 6),
    lambda: scores.Cosine(0.3),
])
def test_gradcheck_parameterized_scores(make):
    s = make().double()
    q = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 4, 2, dtype=torch.float64, requires_grad=True)
    params = tuple(p for p in s.parameters())

    def f(q, k, v, *ps):
        with torch.no_grad():
            for p, new in zip(params, ps):
                p.copy_(new)
        return attnkit.attention(q, k, v, score=s, mask=attnkit.masks.causal(), backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v))
    # parameters get gradients through the attention call
    attnkit.attention(q, k, v, score=s).sum().backward()
    for p in s.parameters():
        if p.requires_grad and p is not getattr(getattr(s, "key_proj", None), "bias", None):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_score_modules_train_with_their_owner():
    owner = nn.Module()
    owner.score = scores.Additive(4, 4, 8)
    assert len(list(owner.parameters())) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameterized_scores_in_low_precision(dtype):
    s = scores.Additive(4, 4, 8)
    q = torch.randn(1, 1, 3, 4)
    out32 = attnkit.attention(q, q, q, score=s)
    out = attnkit.attention(q.to(dtype), q.to(dtype), q.to(dtype), score=s)
    assert out.dtype == dtype
    assert_close(out, out32, dtype=dtype, scale=3)


def test_score_errors():
    with pytest.raises(ValueError, match=r"Additive score expects q \(\.\.\., 3\) and k \(\.\.\., 5\); got q \(\.\.\., 4\)"):
        attnkit.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                          score=scores.Additive(3, 5, 2))
    with pytest.raises(ValueError, match="General weight has shape"):
        attnkit.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                          score=scores.General(3, 4))
    with pytest.raises(ValueError, match="max_keys = 2"):
        attnkit.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4),
                          score=scores.Location(4, 2))
    with pytest.raises(ValueError, match="tau must be > 0; got 0"):
        scores.Cosine(tau=0)
    with pytest.raises(ValueError, match="hidden_dim must be > 0; got -1"):
        scores.Additive(3, 3, -1)
    with pytest.raises(TypeError, match="query_dim must be an int"):
        scores.General(2.5, 2)
