"""attnkit's Triton weights kernel (attnkit.kernels.triton.weights): ``return_weights`` and
:func:`attnkit.capture`'s chosen heads and rows, for softmax (its log-sum-exp computed in the
kernel), sigmoid, sparsemax and 1.5-entmax, against the float64 reference.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py); a few cases run by
default, the whole matrix with ``python -m pytest -m interpreter``.
"""

import pytest
import torch

import attnkit
from attnkit import masks, normalizers, positions
from attnkit.kernels.triton import interpreting
from attnkit.testing import make_qkv, max_err

pytest.importorskip("triton", reason='triton is not installed (pip install -e ".[gpu]")')
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from tests.backends.test_triton import _mask_cases  # noqa: E402

REQUESTS = {
    "all": True,
    "subset": attnkit.WeightsRequest(heads=(3, 1), rows=(36, 0, 7)),
    "average": attnkit.WeightsRequest(heads=(0, 2, 3), average=True),
}
NORMS = {"softmax": "softmax", "softmax_T": normalizers.Softmax(0.5), "sigmoid": normalizers.Sigmoid(bias="log_n"),
         "sparsemax": "sparsemax", "entmax15": "entmax15", "entmax_1.25": normalizers.Entmax(1.25, n_iter=80)}


def _check(norm, mask, bias, request, tol=1e-5):
    q, k, v = make_qkv(2, 4, 37, 45, D=16, Dv=24, Hkv=2, device=DEVICE, requires_grad=True)
    kw = dict(normalizer=norm, mask=mask, bias=bias, return_weights=request)
    out, w = attnkit.attention(q, k, v, backend="triton", **kw)
    ref_out, ref_w = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert w.shape == ref_w.shape and w.dtype == q.dtype and not w.requires_grad
    assert max_err(w, ref_w) < tol, max_err(w, ref_w)
    assert max_err(out, ref_out.nan_to_num()) < tol
    return out, q


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_softmax_weights_of_chosen_heads_and_rows(request_name):
    """Softmax: the kernel finds each chosen row's log-sum-exp in a first pass; GQA, ALiBi, causal."""
    _check("softmax", masks.causal(), positions.ALiBi(4), REQUESTS[request_name])


@pytest.mark.parametrize("norm", ["sigmoid", "entmax15"])
def test_kernel_outputs_keep_their_gradients_with_weights(norm):
    out, q = _check(NORMS[norm], masks.sliding_window(6), None, REQUESTS["subset"])
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("mask_name", list(_mask_cases(37, 45, 2)))
def test_every_normalizer_and_mask(norm, mask_name):
    """Each pair with one of the three requests (all, a subset, averaged), in turn."""
    names = list(_mask_cases(37, 45, 2))
    request = list(REQUESTS.values())[(names.index(mask_name) + list(NORMS).index(norm)) % len(REQUESTS)]
    _check(NORMS[norm], _mask_cases(37, 45, 2)[mask_name], positions.ALiBi(4), request)


def test_rows_with_no_key_have_zero_weights():
    _check("softmax", masks.key_padding(torch.tensor([45, 0])), None, True)


def test_softmax_weights_inside_use_backend_triton():
    """The output of a softmax request comes from auto's own choice, even when triton is forced."""
    q, k, v = make_qkv(1, 2, 20, D=16, device=DEVICE)
    with attnkit.use_backend("triton"):
        out, w = attnkit.attention(q, k, v, mask=masks.causal(), return_weights=True)
    ref, wr = attnkit.attention(q, k, v, mask=masks.causal(), return_weights=True, backend="reference")
    assert max_err(out, ref) < 1e-5 and max_err(w, wr) < 1e-5


def test_the_backend_says_what_it_does_with_softmax():
    q, k, v = make_qkv(1, 2, 8, D=16, device=DEVICE)
    with pytest.raises(ValueError, match="only for its weights"):
        attnkit.attention(q, k, v, backend="triton")
    choice = attnkit.explain(q, k, v, return_weights=True, backend="triton")
    assert "weights kernel" in str(choice)


def test_blocks_with_no_live_pair_are_listed_for_skipping():
    """The kernel skips (row block, key block) pairs the mask hides entirely: a causal mask's upper
    blocks; what it skips stays zero in the result (the matrix tests above)."""
    from attnkit.kernels.triton.weights import _live_blocks, _mask_rows

    rows = torch.arange(40)
    mt = _mask_rows(masks.causal(), 1, torch.arange(2), rows, 40, 40)
    live = _live_blocks(mt, 16, 16)
    assert live.shape == (1, 1, 3, 3)
    assert live[0, 0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
