import math

import pytest
import torch
from torch import nn

from attnkit.nn import AttentionMemory, GatedAttentionHeads


# -- independent computations from the documented equations (docs/gated_attention.md) ----------
def heads_reference(m, x, keep):
    """GatedAttentionHeads with explicit loops over batch and heads, float64."""
    x = x.double()
    Wx, bx = m.input_proj.weight.double(), m.input_proj.bias.double()
    Wk, bk = m.key_proj.weight.double(), m.key_proj.bias.double()
    Wo, bo = m.out_proj.weight.double(), m.out_proj.bias.double()
    B, T, _ = x.shape
    K, d, nh = m.num_heads, m.head_dim, m.hidden_dim
    ys, ws = [], torch.zeros(B, K, T, dtype=torch.float64)
    for b in range(B):
        H = torch.sigmoid(x[b] @ Wx.t() + bx)                                 # (T, n_h)
        real = keep[b].nonzero().flatten()
        heads = []
        for i in range(K):
            Wi, thetai = Wk[i * d:(i + 1) * d], bk[i * d:(i + 1) * d]
            keys = torch.tanh(H @ Wi.t() + thetai)                            # (T, d)
            r = torch.zeros(nh, dtype=torch.float64)
            if len(real):
                a = torch.softmax(keys[real] @ m.queries[i].double() / math.sqrt(d), 0)
                ws[b, i, real] = a
                r = a @ H[real]
            heads.append(r)
        ys.append(torch.sigmoid(torch.cat(heads) @ Wo.t() + bo))
    return torch.stack(ys), ws


def memory_reference(m, x, keep, steps):
    """AttentionMemory step by step with explicit sums over positions, float64."""
    x = x.double()
    p = {k: v.double() for k, v in m.state_dict().items()}
    B, n, D = x.shape
    M = m.memory_dim
    Y, Fs, Gs = torch.zeros(B, steps, M, dtype=torch.float64), torch.zeros(B, steps, n, dtype=torch.float64), \
        torch.zeros(B, steps, M, dtype=torch.float64)
    Wq = p["score.query_proj.weight"]
    Wa, Wy = Wq[:, :D], Wq[:, D:]
    Wx, theta, v = p["score.key_proj.weight"], p["score.key_proj.bias"], p["score.v.weight"][0]
    Wu, Uu, bu = p["update.weight"][:, :D], p["update.weight"][:, D:], p["update.bias"]
    Wg, Ug, bg = p["gate.weight"][:, :D], p["gate.weight"][:, D:], p["gate.bias"]
    Wo, bo = p["output.weight"], p["output.bias"]
    for b in range(B):
        real = [i for i in range(n) if keep[b, i]]
        xbar = sum(x[b, i] for i in real) / len(real) if real else torch.zeros(D, dtype=torch.float64)
        mem, y = torch.zeros(M, dtype=torch.float64), torch.sigmoid(bo)
        for t in range(steps):
            c = torch.zeros(D, dtype=torch.float64)
            if real:
                e = torch.stack([v @ torch.tanh(Wx @ x[b, i] + Wa @ xbar + Wy @ y + theta) / math.sqrt(m.attn_dim)
                                 for i in real])
                F = torch.softmax(e, 0)
                for k, i in enumerate(real):
                    Fs[b, t, i] = F[k]
                    c = c + F[k] * x[b, i]
            u = torch.tanh(Wu @ c + Uu @ y + bu)
            g = torch.sigmoid(Wg @ c + Ug @ y + bg)
            mem = g * u + (1 - g) * mem
            y = torch.sigmoid(Wo @ mem + bo)
            Y[b, t], Gs[b, t] = y, g
    return Y, Fs, Gs


