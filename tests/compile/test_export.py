"""``torch.export`` of attnkit modules and models: the exported program, and the one saved and
loaded back, give eager's outputs on inputs it was not traced with, including other sequence
lengths where the length is exported as dynamic."""

from __future__ import annotations

import io

import pytest
import torch
from torch.export import Dim

import attnkit
from attnkit import models, positions


def _roundtrip(ep):
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


class _WindowAlibi(torch.nn.Module):
    """Sliding-window self-attention with ALiBi, output only (what a served model calls)."""

    def __init__(self):
        super().__init__()
        self.attn = attnkit.nn.SlidingWindowAttention(32, 4, window=8, score_mod=positions.ALiBi(4))

    def forward(self, x):
        return self.attn(x, need_weights=False)[0]


def test_export_a_sliding_window_module_with_alibi():
    torch.manual_seed(0)
    m = _WindowAlibi().eval()
    ep = torch.export.export(m, (torch.randn(2, 40, 32),))
    loaded = _roundtrip(ep)
    for x in (torch.randn(2, 40, 32), torch.randn(2, 40, 32) * 3):
        want = m(x)
        torch.testing.assert_close(ep.module()(x), want)
        torch.testing.assert_close(loaded.module()(x), want)


def test_export_with_a_dynamic_sequence_length():
    torch.manual_seed(0)
    m = _WindowAlibi().eval()
    T = Dim("T", min=2, max=512)
    ep = torch.export.export(m, (torch.randn(2, 40, 32),), dynamic_shapes=({1: T},))
    for n in (5, 40, 97):
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(ep.module()(x), m(x))


def test_export_multihead_attention_with_torch_masks():
    torch.manual_seed(0)
    mha = attnkit.nn.MultiheadAttention(32, 4, batch_first=True).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False, is_causal=True,
                            attn_mask=torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1))[0]

    m = Wrapped()
    x, pad = torch.randn(2, 12, 32), torch.zeros(2, 12, dtype=torch.bool)
    ep = _roundtrip(torch.export.export(m, (x, pad)))
    pad2 = pad.clone()
    pad2[1, 7:] = True  # other padding than traced with: the mask is data, not a constant
    for p in (pad, pad2):
        torch.testing.assert_close(ep.module()(x, p), m(x, p))


def test_export_the_transformer():
    torch.manual_seed(0)
    m = models.Transformer(30, 40, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=48, dropout=0.0).eval()
    src, tgt = torch.randint(3, 30, (2, 9)), torch.randint(3, 40, (2, 7))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    ep = _roundtrip(torch.export.export(m, (src, pad, tgt)))
    pad2 = pad.clone()
    pad2[0, 5:] = True
    for s, p, t in ((src, pad, tgt), (torch.randint(3, 30, (2, 9)), pad2, torch.randint(3, 40, (2, 7)))):
        torch.testing.assert_close(ep.module()(s, p, t), m(s, p, t))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_export_attention_itself(backend):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return attnkit.attention(q, k, v, mask=attnkit.masks.sliding_window(4), bias=positions.ALiBi(2),
                                     backend=backend)

    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    ep = torch.export.export(Attn(), (q, k, v))
    q2, k2, v2 = (torch.randn(1, 2, 10, 8) for _ in range(3))
    torch.testing.assert_close(ep.module()(q2, k2, v2), Attn()(q2, k2, v2))
