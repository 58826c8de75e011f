"""Rollout, flow, head statistics, gradient × attention and alignments against hand computations
and independent oracles."""

import math

import pytest
import torch

import attnkit
from attnkit.viz import analysis
from attnkit.viz.analysis import (align, alignment_matrix, flow, gradient_x_attention, head_distance, head_entropy,
                                  head_stats, rollout)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# -- rollout ---------------------------------------------------------------------------------------------
# Two layers, two heads, two tokens. By hand:
#   layer 1 head mean [[1, 0], [.5, .5]]    -> Ã1 = .5 I + .5 mean = [[1, 0], [.25, .75]]
#   layer 2 head mean [[.25, .75], [0, 1]]  -> Ã2 = [[.625, .375], [0, 1]]
#   R = Ã2 Ã1 = [[.625 + .375 * .25, .375 * .75], [.25, .75]] = [[.71875, .28125], [.25, .75]]
L1 = t([[[1, 0], [1, 0]], [[1, 0], [0, 1]]])
L2 = t([[[0, 1], [0, 1]], [[0.5, 0.5], [0, 1]]])


def test_rollout_of_a_hand_made_two_layer_example():
    assert torch.equal(rollout([L1, L2]), t([[0.71875, 0.28125], [0.25, 0.75]]))
    cum = rollout(torch.stack([L1, L2]), cumulative=True)
    assert torch.equal(cum, torch.stack([t([[1, 0], [0.25, 0.75]]), t([[0.71875, 0.28125], [0.25, 0.75]])]))
    # without the residual: the plain product of the head means, [[.25, .75], [0, 1]] @ [[1, 0], [.5, .5]]
    assert torch.equal(rollout([L1, L2], residual=0.0), t([[0.625, 0.375], [0.5, 0.5]]))
    # max over heads instead of the mean, then renormalized: Ã1 = [[1, 0], [1/3, 2/3]], Ã2 = [[.6, .4], [0, 1]]
    torch.testing.assert_close(rollout([L1, L2], head_reduce="max"), t([[11 / 15, 4 / 15], [1 / 3, 2 / 3]]))


def test_rollout_keeps_batches_rows_sum_to_one_and_dead_rows_stay_home():
    A = torch.softmax(torch.randn(3, 2, 4, 6, 6), -1)  # (L, B, H, T, T)
    A[0, 1, :, 2] = 0  # a fully masked query row in example 1
    R = rollout(A)
    assert R.shape == (2, 6, 6)
    torch.testing.assert_close(R.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    for b in range(2):
        torch.testing.assert_close(R[b], rollout(A[:, b]))
    aug = analysis.augmented(A[0, 1])
    assert torch.equal(aug[2], t([0, 0, 1, 0, 0, 0]))  # the identity alone


def test_rollout_takes_capture_records_and_checks_its_input():
    mhas = torch.nn.ModuleList(attnkit.nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2))
    x = torch.randn(1, 5, 8)
    with torch.no_grad(), attnkit.capture() as rec:
        for m in mhas:
            x = m(x, need_weights=False)[0]
    assert torch.equal(rollout(rec), rollout([r.weights for r in rec]))
    with pytest.raises(ValueError, match=r"attentions\[1\] must be \(\.\.\., H, T, T\)"):
        rollout([torch.ones(1, 3, 3), torch.ones(1, 3, 4)])
    with pytest.raises(ValueError, match="every layer must have the shape of layer 0"):
        rollout([torch.ones(1, 3, 3), torch.ones(2, 3, 3)])
    with pytest.raises(ValueError, match="residual must be a number in \\[0, 1\\]"):
        rollout([L1], residual=1.5)
    with pytest.raises(ValueError, match="head_reduce must be one of 'mean', 'max', 'min'; got 'sum'"):
        rollout([L1], head_reduce="sum")
    with pytest.raises(ValueError, match="at least one layer"):
        rollout([])
    with pytest.raises(ValueError, match="finite"):
        rollout([t([[[math.nan, 0], [0, 1]]])])


