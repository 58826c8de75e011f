"""Whatever a module is configured with that has parameters -- a learned score mod (T5 buckets,
an nn.Module, a function closing over an nn.Parameter, a learned bias tensor), a score object
-- is part of the module: it is in parameters() and state_dict(), survives save/load, and an
optimizer built from model.parameters() changes it in one step. (A learned bias kept in a
plain tuple got gradients that no optimizer ever applied.)"""

import pytest
import torch
from torch import nn

import attnkit
from attnkit.nn import HardAttention, MultiheadAttention, SlidingWindowAttention


class DistanceSlope(nn.Module):
    """A user's learned per-head distance penalty, written as a score_mod module."""

    def __init__(self, heads: int):
        super().__init__()
        self.slope = nn.Parameter(torch.full((heads,), 0.1))

    def forward(self, score, b, h, q_idx, kv_idx):
        return score - self.slope[h] * (q_idx - kv_idx).abs()


def closure_mod(heads: int):
    w = nn.Parameter(torch.full((heads,), 0.1))

    def decay(score, b, h, q_idx, kv_idx):
        return score - w[h] * (q_idx - kv_idx).abs()

    return decay, w


def learned_parts(kind: str, heads: int):
    """(score_mod, the tensors that must train)."""
    if kind == "t5":
        t5 = attnkit.positions.T5RelativeBias(heads, num_buckets=8, max_distance=16)
        return t5, list(t5.parameters())
    if kind == "module":
        m = DistanceSlope(heads)
        return m, [m.slope]
    if kind == "closure":
        fn, w = closure_mod(heads)
        return fn, [w]
    if kind == "tensor":
        t = nn.Parameter(0.1 * torch.randn(heads, 5, 5))
        return t, [t]
    if kind == "bias_mod":
        w = nn.Parameter(torch.full((heads,), 0.1))
        return attnkit.positions.bias_mod(lambda b, h, q_idx, kv_idx: -w[h] * (q_idx - kv_idx).abs()), [w]
    raise AssertionError(kind)


def one_step_changes(model: nn.Module, run, tensors):
    """Build the optimizer the usual way, take one step, return whether each tensor changed."""
    before = [t.detach().clone() for t in tensors]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = run().square().mean()
    loss.backward()
    opt.step()
    return [not torch.equal(b, t.detach()) for b, t in zip(before, tensors)]


KINDS = ["t5", "module", "closure", "tensor", "bias_mod"]


@pytest.mark.parametrize("kind", KINDS)
def test_multihead_score_mod_parameters_train_and_save(kind):
    torch.manual_seed(0)
    mod, tensors = learned_parts(kind, 4)
    m = MultiheadAttention(16, 4, batch_first=True, score_mod=mod)
    params = list(m.parameters())
    for t in tensors:
        assert any(p is t for p in params), f"{kind}: learned part missing from parameters()"
        assert any(v.data_ptr() == t.data_ptr() for v in m.state_dict().values()), f"{kind}: missing from state_dict"
    x = torch.randn(2, 5, 16)
    assert all(one_step_changes(m, lambda: m(x, need_weights=False)[0], tensors)), kind
    # save and load into a fresh module: the learned values come back
    mod2, tensors2 = learned_parts(kind, 4)
    m2 = MultiheadAttention(16, 4, batch_first=True, score_mod=mod2)
    m2.load_state_dict(m.state_dict())
    for a, b in zip(tensors, tensors2):
        assert torch.equal(a.detach(), b.detach())
    torch.testing.assert_close(m2(x)[0], m(x)[0])


def test_the_report_t5_bias_is_listed():
    m = MultiheadAttention(64, 4, score_mod=attnkit.positions.T5RelativeBias(4))
    names = [n for n, _ in m.named_parameters()]
    assert any(n.startswith("score_mod.0.") for n in names), names
    assert any(k.startswith("score_mod.0.") for k in m.state_dict())


def test_sliding_window_attention_registers_its_score_mod():
    t5 = attnkit.positions.T5RelativeBias(2, num_buckets=8, max_distance=16)
    m = SlidingWindowAttention(8, 2, window=2, score_mod=[attnkit.positions.ALiBi(2), t5])
    assert {id(p) for p in t5.parameters()} <= {id(p) for p in m.parameters()}
    x = torch.randn(1, 6, 8)
    assert all(one_step_changes(m, lambda: m(x)[0], list(t5.parameters())))


def test_score_object_parameters_train():
    score = attnkit.scores.General(4, 4)
    m = MultiheadAttention(8, 2, batch_first=True, score=score)
    x = torch.randn(1, 3, 8)
    assert all(one_step_changes(m, lambda: m(x)[0], [score.weight]))


def test_hard_attention_registers_its_score():
    score = attnkit.scores.General(6, 6)
    m = HardAttention(6, 6, score=score, mode="topk", k=2)
    assert any(p is score.weight for p in m.parameters())


