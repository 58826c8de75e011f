"""Every CUDA route of ``auto`` on a real GPU: the backend it picks, and its output and gradients
against the reference (float64 gold). Skipped where no GPU is present (tests/conftest.py)."""

import pytest
import torch

import attnkit
from attnkit import masks, normalizers, positions
from attnkit.testing import assert_close_to_gold, make_qkv

pytestmark = pytest.mark.cuda
DEV = "cuda"


def check(route, dtype, B=2, H=4, Hkv=None, Tq=300, Tk=None, D=64, **kw):
    """``auto`` picks ``route``, and its output and gradients are within 2x the reference's own
    error (in ``dtype``) of the float64 gold."""
    q64, k64, v64 = make_qkv(B, H, Tq, Tk, D=D, Hkv=Hkv, dtype=torch.float64, device=DEV, requires_grad=True)
    choice = attnkit.explain(q64.to(dtype), k64.to(dtype), v64.to(dtype), **kw)
    assert choice.backend == route, str(choice)
    dout = torch.randn(*q64.shape[:-1], v64.shape[-1], dtype=torch.float64, device=DEV)

    def run(x, backend):
        q, k, v = (t.detach().to(x).requires_grad_() for t in (q64, k64, v64))
        out = attnkit.attention(q, k, v, backend=backend, **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))

    gold = run(torch.float64, "reference")
    ref = run(dtype, "reference")
    fast = run(dtype, "auto")
    for name, f, r, g in zip(["out", "dq", "dk", "dv"], fast, ref, gold):
        assert_close_to_gold(f, r, g, name=name)


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_causal(dtype):
    check("sdpa", dtype, mask=masks.causal(align="top_left"))


# each case compiles flex's forward and backward (tens of seconds): one dtype per mask
@pytest.mark.parametrize("dtype, kw", [(torch.bfloat16, dict(mask=masks.sliding_window(100))),
                                       (torch.float16, dict(mask=masks.causal(), bias=positions.ALiBi(4))),
                                       (torch.float32, dict(mask=masks.chunked(128) & masks.causal()))])
def test_flex_masks_and_mods(dtype, kw):
    check("flex", dtype, Tq=1024, **kw)