def marker_task(n, g, T=10, V=8, emb=None):
    """Sequences of random tokens 1..V-1 with random lengths; label 1 when the marker token 0 appears
    among the real positions. Padded positions hold the marker: a model that looks at padding fails."""
    tok = torch.randint(1, V, (n, T), generator=g)
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    pad = torch.arange(T)[None] >= lengths[:, None]
    y = torch.rand(n, generator=g) < 0.5
    pos = (torch.rand(n, generator=g) * lengths).long()
    tok[y, pos[y]] = 0
    tok[pad] = 0
    return emb[tok], pad, y.float()


def train_marker(encoder, features, out_dim, steps=150):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(8, 8, generator=g)
    xtr, ptr, ytr = marker_task(512, g, emb=emb)
    xte, pte, yte = marker_task(512, g, emb=emb)
    head = nn.Linear(out_dim, 1)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(head.parameters()), lr=0.03)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(head(features(xtr, ptr)).squeeze(-1), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((head(features(xte, pte)).squeeze(-1) > 0).float() == yte).float().mean().item()


PAD = torch.tensor([[False, False, False, True, True], [False] * 5, [True] * 5])


# -- GatedAttentionHeads ---------------------------------------------------------------------
def test_heads_match_reference_shapes_and_ranges():
    m = GatedAttentionHeads(input_dim=4, hidden_dim=6, num_heads=3, head_dim=5, output_dim=7)
    x = torch.randn(3, 5, 4)
    y, w = m(x, key_padding_mask=PAD)
    assert y.shape == (3, 7) and w.shape == (3, 3, 5)
    ref_y, ref_w = heads_reference(m, x, ~PAD)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    # rows sum to 1 over real positions, 0 on padding (and on the all-padding row)
    torch.testing.assert_close(w.sum(-1), torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3]))
    assert (w.masked_select(PAD.unsqueeze(1).expand_as(w)) == 0).all()
    # gates in (0, 1)
    H = m.input_gate(x)
    assert ((H > 0) & (H < 1)).all() and ((y > 0) & (y < 1)).all()


def test_heads_padding_invariance():
    m = GatedAttentionHeads(4, 6, 2, 3)
    x = torch.randn(3, 5, 4)
    y, w = m(x, key_padding_mask=PAD)
    x2 = x.clone()
    x2[PAD] = 100.0
    y2, w2 = m(x2, key_padding_mask=PAD)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(w2, w)


def test_heads_gradients_reach_every_parameter():
    m = GatedAttentionHeads(4, 6, 3, 5)
    y, _ = m(torch.randn(2, 5, 4), key_padding_mask=PAD[:2])
    (y * torch.randn_like(y)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_heads_gradcheck_float64():
    m = GatedAttentionHeads(3, 4, 2, 3).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, False, True, False], [False] * 4])
    assert torch.autograd.gradcheck(lambda x: torch.cat([o.flatten() for o in m(x, pad)]), (x,))


def test_heads_learn_marker_task():
    torch.manual_seed(0)
    m = GatedAttentionHeads(8, 16, 2, 8)
    acc = train_marker(m, lambda x, p: m(x, key_padding_mask=p)[0], 16)
    assert acc > 0.9, acc


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_heads_dtypes(dtype):
    m = GatedAttentionHeads(4, 6, 2, 3)
    x = torch.randn(3, 5, 4)
    gold, _ = m(x.double(), PAD)
    y, w = m(x.to(dtype), PAD)
    assert y.dtype == dtype and w.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(y.double(), gold, atol=tol, rtol=tol)


