"""Seq2Seq: learning, decoding (greedy, beam = exhaustive search on a tiny case), padding,
the Luong fast path, checkpoints and bad arguments."""

import itertools
import json

import pytest
import torch

from attnkit import checkpoint as ck
from attnkit import models
from attnkit.models.seq2seq import ATTENTIONS, Seq2Seq

VARIANTS = [(a, "gru", True) for a in ATTENTIONS] + [("luong-general", "lstm", True), ("luong-dot", "gru", False),
                                                       ("bahdanau", "lstm", True)]


def _batch(B=4, S=7, V=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    lengths = torch.tensor([S] + [int(x) for x in torch.randint(2, S + 1, (B - 1,), generator=g)])
    src[torch.arange(S)[None, :] >= lengths[:, None]] = 0
    return src, lengths


def _tiny(attention="luong-general", rnn="gru", input_feeding=True, V=12, W=10, **kw):
    kw = {"emb_dim": 16, "hidden_dim": 32, **kw}
    return Seq2Seq(V, W, rnn=rnn, attention=attention, input_feeding=input_feeding, **kw)


@pytest.mark.parametrize("attention,rnn,feed", VARIANTS)
def test_overfits_a_tiny_batch(attention, rnn, feed):
    torch.manual_seed(0)
    src, lengths = _batch(B=4, S=6)
    # target: the source reversed within its length (mod the target vocabulary), then </s>
    tgt = [[1] + [4 + int(t) % 6 for t in reversed(src[b, : lengths[b]].tolist())] + [2] for b in range(4)]
    T = max(map(len, tgt))
    tgt = torch.tensor([t + [0] * (T - len(t)) for t in tgt])
    m = _tiny(attention, rnn, feed)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    for _ in range(50):
        logits = m(src, lengths, tgt[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), tgt[:, 1:].reshape(-1), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    out, _ = m.greedy(src, lengths, max_len=10)
    assert out == [[t for t in row.tolist()[1:] if t not in (0, 2)] for row in tgt]


@pytest.mark.parametrize("attention,rnn,feed", VARIANTS)
def test_beam_one_equals_greedy_exactly(attention, rnn, feed):
    torch.manual_seed(1)
    m = _tiny(attention, rnn, feed).eval()
    src, lengths = _batch(B=6, S=9, seed=3)
    g_tok, g_w = m.greedy(src, lengths, max_len=12)
    b_tok, b_w = m.beam_search(src, lengths, beam=1, max_len=12, length_penalty=0.6)
    assert g_tok == b_tok
    assert all(torch.equal(a, b) for a, b in zip(g_w, b_w))
    assert [w.shape for w in g_w] == [(min(len(t) + 1, 12), int(n)) for t, n in zip(g_tok, lengths)]


def _seq_logprob(m, src, lengths, seq):
    """Teacher-forced log-probability of ``seq`` (ids after <s>) under decoding's distribution."""
    tgt_in = torch.tensor([[1] + seq[:-1]])
    logits = m(src, lengths, tgt_in)
    logp = m._log_probs(logits)[0]
    return float(sum(logp[t, y] for t, y in enumerate(seq)))


def test_wide_beam_is_exhaustive_search():
    """With a beam as wide as the hypothesis space, beam search returns the best sequence over
    all sequences of length <= max_len (checked by enumerating them)."""
    torch.manual_seed(2)
    V, L = 6, 3
    m = _tiny("luong-general", V=9, W=V).eval()
    for seed in range(3):
        src, lengths = _batch(B=1, S=5, V=9, seed=seed)
        allowed = [t for t in range(V) if t not in (0, 1)]  # <pad> and <s> are never generated
        best, best_seq = -float("inf"), None
        with torch.no_grad():
            for n in range(1, L + 1):
                for seq in itertools.product(allowed, repeat=n):
                    seq = list(seq)
                    if 2 in seq[:-1] or (n < L and seq[-1] != 2):
                        continue  # </s> only at the end; shorter than L only if it ends with </s>
                    s = _seq_logprob(m, src, lengths, seq)
                    if s > best:
                        best, best_seq = s, seq
        tok, _ = m.beam_search(src, lengths, beam=V ** L, max_len=L)
        assert tok[0] == [t for t in best_seq if t != 2]


@pytest.mark.parametrize("attention,rnn,feed", VARIANTS)
def test_padding_gets_exactly_zero_attention_and_changes_nothing(attention, rnn, feed):
    torch.manual_seed(3)
    m = _tiny(attention, rnn, feed).eval()
    src, lengths = _batch(B=5, S=8, seed=4)
    tgt = torch.randint(3, 10, (5, 6))
    logits, w = m(src, lengths, tgt, need_weights=True)
    for b in range(5):
        assert torch.all(w[b, :, lengths[b]:] == 0)
        assert torch.allclose(w[b].sum(-1), torch.ones(6))
    _, gw = m.greedy(src, lengths, max_len=5)
    _, full = m.beam_search(src, lengths, beam=3, max_len=5)
    # more padding (and garbage in the padded slots) leaves every result unchanged
    wide = torch.cat([src, torch.full((5, 4), 7)], 1)
    logits2, w2 = m(wide, lengths, tgt, need_weights=True)
    assert torch.allclose(logits, logits2, atol=1e-6) and torch.all(w2[:, :, 8:] == 0)
    assert torch.allclose(w, w2[:, :, :8], atol=1e-6)
    _, gw2 = m.greedy(wide, lengths, max_len=5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gw, gw2))


def test_luong_without_input_feeding_runs_all_steps_at_once_equal_to_the_step_loop():
    torch.manual_seed(4)
    m = _tiny("luong-concat", "lstm", input_feeding=False, num_layers=2).eval()
    src, lengths = _batch(B=3, S=6, seed=5)
    tgt = torch.randint(3, 10, (3, 5))
    fast, wf = m(src, lengths, tgt, need_weights=True)
    memory, pad, state = m.encode(src, lengths)
    feed = memory.new_zeros(3, 32)
    steps = []
    for t in range(5):
        lg, state, feed, w = m._step(tgt[:, t], state, feed, memory, pad, True)
        steps.append((lg, w))
    assert torch.allclose(fast, torch.stack([s[0] for s in steps], 1), atol=1e-5)
    assert torch.allclose(wf, torch.stack([s[1] for s in steps], 1), atol=1e-6)


def test_config_rebuilds_the_model_and_checkpoint_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(5)
    m = _tiny("bahdanau", "lstm", num_layers=2, dropout=0.1).eval()
    assert json.loads(json.dumps(m.config)) == m.config
    ck.save_checkpoint(tmp_path, model=m, config={"model": "Seq2Seq", "model_config": m.config})
    c = ck.load_checkpoint(tmp_path)
    fresh = models.get(c.config["model"])(**c.config["model_config"]).eval()
    ck.load_weights(fresh, c)
    src, lengths = _batch(B=3, S=6, seed=6)
    tgt = torch.randint(3, 10, (3, 4))
    assert torch.equal(m(src, lengths, tgt), fresh(src, lengths, tgt))
    assert m.greedy(src, lengths, 6)[0] == fresh.greedy(src, lengths, 6)[0]


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown attention 'luong'; valid names: 'bahdanau', 'luong-concat'"):
        Seq2Seq(10, 10, attention="luong")
    with pytest.raises(ValueError, match="unknown rnn 'rnn'; valid names: 'gru', 'lstm'"):
        Seq2Seq(10, 10, rnn="rnn")
    with pytest.raises(ValueError, match="hidden_dim must be even"):
        Seq2Seq(10, 10, hidden_dim=33)
    with pytest.raises(ValueError, match="eos_id must be < tgt_vocab = 2"):
        Seq2Seq(10, 2)
    m = _tiny()
    src, lengths = _batch()
    with pytest.raises(ValueError, match=r"src_lengths must be in \[1, 7\]"):
        m(src, torch.tensor([8, 1, 1, 1]), src[:, :3])
    with pytest.raises(ValueError, match=r"src_lengths must have shape \(4,\)"):
        m(src, lengths[:2], src[:, :3])
    with pytest.raises(TypeError, match="src and src_lengths must be torch.long"):
        m(src.float(), lengths, src[:, :3])
    with pytest.raises(ValueError, match=r"tgt_in must have batch 4"):
        m(src, lengths, src[:2, :3])
    with pytest.raises(ValueError, match="beam must be > 0; got 0"):
        m.beam_search(src, lengths, beam=0)
