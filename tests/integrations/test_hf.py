"""attnkit.integrations.hf: ``attn_implementation="attnkit"`` inside Hugging Face transformers models.

The oracle is HF's own ``"eager"`` attention on the very same model and inputs (and, for a
variant, an eager attention written here with the ``entmax`` package). Models are tiny and built
from configs with random weights (no network). ``initializer_range=0.2`` makes the attention
sharp enough that masks, windows and soft-capping visibly change the outputs (with HF's default
0.02 the weights are near-uniform and a wrong mask could still pass).

Padding: HF's eager attention gives *uniform* weights on a query row whose keys are all masked
(a left-padding position under a causal mask), attnkit gives zeros; such rows are padding and
never reach a real token, so outputs, losses and weights are compared on real tokens only.
"""

import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="attnkit.integrations.hf needs Hugging Face transformers: pip install -e '.[hf]'")

import attnkit.integrations.hf as akhf  # noqa: E402  (registers attn_implementation="attnkit")
from attnkit.backends import registry  # noqa: E402
from attnkit.masks import Causal, Chunked, KeyPadding, SlidingWindow  # noqa: E402
from attnkit.masks.base import And, FromMod, Or  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

V = 128          # vocabulary
T = 12           # sequence length in the forward tests: longer than every window below
WINDOW = 4       # sliding window of Mistral / Gemma / Qwen2 (ModernBERT: local_attention=WINDOW)
PAD = 0

COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
              pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
ALTERNATING = ["sliding_attention", "full_attention"]


def _factories():
    tf = transformers
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=WINDOW)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **COMMON, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0, layer_types=ALTERNATING)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **COMMON, head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            **COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
        "gpt_oss": lambda: tf.GptOssForCausalLM(tf.GptOssConfig(  # attention sinks (s_aux), sliding/full layers
            **COMMON, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
            layer_types=ALTERNATING)),
        "llama4": lambda: tf.Llama4ForCausalLM(tf.Llama4TextConfig(  # chunked attention, no-RoPE layers, MoE
            **{**COMMON, "intermediate_size_mlp": 128}, head_dim=16, attention_chunk_size=WINDOW,
            num_local_experts=2, num_experts_per_tok=1, no_rope_layers=[1, 0],
            layer_types=["chunked_attention", "full_attention"])),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
            pad_token_id=PAD, bos_token_id=1, eos_token_id=2)),
        "bert": lambda: tf.BertModel(tf.BertConfig(
            vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, initializer_range=0.2, pad_token_id=PAD), add_pooling_layer=False),
        "modernbert": lambda: tf.ModernBertModel(tf.ModernBertConfig(
            vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, initializer_range=0.2, global_attn_every_n_layers=2,
            local_attention=WINDOW, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, cls_token_id=1,
            sep_token_id=2)),
    }


DECODERS = ["llama", "mistral", "gemma2", "gemma3", "qwen2", "gpt_oss", "llama4", "gpt2"]
ENCODERS = ["bert", "modernbert"]


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = _factories()[name]()
    with torch.no_grad():
        for module in model.modules():  # GPT-OSS's sink logits start near 0: make them matter
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0.0, 1.0)
    return model.to(dtype).eval()  # eval: no dropout; gradients still flow


def inputs(padding, B=2, length=T, seed=1):
    """``ids (B, T)`` and a 0/1 ``attention_mask`` (None for ``padding="none"``): left padding puts
    pads before row 0's tokens, right padding after row 1's."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, length), generator=g)
    if padding == "none":
        return ids, None
    am = torch.ones(B, length, dtype=torch.long)
    if padding == "left":
        am[0, :3] = 0
    elif padding == "right":
        am[1, -4:] = 0
    else:
        raise ValueError(padding)
    return ids.masked_fill(am == 0, PAD), am


def real_tokens(ids, am):
    return torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()


def forward(model, ids, am, **kw):
    out = model(input_ids=ids, attention_mask=am, **kw)
    return out, (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def loss_fn(y, real):
    """A loss over real tokens only: squares of fixed random projections of the output. (Not
    sum(y**2): an encoder's output is LayerNorm'd, and sum(LayerNorm(x)**2) is constant, so its
    gradients would be pure rounding noise.)"""
    proj = torch.randn(y.shape[-1], 8, generator=torch.Generator().manual_seed(2))
    return ((y.float() * real[..., None]) @ proj).pow(2).sum()


def run(model, impl, ids, am):
    """Output and every parameter's gradient of :func:`loss_fn`, under ``impl``."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    _, y = forward(model, ids, am)
    loss_fn(y, real_tokens(ids, am)).backward()
    grads = {n: None if p.grad is None else p.grad.detach().float().clone() for n, p in model.named_parameters()}
    return y.detach().float(), grads