# -- flow ------------------------------------------------------------------------------------------------
# Two layers, two tokens, no residual, capacities (l, i) -> (l-1, j) = A_l[i, j]:
#   A1 = [[.5, .5], [.25, .75]], A2 = [[.75, .25], [.5, .5]]
# Max flow from output node (2, i) to input node (0, j), by hand (augmenting paths and a matching cut):
#   (2,0)->(0,0): via (1,0) min(.75,.5) = .5, via (1,1) min(.25,.25) = .25 -> .75 = cut {(1,0)->(0,0), (1,1)->(0,0)}
#   (2,0)->(0,1): via (1,0) .5, via (1,1) min(.25,.75) = .25        -> .75 = cut {(2,0)->(1,1), (1,0)->(0,1)}
#   (2,1)->(0,0): via (1,0) .5, via (1,1) .25                      -> .75 = cut {(1,0)->(0,0), (1,1)->(0,0)}
#   (2,1)->(0,1): via (1,0) .5, via (1,1) .5                       -> 1   = the source's capacity
A1 = t([[[0.5, 0.5], [0.25, 0.75]]])
A2 = t([[[0.75, 0.25], [0.5, 0.5]]])


@pytest.mark.parametrize("solver", ["scipy", "edmonds-karp", "networkx"])
def test_flow_of_a_tiny_graph_equals_the_hand_computation(solver):
    if solver == "networkx":
        pytest.importorskip("networkx")
    if solver == "scipy":
        pytest.importorskip("scipy")
    raw = flow([A1, A2], residual=0.0, normalize=False, solver=solver)
    assert torch.equal(raw, t([[0.75, 0.75], [0.75, 1.0]]))
    torch.testing.assert_close(flow([A1, A2], residual=0.0, solver=solver), t([[0.5, 0.5], [3 / 7, 4 / 7]]))


def test_flow_solvers_agree_and_flow_is_bounded():
    A = torch.softmax(3 * torch.randn(3, 2, 6, 6), -1)
    ek = flow(A, normalize=False, solver="edmonds-karp")
    torch.testing.assert_close(flow(A, normalize=False, solver="scipy"), ek, atol=1e-6, rtol=0)
    assert (ek <= 1 + 1e-12).all() and (ek > 0).all()  # the residual keeps every path open
    # one layer: the flow from i to j is the edge itself
    torch.testing.assert_close(flow(A[:1], normalize=False), analysis.augmented(A[0]), atol=1e-7, rtol=0)


def test_flow_refuses_long_inputs_and_says_why():
    with pytest.raises(ValueError, match=r"T = 70 tokens, more than max_tokens = 64.*rollout\(\)"):
        flow(torch.softmax(torch.randn(1, 1, 70, 70), -1))
    with pytest.raises(ValueError, match="solver must be one of"):
        flow([A1], solver="magic")


# -- statistics ------------------------------------------------------------------------------------------
def test_entropy_and_distance_by_hand():
    w = t([[[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 0]],   # head 0 (last row dead)
           [[0, 1, 0, 0], [0.5, 0, 0.5, 0], [1, 0, 0, 0], [0, 0, 0, 1]]])             # head 1
    torch.testing.assert_close(head_entropy(w), t([(math.log(2) + 0 + math.log(4)) / 3, (0 + math.log(2) + 0 + 0) / 4]))
    # head 0: |0-0|.5+|0-1|.5 = .5, |1-0| = 1, |2-j| avg = (2+1+0+1)/4 = 1 ; head 1: 1, 1, 2, 0
    torch.testing.assert_close(head_distance(w), t([(0.5 + 1 + 1) / 3, (1 + 1 + 2 + 0) / 4]))
    # a decoding step: one query, bottom-right aligned -> it sits at the last key
    step = t([[[0, 0, 0.5, 0.5]]])
    torch.testing.assert_close(head_distance(step), t([0.5]))
    torch.testing.assert_close(head_distance(step, rows=[0], query_offset=0), t([2.5]))
    assert torch.isnan(head_entropy(torch.zeros(1, 2, 3))).all()  # no live row


def test_head_stats_of_a_partial_capture_use_the_true_positions_and_heads():
    mha = attnkit.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad(), attnkit.capture() as full, attnkit.capture(heads=[3, 1], rows=[0, 4, 8]) as part:
        mha(x, need_weights=False)
    s_full = {(s.head): s for s in head_stats(full)}
    s_part = head_stats(part)
    assert [s.head for s in s_part] == [3, 1] and [s.layer for s in s_part] == [0, 0]
    w = full[0].weights.double()
    for s in s_part:
        sub = w[:, [s.head]][:, :, [0, 4, 8]]
        assert s.distance == pytest.approx(float(head_distance(sub, rows=[0, 4, 8]).mean()))
        assert s.entropy == pytest.approx(float(head_entropy(sub).mean()))
        assert s.name == "MultiheadAttention" and 0 < s.max_weight <= 1
    assert s_full[3].distance == pytest.approx(float(head_distance(w)[:, 3].mean()))