def _sigmoid_cases():
    return {
        "none": dict(),
        "causal_alibi": dict(mask=masks.causal(), bias=positions.ALiBi(4)),
        "window": dict(mask=masks.sliding_window(77, 5)),
        "padding": dict(mask=masks.key_padding(torch.tensor([517, 100], device=DEV))),
        "from_mod": dict(mask=masks.from_mod(lambda b, h, q, kv: (q // 64 + kv // 32) % 3 != 0)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["none", "causal_alibi", "window", "padding", "from_mod"])
def test_triton_sigmoid(dtype, case):
    check("triton", dtype, Hkv=2, Tq=333, Tk=517, normalizer=normalizers.Sigmoid(bias="log_n"),
          **_sigmoid_cases()[case])


@pytest.mark.parametrize("D", [32, 128])
def test_triton_sigmoid_head_dims(D):
    check("triton", torch.bfloat16, Tq=1000, D=D, normalizer="sigmoid", mask=masks.causal())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["sparsemax", "entmax15", normalizers.Entmax(1.25)])
@pytest.mark.parametrize("case", ["none", "causal_alibi", "window", "padding", "from_mod"])
def test_triton_entmax(dtype, norm, case):
    check("triton", dtype, Hkv=2, Tq=333, Tk=517, normalizer=norm, **_sigmoid_cases()[case])


@pytest.mark.parametrize("candidates", [0, 4, 128])
@pytest.mark.parametrize("norm", ["sparsemax", "entmax15"])
def test_triton_entmax_candidates_and_passes_agree(candidates, norm):
    """The entmax forward's kept candidates (compacted across the block's threads with barriers),
    their overflow into passes over the keys, and passes only: all exact on a GPU."""
    from attnkit.backends.triton import GPU_CONFIG_FP32, TritonBackend
    from attnkit.spec import canonicalize

    q, k, v = make_qkv(2, 4, 2048, D=64, device=DEV)
    b = TritonBackend(config={**GPU_CONFIG_FP32, "candidates": candidates})
    for spread in (0.2, 1.0, 4.0):
        qs = q * spread
        out = b(qs, k, v, canonicalize(qs, k, v, normalizer=norm, mask=masks.causal()))[0]
        ref = attnkit.attention(qs.double(), k.double(), v.double(), normalizer=norm, mask=masks.causal(),
                                backend="reference")
        assert (out.double() - ref).abs().max() < 1e-4, (candidates, spread)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["none", "causal_alibi", "padding"])
def test_triton_additive(dtype, case):
    kw = _sigmoid_cases()[case]
    kw.pop("bias", None)   # the additive kernel takes no score mods
    score = attnkit.scores.Additive(64, 64, 128).to(DEV).double()
    q64, k64, v64 = make_qkv(2, 4, 333, 517, D=64, Hkv=2, dtype=torch.float64, device=DEV, requires_grad=True)
    assert attnkit.explain(q64.to(dtype), k64.to(dtype), v64.to(dtype), score=score, **kw).backend == "triton"
    dout = torch.randn(2, 4, 333, 64, dtype=torch.float64, device=DEV)

    def run(x, backend):
        sc = attnkit.scores.Additive(64, 64, 128).to(DEV)
        sc.load_state_dict(score.state_dict())
        sc = sc.to(torch.float64 if x == torch.float64 else torch.float32)
        q, k, v = (t.detach().to(x).requires_grad_() for t in (q64, k64, v64))
        out = attnkit.attention(q, k, v, score=sc, backend=backend, **kw)
        return (out, *torch.autograd.grad(out, (q, k, v, *sc.parameters()), dout.to(out.dtype)))

    for name, f, r, g in zip(["out", "dq", "dk", "dv", "dW_q", "dW_k", "dbias", "dw"], run(dtype, "auto"),
                             run(dtype, "reference"), run(torch.float64, "reference")):
        assert_close_to_gold(f, r, g, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["softmax", "sigmoid", "entmax15"])
def test_triton_weights(dtype, norm):
    q, k, v = make_qkv(1, 4, 1100, D=64, dtype=dtype, device=DEV)   # past the reference's small sizes
    kw = dict(normalizer=norm, mask=masks.causal(), bias=positions.ALiBi(4))
    for request in (True, attnkit.WeightsRequest(heads=[3, 0], rows=[1099, 0, 500]),
                    attnkit.WeightsRequest(average=True)):
        c = attnkit.explain(q, k, v, return_weights=request, **kw)
        assert c.backend == "triton", str(c)
        out, w = attnkit.attention(q, k, v, return_weights=request, **kw)
        ref, wr = attnkit.attention(q, k, v, return_weights=request, backend="reference", **kw)
        tol = 2e-2 if dtype != torch.float32 else 1e-5
        assert (out.float() - ref.float()).abs().max() < tol and (w.float() - wr.float()).abs().max() < tol


def test_capture_uses_the_triton_weights_kernel():
    q, k, v = make_qkv(1, 4, 1100, D=64, dtype=torch.bfloat16, device=DEV)
    with attnkit.capture(heads=[1], rows=[0, 1099]) as rec:
        attnkit.attention(q, k, v, mask=masks.causal())
    _, wr = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference",
                              return_weights=attnkit.WeightsRequest(heads=[1], rows=[0, 1099]))
    assert (rec[0].weights - wr.float().cpu()).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_takes_what_the_others_cannot(dtype):
    q, k, v = make_qkv(1, 4, 1100, D=64, dtype=dtype, device=DEV)   # past the reference's small sizes
    kw = dict(normalizer="sigmoid", mask=masks.causal(), bias=positions.bias_mod(lambda b, h, q, kv: (q - kv) * 0.01))
    c = attnkit.explain(q, k, v, **kw)
    assert c.backend == "tiled", str(c)
    out = attnkit.attention(q, k, v, **kw)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    assert (out.float() - ref.float()).abs().max() < tol


def test_flex_block_masks_are_reused():
    from attnkit.backends import flex

    m = masks.sliding_window(64)
    q, k, v = make_qkv(1, 2, 1024, D=64, dtype=torch.bfloat16, device=DEV)
    attnkit.attention(q, k, v, mask=m)
    n = len(flex._BLOCK_MASKS[m])
    attnkit.attention(q, k, v, mask=m)
    assert len(flex._BLOCK_MASKS[m]) == n == 1


def test_nan_policy_on_cuda_matches_cpu():
    """The CUDA path checks finiteness beside the kernels; a NaN must still give the policy's
    answer (attnkit.nonfinite): NaN in the query's row, nothing from a masked-out key."""
    q, k, v = make_qkv(1, 2, 64, D=64)
    q[0, 1, 5, 3] = float("nan")
    k[0, 0, 63, 0] = float("nan")               # a padded key
    m = masks.key_padding(torch.tensor([60]))
    want = attnkit.attention(q, k, v, mask=m)
    got = attnkit.attention(q.to(DEV), k.to(DEV), v.to(DEV), mask=masks.key_padding(torch.tensor([60], device=DEV)))
    assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert (got.cpu()[ok] - want[ok]).abs().max() < 1e-4


def test_keys_and_values_found_clean_are_not_summed_again_on_cuda(monkeypatch):
    """The CUDA check sums only what is not known finite (attnkit.nonfinite.known_finite): a KV
    cache's keys and values once, then the query alone; a NaN written into known keys later is
    still caught (the version counter moves)."""
    from attnkit import nonfinite
    from attnkit.spec import canonicalize

    q, k, v = make_qkv(1, 2, 1, 256, D=64, device=DEV)
    summed = []
    real = nonfinite.unchecked
    monkeypatch.setattr(nonfinite, "unchecked", lambda *x: summed.append(real(*x)) or summed[-1])
    attnkit.attention(q, k, v)
    attnkit.attention(q, k, v)
    assert [len(t) for t in summed] == [3, 1] and summed[1][0] is q
    check = nonfinite.pending_check(q, k, v, canonicalize(q, k, v))
    nonfinite.mark_finite(q)
    assert nonfinite.pending_check(q, k, v, canonicalize(q, k, v)) is nonfinite._finite
    assert check() is True
    k[0, 0, 7, 0] = float("nan")
    out = attnkit.attention(q, k, v)
    assert torch.isnan(out[0, 0]).all() and not torch.isnan(out[0, 1]).any()   # head 0 reads key 7
