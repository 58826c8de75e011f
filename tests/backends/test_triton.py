"""attnkit's Triton sigmoid kernel against the reference, forward and backward.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel is defined); with one, on CUDA. Shapes are small and odd
(ragged last tiles, Tq != Tk, D != Dv) and the interpreter's tiles are 16 x 16, so every mask
family gives empty, partial and full tiles. The interpreter runs each program in Python: a few
cases run by default, the whole matrix with ``python -m pytest -m interpreter``.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnkit
from attnkit import masks, normalizers, positions
from attnkit.backends import REGISTRY
from attnkit.kernels.triton import interpreting
from attnkit.spec import canonicalize
from attnkit.testing import assert_matches_float64_gold, assert_matches_reference, make_qkv

pytest.importorskip("triton", reason='triton is not installed (pip install -e ".[gpu]")')
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

SIG = normalizers.Sigmoid(bias="log_n")


def _mask_cases(Tq, Tk, B):
    g = torch.Generator().manual_seed(1)
    return {
        "none": None,
        "causal": masks.causal(),
        "causal_top_left": masks.causal(align="top_left"),
        "window": masks.sliding_window(5, 2),
        "key_padding": masks.key_padding(torch.tensor([Tk, 7])[:B]),
        "chunked": masks.chunked(8),
        "from_mod": masks.from_mod(lambda b, h, q, kv: (q * 7 + kv * 3) % 5 != 0),
        "from_tensor": masks.from_tensor(torch.rand(Tq, Tk, generator=g) > 0.3),
        "block_sparse": masks.block_sparse(torch.tensor([[True, False, True], [False, True, True],
                                                         [True, True, False]]), 16),
        "not_causal": ~masks.causal(),
        "window_and_padding": masks.sliding_window(20) & masks.key_padding(torch.tensor([Tk, 30])[:B]),
    }


def test_causal_alibi_gqa_forward_and_backward():
    q, k, v = make_qkv(2, 4, 37, 45, D=16, Dv=24, Hkv=2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "triton", normalizer=SIG, mask=masks.causal(), bias=positions.ALiBi(4))


@pytest.mark.interpreter
@pytest.mark.parametrize("mask_name", list(_mask_cases(37, 45, 2)))
@pytest.mark.parametrize("alibi", [False, True])
def test_every_mask_family_forward_and_backward(mask_name, alibi):
    """float32, GQA (4 query heads on 2), Tq=37, Tk=45, D=16, Dv=24: output and all three
    gradients within 2x the reference's own float32 error of the float64 gold."""
    B, H = 2, 4
    q, k, v = make_qkv(B, H, 37, 45, D=16, Dv=24, Hkv=2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = _mask_cases(37, 45, B)[mask_name]
    bias = positions.ALiBi(H) if alibi else None
    assert_matches_float64_gold(q, k, v, "triton", normalizer=SIG, mask=mask, bias=bias)


@pytest.mark.interpreter
@pytest.mark.parametrize("sig", [normalizers.Sigmoid(), normalizers.Sigmoid(bias=-1.5), "sigmoid"])
@pytest.mark.parametrize("score", ["scaled_dot", "dot", "cosine"])
def test_sigmoid_offsets_and_dot_scores(sig, score):
    q, k, v = make_qkv(1, 2, 20, 33, D=16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "triton", normalizer=sig, score=score, mask=masks.causal())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bfloat16 wrongly (numpy has no bfloat16: a float32 -> "
                    "bfloat16 cast gives ~1e10); bfloat16 is checked on CUDA by tests/cuda")
    q, k, v = make_qkv(1, 4, 33, 40, D=32, Hkv=1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_float64_gold(q, k, v, "triton", dtype=dtype, normalizer=SIG, mask=masks.sliding_window(9),
                                bias=positions.ALiBi(4))


def test_noncontiguous_inputs_and_their_gradients():
    """(B, T, H, D) transposed to heads-major, as modules produce them; and a sliced K (not dense)."""
    q, k, v = make_qkv(2, 2, 21, D=16, device=DEVICE, noncontiguous=True)
    k = torch.randn(2, 2, 21, 32, device=DEVICE)[..., :16]
    for x in (q, k, v):
        x.requires_grad_()
    assert_matches_reference(q, k, v, "triton", normalizer=SIG, mask=masks.causal())


@pytest.mark.parametrize("norm", [SIG, "sparsemax", "entmax15"])
def test_a_row_with_no_key_gives_zero_output_and_zero_gradients(norm):
    q, k, v = make_qkv(2, 2, 9, 18, D=16, device=DEVICE, requires_grad=True)
    mask = masks.key_padding(torch.tensor([18, 0]))   # batch 1 sees nothing
    out = attnkit.attention(q, k, v, normalizer=norm, mask=mask, backend="triton")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert not dq[1].any() and not dk[1].any() and not dv[1].any()
    assert dq[0].abs().sum() > 0


def test_auto_never_picks_the_interpreter_and_explains_why():
    q, k, v = make_qkv(1, 2, 8, D=16)
    choice = attnkit.explain(q, k, v, normalizer="sigmoid")
    assert choice.backend != "triton"
    if DEVICE == "cpu":
        assert "interpreter" in " ".join(choice.reasons["triton"])


def test_refusals_name_what_the_kernel_does_not_do():
    q, k, v = make_qkv(1, 2, 8, D=16, device=DEVICE)
    b = REGISTRY["triton"]
    cases = {
        "softmax": dict(),
        "dropout": dict(normalizer="sigmoid", dropout_p=0.1),
        "ALiBi": dict(normalizer="sigmoid", bias=positions.ALiBi(2, symmetric=True)),
    }
    for word, kw in cases.items():
        spec = canonicalize(q, k, v, **kw)
        why = " ".join(b.not_supported_reasons(spec))
        assert why and (word.lower() in why.lower() or word == "softmax" and "sigmoid" in why), (word, why)
    spec = canonicalize(q.double(), k.double(), v.double(), normalizer="sigmoid")
    assert "float64" in " ".join(b.not_supported_reasons(spec))
    with pytest.raises(ValueError, match="triton"):
        attnkit.attention(q, k, v, backend="triton")


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 2, 8, D=16)
    why = REGISTRY["triton"].not_supported_reasons(canonicalize(q, k, v, normalizer="sigmoid"))
    assert any("TRITON_INTERPRET=1" in w for w in why)
    spec = dataclasses.replace(canonicalize(q, k, v, normalizer="sigmoid"), device=torch.device("cuda"))
    assert REGISTRY["triton"].not_supported_reasons(spec) == []


@pytest.mark.interpreter
@settings(max_examples=8, deadline=None)
@given(Tq=st.integers(1, 40), Tk=st.integers(1, 40), left=st.integers(0, 40), right=st.integers(0, 40),
       H=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]))
