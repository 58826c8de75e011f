"""RoPE: norms, the relative property, a complex-number implementation, the module and its cache."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit.testing import make_qkv
from attnkit.positions import RotaryEmbedding, apply_rope, rotate_half


def complex_rope(x, positions, base=10000.0):
    """Independent RoPE: z_i = x_i + 1j x_{i+D/2} (half-split pairing), z_i * exp(1j * m * theta_i)."""
    D = x.shape[-1]
    theta = torch.tensor([base ** (-2.0 * i / D) for i in range(D // 2)], dtype=torch.float64)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())
    pos = positions.double()
    if pos.dim() == 2:
        pos = pos[:, None, :]                                    # (B, 1, T)
    rot = torch.polar(torch.ones_like(pos).unsqueeze(-1) * torch.ones_like(theta), pos.unsqueeze(-1) * theta)
    w = z * rot
    return torch.cat((w.real, w.imag), dim=-1)


def test_rotate_half_hand_example():
    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).tolist() == [-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]


def test_apply_rope_by_hand_d2():
    # D = 2: theta_0 = 1; position m rotates (x0, x1) by angle m
    x = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
    out = apply_rope(x)
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [-2 * math.sin(2), 2 * math.cos(2)]],
                            dtype=torch.float64)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("positions", [None, "1d", "2d", "float"])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_apply_rope_equals_complex_multiplication(positions, base):
    B, H, T, D = 2, 3, 7, 10
    x = torch.randn(B, H, T, D, dtype=torch.float64)
    pos = {None: None, "1d": torch.arange(5, 5 + T), "2d": torch.randint(0, 1000, (B, T)),
           "float": torch.rand(T, dtype=torch.float64) * 50}[positions]
    ref_pos = torch.arange(T) if pos is None else pos
    torch.testing.assert_close(apply_rope(x, pos, base=base), complex_rope(x, ref_pos, base), rtol=0, atol=1e-11)


@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), half=st.integers(1, 6))
def test_apply_rope_preserves_norms(B, H, T, half):
    x = torch.randn(B, H, T, 2 * half, dtype=torch.float64)
    pos = torch.randint(0, 10_000, (B, T))
    torch.testing.assert_close(apply_rope(x, pos).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)


@given(m=st.integers(0, 2000), n=st.integers(0, 2000), shift=st.integers(0, 2000))
def test_rope_scores_depend_only_on_position_difference(m, n, shift):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 1, 8, generator=g, dtype=torch.float64).unbind(0)
    def score(a, b):
        return (apply_rope(q, torch.tensor([a])) * apply_rope(k, torch.tensor([b]))).sum().item()
    assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-9, abs_tol=1e-9)


def test_rope_attention_is_shift_invariant():
    q, k, v = make_qkv(2, 2, 6, 6, D=8, dtype=torch.float64)
    def run(offset):
        pos = torch.arange(offset, offset + 6)
        return attnkit.attention(apply_rope(q, pos), apply_rope(k, pos), v, mask=attnkit.masks.causal())
    torch.testing.assert_close(run(0), run(123), rtol=1e-9, atol=1e-9)


def test_rope_per_batch_positions_equal_separate_calls():
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [2, 2, 3, 3, 4]])
    out = apply_rope(x, pos)
    for b in range(3):
        torch.testing.assert_close(out[b:b + 1], apply_rope(x[b:b + 1], pos[b]), rtol=0, atol=0)


def test_apply_rope_gradcheck():
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, torch.tensor([0, 3, 9, 100])), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_low_precision_close_to_float64(dtype):
    x = torch.randn(2, 2, 300, 16, dtype=torch.float64)
    gold = apply_rope(x)
    out = apply_rope(x.to(dtype))
    assert out.dtype == dtype
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), gold, rtol=0, atol=tol * gold.abs().max().item())


def test_rope_errors():
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(1, 1, 3, 5))
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"positions must have shape"):
        apply_rope(torch.randn(2, 1, 3, 4), torch.arange(4))
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        apply_rope(torch.randn(3, 4))
    with pytest.raises(ValueError, match="base"):
        apply_rope(torch.randn(1, 1, 3, 4), base=0.0)


def test_rotary_module_matches_function_and_offset():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    torch.testing.assert_close(rope(x), apply_rope(x), rtol=0, atol=0)
    # decoding: rotating the last tokens alone with offset equals rotating the whole sequence
    torch.testing.assert_close(rope(x[:, :, 9:], offset=9), apply_rope(x)[:, :, 9:], rtol=0, atol=0)
    pos = torch.tensor([[4, 0, 2] * 4, [1] * 12])
    torch.testing.assert_close(rope(x, positions=pos), apply_rope(x, pos), rtol=0, atol=0)
    # cache grows beyond its first length and survives float32 <-> float64 switches
    long = torch.randn(1, 1, 100, 8)
    torch.testing.assert_close(rope(long), apply_rope(long), rtol=0, atol=0)
    torch.testing.assert_close(rope(x), apply_rope(x), rtol=0, atol=0)
    assert len(rope.state_dict()) == 0
    with pytest.raises(ValueError, match="offset or positions"):
        rope(x, offset=1, positions=pos)


def test_rotary_partial_rotates_first_dim_features_only():
    rope = RotaryEmbedding(4)
    x = torch.randn(1, 2, 5, 10, dtype=torch.float64)
    out = rope(x)
    torch.testing.assert_close(out[..., :4], apply_rope(x[..., :4]), rtol=0, atol=0)
    torch.testing.assert_close(out[..., 4:], x[..., 4:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="dim=4"):
        rope(torch.randn(1, 1, 3, 2))
