"""A custom normalizer: "softmax plus one" (a row may attend to nothing).

``w_j = exp(s_j) / (1 + sum_k exp(s_k))``: softmax with an extra, implicit key of score 0 and
value 0, so a head can put weight on "none of these" (E. Miller, "Attention Is Off By One",
2023; the "attention sink" of Xiao et al. 2023 is the learned version). Subclass
``attnkit.normalizers.Normalizer`` and implement ``normalize``; the base class handles masks,
rows with no key and NaN. ``attnkit.explain`` then says which backends serve it.

    python examples/custom_normalizer.py
"""

import torch

import attnkit
from attnkit.normalizers import Normalizer


class SoftmaxPlusOne(Normalizer):
    name = "softmax_plus_one"
    sums_to_one = False  # rows sum to less than 1

    def normalize(self, scores):  # (..., Tk); masked keys arrive as -inf, every row has a live key
        m = scores.amax(-1, keepdim=True).clamp(min=0)                     # the extra key's score is 0
        e = torch.exp(scores - m)
        return e / (torch.exp(-m) + e.sum(-1, keepdim=True))


torch.manual_seed(0)
q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
mask = attnkit.masks.causal()
out, w = attnkit.attention(q, k, v, normalizer=SoftmaxPlusOne(), mask=mask, return_weights=True)

# the same by hand: softmax over the real keys plus one extra key of score 0 and value 0
s = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~mask.materialize(6, 6), float("-inf"))
s = torch.cat([s, torch.zeros(1, 2, 6, 1)], -1)
expected = torch.softmax(s, -1)[..., :-1] @ v
print("matches the hand computation:", torch.allclose(out, expected, atol=1e-6))
print("row sums (head 0):", [round(x, 3) for x in w[0, 0].sum(-1).tolist()])

# gradients flow through normalize() by ordinary autograd
q.requires_grad_(True)
attnkit.attention(q, k, v, normalizer=SoftmaxPlusOne(), mask=mask).sum().backward()
print("gradient is finite:", bool(torch.isfinite(q.grad).all()))

# which backends serve it: sdpa, tiled and flex implement only the normalizers they know
# (sdpa and flex: softmax; tiled: softmax, sigmoid, normalize), so `auto` falls back to the
# reference, which runs any Normalizer
choice = attnkit.explain(q, k, v, normalizer=SoftmaxPlusOne(), mask=mask)
print(choice)
try:
    attnkit.attention(q, k, v, normalizer=SoftmaxPlusOne(), backend="tiled")
except ValueError as e:
    print("forcing tiled:", e)
assert choice.backend == "reference"
print(f"ok: {SoftmaxPlusOne.name} runs on the {choice.backend} backend")