def test_heads_errors():
    for kwargs, name in (({"num_heads": 0}, "num_heads"), ({"head_dim": -1}, "head_dim"),
                         ({"hidden_dim": 0}, "hidden_dim"), ({"output_dim": 0}, "output_dim")):
        args = dict(input_dim=4, hidden_dim=6, num_heads=2, head_dim=3) | kwargs
        with pytest.raises(ValueError, match=name):
            GatedAttentionHeads(**args)
    m = GatedAttentionHeads(4, 6, 2, 3)
    with pytest.raises(ValueError, match="x must have 4 features"):
        m(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        m(torch.randn(2, 5, 4), key_padding_mask=torch.zeros(2, 5, 1, dtype=torch.bool))


# -- AttentionMemory -------------------------------------------------------------------------
def test_memory_matches_reference_shapes_and_ranges():
    m = AttentionMemory(input_dim=4, memory_dim=6, attn_dim=5, num_steps=3)
    x = torch.randn(3, 5, 4)
    y, F, g = m(x, key_padding_mask=PAD, return_gates=True)
    assert y.shape == (3, 3, 6) and F.shape == (3, 3, 5) and g.shape == (3, 3, 6)
    ref_y, ref_F, ref_g = memory_reference(m, x, ~PAD, 3)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(F.double(), ref_F, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g.double(), ref_g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(F.sum(-1), torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3]))
    assert (F.masked_select(PAD.unsqueeze(1).expand_as(F)) == 0).all()
    assert ((g > 0) & (g < 1)).all() and ((y > 0) & (y < 1)).all()
    assert not y.isnan().any()


def test_memory_num_steps():
    m = AttentionMemory(4, 6, num_steps=2)
    x = torch.randn(2, 5, 4)
    y2, F2 = m(x)
    y5, F5 = m(x, num_steps=5)
    assert y2.shape == (2, 2, 6) and y5.shape == (2, 5, 6) and F5.shape == (2, 5, 5)
    torch.testing.assert_close(y5[:, :2], y2)  # the recurrence does not depend on the number of steps ahead
    torch.testing.assert_close(F5[:, :2], F2)


def test_memory_padding_invariance():
    m = AttentionMemory(4, 6)
    x = torch.randn(3, 5, 4)
    y, F = m(x, key_padding_mask=PAD)
    x2 = x.clone()
    x2[PAD] = -100.0
    y2, F2 = m(x2, key_padding_mask=PAD)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(F2, F)
    # trailing padding equals truncation
    y3, F3 = m(x[:1, :3])
    torch.testing.assert_close(y3, y[:1])
    torch.testing.assert_close(F3, F[:1, :, :3])


def test_memory_gradients_reach_every_parameter():
    m = AttentionMemory(4, 6, num_steps=3)
    y, _ = m(torch.randn(2, 5, 4), key_padding_mask=PAD[:2])
    (y * torch.randn_like(y)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_memory_gradcheck_float64():
    m = AttentionMemory(3, 4, num_steps=2).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, True, False, False], [False] * 4])
    assert torch.autograd.gradcheck(lambda x: torch.cat([o.flatten() for o in m(x, pad, return_gates=True)]), (x,))


def test_memory_learns_marker_task():
    torch.manual_seed(0)
    m = AttentionMemory(8, 16, num_steps=2)
    acc = train_marker(m, lambda x, p: m(x, key_padding_mask=p)[0][:, -1], 16)
    assert acc > 0.9, acc


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_memory_dtypes(dtype):
    m = AttentionMemory(4, 6)
    x = torch.randn(3, 5, 4)
    gold, _ = m(x.double(), PAD)
    y, F = m(x.to(dtype), PAD)
    assert y.dtype == dtype and F.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(y.double(), gold, atol=tol, rtol=tol)


def test_memory_errors():
    for kwargs, name in (({"memory_dim": 0}, "memory_dim"), ({"num_steps": 0}, "num_steps"),
                         ({"attn_dim": 0}, "attn_dim")):
        with pytest.raises(ValueError, match=name):
            AttentionMemory(**(dict(input_dim=4, memory_dim=6) | kwargs))
    m = AttentionMemory(4, 6)
    with pytest.raises(ValueError, match="num_steps"):
        m(torch.randn(2, 5, 4), num_steps=0)
    with pytest.raises(ValueError, match="x must be a 3-D"):
        m(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        m(torch.randn(2, 5, 4), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        m(torch.randn(2, 5, 4), key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