def assert_close(actual, expected, rtol, atol, what, scale=None):
    """``|a - e| <= atol * scale + rtol * |e|``, atol relative to the magnitude: ``scale`` defaults
    to ``max(1, max|e|)``."""
    if scale is None:
        scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_same_grads(g_ak, g_eager, rtol, atol):
    """Every parameter's gradient, by name. atol is relative to the largest entry of that
    gradient, floored at 1% of the model's largest gradient entry (a gradient that is zero in
    exact arithmetic -- BERT's key bias under softmax -- is rounding noise of the others' size)."""
    assert g_ak.keys() == g_eager.keys()
    with_grad = [n for n, g in g_eager.items() if g is not None]
    missing = sorted(set(g_eager) - set(with_grad))
    assert len(missing) <= 1, f"too few parameters got a gradient: {missing}"
    top = max(g_eager[n].abs().max().item() for n in with_grad)
    for n in g_eager:
        if g_eager[n] is None:
            assert g_ak[n] is None, f"{n}: attnkit gives a gradient where eager gives none"
            continue
        assert g_ak[n] is not None, f"{n}: no gradient under attnkit"
        scale = max(g_eager[n].abs().max().item(), 1e-2 * top)
        assert_close(g_ak[n], g_eager[n], rtol, atol, f"grad of {n}", scale=scale)


# -- spies ------------------------------------------------------------------------------------------
class _BackendSpy:
    def __init__(self, name, backend, calls):
        self._name, self._backend, self._calls = name, backend, calls

    def __getattr__(self, attr):
        return getattr(self._backend, attr)

    def __call__(self, q, k, v, spec):
        self._calls.append((self._name, bool(spec.return_weights)))
        return self._backend(q, k, v, spec)


@pytest.fixture
def backend_calls(monkeypatch):
    """(backend name, weights requested) for every attnkit kernel call."""
    calls = []
    for name, backend in list(registry.REGISTRY.items()):
        monkeypatch.setitem(registry.REGISTRY, name, _BackendSpy(name, backend, calls))
    return calls


@pytest.fixture
def attnkit_masks(monkeypatch):
    """``(build_mask kwargs, HFMask)`` for every mask the models ask for, and every
    ``attention_mask`` the "attnkit" attention function receives."""
    built, received = [], []

    def spy_mask(*args, **kwargs):
        out = akhf.build_mask(*args, **kwargs)
        built.append((kwargs, out))
        return out

    def spy_attention(module, query, key, value, attention_mask, **kwargs):
        received.append(attention_mask)
        return akhf.attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(transformers.AttentionMaskInterface._global_mapping, akhf.NAME, spy_mask)
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, akhf.NAME, spy_attention)
    return types.SimpleNamespace(built=built, received=received)


def leaves(mask):
    if isinstance(mask, (And, Or)):
        return leaves(mask.left) + leaves(mask.right)
    return [mask]


