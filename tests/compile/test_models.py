"""Every attnkit model under ``torch.compile``: one training step (forward, loss, backward) traces
without a graph break, and its loss and gradients under ``fullgraph=True`` equal eager's; changing
only the batch size recompiles at most once (the second shape makes that dimension dynamic)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import attnkit
from attnkit import models


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """torch's own switch ``allow_rnn`` lets Dynamo trace ``nn.GRU``/``nn.LSTM`` (off by default: a
    graph break at each); the RNN models need it, the README says so."""
    dynamo.reset()
    with dynamo.config.patch(allow_rnn=True):
        yield
    dynamo.reset()


def _lengths(B: int, T: int) -> torch.Tensor:
    return torch.tensor([T] + [max(1, T - 3 * i) for i in range(1, B)])


def _seq2seq(B):
    m = models.Seq2Seq(30, 40, emb_dim=16, hidden_dim=24)
    src, tgt = torch.randint(3, 30, (B, 9)), torch.randint(3, 40, (B, 7))
    return m, (src, _lengths(B, 9), tgt), lambda m, src, n, tgt: m(src, n, tgt).logsumexp(-1).sum()


def _seq2seq_deep(B):
    """Two layers: the bidirectional encoder runs one layer at a time when traced."""
    m = models.Seq2Seq(30, 40, emb_dim=16, hidden_dim=24, rnn="lstm", num_layers=2)
    src, tgt = torch.randint(3, 30, (B, 9)), torch.randint(3, 40, (B, 7))
    return m, (src, _lengths(B, 9), tgt), lambda m, src, n, tgt: m(src, n, tgt).logsumexp(-1).sum()


def _transformer(B):
    m = models.Transformer(30, 40, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=48, dropout=0.0)
    src, tgt = torch.randint(3, 30, (B, 9)), torch.randint(3, 40, (B, 7))
    pad = torch.arange(9) >= _lengths(B, 9).unsqueeze(1)
    return m, (src, pad, tgt), lambda m, src, pad, tgt: m(src, pad, tgt).logsumexp(-1).sum()


def _classifier(B):
    m = models.AttentionClassifier(3, vocab_size=30, dim=32, depth=1, num_heads=4, dropout=0.0)
    x = torch.randint(1, 30, (B, 12))
    pad = torch.arange(12) >= _lengths(B, 12).unsqueeze(1)
    return m, (x, pad), lambda m, x, pad: m(x, pad).logsumexp(-1).sum()


def _han(B):
    m = models.HierarchicalAttentionNetwork(30, 3, embed_dim=16, word_hidden=8, sent_hidden=8, dropout=0.0)
    x = torch.randint(1, 30, (B, 3, 6))
    return m, (x,), lambda m, x: m(x).logsumexp(-1).sum()


def _memory(B):
    m = models.AttentionMemoryClassifier(10, row_dim=8, num_rows=6, dim=16, memory_dim=16, num_steps=2, dropout=0.0)
    x = torch.randn(B, 6, 8)
    return m, (x,), lambda m, x: m(x).logsumexp(-1).sum()


def _captioner(B):
    m = models.ShowAttendTell(20, bos_id=1, eos_id=2, image_size=16, feature_dim=48, emb_dim=8, hidden_dim=16,
                              att_dim=8, dropout=0.0)
    images, words = torch.randn(B, 3, 16, 16), torch.randint(3, 20, (B, 6))
    return m, (images, words), lambda m, images, words: m(images, words).logits.logsumexp(-1).sum()


def _san(B):
    m = models.StackedAttentionNetwork(5, 20, image_size=16, dim=16, att_dim=8, emb_dim=8, width=8, dropout=0.0)
    images, questions = torch.randn(B, 3, 16, 16), torch.randint(1, 20, (B, 7))
    return m, (images, questions), lambda m, images, q: m(images, q).logits.logsumexp(-1).sum()


def _relational(B):
    m = models.RelationalAttentionNetwork(5, 20, image_size=16, dim=16, att_dim=8, emb_dim=8, width=8)
    images, questions = torch.randn(B, 3, 16, 16), torch.randint(1, 20, (B, 7))
    return m, (images, questions), lambda m, images, q: m(images, q).logits.logsumexp(-1).sum()


def _vqa_transformer(B):
    m = models.VqaTransformer(5, 20, image_size=16, dim=16, depth=1, num_heads=2, width=8)
    images, questions = torch.randn(B, 3, 16, 16), torch.randint(1, 20, (B, 7))
    return m, (images, questions), lambda m, images, q: m(images, q).logits.logsumexp(-1).sum()


def _las(B):
    m = models.ListenAttendSpell(12, n_mels=8, hidden_dim=16, att_dim=8, emb_dim=8, channels=3, kernel_size=5,
                                 dropout=0.0)
    feats, inputs = torch.randn(B, 64, 8), torch.randint(3, 12, (B, 6))
    return m, (feats, 8 * _lengths(B, 8), inputs), lambda m, f, n, y: m(f, n, y).logits.logsumexp(-1).sum()


MODELS = {"Seq2Seq": _seq2seq, "Seq2Seq, 2-layer LSTM": _seq2seq_deep, "Transformer": _transformer, "AttentionClassifier": _classifier,
          "HierarchicalAttentionNetwork": _han, "AttentionMemoryClassifier": _memory, "ShowAttendTell": _captioner,
          "StackedAttentionNetwork": _san, "RelationalAttentionNetwork": _relational, "VqaTransformer": _vqa_transformer, "ListenAttendSpell": _las}


def _build(name, B=3):
    torch.manual_seed(0)
    m, args, loss = MODELS[name](B)
    return m.train(), args, loss


@pytest.mark.parametrize("name", list(MODELS))
def test_a_training_step_traces_without_a_graph_break_and_equals_eager(name):
    m, args, loss = _build(name)
    step = lambda *a: loss(m, *a)  # noqa: E731
    explained = dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    params = [p for p in m.parameters() if p.requires_grad]
    want = step(*args)
    gw = torch.autograd.grad(want, params, allow_unused=True)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    gg = torch.autograd.grad(got, params, allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(gg, gw):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["Transformer", "Seq2Seq"])
def test_a_new_batch_size_recompiles_at_most_once(name):
    m, _, loss = _build(name)
    counter = CompileCounter()
    step = torch.compile(lambda *a: loss(m, *a), backend=counter)
    for B in (2, 3, 5, 8):
        torch.manual_seed(B)
        _, args, _ = MODELS[name](B)
        want = loss(m, *args)
        torch.testing.assert_close(step(*args), want, rtol=1e-4, atol=1e-4)
    assert counter.frame_count <= 2, counter.frame_count


def test_attention_with_a_new_batch_size_recompiles_at_most_once():
    counter = CompileCounter()

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=attnkit.masks.causal())

    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for B in (1, 2, 3, 6):
        q, k, v = (torch.randn(B, 2, 16, 8) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    assert counter.frame_count <= 2, counter.frame_count


def test_transformer_decoding_with_the_kv_cache_compiles_twice_and_decodes_as_eager():
    """``decode_step`` compiled with dynamic shapes: one graph for the first step (empty caches) and
    one for every later step (the cache length is symbolic), no graph break, the same tokens."""
    torch.manual_seed(0)
    m = models.Transformer(30, 40, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
                           dim_feedforward=48, dropout=0.0).eval()
    src = torch.randint(3, 30, (3, 9))
    pad = torch.arange(9) >= _lengths(3, 9).unsqueeze(1)

    def decode(step, n=8):
        with torch.no_grad():
            state = m.init_state(m.encode(src, pad), pad, 16)
            tok, out = torch.full((3, 1), m.bos_id, dtype=torch.long), []
            for _ in range(n):
                tok = step(tok, state)[:, -1].argmax(-1, keepdim=True)
                out.append(tok)
            return torch.cat(out, 1)

    counter = CompileCounter()
    got = decode(torch.compile(m.decode_step, backend=counter, dynamic=True))
    assert torch.equal(got, decode(m.decode_step))
    assert counter.frame_count == 2, counter.frame_count
    with torch.no_grad():
        state = m.init_state(m.encode(src, pad), pad, 16)
        tok = torch.full((3, 1), m.bos_id, dtype=torch.long)
        m.decode_step(tok, state)
        dynamo.reset()
        explained = dynamo.explain(m.decode_step)(tok, state)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
