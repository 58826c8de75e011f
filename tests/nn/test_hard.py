"""HardAttention and StochasticHardAttention modules."""

import pytest
import torch

import attnkit
from attnkit.nn import HardAttention, StochasticHardAttention
from attnkit.normalizers import HardSample, TopK, reinforce_loss


def _data(B=3, Tq=4, Tk=6, dq=5, dk=5, dv=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Tq, dq, generator=gen), torch.randn(B, Tk, dk, generator=gen),
            torch.randn(B, Tk, dv, generator=gen))


def _explicit_scores(att, q, k):
    """Scores computed without attnkit.attention, from the module's own parameters."""
    if att.score == "dot":
        return q @ k.transpose(-2, -1)
    if att.score == "scaled_dot":
        return q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    sc = att.score
    if isinstance(sc, attnkit.scores.General):
        return q @ sc.weight @ k.transpose(-2, -1)
    a = q @ sc.query_proj.weight.t()                                # (B, Tq, h)
    b = k @ sc.key_proj.weight.t() + sc.key_proj.bias               # (B, Tk, h)
    return (torch.tanh(a[:, :, None] + b[:, None]) @ sc.v.weight.t()).squeeze(-1)


@pytest.mark.parametrize("score", ["dot", "scaled_dot", "general", "additive"])
def test_hardmax_picks_argmax_value(score):
    q, k, v = _data(dq=5 if score in ("dot", "scaled_dot") else 3)
    att = HardAttention(q.shape[-1], k.shape[-1], hidden_dim=7, score=score)
    ctx, w = att(q, k, v)
    assert ctx.shape == (3, 4, 2) and w.shape == (3, 4, 6)
    best = _explicit_scores(att, q, k).argmax(-1)                   # (B, Tq)
    assert torch.equal(w, torch.nn.functional.one_hot(best, 6).float())
    torch.testing.assert_close(ctx, torch.gather(v, 1, best[..., None].expand(-1, -1, 2)))


def test_key_padding_mask_is_respected_and_gradients_flow():
    q, k, v = _data(dq=3)
    att = HardAttention(3, 5, score="general")
    s = _explicit_scores(att, q, k).detach()
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0] = s[0].argmax(-1).bincount(minlength=6) > 0  # pad exactly the keys batch 0 would pick
    pad[2] = True                                        # batch 2: everything is padding
    v = v.requires_grad_()
    ctx, w = att(q, k, v, key_padding_mask=pad)
    assert (w[pad[:, None, :].expand_as(w)] == 0).all()
    assert (w[:2].sum(-1) == 1).all() and (w[2] == 0).all() and (ctx[2] == 0).all()
    best0 = s[0].masked_fill(pad[0], float("-inf")).argmax(-1)
    assert torch.equal(w[0].argmax(-1), best0)
    # straight-through: the bilinear weight gets the softmax gradient, the values the usual one
    (ctx * torch.randn_like(ctx)).sum().backward()
    g = att.score.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(v.grad).all() and (v.grad[2] == 0).all()