# -- 1, 2: forward and gradient parity with eager ----------------------------------------------------
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", DECODERS + ENCODERS)
def test_float32_logits_and_every_gradient_match_eager(name, padding):
    model = build(name)
    ids, am = inputs(padding)
    y_e, g_e = run(model, "eager", ids, am)
    y_k, g_k = run(model, "attnkit", ids, am)
    real = real_tokens(ids, am)
    assert y_k.shape == y_e.shape
    assert torch.isfinite(y_k).all()
    assert_close(y_k[real], y_e[real], 1e-4, 1e-5, f"{name} outputs on real tokens")
    assert_same_grads(g_k, g_e, 1e-4, 1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_bfloat16_matches_eager_within_dtype_tolerance(name):
    model = build(name, torch.bfloat16)
    ids, am = inputs("left")
    y_e, g_e = run(model, "eager", ids, am)
    y_k, g_k = run(model, "attnkit", ids, am)
    real = real_tokens(ids, am)
    assert_close(y_k[real], y_e[real], 2e-2, 2e-2, f"{name} bf16 logits")
    assert_same_grads(g_k, g_e, 5e-2, 5e-2)
    # and the bf16 run is a bf16 run: not the float32 numbers
    y32, _ = run(build(name), "attnkit", ids, am)
    assert not torch.equal(y_k[real], y32[real])


def test_the_tests_are_sensitive_to_window_and_softcap():
    """Guard for the parity tests above: at these sizes the sliding window and Gemma 2's score
    soft-capping change the outputs, so a mask or softcap that attnkit dropped would be seen."""
    ids, am = inputs("none")
    model = build("gemma2")
    model.set_attn_implementation("eager")
    base = forward(model, ids, am)[1]
    for change in (dict(sliding_window=64), dict(attn_logit_softcapping=50.0)):
        torch.manual_seed(0)
        cfg = transformers.Gemma2Config(**{**COMMON, "head_dim": 16, "sliding_window": WINDOW,
                                           "attn_logit_softcapping": 5.0, "layer_types": ALTERNATING, **change})
        other = transformers.Gemma2ForCausalLM(cfg).eval()
        other.set_attn_implementation("eager")
        assert (forward(other, ids, am)[1] - base).abs().max() > 1e-2, change


@pytest.mark.parametrize("name", ["gemma2", "modernbert"])
def test_model_masks_reach_attention_structured(name, attnkit_masks):
    """Hybrid models: the sliding layers get a SlidingWindow, the global ones a Causal (or
    nothing, bidirectional), padding a KeyPadding -- never a dense tensor."""
    model = build(name)
    model.set_attn_implementation("attnkit")
    ids, am = inputs("right")
    with torch.no_grad():
        forward(model, ids, am)
    assert len(attnkit_masks.received) == 2
    by_type = dict(zip(model.config.layer_types, attnkit_masks.received))
    sliding, full = by_type["sliding_attention"], by_type["full_attention"]
    for m in (sliding, full):
        assert isinstance(m, akhf.HFMask), type(m)
        assert all(isinstance(x, (Causal, SlidingWindow, KeyPadding)) for x in leaves(m.mask)), m
        assert any(isinstance(x, KeyPadding) for x in leaves(m.mask)), m
    assert any(isinstance(x, SlidingWindow) for x in leaves(sliding.mask)), sliding
    assert not any(isinstance(x, SlidingWindow) for x in leaves(full.mask)), full
    assert any(isinstance(x, Causal) for x in leaves(full.mask)) == (name == "gemma2"), full


def test_chunked_layers_get_the_analytic_chunked_mask(attnkit_masks):
    """Llama 4's chunked layers: HF's chunked mask function (chunks counted from each sequence's
    first real token) arrives as attnkit's Chunked mask, not as a mask_mod evaluated pair by pair."""
    model = build("llama4")
    model.set_attn_implementation("attnkit")
    ids, am = inputs("left")
    with torch.no_grad():
        forward(model, ids, am)
    chunked, full = attnkit_masks.received
    kinds = {type(x) for x in leaves(chunked.mask)}
    assert Chunked in kinds and FromMod not in kinds, chunked
    (c,) = [x for x in leaves(chunked.mask) if isinstance(x, Chunked)]
    assert c.size == WINDOW and c.shift.tolist() == [3, 0]  # row 0 has 3 pads on the left
    assert not any(isinstance(x, Chunked) for x in leaves(full.mask)), full


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_4d_mask_given_by_the_user_matches_eager(kind):
    """A prepared 4-D mask skips HF's mask builders and reaches the attention function as a
    tensor: bool (True = may attend) or HF's additive float form (0 / finfo.min). Eager always
    gets the float form (it adds the mask to the scores, so a bool mask would mean +1 / +0)."""
    model = build("llama")
    ids, am = inputs("left")
    allowed = mu.sdpa_mask(2, T, T, mask_function=mu.causal_mask_function, attention_mask=am.bool(),
                           allow_is_causal_skip=False)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    outs = {}
    for impl, mask in (("eager", additive), ("attnkit", allowed if kind == "bool" else additive)):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model(input_ids=ids, attention_mask=mask).logits
    real = am.bool()
    assert_close(outs["attnkit"][real], outs["eager"][real], 1e-4, 1e-5, f"4-D {kind} mask")


def test_packed_sequences_match_eager_and_stay_apart(attnkit_masks):
    """Two sequences packed in one row (position_ids restart, no attention_mask, no cache): HF's
    packed-sequence mask function reaches attnkit as a mask_mod and matches eager."""
    model = build("llama")
    ids = torch.randint(3, V, (1, T), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    y = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            y[impl] = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    y_k = y["attnkit"]
    assert_close(y_k, y["eager"], 1e-4, 1e-5, "packed sequences")
    with torch.no_grad():
        alone = model(input_ids=ids[:, 5:], use_cache=False).logits
    assert_close(y_k[:, 5:], alone, 1e-4, 1e-5, "second packed sequence vs the same sequence alone")
    packed = attnkit_masks.built[0][1]
    assert FromMod in {type(x) for x in leaves(packed.mask)} and Causal in {type(x) for x in leaves(packed.mask)}


def test_encoder_decoder_cross_attention_matches_eager(backend_calls):
    """BART: encoder (bidirectional + padding), decoder (causal + padding) and cross-attention
    (Tq != Tk, encoder padding) all through attnkit; outputs, weights and gradients as eager."""
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        init_std=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)).eval()
    ids, am = inputs("right")
    dec_ids, dec_am = inputs("right", length=7, seed=5)
    got = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=am, decoder_input_ids=dec_ids, decoder_attention_mask=dec_am,
                    output_attentions=True)
        loss_fn(out.logits, dec_am.bool()).backward()
        got[impl] = (out, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    (o_e, g_e), (o_k, g_k) = got["eager"], got["attnkit"]
    real = dec_am.bool()
    assert_close(o_k.logits[real].detach(), o_e.logits[real].detach(), 1e-4, 1e-5, "BART logits")
    assert_same_grads(g_k, g_e, 1e-4, 1e-5)
    for key, rows in (("encoder_attentions", am.bool()), ("decoder_attentions", real), ("cross_attentions", real)):
        for a, b in zip(getattr(o_k, key), getattr(o_e, key)):
            assert a.shape == b.shape
            for row in range(2):
                assert_close(a[row][:, rows[row]].detach(), b[row][:, rows[row]].detach(), 1e-4, 1e-5, key)
    assert o_k.cross_attentions[0].shape == (2, 4, 7, T)
    assert len(backend_calls) == 2 + 2 + 2  # encoder self, decoder self and cross, 2 layers each: all attnkit


# -- 3: generate with the KV cache ---------------------------------------------------------------------
def _generate(model, impl, ids, am, **kw):
    model.set_attn_implementation(impl)
    return model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                          return_dict_in_generate=True, output_logits=True, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gemma3", "gpt_oss", "llama4"])
def test_generate_with_kv_cache_matches_eager(name, attnkit_masks):
    model = build(name)
    ids, am = inputs("left", length=8)  # 8 + 6 tokens: well past the window of 4
    want = _generate(model, "eager", ids, am)
    got = _generate(model, "attnkit", ids, am)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == 6
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert_close(a, b, 1e-4, 1e-5, f"{name} logits at generation step {step}")
    assert len(set(want.sequences[:, 8:].flatten().tolist())) > 2  # not a degenerate repetition
    assert attnkit_masks.built and attnkit_masks.received  # attnkit built the masks and ran the attention
    if name != "llama":  # the sliding layers' cache holds only the window: masks start past key 0
        assert any(type(layer).__name__ == "DynamicSlidingWindowLayer" for layer in got.past_key_values.layers)
        assert any(kw.get("kv_offset", 0) > 0 for kw, _ in attnkit_masks.built)
        decode = [m for kw, m in attnkit_masks.built if kw.get("kv_offset", 0) > 0]
        local = Chunked if name == "llama4" else SlidingWindow  # Llama 4's local layers are chunked
        assert all(any(isinstance(x, local) for x in leaves(m.mask)) for m in decode)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_generate_with_static_cache_matches_eager(name):
    model = build(name)
    ids, am = inputs("left", length=8)
    want = _generate(model, "eager", ids, am, cache_implementation="static")
    got = _generate(model, "attnkit", ids, am, cache_implementation="static")
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert_close(a, b, 1e-4, 1e-5, f"{name} static-cache logits")


# -- 4: output_attentions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss", "gpt2", "bert", "modernbert"])
def test_output_attentions_match_eager_and_come_from_the_tiled_backend(name, padding, backend_calls):
    model = build(name)
    ids, am = inputs(padding)
    got = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        backend_calls.clear()
        with torch.no_grad():
            got[impl] = model(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    # the weights were computed by attnkit's tiled backend, asked for weights, once per layer
    assert backend_calls == [("tiled", True)] * 2
    w_e, w_k = got["eager"], got["attnkit"]
    assert len(w_k) == len(w_e) == 2
    real = am.bool()
    for layer, (a, b) in enumerate(zip(w_k, w_e)):
        assert a.shape == b.shape == (2, 4, T, T)
        for row in range(2):
            q = real[row]
            assert_close(a[row][:, q], b[row][:, q], 1e-4, 1e-5, f"{name} layer {layer} weights, sequence {row}")
            assert torch.equal(a[row][:, q][..., ~q], torch.zeros_like(a[row][:, q][..., ~q]))  # pads get nothing
            sums = a[row][:, q].sum(-1)
            if name == "gpt_oss":  # the sink takes its share: rows sum to less than 1
                assert (sums < 1).all() and (sums > 0).all()
            else:
                torch.testing.assert_close(sums, torch.ones(4, int(q.sum())))
        assert torch.isfinite(a).all()


def test_output_attentions_are_differentiable_like_eager():
    model = build("llama")
    ids, am = inputs("left")
    real = am.bool()
    grads = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=am, output_attentions=True)
        assert all(a.requires_grad for a in out.attentions), impl
        loss = sum((a * real[:, None, :, None]).pow(2).sum() for a in out.attentions)
        loss.backward()
        grads[impl] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["eager"].items():
        if g is not None and grads["attnkit"][n] is not None:
            assert_close(grads["attnkit"][n], g, 1e-4, 1e-5, f"grad of {n} through the weights")


def test_output_attentions_without_padding_and_outputs_unchanged(backend_calls):
    model = build("qwen2")
    ids, _ = inputs("none")
    model.set_attn_implementation("attnkit")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        out = model(input_ids=ids, output_attentions=True)
    assert {c for c in backend_calls if c[1]} == {("tiled", True)}
    torch.testing.assert_close(out.logits, plain, rtol=1e-5, atol=1e-5)  # asking for weights changes nothing else
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(input_ids=ids, output_attentions=True).attentions
    for a, b in zip(out.attentions, want):
        assert_close(a, b, 1e-4, 1e-5, "qwen2 weights")


# -- 5: masks stay structured -------------------------------------------------------------------------------
_LEFT = torch.ones(2, 11, dtype=torch.bool)
_LEFT[0, :3] = False
_RIGHT = torch.ones(2, 9, dtype=torch.bool)
_RIGHT[1, -3:] = False


def _custom(b, h, q_idx, kv_idx):  # a user's mask function: every third key back, and the first key
    return ((q_idx - kv_idx) % 3 == 0) & (kv_idx <= q_idx) | (kv_idx == 0)


# (name, build_mask/sdpa_mask kwargs, leaf types it must contain, leaf types it may contain)
MASK_CASES = [
    ("causal", dict(q_length=7, kv_length=7, mask_function=mu.causal_mask_function), {Causal}, {Causal}),
    ("causal prefill after a cache", dict(q_length=3, kv_length=8, q_offset=5, mask_function=mu.causal_mask_function),
     {Causal}, {Causal}),
    ("causal decode step", dict(q_length=1, kv_length=9, q_offset=8, mask_function=mu.causal_mask_function),
     {Causal}, {Causal}),
    ("causal, no padding in attention_mask", dict(q_length=9, kv_length=9, mask_function=mu.causal_mask_function,
                                                  attention_mask=torch.ones(2, 9, dtype=torch.bool)),
     {Causal}, {Causal}),
    ("causal left padding", dict(q_length=11, kv_length=11, attention_mask=_LEFT,
                                 mask_function=mu.causal_mask_function), {Causal, KeyPadding}, {Causal, KeyPadding}),
    ("causal right padding", dict(q_length=9, kv_length=9, attention_mask=_RIGHT,
                                  mask_function=mu.causal_mask_function), {Causal, KeyPadding}, {Causal, KeyPadding}),
    ("causal padding mask shorter than the cache", dict(q_length=1, kv_length=12, q_offset=11, attention_mask=_LEFT,
                                                        mask_function=mu.causal_mask_function),
     {Causal, KeyPadding}, {Causal, KeyPadding}),
    ("sliding window", dict(q_length=9, kv_length=9, mask_function=mu.sliding_window_causal_mask_function(3)),
     {SlidingWindow}, {SlidingWindow, Causal}),
    ("sliding window cache (kv_offset)", dict(q_length=2, kv_length=5, q_offset=9, kv_offset=6,
                                              mask_function=mu.sliding_window_causal_mask_function(4)),
     {SlidingWindow}, {SlidingWindow, Causal}),
    ("sliding window cache + padding", dict(q_length=3, kv_length=6, q_offset=8, kv_offset=5, attention_mask=_LEFT,
                                            mask_function=mu.sliding_window_causal_mask_function(4)),
     {SlidingWindow}, {SlidingWindow, Causal, KeyPadding}),
    ("sliding window + left padding", dict(q_length=4, kv_length=11, q_offset=7, attention_mask=_LEFT,
                                           mask_function=mu.sliding_window_causal_mask_function(4)),
     {SlidingWindow, KeyPadding}, {SlidingWindow, Causal, KeyPadding}),
    ("bidirectional + padding", dict(q_length=9, kv_length=9, attention_mask=_RIGHT,
                                     mask_function=mu.bidirectional_mask_function), {KeyPadding}, {KeyPadding}),
    ("bidirectional sliding window", dict(q_length=9, kv_length=9,
                                          mask_function=mu.sliding_window_bidirectional_mask_function(2)),
     {SlidingWindow}, {SlidingWindow}),
    ("bidirectional sliding window + padding", dict(q_length=9, kv_length=9, attention_mask=_RIGHT,
                                                    mask_function=mu.sliding_window_bidirectional_mask_function(2)),
     {SlidingWindow, KeyPadding}, {SlidingWindow, KeyPadding}),
    ("causal | bidirectional window", dict(q_length=6, kv_length=6, mask_function=mu.or_masks(
        mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(1))), {Causal, SlidingWindow},
     {Causal, SlidingWindow}),
    ("causal & padding_mask_function", dict(q_length=9, kv_length=9, mask_function=mu.and_masks(
        mu.causal_mask_function, mu.padding_mask_function(_RIGHT))), {Causal, KeyPadding}, {Causal, KeyPadding}),
    ("chunked", dict(q_length=9, kv_length=9, mask_function=mu.chunked_causal_mask_function(3, torch.tensor([2, 0])),
                     attention_mask=torch.ones(2, 9, dtype=torch.bool)), {Chunked, Causal}, {Chunked, Causal}),
    ("chunked after a cache", dict(q_length=2, kv_length=9, q_offset=7, attention_mask=_RIGHT,
                                   mask_function=mu.chunked_causal_mask_function(4, torch.tensor([0, 1]))),
     {Chunked, Causal}, {Chunked, Causal, KeyPadding}),
    ("chunked after a sliding cache (kv_offset)", dict(q_length=3, kv_length=6, q_offset=10, kv_offset=7,
                                                     mask_function=mu.chunked_causal_mask_function(
                                                         4, torch.tensor([3, 0]))), {Chunked, Causal},
     {Chunked, Causal}),
    ("packed sequences", dict(q_length=8, kv_length=8, mask_function=mu.and_masks(
        mu.causal_mask_function, mu.packed_sequence_mask_function(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]] * 2)))),
     {FromMod}, {FromMod, Causal}),
    ("custom mask function", dict(q_length=6, kv_length=9, q_offset=3, mask_function=_custom), {FromMod}, {FromMod}),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_build_mask_is_structured_and_equals_sdpa_mask(case):
    _, kw, must, may = case
    hm = akhf.build_mask(2, **kw)
    assert isinstance(hm, akhf.HFMask)
    got = {type(x) for x in leaves(hm.mask)}
    assert must <= got <= may, f"{hm!r}: leaf types {got}"
    want = mu.sdpa_mask(2, allow_is_causal_skip=False, **kw)
    dense = hm.to_dense(2)
    assert dense.dtype == torch.bool and dense.shape[1:] == want.shape[1:] and dense.shape[0] in (1, 2)
    assert torch.equal(dense.expand_as(want), want), f"{hm!r}\n{dense.int()}\n{want.int()}"