def test_property_windows_any_size(Tq, Tk, left, right, H, groups):
    q, k, v = make_qkv(1, H * groups, Tq, Tk, D=16, Hkv=H, device=DEVICE, requires_grad=True)
    assert_matches_reference(q, k, v, "triton", normalizer=SIG, mask=masks.sliding_window(left, right))


def test_block_tables_pack_only_partial_tiles_and_are_cached():
    from attnkit.kernels.triton.blocks import block_tables

    m = masks.causal()
    t = block_tables(m, 64, 64, 1, 1, 16, 16, torch.device(DEVICE))
    assert t.live_tiles == 10 and t.total_tiles == 16 and t.partial.shape[0] == 4   # 4 diagonal tiles
    assert t.q_ptr.tolist() == [0, 1, 3, 6, 10] and t.q_cols.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert t.k_ptr.tolist() == [0, 4, 7, 9, 10] and t.k_rows.tolist() == [0, 1, 2, 3, 1, 2, 3, 2, 3, 3]
    diag = t.q_tile.tolist()
    assert [diag[i] >= 0 for i in range(10)] == [True, False, True, False, False, True, False, False, False, True]
    assert torch.equal(t.partial[0, 0, 0].bool(), torch.ones(16, 16).tril().bool().to(t.partial.device))
    assert block_tables(m, 64, 64, 1, 1, 16, 16, torch.device(DEVICE)) is t


def test_block_tables_follow_a_mask_tensor_changed_in_place():
    from attnkit.kernels.triton.blocks import block_tables

    lengths = torch.tensor([40])
    m = masks.key_padding(lengths)
    a = block_tables(m, 16, 64, 1, 1, 16, 16, torch.device(DEVICE))
    lengths.fill_(20)
    b = block_tables(m, 16, 64, 1, 1, 16, 16, torch.device(DEVICE))
    assert a.live_tiles == 3 and b.live_tiles == 2
