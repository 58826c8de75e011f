"""Bad input: every error names the argument, what it got and what was expected."""

import re

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.testing import make_qkv


def qkv(B=2, H=2, Tq=5, Tk=6):
    return make_qkv(B, H, Tq, Tk, D=4)


# -- mask tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_non_bool_mask_tensor_is_a_type_error_pointing_to_bias(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"bool.*bias="):
        attnkit.attention(q, k, v, mask=torch.zeros(5, 6, dtype=dtype))


def test_float_mask_combined_with_a_mask_object_is_a_type_error():
    with pytest.raises(TypeError, match="bias="):
        masks.causal() & torch.zeros(5, 6)


def test_mask_not_broadcastable_is_a_value_error_with_both_shapes():
    q, k, v = qkv(B=2, H=2, Tq=5, Tk=6)
    with pytest.raises(ValueError, match=re.escape("(1, 1, 3, 4)") + ".*" + re.escape("(2, 2, 5, 6)")):
        attnkit.attention(q, k, v, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=re.escape("(3, 1, 5, 6)")):
        attnkit.attention(q, k, v, mask=torch.ones(3, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=re.escape("(2, 2, 2, 5, 6)")):
        attnkit.attention(q, k, v, mask=torch.ones(2, 2, 2, 5, 6, dtype=torch.bool))


def test_mask_of_unsupported_type_lists_what_is_accepted():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="Mask.*bool tensor.*mask_mod.*got str"):
        attnkit.attention(q, k, v, mask="causal")