def test_build_mask_offsets_land_on_the_analytic_masks():
    m = akhf.build_mask(1, 3, 8, q_offset=5, mask_function=mu.causal_mask_function).mask
    assert type(m) is Causal and m.align == 5
    m = akhf.build_mask(1, 2, 5, q_offset=9, kv_offset=6, mask_function=mu.sliding_window_causal_mask_function(4)).mask
    windows = [x for x in leaves(m) if isinstance(x, SlidingWindow)]
    assert len(windows) == 1 and windows[0].left == 3 and windows[0].align == 3  # w - 1 keys back; query 0 at key 3
    m = akhf.build_mask(1, 9, 9, mask_function=mu.sliding_window_bidirectional_mask_function(2)).mask
    assert type(m) is SlidingWindow and (m.left, m.right) == (2, 2)


def test_bidirectional_without_padding_is_no_mask():
    hm = akhf.build_mask(2, 5, 7, mask_function=mu.bidirectional_mask_function,
                         attention_mask=torch.ones(2, 7, dtype=torch.bool))
    assert hm.mask is None
    assert hm.to_dense(2).all() and hm.to_dense(2).shape[-2:] == (5, 7)


def _tensors(obj, seen=None):
    """Every tensor reachable from ``obj`` through attributes, containers and closures."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, (type, types.ModuleType, str, bytes, int, float)):
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, types.FunctionType):
        children = [c.cell_contents for c in (obj.__closure__ or ())]
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        yield from _tensors(child, seen)


def test_nothing_quadratic_is_built_at_4096():
    n = 4096
    hm = akhf.build_mask(1, n, n, mask_function=mu.causal_mask_function)
    assert type(hm.mask) is Causal
    assert max((t.numel() for t in _tensors(hm)), default=0) < n * n
    am = torch.ones(2, n, dtype=torch.bool)
    am[0, :100] = False
    hm = akhf.build_mask(2, n, n, mask_function=mu.sliding_window_causal_mask_function(64), attention_mask=am)
    assert {type(x) for x in leaves(hm.mask)} <= {SlidingWindow, Causal, KeyPadding}
    assert KeyPadding in {type(x) for x in leaves(hm.mask)}
    assert max(t.numel() for t in _tensors(hm)) <= 2 * n  # the (B, Tk) padding row, nothing (Tq, Tk)


# -- 6: a variant against a hand-written eager attention --------------------------------------------------
def _entmax_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from entmax import entmax15
    from transformers.models.llama.modeling_llama import repeat_kv

    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    scores = query @ k.transpose(2, 3) * scaling
    if attention_mask is not None:  # bool (B, 1, Tq, Tk), True = may attend
        # a large finite value: entmax15 (X/2 - tau)_+^2 gives exactly 0 there; -inf would give NaN
        scores = scores.masked_fill(~attention_mask[..., :k.shape[-2]], -1e4)
    weights = entmax15(scores, dim=-1)
    out = weights @ v
    return out.transpose(1, 2).contiguous(), weights


def _dense_bool_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    return mu.sdpa_mask(*args, **kwargs)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_configure_entmax15_matches_a_hand_written_entmax_attention(padding, monkeypatch):
    pytest.importorskip("entmax", reason="the reference uses the entmax package (pip install entmax)")
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "entmax_ref", _entmax_eager_attention)
    monkeypatch.setitem(transformers.AttentionMaskInterface._global_mapping, "entmax_ref", _dense_bool_mask)
    model = build("llama")
    ids, am = inputs(padding)
    y_ref, g_ref = run(model, "entmax_ref", ids, am)
    akhf.configure(model, normalizer="entmax15")
    assert model.config._attn_implementation == "attnkit"
    y_k, g_k = run(model, "attnkit", ids, am)
    real = real_tokens(ids, am)
    assert_close(y_k[real], y_ref[real], 1e-4, 1e-5, "entmax15 logits")
    assert_same_grads(g_k, g_ref, 1e-4, 1e-5)
    # entmax15 really differs from softmax here
    y_soft, _ = run(build("llama"), "eager", ids, am)
    assert (y_soft[real] - y_ref[real]).abs().max() > 1e-2
    # configure(model) with no options restores plain (softmax) attnkit attention
    akhf.configure(model)
    y_back, _ = run(model, "attnkit", ids, am)
    assert_close(y_back[real], y_soft[real], 1e-4, 1e-5, "after configure(model)")


# -- 7: bad use -------------------------------------------------------------------------------------------
def test_unknown_normalizer_is_a_value_error_listing_the_valid_names():
    model = build("llama")
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="nope") as info:
        akhf.configure(model, normalizer="nope")
    for valid in ("softmax", "sigmoid", "sparsemax", "entmax15"):
        assert valid in str(info.value)
    assert model.config._attn_implementation == before  # nothing half-done
    assert not any(hasattr(m, "_attnkit_variant") for m in model.modules())


def test_a_score_or_bias_with_parameters_is_refused():
    import attnkit

    model = build("llama")
    with pytest.raises(ValueError, match="parameters"):
        akhf.configure(model, score=attnkit.scores.General(16))
    with pytest.raises(ValueError, match="parameters"):
        akhf.configure(model, bias=attnkit.positions.T5RelativeBias(4))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        akhf.configure(torch.nn.Linear(2, 2))
    assert model.config._attn_implementation != "attnkit"
    assert not any(hasattr(m, "_attnkit_variant") for m in model.modules())


def test_a_model_without_attention_interface_support_is_a_clear_value_error():
    model = transformers.MPNetModel(transformers.MPNetConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert model._supports_attention_backend is False
    with pytest.raises(ValueError, match="does not route its attention") as info:
        akhf.configure(model)
    assert "MPNetModel" in str(info.value) and "AttentionInterface" in str(info.value)


def test_configure_accepts_a_model_whose_attention_goes_through_the_interface():
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    akhf.configure(model, normalizer="sigmoid")
    assert model.config._attn_implementation == "attnkit"


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_missing_transformers_names_the_hf_extra():
    r = _python("import sys; sys.modules['transformers'] = None\n"
                "try:\n    import attnkit.integrations.hf\n"
                "except ImportError as e:\n    print('IMPORTERROR:', e)\n")
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR:" in r.stdout, r.stdout
    assert "[hf]" in r.stdout and "transformers" in r.stdout


def test_import_attnkit_does_not_import_transformers():
    r = _python("import sys, attnkit, attnkit.integrations; print('transformers' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# -- 8: the registered shorthands ----------------------------------------------------------------------------
def test_shorthand_sigmoid_works_and_differs_from_softmax():
    model = build("llama")
    ids, am = inputs("left")
    real = real_tokens(ids, am)
    y_soft, _ = run(model, "attnkit", ids, am)
    y_sig, g_sig = run(model, "attnkit:sigmoid", ids, am)
    assert model.config._attn_implementation == "attnkit:sigmoid"
    assert torch.isfinite(y_sig).all()
    assert all(g is None or torch.isfinite(g).all() for g in g_sig.values())
    assert (y_sig[real] - y_soft[real]).abs().max() > 1e-2
    # the same as configure(normalizer="sigmoid")
    y_cfg, g_cfg = run(akhf.configure(build("llama"), normalizer="sigmoid"), "attnkit", ids, am)
    assert_close(y_sig[real], y_cfg[real], 1e-5, 1e-6, "attnkit:sigmoid vs configure(normalizer='sigmoid')")
    assert_same_grads(g_sig, g_cfg, 1e-5, 1e-6)


@pytest.mark.parametrize("normalizer", akhf.NORMALIZER_NAMES)
def test_every_shorthand_is_registered_and_softmax_is_plain_attnkit(normalizer):
    name = f"attnkit:{normalizer}"
    assert name in transformers.AttentionInterface._global_mapping
    assert name in transformers.AttentionMaskInterface._global_mapping
    if normalizer == "softmax":
        model = build("llama")
        ids, am = inputs("left")
        real = real_tokens(ids, am)
        a, _ = run(model, name, ids, am)
        b, _ = run(model, "eager", ids, am)
        assert_close(a[real], b[real], 1e-4, 1e-5, "attnkit:softmax vs eager")


def test_shorthand_after_configure_is_not_silently_ignored():
    model = build("llama")
    ids, am = inputs("none")
    y_sig, _ = run(model, "attnkit:sigmoid", ids, am)
    akhf.configure(model)  # "restores plain attnkit attention"
    y_again, _ = run(model, "attnkit:sigmoid", ids, am)
    assert_close(y_again, y_sig, 1e-5, 1e-6, "attnkit:sigmoid after configure(model)")