def test_lambda_inside_a_models_init_does_not_register_the_model():
    """A score_mod written in a model's __init__ closes over `self`: registering the model
    inside its own submodule would make the module tree a cycle (state_dict recursing forever)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.slope = nn.Parameter(torch.tensor(0.1))
            self.attn = MultiheadAttention(8, 2, batch_first=True,
                                           score_mod=lambda s, b, h, q, k: s - self.slope * (q - k).abs())

    net = Net()
    keys = list(net.state_dict())  # would recurse forever through a cycle
    assert not any(k.startswith("attn.score_mod") for k in keys), keys
    assert sum(1 for n, _ in net.named_parameters() if "slope" in n) == 1
    x = torch.randn(1, 4, 8)
    assert all(one_step_changes(net, lambda: net.attn(x)[0], [net.slope]))


def test_plain_score_mods_add_nothing():
    m = MultiheadAttention(8, 2, score_mod=[attnkit.positions.ALiBi(2), attnkit.positions.softcap(5.0),
                                           lambda s, b, h, q, k: s])
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {"q_proj", "k_proj", "v_proj", "out_proj"}


@pytest.mark.parametrize("name", sorted(set(attnkit.nn.__all__) - {"KVCache"}))  # KVCache holds no parameters
def test_every_parameter_of_every_nn_module_gets_a_gradient(name):
    """One forward/backward of each module: every parameter it lists receives a gradient (a
    parameter that never gets one is dead weight or a wiring bug)."""
    torch.manual_seed(0)
    build = {
        "MultiheadAttention": lambda: (MultiheadAttention(8, 2, batch_first=True),
                                       lambda m: m(torch.randn(2, 5, 8))[0]),
        "SlidingWindowAttention": lambda: (SlidingWindowAttention(8, 2, window=2),
                                           lambda m: m(torch.randn(2, 5, 8))[0]),
        "AdditiveAttention": lambda: (attnkit.nn.AdditiveAttention(6, 5, 7),
                                      lambda m: m(torch.randn(2, 3, 6), torch.randn(2, 4, 5), torch.randn(2, 4, 5))[0]),
        "LuongAttention": lambda: (attnkit.nn.LuongAttention(6, score="general"),
                                   lambda m: m(torch.randn(2, 3, 6), torch.randn(2, 4, 6))[0]),
        "LinearAttention": lambda: (attnkit.nn.LinearAttention(8, 2), lambda m: m(torch.randn(2, 5, 8))[0]),
        "PerformerAttention": lambda: (attnkit.nn.PerformerAttention(8, 2, num_features=16, seed=0),
                                       lambda m: m(torch.randn(2, 5, 8))[0]),
        "LinformerAttention": lambda: (attnkit.nn.LinformerAttention(8, 2, seq_len=5, proj_len=3),
                                       lambda m: m(torch.randn(2, 5, 8))[0]),
        "AttentionPooling": lambda: (attnkit.nn.AttentionPooling(6, mode="mlp", hidden_dim=4),
                                     lambda m: m(torch.randn(2, 5, 6))[0]),
        "BidirectionalAttention": lambda: (attnkit.nn.BidirectionalAttention(8),
                                           lambda m: m(torch.randn(2, 7, 8), torch.randn(2, 4, 8))[0]),
        "GatedAttentionHeads": lambda: (attnkit.nn.GatedAttentionHeads(input_dim=6, hidden_dim=8, num_heads=3,
                                                                       head_dim=4),
                                        lambda m: m(torch.randn(2, 5, 6))[0]),
        "AttentionMemory": lambda: (attnkit.nn.AttentionMemory(input_dim=6, memory_dim=8, num_steps=3),
                                    lambda m: m(torch.randn(2, 5, 6))[0]),
        "HierarchicalAttention": lambda: (attnkit.nn.HierarchicalAttention(embed_dim=8, word_hidden=5, sent_hidden=6),
                                          lambda m: m(torch.randn(2, 3, 4, 8))[0]),
        "LocationAwareAttention": lambda: (
            attnkit.nn.LocationAwareAttention(4, 6, 8, channels=3, kernel_size=3),
            lambda m: m(torch.randn(2, 4), torch.randn(2, 7, 6), torch.randn(2, 7, 6),
                        torch.softmax(torch.randn(2, 7), -1))[0]),
        "LocalAttention": lambda: (attnkit.nn.LocalAttention(6, 6, D=2, mode="p"),
                                   lambda m: m(torch.randn(2, 3, 6), torch.randn(2, 9, 6))[0]),
        # hard choices train through the straight-through Gumbel estimator ...
        "HardAttention": lambda: (HardAttention(4, 4, score="general", mode="gumbel",
                                                generator=torch.Generator().manual_seed(0)),
                                  lambda m: m(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4))[0]),
        # ... or REINFORCE: the score learns from the sample's log-probability
        "StochasticHardAttention": lambda: (
            attnkit.nn.StochasticHardAttention(3, 5, score="general", generator=torch.Generator().manual_seed(0)),
            lambda m: (lambda ctx, w, sample: ctx.sum() + sample.log_prob.sum())(
                *m(torch.randn(2, 4, 3), torch.randn(2, 6, 5), torch.randn(2, 6, 7)))),
    }
    m, run = build[name]()
    out = run(m)
    out.square().sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{name}: parameters without a gradient: {dead}"
