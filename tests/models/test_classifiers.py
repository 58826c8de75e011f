"""The attention classifiers: they learn, padding is invisible, configs and checkpoints round-trip."""

import json

import pytest
import torch

from attnkit import models
from attnkit.checkpoint import load_checkpoint, load_weights, save_checkpoint
from attnkit.models import AttentionClassifier, AttentionMemoryClassifier, HierarchicalAttentionNetwork

V = 30  # vocabulary size of the token models


def token_model(encoder, pooling="query"):
    return AttentionClassifier(3, input="tokens", vocab_size=V, dim=16, depth=1, num_heads=2, encoder=encoder,
                               pooling=pooling, dropout=0.0, max_len=16)


MODELS = {
    "tokens-transformer": lambda: token_model("transformer"),
    "tokens-gru-mlp": lambda: token_model("gru", "mlp"),
    "tokens-none": lambda: token_model("none"),
    "patches-transformer": lambda: AttentionClassifier(3, input="patches", image_size=(6, 4), patch_size=2,
                                                       dim=16, depth=1, num_heads=2, dropout=0.0),
    "memory-gru-heads": lambda: AttentionMemoryClassifier(3, row_dim=4, num_rows=6, dim=16, memory_dim=12,
                                                          num_steps=3, gated_heads=2, head_dim=8, dropout=0.0),
    "memory-transformer-concat": lambda: AttentionMemoryClassifier(3, row_dim=4, num_rows=6, dim=16, memory_dim=12,
                                                                   encoder="transformer", num_heads=2,
                                                                   readout="concat", dropout=0.0),
    "memory-none": lambda: AttentionMemoryClassifier(3, row_dim=4, num_rows=6, dim=16, memory_dim=12,
                                                     encoder="none", dropout=0.0),
    "han": lambda: HierarchicalAttentionNetwork(V, 3, embed_dim=12, word_hidden=8, sent_hidden=8, dropout=0.0),
}


