"""Transformer encoder-decoder: learning, incremental decoding, search, padding, tying, checkpoints."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.checkpoint import load_checkpoint, load_weights, save_checkpoint
from attnkit.models.transformer import Transformer, label_smoothed_cross_entropy

SMALL = dict(d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64)


def make(seed: int = 0, src_vocab: int = 23, tgt_vocab: int = 19, dropout: float = 0.0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = {**SMALL, **kw}
    return Transformer(src_vocab, tgt_vocab, dropout=dropout, **cfg)


def batch(seed: int = 0, B: int = 3, S: int = 7, T: int = 6, src_vocab: int = 23, tgt_vocab: int = 19):
    """Right-padded source (lengths S, S-2, S-4, ...) and a BOS-started target."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, src_vocab, (B, S), generator=g)
    lengths = torch.tensor([max(1, S - 2 * i) for i in range(B)])
    pad = torch.arange(S) >= lengths.unsqueeze(1)
    src = src.masked_fill(pad, 0)
    tgt = torch.randint(4, tgt_vocab, (B, T), generator=g)
    tgt[:, 0] = 1
    return src, pad, tgt


def copy_batch(seed: int, B: int = 16, vocab: int = 12):
    """A reverse-copy task with EOS: source ``x_1..x_n </s>``, target ``<s> x_n..x_1 </s>``, n in 2..6."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(2, 7, (B,), generator=g)
    src = torch.zeros(B, 7, dtype=torch.long)
    tgt = torch.zeros(B, 8, dtype=torch.long)
    for b in range(B):
        x = torch.randint(4, vocab, (int(n[b]),), generator=g)
        src[b, : n[b]], src[b, n[b]] = x, 2
        tgt[b, 0], tgt[b, 1: n[b] + 1], tgt[b, n[b] + 1] = 1, x.flip(0), 2
    return src, src == 0, tgt


_TOY: dict = {}


def toy_model(positions: str = "sinusoidal", steps: int = 40) -> Transformer:
    """A model half-trained on :func:`copy_batch`: its outputs are confident, varied in length and
    partly wrong -- a good subject for search tests (an untrained model just repeats a token)."""
    key = (positions, steps)
    if key not in _TOY:
        model = make(seed=7, src_vocab=12, tgt_vocab=12, positions=positions, tie_embeddings="none")
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for i in range(steps):
            src, pad, tgt = copy_batch(i)
            loss = label_smoothed_cross_entropy(model(src, pad, tgt[:, :-1]), tgt[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TOY[key] = model.eval()
    return _TOY[key]


# -- learning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_overfits_a_tiny_batch(norm_first):
    model = make(norm_first=norm_first, tie_embeddings="none")
    src, pad, tgt = batch(B=4, S=6, T=7)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = label_smoothed_cross_entropy(model(src, pad, tgt_in), tgt_out)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0
    assert loss.item() < 0.02, f"loss only fell from {first:.3f} to {loss.item():.4f}"
    # and greedy decoding then reproduces the memorized targets (the model never saw EOS: force length)
    model.eval()
    with torch.no_grad():
        pred = model(src, pad, tgt_in).argmax(-1)
    assert torch.equal(pred, tgt_out)


def test_label_smoothing_matches_the_definition():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5), torch.tensor([[1, 4, 0], [2, 0, 0]])
    eps = 0.2
    logp = logits.log_softmax(-1)
    keep = target != 0
    want = -((1 - eps) * logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) + eps * logp.mean(-1))[keep].mean()
    got = label_smoothed_cross_entropy(logits, target, label_smoothing=eps, ignore_index=0)
    assert torch.allclose(got, want, atol=1e-6)


# -- incremental decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_kv_cached_decoding_equals_full_decoding_float64(positions, norm_first):
    model = make(positions=positions, norm_first=norm_first, num_kv_heads=2).double().eval()
    src, pad, tgt = batch(T=8)
    with torch.no_grad():
        memory = model.encode(src, pad)
        full = model.decode(tgt, memory, pad)                               # (B, T, V), one pass
        state = model.init_state(memory, pad, max_len=tgt.shape[1])
        steps = torch.cat([model.decode_step(tgt[:, t:t + 1], state) for t in range(tgt.shape[1])], dim=1)
    assert full.dtype == torch.float64
    assert (full - steps).abs().max().item() < 1e-10
    assert state.offset == tgt.shape[1] and state.self_caches[0].length == tgt.shape[1]
    assert state.cross_caches[0].length == src.shape[1]  # the memory is projected once


def test_kv_cached_decoding_float32_and_chunks():
    model = make(positions="sinusoidal").eval()
    src, pad, tgt = batch(T=8)
    with torch.no_grad():
        memory = model.encode(src, pad)
        full = model.decode(tgt, memory, pad)
        state = model.init_state(memory, pad)
        # uneven chunks: 3 tokens, then 1, then 4
        parts = [model.decode_step(tgt[:, a:b], state) for a, b in ((0, 3), (3, 4), (4, 8))]
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5, rtol=1e-5)


# -- search ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy(positions, seed):
    model = toy_model(positions)
    src, pad, _ = copy_batch(100 + seed, B=8)
    greedy = model.greedy(src, pad, max_len=12)
    assert model.beam_search(src, pad, beam=1, max_len=12) == greedy
    assert model.beam_search(src, pad, beam=1, max_len=12, length_penalty=0.0) == greedy
    lengths = {len(g) for g in greedy}
    assert len(lengths) > 1, "degenerate test: every hypothesis has the same length"


def test_beam_one_equals_greedy_when_max_len_cuts_hypotheses():
    model = toy_model()
    src, pad, _ = copy_batch(300, B=8)
    greedy = model.greedy(src, pad, max_len=2)
    assert max(len(g) for g in greedy) == 2
    assert model.beam_search(src, pad, beam=1, max_len=2) == greedy


def test_beam_search_of_a_batch_equals_each_sentence_alone():
    model = toy_model("rope")
    src, pad, _ = copy_batch(400, B=6)
    batched, scores = model.beam_search(src, pad, beam=3, max_len=10, return_scores=True)
    for b in range(src.shape[0]):
        n = int((~pad[b]).sum())
        alone, s = model.beam_search(src[b:b + 1, :n], None, beam=3, max_len=10, return_scores=True)
        assert alone[0] == batched[b]
        assert s[0] == pytest.approx(scores[b], abs=1e-5)


def sequence_logprob(model: Transformer, src, pad, seq: list[int], ended: bool) -> float:
    tokens = [model.bos_id] + seq + ([model.eos_id] if ended else [])
    t = torch.tensor([tokens])
    with torch.no_grad():
        logp = model(src, pad, t[:, :-1]).log_softmax(-1)
    return logp[0, torch.arange(len(tokens) - 1), t[0, 1:]].sum().item()


def test_beam_search_scores_are_the_length_normalized_model_logprob():
    model = toy_model()
    src, pad, _ = copy_batch(200, B=8)
    alpha, max_len = 0.6, 10
    seqs, scores = model.beam_search(src, pad, beam=4, max_len=max_len, length_penalty=alpha, return_scores=True)
    greedy = model.greedy(src, pad, max_len=max_len)
    for b, (seq, score) in enumerate(zip(seqs, scores)):
        ended = len(seq) < max_len
        L = len(seq) + (1 if ended else 0)
        lp = ((5 + L) / 6) ** alpha
        want = sequence_logprob(model, src[b:b + 1], pad[b:b + 1], seq, ended) / lp
        assert abs(score - want) < 1e-4, (b, seq, score, want)
        # a beam of 4 finds a hypothesis at least as good as greedy's here
        g = greedy[b]
        g_ended = len(g) < max_len
        g_score = sequence_logprob(model, src[b:b + 1], pad[b:b + 1], g, g_ended) / (
            ((5 + len(g) + g_ended) / 6) ** alpha)
        assert score >= g_score - 1e-5


def test_search_restores_training_mode_and_checks_arguments():
    model = make(dropout=0.1)
    src, pad, _ = batch()
    model.train()
    model.greedy(src, pad, max_len=3)
    model.beam_search(src, pad, beam=2, max_len=3)
    assert model.training
    with pytest.raises(ValueError, match="beam"):
        model.beam_search(src, pad, beam=0)
    with pytest.raises(ValueError, match="max_len"):
        model.greedy(src, pad, max_len=0)


# -- padding ---------------------------------------------------------------------------------------
def test_padded_source_gets_zero_cross_attention_and_does_not_change_the_output():
    model = make(seed=1).eval()
    src, pad, tgt = batch(seed=1)
    assert pad.any()
    with torch.no_grad():
        maps = model.attention_weights(src, pad, tgt)
        assert len(maps["cross"]) == 2 and maps["cross"][0].shape == (3, 4, tgt.shape[1], src.shape[1])
        for w in maps["cross"]:
            assert torch.all(w.masked_select(pad[:, None, None, :]) == 0)
            assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-6)
        for w in maps["encoder"]:
            assert torch.all(w.masked_select(pad[:, None, None, :]) == 0)
        out = model(src, pad, tgt)
        other = src.masked_fill(pad, 7)  # different tokens at the padded positions
        assert torch.equal(model(other, pad, tgt), out)
        # and each sentence alone, without padding, gives the same logits
        for b in range(src.shape[0]):
            n = int((~pad[b]).sum())
            alone = model(src[b:b + 1, :n], None, tgt[b:b + 1])
            assert torch.allclose(alone, out[b:b + 1], atol=1e-5)
        # greedy decoding is also unaffected by what the padding holds
        assert model.greedy(other, pad, max_len=6) == model.greedy(src, pad, max_len=6)


# -- tying and checkpoints ---------------------------------------------------------------------
def test_tied_embeddings_share_storage():
    m = make(tie_embeddings="decoder")
    assert m.generator.weight is m.tgt_embed.weight and m.src_embed.weight is not m.tgt_embed.weight
    n_dec = sum(p.numel() for p in m.parameters())
    a = make(src_vocab=19, tgt_vocab=19, tie_embeddings="all")
    assert a.src_embed.weight.data_ptr() == a.tgt_embed.weight.data_ptr() == a.generator.weight.data_ptr()
    none = make(tie_embeddings="none")
    assert sum(p.numel() for p in none.parameters()) - n_dec == 19 * 32  # one output matrix more
    with pytest.raises(ValueError, match="src_vocab must equal tgt_vocab"):
        make(src_vocab=23, tgt_vocab=19, tie_embeddings="all")
    with pytest.raises(ValueError, match="unknown tie_embeddings 'both'; valid names: 'all', 'decoder', 'none'"):
        make(tie_embeddings="both")


@pytest.mark.parametrize("tie", ["decoder", "all"])
def test_checkpoint_round_trip_is_bit_exact_and_keeps_the_tie(tmp_path, tie):
    model = make(seed=5, src_vocab=19, tgt_vocab=19, tie_embeddings=tie, positions="learned")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    src, pad, tgt = batch(src_vocab=19)
    for _ in range(3):  # move the weights away from their initialization
        loss = label_smoothed_cross_entropy(model(src, pad, tgt[:, :-1]), tgt[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(tmp_path, model=model, config={"model": "Transformer", "model_config": model.config})
    ck = load_checkpoint(tmp_path)
    rebuilt = attnkit.models.get(ck.config["model"])(**ck.config["model_config"])
    load_weights(rebuilt, ck)
    assert rebuilt.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    assert rebuilt.generator.weight is rebuilt.tgt_embed.weight
    if tie == "all":
        assert rebuilt.src_embed.weight is rebuilt.tgt_embed.weight
    # assign=True replaces parameters: the tie is restored afterwards
    rebuilt.load_state_dict({k: v.clone() for k, v in ck.state_dict.items()}, assign=True)
    assert rebuilt.generator.weight is rebuilt.tgt_embed.weight
    # one optimizer step on the loaded model still moves the tied matrices together
    opt2 = torch.optim.SGD(rebuilt.parameters(), lr=0.1)
    label_smoothed_cross_entropy(rebuilt(src, pad, tgt[:, :-1]), tgt[:, 1:]).backward()
    opt2.step()
    assert torch.equal(rebuilt.generator.weight, rebuilt.tgt_embed.weight)
    # identical outputs after the round trip
    model.eval()
    fresh = attnkit.models.get("Transformer")(**model.config)
    load_weights(fresh, load_checkpoint(tmp_path))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(src, pad, tgt), model(src, pad, tgt))


def test_tied_copies_that_disagree_are_refused():
    m = make(tie_embeddings="decoder")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["generator.weight"] += 1
    with pytest.raises(ValueError, match="'generator.weight' and 'tgt_embed.weight' are one tied parameter"):
        m.load_state_dict(sd)


# -- inputs ------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    m = make()
    src, pad, tgt = batch()
    with pytest.raises(ValueError, match=r"src must be a \(B, T\) tensor of token ids"):
        m(src.float(), pad, tgt)
    with pytest.raises(ValueError, match=r"tgt_in ids must lie in \[0, 19\)"):
        m(src, pad, tgt + 100)
    with pytest.raises(ValueError, match="src_key_padding_mask must be a bool tensor"):
        m(src, pad.long(), tgt)
    with pytest.raises(ValueError, match="d_model must be divisible by num_heads"):
        Transformer(5, 5, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown positions 'alibi'"):
        Transformer(5, 5, d_model=8, num_heads=2, positions="alibi")


def test_grouped_query_attention_shrinks_key_value_projections():
    m = make(num_kv_heads=1)
    layer = m.decoder_layers[0]
    assert layer.self_attn.k_proj.weight.shape == (8, 32)  # one kv head of 32 / 4 = 8 features
    assert layer.cross_attn.v_proj.weight.shape == (8, 32)
    src, pad, tgt = batch()
    assert m(src, pad, tgt).shape == (3, tgt.shape[1], 19)