# -- key padding -----------------------------------------------------------------------------
def test_key_padding_with_the_wrong_batch():
    q, k, v = qkv(B=2)
    with pytest.raises(ValueError, match="batch 3.*batch 2"):
        attnkit.attention(q, k, v, mask=masks.key_padding(torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match="batch 1.*batch 2"):
        attnkit.attention(q, k, v, mask=masks.key_padding(torch.ones(1, 6, dtype=torch.bool)))


def test_key_padding_lengths_longer_than_tk():
    q, k, v = qkv(Tk=6)
    with pytest.raises(ValueError, match=r"lengths.*<= Tk = 6.*7"):
        attnkit.attention(q, k, v, mask=masks.key_padding(torch.tensor([7, 2])))


def test_key_padding_other_bad_inputs():
    with pytest.raises(ValueError, match=">= 0"):
        masks.key_padding(torch.tensor([-1, 2]))
    with pytest.raises(TypeError, match="float32"):
        masks.key_padding(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(B, Tk\)"):
        masks.key_padding(torch.ones(2, 3, 4, dtype=torch.bool))
    q, k, v = qkv(Tk=6)
    with pytest.raises(ValueError, match="5 keys.*Tk = 6"):
        attnkit.attention(q, k, v, mask=masks.key_padding(torch.ones(2, 5, dtype=torch.bool)))


# -- windows -----------------------------------------------------------------------------------
@pytest.mark.parametrize("call,name", [
    (lambda: masks.sliding_window(-1), "left"),
    (lambda: masks.sliding_window(2, -1), "right"),
    (lambda: masks.longformer(-1), "window"),
    (lambda: masks.longformer(0), "window"),
    (lambda: masks.dilated_window(-1), "left"),
    (lambda: masks.dilated_window(2, -3), "right"),
    (lambda: masks.chunked(0), "size"),
    (lambda: masks.chunked(-4), "size"),
])
def test_negative_windows_are_value_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        call()


@pytest.mark.parametrize("call", [lambda: masks.sliding_window(1.5), lambda: masks.strided(2.0),
                                  lambda: masks.longformer(True), lambda: masks.dilated_window(2, dilation=1.0),
                                  lambda: masks.chunked(2.5)])
def test_non_integer_sizes_are_type_errors(call):
    with pytest.raises(TypeError, match="must be an int"):
        call()


def test_chunked_shift_must_be_integers_of_the_batch():
    with pytest.raises(ValueError, match="chunked shift must be an int or an integer tensor of shape"):
        masks.chunked(4, torch.tensor([0.5, 1.0]))
    q = torch.randn(3, 1, 4, 2)
    with pytest.raises(ValueError, match="chunked shift was built for batch 2 but the inputs have batch 3"):
        attnkit.attention(q, q, q, mask=masks.chunked(2, torch.tensor([0, 1])))


@pytest.mark.parametrize("D", [0, -2])
def test_local_m_and_local_p_need_D_positive(D):
    with pytest.raises(ValueError, match=rf"^D must be > 0; got {D}"):
        masks.local_m(D)
    with pytest.raises(ValueError, match=rf"^D must be > 0; got {D}"):
        masks.local_p(torch.zeros(1, 3), D)


def test_local_p_centers_checks():
    with pytest.raises(TypeError, match="float tensor"):
        masks.local_p(torch.zeros(1, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"\(B, Tq\) or \(B, H, Tq\)"):
        masks.local_p(torch.zeros(3), 1)
    q, k, v = qkv(B=2, Tq=5)
    with pytest.raises(ValueError, match=re.escape("(2, 4)") + ".*" + re.escape("(2, 5)")):
        attnkit.attention(q, k, v, mask=masks.local_p(torch.zeros(2, 4), 1))


def test_local_p_cannot_be_combined_with_or_or_inverted():
    lp = masks.local_p(torch.zeros(1, 3), 1)
    for make in (lambda: lp | masks.causal(), lambda: masks.causal() | lp, lambda: ~lp,
                 lambda: ~(lp & masks.causal()), lambda: lp | torch.ones(3, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="local_p"):
            make()


def test_unknown_alignment_lists_the_valid_ones():
    for make in (masks.causal, lambda align: masks.strided(2, align=align),
                 lambda align: masks.bigbird(2, align=align), lambda align: masks.longformer(1, align=align)):
        with pytest.raises(ValueError, match="bottom_right.*top_left.*'diagonal'"):
            make(align="diagonal")


# -- sparse masks ------------------------------------------------------------------------------
def test_block_sparse_layout_checks():
    with pytest.raises(TypeError, match="bool tensor.*float32"):
        masks.block_sparse(torch.ones(2, 2), 2)
    with pytest.raises(TypeError, match="got list"):
        masks.block_sparse([[True]], 2)
    for shape in [(4,), (1, 2, 2, 2)]:
        with pytest.raises(ValueError, match=re.escape(str(shape).replace(",)", ")"))):
            masks.block_sparse(torch.ones(shape, dtype=torch.bool), 2)


@pytest.mark.parametrize("bs,name", [(0, "block_size"), (-1, "block_size"), ((2, 0), r"block_size\[1\]"),
                                     ((0, 2), r"block_size\[0\]")])
def test_block_sparse_block_size_must_be_positive(bs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be > 0"):
        masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), bs)


def test_block_sparse_block_size_pair_of_wrong_length():
    with pytest.raises(ValueError, match="pair"):
        masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), (1, 2, 3))


def test_block_sparse_layout_must_cover_the_inputs():
    layout = torch.ones(2, 3, dtype=torch.bool)          # covers Tq <= 4, Tk <= 6 with blocks of 2
    q, k, v = qkv(Tq=5, Tk=6)
    with pytest.raises(ValueError, match=r"2 query blocks.*Tq = 5.*at least 3"):
        attnkit.attention(q, k, v, mask=masks.block_sparse(layout, 2))
    q, k, v = qkv(Tq=4, Tk=7)
    with pytest.raises(ValueError, match=r"3 key blocks.*Tk = 7.*at least 4"):
        attnkit.attention(q, k, v, mask=masks.block_sparse(layout, 2))
    with pytest.raises(ValueError, match="Tk = 7"):
        masks.block_sparse(layout, 2).classify_blocks(4, 7, 2, 2)
    q, k, v = qkv(H=2, Tq=4, Tk=6)
    with pytest.raises(ValueError, match=r"3 heads.*H = 2"):
        attnkit.attention(q, k, v, mask=masks.block_sparse(torch.ones(3, 2, 3, dtype=torch.bool), 2))


@pytest.mark.parametrize("call,name", [
    (lambda: masks.strided(0), "stride"), (lambda: masks.strided(-2), "stride"),
    (lambda: masks.fixed(0), "stride"), (lambda: masks.fixed(4, summary=0), "summary"),
    (lambda: masks.fixed(4, summary=5), "summary"),
    (lambda: masks.dilated_window(2, dilation=0), "dilation"), (lambda: masks.dilated_window(2, dilation=-1), "dilation"),
    (lambda: masks.bigbird(0), "block_size"), (lambda: masks.bigbird(2, window_blocks=-1), "window_blocks"),
    (lambda: masks.bigbird(2, global_blocks=-1), "global_blocks"),
    (lambda: masks.bigbird(2, random_blocks=-1), "random_blocks"),
])
def test_sparse_pattern_parameters_are_validated(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        call()


def test_sparse_pattern_type_errors():
    with pytest.raises(TypeError, match="causal must be a bool"):
        masks.strided(2, causal=1)
    with pytest.raises(TypeError, match="causal must be a bool"):
        masks.fixed(2, causal="yes")
    with pytest.raises(TypeError, match="seed must be an int"):
        masks.bigbird(2, seed=1.5)
    with pytest.raises(TypeError, match="dilation must be an int"):
        masks.dilated_window(2, dilation=True)


def test_longformer_global_tokens_checks():
    with pytest.raises(ValueError, match=r"global_tokens must be >= 0; got -1"):
        masks.longformer(1, [0, -1])
    with pytest.raises(TypeError, match="must hold ints"):
        masks.longformer(1, [0, 1.5])
    with pytest.raises(TypeError, match="list of int indices or a bool"):
        masks.longformer(1, 3)
    with pytest.raises(TypeError, match="float32"):
        masks.longformer(1, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(Tk,\)"):
        masks.longformer(1, torch.ones(2, 3, dtype=torch.bool))
    q, k, v = qkv(Tk=6)
    with pytest.raises(ValueError, match=r"< Tk = 6.*\[0, 6\]"):
        attnkit.attention(q, k, v, mask=masks.longformer(1, [0, 6]))
    with pytest.raises(ValueError, match="5 entries.*Tk = 6"):
        attnkit.attention(q, k, v, mask=masks.longformer(1, torch.ones(5, dtype=torch.bool)))


def test_longformer_accepts_an_integer_index_tensor():
    a = masks.longformer(1, torch.tensor([3, 0])).materialize(6, 6)
    b = masks.longformer(1, [0, 3]).materialize(6, 6)
    assert torch.equal(a, b) and masks.longformer(1, torch.tensor([3, 0])).global_tokens == [0, 3]