# -- gradient x attention -------------------------------------------------------------------------------
def _oracle(mha, x, pick):
    """The weights as an explicit leaf of the graph: softmax(q kᵀ/√d), out = A v, then out_proj."""
    B, T, E = x.shape
    H, d = mha.num_heads, E // mha.num_heads
    q = mha.q_proj(x).view(B, T, H, d).transpose(1, 2)
    k = mha.k_proj(x).view(B, T, H, d).transpose(1, 2)
    v = mha.v_proj(x).view(B, T, H, d).transpose(1, 2)
    A = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1).detach().requires_grad_()
    y = mha.out_proj((A @ v).transpose(1, 2).reshape(B, T, E))
    pick(y).backward()
    return A.detach(), A.grad


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
def test_gradient_x_attention_matches_an_explicit_graph_on_every_backend(backend):
    torch.manual_seed(0)
    mha = attnkit.nn.MultiheadAttention(8, 2, batch_first=True).eval().double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    pick = lambda y: y[0, -1, :3].sum()  # noqa: E731
    A, G = _oracle(mha, x, pick)
    saved = dict(attnkit.backends.registry.REGISTRY)
    with attnkit.use_backend(backend):
        res = gradient_x_attention(lambda: pick(mha(x, need_weights=False)[0]))
    assert attnkit.backends.registry.REGISTRY == saved  # the backends are restored, the very same objects
    assert len(res) == 1 and res[0].backend == backend and res[0].name == "MultiheadAttention"
    torch.testing.assert_close(res[0].weights.double(), A, atol=1e-6, rtol=0)
    torch.testing.assert_close(res[0].grad.double(), G, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res[0].relevance.double(), A * G, atol=1e-6, rtol=1e-5)
    assert (res[0].grad[0, :, :4] == 0).all()  # only the last query row reaches y


def test_gradient_x_attention_errors_and_restores_backends_on_failure():
    saved = dict(attnkit.backends.registry.REGISTRY)
    with pytest.raises(RuntimeError, match="boom"):
        gradient_x_attention(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert attnkit.backends.registry.REGISTRY == saved
    with pytest.raises(ValueError, match="no attnkit attention call that needs gradients"):
        gradient_x_attention(lambda: torch.ones(1, requires_grad=True).sum())
    with pytest.raises(TypeError, match="forward must be a callable"):
        gradient_x_attention(3)


# -- alignments --------------------------------------------------------------------------------------------
def test_alignment_from_cross_attention_layers_and_heads():
    layer0 = t([[[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]], [[0.3, 0.7, 0.0], [0.1, 0.1, 0.8]]])  # (H=2, T=2, S=3)
    layer1 = t([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    assert torch.equal(alignment_matrix([layer0, layer1], layer=0), (layer0[0] + layer0[1]) / 2)
    assert torch.equal(alignment_matrix(torch.stack([layer0, layer1]), layer="mean", heads=[1]),
                       (layer0[1] + layer1[1]) / 2)
    pairs = align([layer0, layer1], ["le", "chat", "</s>"], ["the", "cat"], layer=0)
    # layer 0's head mean: [[.2, .8, 0], [.4, .15, .45]]
    assert [(p.target, p.source, round(p.weight, 3)) for p in pairs] == [("the", "chat", 0.8), ("cat", "</s>", 0.45)]
    pairs = align([layer0, layer1], ["le", "chat", "</s>"], ["the", "cat"])  # last layer
    assert [(p.target_index, p.source_index) for p in pairs] == [(0, 2), (1, 0)]
    pairs = align([layer0, layer1], ["le", "chat", "</s>"], ["the", "cat"], layer=0, exclude_sources=[2])
    assert [p.source for p in pairs] == ["chat", "le"]
    # the last layer's first row attends only to the excluded </s>: no alignment for it
    pairs = align([layer0, layer1], exclude_sources=[-1])
    assert [(p.target_index, p.source_index) for p in pairs] == [(1, 0)]
    assert align(t([[0.0, 0.0], [0.5, 0.5]])) == [analysis.AlignedToken(1, 0, 0.5)]  # dead rows are skipped
    with pytest.raises(ValueError, match=r"src_tokens must have one label per source position \(3\); got 2"):
        align(layer0, ["a", "b"])
    with pytest.raises(ValueError, match="layer must lie in"):
        alignment_matrix([layer0, layer1], layer=2)
    with pytest.raises(ValueError, match="heads must be a non-empty list"):
        alignment_matrix(layer0, heads=[5])
