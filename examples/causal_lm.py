"""A tiny causal character LM: sliding window + ALiBi, with entmax15 or sigmoid attention.

Trains the same two-layer model twice on an embedded text, once with sparse 1.5-entmax weights
and once with sigmoid weights (``bias="log_n"``, the recommended start), and prints the loss
falling. No position embeddings: ALiBi's per-head distance penalty is the only position signal.

    python examples/causal_lm.py [--steps 40]
"""

import argparse

import torch
from torch import nn

import attnkit
from attnkit.normalizers import Sigmoid

TEXT = ("attention is a weighted average of values. the weights come from comparing a query with "
        "every key. a sliding window lets each token see only its recent past, and alibi adds a "
        "penalty that grows with distance, so no position embedding is needed. ") * 4
VOCAB = sorted(set(TEXT))
DATA = torch.tensor([VOCAB.index(c) for c in TEXT])


class Block(nn.Module):
    def __init__(self, dim, heads, window, normalizer):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # sliding_window(w) is a causal band: each token sees itself and the w tokens before it
        self.attn = attnkit.nn.MultiheadAttention(
            dim, heads, batch_first=True, normalizer=normalizer,
            mask=attnkit.masks.sliding_window(window), score_mod=attnkit.positions.ALiBi(heads))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):                                             # x (B, T, E)
        x = x + self.attn(self.ln1(x), need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, normalizer, dim=64, heads=4, layers=2, window=16):
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, window, normalizer) for _ in range(layers)])
        self.head = nn.Linear(dim, len(VOCAB))

    def forward(self, idx):                                           # idx (B, T) -> logits (B, T, V)
        return self.head(self.blocks(self.emb(idx)))


def batch(gen, size=16, length=48):
    start = torch.randint(0, len(DATA) - length - 1, (size,), generator=gen)
    x = torch.stack([DATA[s:s + length + 1] for s in start.tolist()])
    return x[:, :-1], x[:, 1:]                                        # inputs, next characters


def train(normalizer, steps):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyLM(normalizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x, y = batch(gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5         # mean of 5 steps: less noise
    return first, last


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{len(TEXT)} characters, vocabulary {len(VOCAB)}; uniform guessing costs {torch.tensor(len(VOCAB)).log():.2f} nats")
    for name, normalizer in [("entmax15", "entmax15"), ("sigmoid(-log n)", Sigmoid(bias="log_n"))]:
        first, last = train(normalizer, args.steps)
        print(f"{name:<16} loss {first:.2f} -> {last:.2f} after {args.steps} steps")
        assert last < first - 0.5, f"{name}: the loss did not fall ({first:.2f} -> {last:.2f})"
    print("ok: both models learn")