def test_modes_topk_gumbel_and_objects():
    q, k, v = _data()
    ctx, w = HardAttention(5, 5, mode="topk", k=2)(q, k, v)
    assert ((w > 0).sum(-1) == 2).all()
    ctx_obj, w_obj = HardAttention(5, 5, mode=TopK(k=2))(q, k, v)
    assert torch.equal(w, w_obj)
    att = HardAttention(5, 5, mode="gumbel", tau=0.5, generator=torch.Generator().manual_seed(0))
    _, w_train = att(q, k, v)
    assert ((w_train == 0) | (w_train == 1)).all() and (w_train.sum(-1) == 1).all()
    att.eval()  # eval: the argmax, without noise
    _, w_eval = att(q, k, v)
    _, w_hard = HardAttention(5, 5)(q, k, v)
    assert torch.equal(w_eval, w_hard)
    # with many queries, noisy training picks differ from the argmax somewhere
    att.train()
    qq = torch.randn(4, 50, 5)
    assert not torch.equal(att(qq, k[:1].expand(4, -1, -1), v[:1].expand(4, -1, -1))[1],
                           HardAttention(5, 5)(qq, k[:1].expand(4, -1, -1), v[:1].expand(4, -1, -1))[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="query_dim == key_dim"):
        HardAttention(3, 5)
    with pytest.raises(ValueError, match="'hardmax'"):
        HardAttention(4, 4, mode="argmax")
    with pytest.raises(ValueError, match="'general'"):
        HardAttention(4, 4, score="bilinear")
    att = HardAttention(4, 4)
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 1)
    with pytest.raises(ValueError, match="query"):
        att(torch.randn(2, 3, 6), k, v)
    with pytest.raises(ValueError, match="values"):
        att(q, k, torch.randn(2, 4, 1))
    with pytest.raises(ValueError, match="key_padding_mask"):
        att(q, k, v, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        att(q, k, v, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="query"):
        att(torch.randn(3, 4), k, v)


def test_stochastic_hard_attention_outputs():
    q, k, v = _data(dq=3)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, :4] = True
    pad[2] = True
    att = StochasticHardAttention(3, 5, score="general", generator=torch.Generator().manual_seed(0))
    ctx, w, sample = att(q, k, v, key_padding_mask=pad)
    assert isinstance(sample, HardSample)
    assert sample.index.shape == (3, 4) and sample.log_prob.shape == (3, 4)
    assert sample.probs.shape == (3, 4, 6) and sample.entropy.shape == (3, 4)
    assert (sample.index[2] == -1).all() and (sample.log_prob[2] == 0).all() and (w[2] == 0).all()
    assert (sample.index[1] >= 4).all()  # never a padded key
    for b in range(2):
        assert torch.equal(w[b], torch.nn.functional.one_hot(sample.index[b], 6).float())
        torch.testing.assert_close(ctx[b], v[b, sample.index[b]])
    s = _explicit_scores(att, q, k).detach().masked_fill(pad[:, None], float("-inf"))
    p = torch.softmax(s[:2], -1)
    torch.testing.assert_close(sample.probs[:2].detach(), p)
    torch.testing.assert_close(sample.log_prob[:2].detach(), p.gather(-1, sample.index[:2, :, None]).log().squeeze(-1))
    # reproducible with a generator; greedy (argmax) in eval mode
    att2 = StochasticHardAttention(3, 5, score="general", generator=torch.Generator().manual_seed(0))
    att2.load_state_dict(att.state_dict())
    assert torch.equal(att2(q, k, v, key_padding_mask=pad)[2].index, sample.index)
    att.eval()
    _, _, greedy = att(q, k, v, key_padding_mask=pad)
    assert torch.equal(greedy.index[:2], p.argmax(-1))


def test_stochastic_hard_attention_learns_with_reinforce():
    """Toy task: the query is a rotated, noisy copy of one key; reward 1 for sampling that key.
    Only REINFORCE can train the bilinear score (the weights carry no gradient)."""
    torch.manual_seed(0)
    D, Tk, B = 8, 8, 64
    data = torch.Generator().manual_seed(1)
    rot = torch.linalg.qr(torch.randn(D, D, generator=data))[0]

    def batch():
        keys = torch.randn(B, Tk, D, generator=data)
        target = torch.randint(Tk, (B,), generator=data)
        query = (keys[torch.arange(B), target] + 0.1 * torch.randn(B, D, generator=data)) @ rot
        return query[:, None], keys, target

    att = StochasticHardAttention(D, D, score="general", generator=torch.Generator().manual_seed(0))
    baseline = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam(list(att.parameters()) + [baseline], lr=0.05)

    def expected_reward():
        with torch.no_grad():
            q, keys, target = batch()
            _, _, s = att(q, keys, keys)
            return s.probs[torch.arange(B), 0, target].mean().item()

    before = expected_reward()
    for _ in range(150):
        q, keys, target = batch()
        _, _, s = att(q, keys, keys)
        reward = (s.index[:, 0] == target).float()
        loss = reinforce_loss(s.log_prob[:, 0], reward, baseline, entropy=s.entropy[:, 0], entropy_weight=1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = expected_reward()
    chance = 1 / Tk
    assert before < 2 * chance
    assert after > 0.6, f"expected reward {after:.3f} did not rise clearly above chance {chance:.3f}"
    assert 0.3 < baseline.item() < 1.0  # the learned baseline tracks the average reward
