"""A Hugging Face model on attnkit: attn_implementation="attnkit", a variant, weights, capture.

A tiny Mistral-like model (random weights, built from a config: nothing is downloaded) runs with
HF's own eager attention and with attnkit's; the logits agree, the sliding window stays a
structured mask (no (N, N) tensor), output_attentions comes from attnkit's tiled path, and
configure() swaps softmax for entmax15 on the same weights.

    pip install -e ".[hf]"
    python examples/huggingface.py
"""

import torch
import transformers

import attnkit
import attnkit.integrations.hf as akhf  # registers attn_implementation="attnkit"

torch.manual_seed(0)
config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, sliding_window=8,
                                    max_position_embeddings=256)
model = transformers.MistralForCausalLM(config).eval()
ids = torch.randint(0, 128, (2, 24))
pad = torch.ones(2, 24, dtype=torch.long)
pad[1, :5] = 0  # the second sequence is left-padded

with torch.no_grad():
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=pad, output_attentions=True)
    model.set_attn_implementation("attnkit")
    ours = model(ids, attention_mask=pad, output_attentions=True)
real = pad.bool()
print(f"logits, attnkit vs eager: max |diff| = {(ours.logits - eager.logits)[real].abs().max():.2e}")
w, w_ref = ours.attentions[0], eager.attentions[0]
print(f"layer 0 weights {tuple(w.shape)}, max |diff| on real rows = "
      f"{(w - w_ref).permute(0, 2, 1, 3)[real].abs().max():.2e}")

# what the model's mask became, and who serves the attention
mask = akhf.build_mask(2, 24, 24, mask_function=transformers.masking_utils.sliding_window_causal_mask_function(8),
                       attention_mask=pad)
print("mask handed to attnkit:", mask.mask)

with attnkit.capture(heads=[0], rows=[23]) as rec, torch.no_grad():
    model(ids, attention_mask=pad)
print("captured:", ", ".join(f"{r.name} {tuple(r.weights.shape)}" for r in rec))

with torch.no_grad():
    akhf.configure(model, normalizer="entmax15")
    sparse = model(ids, attention_mask=pad, output_attentions=True)
zeros = (sparse.attentions[0] == 0).float().mean().item()
print(f"entmax15: {zeros:.0%} of layer 0's weights are exactly zero; logits moved by "
      f"{(sparse.logits - ours.logits).abs().max():.2f}")
print("ok: a Hugging Face model runs on attnkit")
