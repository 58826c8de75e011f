"""Every ``attnkit.nn`` attention module under ``torch.compile``: a forward and a loss trace as one
graph (no break), and under ``fullgraph=True`` the outputs and every gradient equal eager's.
(The models built from them are covered in ``test_models.py``; ``MultiheadAttention``'s calls in
``test_compile.py``.)"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import attnkit
from attnkit import nn as ann

B, T, S, E = 2, 9, 7, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    with dynamo.config.patch(allow_rnn=True):  # HierarchicalAttention runs GRUs
        yield
    dynamo.reset()


def _x(*shape):
    return torch.randn(*shape, requires_grad=True)


def _pad(n=T, lengths=(T, 5)):
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]  # True = pad (torch's convention)


def _cases():
    """name -> a builder of (module, inputs, call(module, *inputs) -> tensor or tuple of tensors)."""
    q, kv = _x(B, S, E), _x(B, T, E)
    return {
        "AdditiveAttention": lambda: (ann.AdditiveAttention(E, E, 12), (q, kv, _pad()),
                              lambda m, q, kv, p: m(q, kv, kv, key_padding_mask=p)),
        "AttentionMemory": lambda: (ann.AttentionMemory(E, 12), (kv, _pad()), lambda m, x, p: m(x, key_padding_mask=p)),
        "AttentionPooling": lambda: (ann.AttentionPooling(E, 12, mode="mlp"), (kv, _pad()), lambda m, x, p: m(x, key_padding_mask=p)),
        "BidirectionalAttention": lambda: (ann.BidirectionalAttention(E), (kv, q, _pad(), _pad(S, (S, 3))),
                                   lambda m, c, q, pc, pq: m(c, q, pc, pq)),
        "GatedAttentionHeads": lambda: (ann.GatedAttentionHeads(E, 12, 3, 5), (kv, _pad()),
                                lambda m, x, p: m(x, key_padding_mask=p)),
        "HardAttention": lambda: (ann.HardAttention(E, E), (q, kv, _pad()), lambda m, q, kv, p: m(q, kv, kv, p)),
        "HierarchicalAttention": lambda: (ann.HierarchicalAttention(E, 6, 5), (_x(B, 3, 4, E), torch.tensor(
            [[[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]], dtype=torch.bool)),
            lambda m, x, w: m(x, w)),
        "LinearAttention": lambda: (ann.LinearAttention(E, 4, causal=True), (kv, ), lambda m, x: m(x)),
        "LinformerAttention": lambda: (ann.LinformerAttention(E, 4, seq_len=T, proj_len=4), (kv, _pad()),
                               lambda m, x, p: m(x, key_padding_mask=p)),
        "LocalAttention": lambda: (ann.LocalAttention(E, D=2), (q, kv, _pad()), lambda m, q, kv, p: m(q, kv, key_padding_mask=p)),
        "LocationAwareAttention": lambda: (ann.LocationAwareAttention(E, E, 12, channels=3, kernel_size=5),
                                   (q[:, 0], kv, torch.softmax(torch.randn(B, T), -1), _pad()),
                                   lambda m, q, kv, prev, p: m(q, kv, kv, prev, key_padding_mask=p)),
        "LuongAttention": lambda: (ann.LuongAttention(E, score="general"), (q, kv, _pad()),
                           lambda m, q, kv, p: m(q, kv, key_padding_mask=p)),
        "MultiheadAttention": lambda: (ann.MultiheadAttention(E, 4, batch_first=True, mask=attnkit.masks.sliding_window(3),
                                                      score_mod=attnkit.positions.ALiBi(4)), (kv, _pad()),
                               lambda m, x, p: m(x, x, x, key_padding_mask=p)),
        "PerformerAttention": lambda: (ann.PerformerAttention(E, 4, num_features=8, seed=0), (kv, _pad()),
                               lambda m, x, p: m(x, key_padding_mask=p)),
        "SlidingWindowAttention": lambda: (ann.SlidingWindowAttention(E, 4, window=3, batch_first=True), (kv, _pad()),
                                   lambda m, x, p: m(x, x, x, key_padding_mask=p)),
        "StochasticHardAttention": lambda: (ann.StochasticHardAttention(E, E).eval(), (q, kv, _pad()),
                                    lambda m, q, kv, p: m(q, kv, kv, p)[:2]),
    }


def _loss(out) -> torch.Tensor:
    """A scalar that reads every floating output with fixed weights (so no gradient is trivial)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    total = 0.0
    for i, t in enumerate(o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()):
        w = torch.linspace(-1.0, 1.0 + i, t.numel(), dtype=t.dtype).view(t.shape)
        total = total + (t * w).sum()
    return total


def test_every_module_is_covered():
    assert set(_cases()) == set(ann.__all__) - {"KVCache"}


@pytest.mark.parametrize("name", sorted(set(ann.__all__) - {"KVCache"}))
def test_module_traces_without_a_graph_break_and_equals_eager(name):
    torch.manual_seed(0)
    m, inputs, call = _cases()[name]()
    step = lambda *a: _loss(call(m, *a))  # noqa: E731
    explained = dynamo.explain(step)(*inputs)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    wrt = [p for p in m.parameters() if p.requires_grad] + [t for t in inputs if t.requires_grad]
    want = step(*inputs)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, wrt, allow_unused=True), torch.autograd.grad(want, wrt, allow_unused=True)):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