def inputs(name, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name.startswith("tokens"):
        x = torch.randint(1, V, (B, 7), generator=g)
        x[1, 4:] = 0  # padding
        x[5, 2:] = 0
        return x
    if name.startswith("patches"):
        return torch.rand(B, 1, 6, 4, generator=g)
    if name.startswith("memory"):
        return torch.randn(B, 6, 4, generator=g)
    x = torch.randint(1, V, (B, 3, 5), generator=g)  # han: 3 sentences of 5 words
    x[2, 1, 3:] = 0
    x[3, 2] = 0
    return x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_overfits_a_tiny_batch(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x, y = inputs(name), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02, f"{name}: loss {loss.item():.4f} after 150 steps on 8 examples"
    assert torch.equal(model(x).argmax(-1), y)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_rebuilds_the_model(name):
    model = MODELS[name]()
    config = json.loads(json.dumps(model.config))  # JSON-able, as a checkpoint stores it
    twin = models.get(type(model).__name__)(**config)
    assert twin.config == model.config
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_round_trip_is_bit_exact(name, tmp_path):
    model = MODELS[name]().eval()
    save_checkpoint(tmp_path, model=model, config={"model": type(model).__name__, "model_config": model.config})
    ckpt = load_checkpoint(tmp_path)
    twin = load_weights(models.get(ckpt.config["model"])(**ckpt.config["model_config"]), ckpt).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k
    x = inputs(name)
    assert torch.equal(model(x), twin(x))


@pytest.mark.parametrize("encoder", ["transformer", "gru", "none"])
@pytest.mark.parametrize("pooling", ["query", "mlp"])
def test_padding_is_invisible_to_the_token_classifier(encoder, pooling):
    model = token_model(encoder, pooling).eval()
    x = inputs("tokens")
    pad = x == 0
    logits, attn = model(x, return_attention=True)
    assert torch.all(attn["pooling"][pad] == 0)
    assert torch.allclose(attn["pooling"].sum(-1), torch.ones(len(x)))
    for key, w in attn.items():
        if key.startswith("layer"):  # (B, H, T, T): no query attends to a padded key
            assert torch.all(w.transpose(1, 3)[pad] == 0)
    # Same tokens, other ids in the padded slots, with an explicit key_padding_mask.
    # (The weights come from the reference backend, plain logits from SDPA: compare like with like.)
    garbage = torch.where(pad, torch.randint(1, V, x.shape), x)
    assert torch.equal(model(garbage, key_padding_mask=pad), model(x))
    assert torch.allclose(model(x), logits, atol=1e-6)
    # And the padded slots may be dropped altogether.
    assert torch.allclose(model(x[1:2, :4]), logits[1:2], atol=1e-6)


def test_pad_id_none_treats_zero_as_a_token():
    model = AttentionClassifier(2, vocab_size=V, dim=16, depth=1, num_heads=2, pad_id=None, dropout=0.0).eval()
    x = torch.tensor([[3, 4, 0, 0]])
    _, attn = model(x, return_attention=True)
    assert torch.all(attn["pooling"][0, 2:] > 0)


@pytest.mark.parametrize("name", ["memory-gru-heads", "memory-transformer-concat", "memory-none"])
def test_padding_is_invisible_to_the_memory_classifier(name):
    model = MODELS[name]().eval()
    x = inputs(name)
    pad = torch.zeros(8, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[3, 1:] = True
    logits, attn = model(x, key_padding_mask=pad, return_attention=True)
    assert attn["memory"].shape == (8, model.config["num_steps"], 6)
    assert torch.all(attn["memory"].transpose(1, 2)[pad] == 0)
    if "heads" in attn:
        assert torch.all(attn["heads"].transpose(1, 2)[pad] == 0)
    garbage = torch.where(pad.unsqueeze(-1), torch.randn_like(x) * 100, x)
    assert torch.allclose(model(garbage, key_padding_mask=pad), logits, atol=1e-6, rtol=0)
    assert torch.allclose(model(x[0:1, :4]), logits[0:1], atol=1e-6)


def test_memory_classifier_reads_images_row_by_row():
    model = MODELS["memory-gru-heads"]().eval()
    rows = torch.randn(2, 6, 4)
    assert torch.equal(model(rows), model(rows.unsqueeze(1)))  # (B, 1, H, W) is read as rows
    _, attn = model(rows, return_attention=True)
    assert torch.allclose(attn["memory"].sum(-1), torch.ones(2, 3))
    assert attn["gates"].shape == (2, 3, 12)


def test_padding_is_invisible_to_the_han():
    model = MODELS["han"]().eval()
    x = inputs("han")
    logits, attn = model(x, return_attention=True)
    assert torch.all(attn["words"][x == 0] == 0)
    assert attn["sentences"][3, 2] == 0  # the empty sentence
    # More padding (a padded word column and an empty sentence) changes nothing.
    wider = torch.nn.functional.pad(x, (0, 2, 0, 1))  # (B, 4, 7)
    assert torch.allclose(model(wider), logits, atol=1e-6, rtol=0)
    # A document without its trailing empty sentence is the same document.
    assert torch.allclose(model(x[3:4, :2]), logits[3:4], atol=1e-6, rtol=0)


def test_patch_order_is_row_major():
    model = AttentionClassifier(2, input="patches", image_size=(4, 6), patch_size=2, dim=8, depth=1, num_heads=2)
    img = torch.arange(24.0).view(1, 1, 4, 6)
    p = model.patches(img)
    assert p.shape == (1, 6, 4)
    assert p[0, 0].tolist() == [0, 1, 6, 7] and p[0, 1].tolist() == [2, 3, 8, 9]
    assert p[0, 3].tolist() == [12, 13, 18, 19]


@pytest.mark.parametrize("kwargs, match", [
    (dict(input="tokens"), "vocab_size is required"),
    (dict(input="patches", image_size=8), "image_size and patch_size are required"),
    (dict(input="patches", image_size=8, patch_size=3), "patch_size must divide image_size"),
    (dict(input="pixels", vocab_size=5), "unknown input 'pixels'; valid names: 'patches', 'tokens'"),
    (dict(vocab_size=5, encoder="lstm"), "unknown encoder 'lstm'; valid names: 'gru', 'none', 'transformer'"),
    (dict(vocab_size=5, pooling="max"), "unknown pooling 'max'"),
    (dict(vocab_size=5, dim=10, num_heads=4), "dim must be divisible by num_heads"),
    (dict(vocab_size=5, dim=15, encoder="gru"), "dim must be even"),
    (dict(vocab_size=5, dropout=1.5), "dropout must be in"),
])
def test_classifier_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionClassifier(2, **kwargs)


def test_bad_inputs_name_the_expected_shape():
    tok = token_model("transformer")
    with pytest.raises(ValueError, match=r"x must be token ids, a \(B, T\) integer tensor; got shape \(2, 3, 4\)"):
        tok(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len = 16"):
        tok(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor \(1, 3\)"):
        tok(torch.ones(1, 3, dtype=torch.long), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    img = MODELS["patches-transformer"]()
    with pytest.raises(ValueError, match=r"x must be images \(B, 1, 6, 4\); got shape \(2, 1, 4, 6\)"):
        img(torch.rand(2, 1, 4, 6))
    mem = MODELS["memory-none"]()
    with pytest.raises(ValueError, match=r"row_dim = 4"):
        mem(torch.rand(2, 6, 5))
    with pytest.raises(ValueError, match="num_rows = 6"):
        mem(torch.rand(2, 7, 4))
    with pytest.raises(ValueError, match="unknown readout 'first'"):
        AttentionMemoryClassifier(2, row_dim=4, readout="first")
    han = MODELS["han"]()
    with pytest.raises(ValueError, match=r"x must be token ids \(B, S, W\)"):
        han(torch.rand(2, 3, 4))
