"""attnkit's Triton additive-score kernel (attnkit.kernels.triton.additive) against the float64
reference: output and the gradients of q, k, v and of the score's parameters (W_q, W_k, bias, w).

Without a GPU it runs under Triton's interpreter (tests/conftest.py); a few cases run by default,
the whole matrix with ``python -m pytest -m interpreter``.
"""

import pytest
import torch

import attnkit
from attnkit import masks, normalizers, scores
from attnkit.kernels.triton import interpreting
from attnkit.testing import assert_close_to_gold, make_qkv

pytest.importorskip("triton", reason='triton is not installed (pip install -e ".[gpu]")')
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from tests.backends.test_triton import _mask_cases  # noqa: E402


def _check(mask, *, hidden=20, bias=True, normalizer="softmax", dtype=torch.float32, Hkv=2, scale=None):
    """Output and every gradient (q, k, v, W_q, W_k, bias, w) within 2x the reference's own error in
    ``dtype`` of the float64 gold."""
    torch.manual_seed(0)
    q64, k64, v64 = make_qkv(2, 4, 37, 45, D=12, Dv=24, Hkv=Hkv, dtype=torch.float64, device=DEVICE)
    k64 = torch.randn(*k64.shape[:-1], 10, dtype=torch.float64, device=DEVICE)
    score64 = scores.Additive(12, 10, hidden, bias=bias).double().to(DEVICE)
    dout = torch.randn(2, 4, 37, 24, dtype=torch.float64, device=DEVICE)

    def run(x_dtype, backend):
        sc = scores.Additive(12, 10, hidden, bias=bias).to(DEVICE)
        sc.load_state_dict(score64.state_dict())
        sc = sc.to(torch.float64 if x_dtype == torch.float64 else torch.float32)
        q, k, v = (t.detach().to(x_dtype).requires_grad_() for t in (q64, k64, v64))
        out = attnkit.attention(q, k, v, score=sc, mask=mask, normalizer=normalizer, scale=scale, backend=backend)
        params = list(sc.parameters())
        grads = torch.autograd.grad(out, (q, k, v, *params), dout.to(out.dtype))
        return (out, *grads)

    gold, ref, fast = run(torch.float64, "reference"), run(dtype, "reference"), run(dtype, "triton")
    names = ["out", "dq", "dk", "dv", "dW_q", "dW_k", "dbias", "dw"] if bias else ["out", "dq", "dk", "dv", "dW_q",
                                                                                     "dW_k", "dw"]
    for name, f, r, g in zip(names, fast, ref, gold):
        assert_close_to_gold(f.nan_to_num(), r.nan_to_num(), g.nan_to_num(), name=name)


def test_causal_gqa_forward_and_backward_with_parameter_gradients():
    _check(masks.causal())


def test_rows_with_no_key():
    _check(masks.key_padding(torch.tensor([45, 0])))


@pytest.mark.interpreter
@pytest.mark.parametrize("mask_name", list(_mask_cases(37, 45, 2)))
def test_every_mask_family(mask_name):
    _check(_mask_cases(37, 45, 2)[mask_name])


@pytest.mark.interpreter
@pytest.mark.parametrize("kw", [dict(hidden=7, bias=False), dict(hidden=33), dict(Hkv=4, scale=0.5),
                                dict(normalizer=normalizers.Softmax(0.7)), dict(dtype=torch.float16)])
def test_sizes_scales_and_dtypes(kw):
    _check(masks.sliding_window(6), **kw)


def test_refusals_name_what_the_additive_kernel_does_not_do():
    q, k, v = make_qkv(1, 2, 8, D=16, device=DEVICE)
    sc = scores.Additive(16, 16, 8).to(DEVICE)
    for kw, word in ((dict(normalizer="sigmoid"), "takes softmax"), (dict(return_weights=True), "weights"),
                     (dict(bias=attnkit.positions.ALiBi(2)), "score mods")):
        with pytest.raises(ValueError, match=word):
            attnkit.attention(q, k, v, score=sc, backend="triton", **kw)
