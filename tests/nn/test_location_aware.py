"""LocationAwareAttention against the formula of Chorowski et al. computed by hand from the module's
parameters, float64 gradcheck, padding, the location term being live, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.nn import AdditiveAttention, LocationAwareAttention

torch.set_num_threads(1)


def _by_hand(att: LocationAwareAttention, s, h, prev, pad=None):
    """e_j = v·tanh(W s + V h_j + b + U (F * prev)_j), softmax over the unpadded j, c = Σ α_j h_j."""
    sc = att.additive.score
    Wq, Wk, b = sc.query_proj.weight, sc.key_proj.weight, sc.key_proj.bias
    v = sc.v.weight[0]
    filt = att.location_conv.weight  # (channels, 1, K)
    K = filt.shape[-1]
    B, T = prev.shape
    padded = F.pad(prev, (K // 2, K // 2))
    f = torch.stack([torch.stack([padded[:, j:j + K] @ filt[c, 0] for c in range(filt.shape[0])], -1)
                     for j in range(T)], 1)  # (B, T, channels)
    e = torch.tanh((s @ Wq.T)[:, None] + h @ Wk.T + b + f @ att.location_proj.weight.T) @ v
    if pad is not None:
        e = e.masked_fill(pad, float("-inf"))
    w = torch.softmax(e, -1)
    return (w[..., None] * h).sum(1), w


def test_matches_the_formula_by_hand_in_float64():
    torch.manual_seed(0)
    att = LocationAwareAttention(query_dim=5, key_dim=6, hidden_dim=7, channels=3, kernel_size=5).double()
    s, h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 9, 6, dtype=torch.float64)
    prev = torch.softmax(torch.randn(3, 9, dtype=torch.float64), -1)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    ctx, w = att(s, h, h, prev, key_padding_mask=pad)
    ref_ctx, ref_w = _by_hand(att, s, h, prev, pad)
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ctx, ref_ctx, rtol=1e-12, atol=1e-12)
    assert torch.all(w[1, 6:] == 0) and torch.allclose(w.sum(-1), torch.ones(3, dtype=torch.float64))


def test_gradcheck_float64():
    torch.manual_seed(1)
    att = LocationAwareAttention(4, 3, 5, channels=2, kernel_size=3).double()
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    prev = torch.softmax(torch.randn(2, 6, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, h, p: att(s, h, h, p), (s, h, prev))


def test_the_previous_weights_change_the_scores_and_without_the_location_term_it_is_additive():
    torch.manual_seed(2)
    att = LocationAwareAttention(4, 6, 8, channels=4, kernel_size=3)
    s, h = torch.randn(2, 4), torch.randn(2, 7, 6)
    first = att.initial_weights(h)
    assert torch.equal(first, F.one_hot(torch.zeros(2, dtype=torch.long), 7).float())
    _, w1 = att(s, h, h, first)
    _, w2 = att(s, h, h, torch.roll(first, 3, dims=1))
    assert not torch.allclose(w1, w2)  # the alignment of the last step moves this one
    with torch.no_grad():
        att.location_proj.weight.zero_()
    plain = AdditiveAttention(4, 6, 8)
    plain.load_state_dict(att.additive.state_dict())
    ctx, w = att(s, h, h, first)
    ref_ctx, ref_w = plain(s, h, h)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(ctx, ref_ctx)


def test_projected_keys_give_the_same_result_and_a_step_loop_keeps_rows_normalized():
    torch.manual_seed(3)
    att = LocationAwareAttention(4, 6, 8)
    h = torch.randn(2, 10, 6)
    pk = att.project_keys(h)
    w = w_fast = att.initial_weights(h)
    for _ in range(4):
        s = torch.randn(2, 4)
        ctx, w = att(s, h, h, w)
        ctx_fast, w_fast = att(s, h, h, w_fast, projected_key=pk)
        torch.testing.assert_close(ctx, ctx_fast)
        torch.testing.assert_close(w, w_fast)
    assert torch.allclose(w.sum(-1), torch.ones(2))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        LocationAwareAttention(4, 6, 8, kernel_size=4)
    att = LocationAwareAttention(4, 6, 8)
    h = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"previous_weights must be \(B, Tk\) = \(2, 5\)"):
        att(torch.randn(2, 4), h, h, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="query must be a 2-D tensor"):
        att(torch.randn(2, 3, 4), h, h, att.initial_weights(h))
    assert "LocationAwareAttention" in attnkit.nn.__all__
