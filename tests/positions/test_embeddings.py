"""Sinusoidal and learned absolute position embeddings."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.positions import LearnedPositionalEmbedding, SinusoidalEmbedding, sinusoidal


def loop_sinusoidal(T, dim, base=10000.0):
    """Vaswani et al. §3.5 written out: PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pe = torch.empty(T, dim, dtype=torch.float64)
    for pos in range(T):
        for c in range(dim):
            i = c // 2
            angle = pos / base ** (2 * i / dim)
            pe[pos, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return pe


def test_sinusoidal_known_values():
    pe = sinusoidal(3, 4, dtype=torch.float64)
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    # d = 4: frequencies 1 and 1/100
    expected = [math.sin(2.0), math.cos(2.0), math.sin(0.02), math.cos(0.02)]
    torch.testing.assert_close(pe[2], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("T,dim,base", [(17, 8, 10000.0), (9, 5, 10000.0), (6, 1, 10000.0), (12, 6, 100.0)])
def test_sinusoidal_matches_loop(T, dim, base):
    torch.testing.assert_close(sinusoidal(T, dim, base=base, dtype=torch.float64), loop_sinusoidal(T, dim, base),
                               rtol=0, atol=1e-12)


def test_sinusoidal_float32_and_bfloat16_close_to_float64():
    gold = loop_sinusoidal(200, 16)
    assert sinusoidal(200, 16).dtype == torch.float32
    torch.testing.assert_close(sinusoidal(200, 16).double(), gold, rtol=0, atol=1e-4)
    bf = sinusoidal(200, 16, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), gold, rtol=0, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sinusoidal_embedding_adds_table(dtype):
    emb = SinusoidalEmbedding(6)
    x = torch.randn(2, 7, 6, dtype=torch.float64).to(dtype)
    y = emb(x)
    assert y.dtype == dtype and y.shape == x.shape
    expected = x.double() + loop_sinusoidal(7, 6)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=tol)
    assert len(list(emb.parameters())) == 0 and len(emb.state_dict()) == 0


def test_sinusoidal_embedding_offset_and_cache_growth():
    emb = SinusoidalEmbedding(8)
    x = torch.randn(3, 40, 8, dtype=torch.float64)
    short = emb(x[:, :3])                    # builds a small cache
    full = emb(x)                            # grows it
    torch.testing.assert_close(short, full[:, :3], rtol=0, atol=0)
    for t in (0, 5, 39):
        torch.testing.assert_close(emb(x[:, t:t + 1], offset=t), full[:, t:t + 1], rtol=0, atol=0)
    torch.testing.assert_close(full - x, loop_sinusoidal(40, 8).expand(3, 40, 8), rtol=0, atol=1e-12)


def test_sinusoidal_errors():
    emb = SinusoidalEmbedding(8)
    with pytest.raises(ValueError, match="dim = 8"):
        emb(torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match="offset"):
        emb(torch.zeros(1, 3, 8), offset=-1)
    with pytest.raises(ValueError, match=r"\(B, T, E\)"):
        emb(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="dim"):
        sinusoidal(4, 0)
    with pytest.raises(ValueError, match="num_positions"):
        sinusoidal(-1, 4)


def test_learned_embedding_adds_rows_and_trains_only_used_rows():
    emb = LearnedPositionalEmbedding(10, 4)
    x = torch.randn(2, 3, 4)
    y = emb(x, offset=2)
    torch.testing.assert_close(y, x + emb.weight[2:5].detach().unsqueeze(0), rtol=0, atol=0)
    y.sum().backward()
    grad = emb.weight.grad
    assert torch.all(grad[2:5] == 2.0)                       # batch of 2, d(sum)/dP = 2
    assert torch.all(grad[:2] == 0) and torch.all(grad[5:] == 0)
    assert abs(emb.weight.std().item() - 0.02) < 0.02


@given(T=st.integers(1, 8), offset=st.integers(0, 8))
def test_learned_embedding_decoding_matches_full(T, offset):
    emb = LearnedPositionalEmbedding(16, 4)
    x = torch.randn(1, offset + T, 4)
    full = emb(x)
    torch.testing.assert_close(emb(x[:, offset:], offset=offset), full[:, offset:], rtol=0, atol=0)


def test_learned_embedding_too_long_names_max_positions():
    emb = LearnedPositionalEmbedding(8, 4)
    emb(torch.zeros(1, 8, 4))                                # exactly max_positions is fine
    with pytest.raises(ValueError, match="max_positions = 8"):
        emb(torch.zeros(1, 9, 4))
    with pytest.raises(ValueError, match="max_positions"):
        emb(torch.zeros(1, 2, 4), offset=7)
    with pytest.raises(ValueError, match="max_positions"):
        LearnedPositionalEmbedding(0, 4)
