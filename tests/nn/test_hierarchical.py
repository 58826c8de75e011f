import pytest
import torch

from attnkit.nn import HierarchicalAttention


def birnn_outputs(rnn, seq):
    """Run ``rnn`` on one unpadded sequence (L, F) -> (L, 2*hidden)."""
    return rnn(seq.unsqueeze(0))[0][0]


def han_pool(pool, h):
    """HAN attention on one unpadded sequence (L, F): u = tanh(W h + b), α = softmax(u·u_w)."""
    u = torch.tanh(h @ pool.proj.weight.t() + pool.proj.bias)
    a = torch.softmax(u @ pool.query[0], 0)
    return a @ h, a


def loop_reference(han, x, word_mask):
    """Yang et al. 2016 document by document, sentence by sentence, on the real words only."""
    B, S, W, _ = x.shape
    docs = torch.zeros(B, 2 * han.sent_hidden, dtype=x.dtype)
    a_w = torch.zeros(B, S, W, dtype=x.dtype)
    a_s = torch.zeros(B, S, dtype=x.dtype)
    for b in range(B):
        sents, real_s = [], []
        for s in range(S):
            real = word_mask[b, s].nonzero().flatten()
            if len(real) == 0:
                continue
            h = birnn_outputs(han.word_rnn, x[b, s, real])
            vec, a = han_pool(han.word_attention, h)
            a_w[b, s, real] = a
            sents.append(vec)
            real_s.append(s)
        if sents:
            hs = birnn_outputs(han.sent_rnn, torch.stack(sents))
            docs[b], a = han_pool(han.sent_attention, hs)
            a_s[b, real_s] = a
    return docs, a_w, a_s


def make(B=2, S=3, W=4, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, W, E, generator=g)
    mask = torch.ones(B, S, W, dtype=torch.bool)
    mask[0, 0, 3:] = False       # short sentence
    mask[0, 1] = False           # fully padded sentence in the middle
    mask[1, 2, 1] = False        # a hole inside a sentence
    mask[1, 0, 0] = False
    return x, mask


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_matches_sentence_by_sentence_loop(rnn):
    han = HierarchicalAttention(5, 3, 4, rnn=rnn)
    x, mask = make()
    doc, a_w, a_s = han(x, mask)
    assert doc.shape == (2, 8) and a_w.shape == (2, 3, 4) and a_s.shape == (2, 3)
    ref_doc, ref_w, ref_s = loop_reference(han, x, mask)
    torch.testing.assert_close(doc, ref_doc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_w, ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_s, ref_s, atol=1e-5, rtol=1e-5)


def test_fully_padded_sentence_zero_weight_no_nan_and_no_effect():
    han = HierarchicalAttention(5, 3, 4)
    x, mask = make()
    x[~mask] = float("nan")  # padded embeddings never reach the computation
    doc, a_w, a_s = han(x, mask)
    assert not doc.isnan().any() and not a_w.isnan().any() and not a_s.isnan().any()
    assert a_s[0, 1] == 0 and (a_w[0, 1] == 0).all()
    assert (a_w[~mask] == 0).all()
    torch.testing.assert_close(a_s.sum(-1), torch.ones(2))
    torch.testing.assert_close(a_w.sum(-1), mask.any(-1).float())
    # dropping the empty sentence, or moving it to the end, gives the same document
    keep = [0, 2]
    doc2, a_w2, a_s2 = han(x[:1, keep], mask[:1, keep])
    torch.testing.assert_close(doc2, doc[:1])
    torch.testing.assert_close(a_s2, a_s[:1, keep])
    order = [0, 2, 1]
    doc3, _, a_s3 = han(x[:1, order], mask[:1, order])
    torch.testing.assert_close(doc3, doc[:1])
    assert a_s3[0, 2] == 0


def test_changing_padded_words_changes_nothing_and_trailing_padding_equals_truncation():
    han = HierarchicalAttention(5, 3, 4)
    x, mask = make()
    out = han(x, mask)
    x2 = x.clone()
    x2[~mask] = 1e3
    for a, b in zip(han(x2, mask), out):
        torch.testing.assert_close(a, b)
    # document 0 sentence 0 has 3 real words then padding; W = 3 with no padding gives the same
    m = torch.ones(1, 1, 4, dtype=torch.bool)
    m[0, 0, 3] = False
    doc_pad, w_pad, _ = han(x[:1, :1], m)
    doc_cut, w_cut, _ = han(x[:1, :1, :3])
    torch.testing.assert_close(doc_pad, doc_cut)
    torch.testing.assert_close(w_pad[..., :3], w_cut)


def test_fully_padded_document_gives_zeros():
    han = HierarchicalAttention(5, 3, 4)
    x, mask = make()
    mask[1] = False
    doc, a_w, a_s = han(x, mask)
    assert (doc[1] == 0).all() and (a_w[1] == 0).all() and (a_s[1] == 0).all()
    assert not doc.isnan().any()
    doc_all, _, _ = han(x, torch.zeros_like(mask))
    assert (doc_all == 0).all()


def test_no_mask_means_all_real():
    han = HierarchicalAttention(5, 3, 4)
    x, _ = make()
    for a, b in zip(han(x), han(x, torch.ones(2, 3, 4, dtype=torch.bool))):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64():
    han = HierarchicalAttention(2, 2, 2).double()
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[[True, True, False], [True, False, True]]])
    assert torch.autograd.gradcheck(lambda x: torch.cat([o.flatten() for o in han(x, mask)]), (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    han = HierarchicalAttention(5, 3, 4)
    x, mask = make()
    gold, _, _ = han.double()(x.double(), mask)
    doc, a_w, a_s = han.to(dtype)(x.to(dtype), mask)
    assert doc.dtype == dtype and a_w.dtype == dtype
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-9
    torch.testing.assert_close(doc.double(), gold, atol=tol, rtol=tol)


def test_errors():
    with pytest.raises(ValueError, match="'gru', 'lstm'"):
        HierarchicalAttention(5, 3, 4, rnn="rnn")
    with pytest.raises(ValueError, match="word_hidden"):
        HierarchicalAttention(5, 0, 4)
    han = HierarchicalAttention(5, 3, 4)
    x, mask = make()
    with pytest.raises(ValueError, match=r"word_mask must have shape \(2, 3, 4\)"):
        han(x, mask[:, :, :3])
    with pytest.raises(TypeError, match="word_mask must be a bool"):
        han(x, mask.float())
    with pytest.raises(ValueError, match="x must be a 4-D"):
        han(x[0])
    with pytest.raises(ValueError, match="x must have 5 features"):
        han(x[..., :4])
    with pytest.raises(TypeError, match="module.to"):
        han(x.double())
