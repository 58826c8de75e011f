"""Train a tiny attention model, capture its heads and write the interactive HTML view.

The task is to reverse a word: output position i must read input position T-1-i, so a trained
head shows an anti-diagonal. ``attnkit.capture`` records the weights of every attention call
(whatever backend computed it) and ``attnkit.viz.attention_page`` writes one self-contained,
offline HTML file with every layer and head, the rollout and the attention flow.

    python examples/attention_html.py [OUT.html]    (default: a temporary folder)
"""

import os
import sys
import tempfile

import torch
from torch import nn

import attnkit
from attnkit import viz

LETTERS, T, DIM, HEADS = "abcdefghij", 8, 32, 2


class Reverser(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(len(LETTERS), DIM), nn.Parameter(torch.randn(T, DIM))
        self.layers = nn.ModuleList(attnkit.nn.MultiheadAttention(DIM, HEADS, batch_first=True) for _ in range(2))
        self.out = nn.Linear(DIM, len(LETTERS))

    def forward(self, x):                                              # x (B, T) -> logits (B, T, V)
        h = self.tok(x) + self.pos
        for attn in self.layers:
            h = h + attn(h, need_weights=False)[0]
        return self.out(h)


torch.manual_seed(0)
torch.set_num_threads(1)
model = Reverser()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(200):
    x = torch.randint(0, len(LETTERS), (64, T))
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flip(1).flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
with torch.no_grad():
    x = torch.randint(0, len(LETTERS), (512, T))
    acc = (model(x).argmax(-1) == x.flip(1)).float().mean().item()
print(f"trained: loss {loss.item():.3f}, accuracy {acc:.1%}")

word = "bagjihed"
x = torch.tensor([[LETTERS.index(c) for c in word]])
with torch.no_grad(), attnkit.capture() as records:                  # every head, every query row
    answer = "".join(LETTERS[i] for i in model(x).argmax(-1)[0].tolist())
for r in records:
    print(f"captured {r.name}: weights {tuple(r.weights.shape)} (computed by {r.backend})")

groups = viz.group_records(records)                                  # layers grouped by module path
viz.assign_tokens(groups, list(word))                                # label queries and keys
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "reverse.html")
viz.attention_page(groups, path, title="reverse a word", info=[("input", word), ("output", answer)], flow=True)
print(f"{word} -> {answer}")
print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB): open it in a browser")
