"""A custom mask (a ``mask_mod`` function) and a learned score mod (an ``nn.Module``).

Task: output the *previous* token. The model has no position embeddings, so it can only find
the previous token through its score mod: a learned per-head slope ``m_h`` that adds
``-m_h * distance`` to the scores (ALiBi with trainable slopes). The mask, a plain function,
lets each query see strictly earlier keys only. The slopes start at 0 (no preference for near
keys) and grow as the model learns to look one step back.

    python examples/custom_mask_and_score_mod.py
"""

import torch
from torch import nn

import attnkit
from attnkit.positions import ScoreMod


def strictly_past(b, h, q_idx, kv_idx):
    """FlexAttention-style mask_mod on broadcastable index tensors: True = may attend."""
    return kv_idx < q_idx


class LearnedSlope(ScoreMod, nn.Module):
    """``score - m_h * (i - j)``: a distance penalty with one trainable slope per head."""

    additive = True  # score_mod(s) == s + bias(h, i, j): SDPA may take it as a float mask

    def __init__(self, num_heads):
        nn.Module.__init__(self)
        self.slope = nn.Parameter(torch.zeros(num_heads))

    def score_mod(self, score, b, h, q_idx, kv_idx, num_queries, num_keys):
        distance = (q_idx + num_keys - num_queries - kv_idx).to(score.dtype)  # bottom-right aligned
        return score - self.slope[h].to(score.dtype) * distance


VOCAB, DIM, HEADS, T = 12, 32, 4, 16
torch.manual_seed(0)
slope = LearnedSlope(HEADS)
emb, out = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB)
attn = attnkit.nn.MultiheadAttention(DIM, HEADS, batch_first=True, mask=strictly_past, score_mod=slope)
model = nn.ModuleList([emb, attn, out])
assert any(p is slope.slope for p in model.parameters())  # the score mod trains with the module

print("the mask (x = may attend), 5 tokens:")
for row in attnkit.masks.from_mod(strictly_past).materialize(5, 5)[0, 0].tolist():
    print("   ", " ".join("x" if a else "." for a in row))

before = slope.slope.detach().clone()
opt = torch.optim.Adam(model.parameters(), lr=0.02)
for step in range(120):
    x = torch.randint(0, VOCAB, (32, T))
    h, _ = attn(emb(x), need_weights=False)                            # (B, T, E); row 0 sees no key: zeros
    logits = out(h)[:, 1:]                                             # predict x[t-1] at t >= 1
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, :-1].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0 or step == 119:
        print(f"step {step:3d}  loss {loss.item():.3f}")

with torch.no_grad():
    x = torch.randint(0, VOCAB, (256, T))
    acc = (out(attn(emb(x), need_weights=False)[0])[:, 1:].argmax(-1) == x[:, :-1]).float().mean().item()
print("slopes before:", [round(v, 2) for v in before.tolist()])
print("slopes after: ", [round(v, 2) for v in slope.slope.tolist()])
print(f"previous-token accuracy: {acc:.1%}")
q = torch.randn(1, HEADS, T, DIM // HEADS)                          # (B, H, T, head_dim), as the module's call
print(f"backend for the module's call: {attnkit.explain(q, q, q, mask=strictly_past, bias=slope).backend}")
assert (slope.slope.detach() - before).abs().min() > 0.1, "the learned slopes did not move"
print("ok: the learned slopes changed")
