"""Hugging Face models on attnkit under ``torch.compile``: no graph break, and the compiled model's
outputs and every gradient equal the same model run eagerly on attnkit.

Traced, the mask functions a model builds in its forward become a mask_mod (their closures cannot
be read by Dynamo), and the padding mask is kept even when nothing is padded (its values cannot
be read); both are exact, which these tests check against the eager run."""

import pytest
import torch
import torch._dynamo as dynamo

pytest.importorskip("transformers", reason="attnkit.integrations.hf needs Hugging Face transformers: "
                    "pip install -e '.[hf]'")

from .test_hf import DECODERS, ENCODERS, V, assert_close, assert_same_grads, build, forward, inputs, \
    real_tokens  # noqa: E402


#: models whose compiled backward fails in transformers' own code, not in attention: checked forward only
FORWARD_ONLY = {"gpt_oss": "transformers' grouped-mm MoE fallback backward guards on data (integrations/moe.py)"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _step(model, ids, am, proj):
    """Output and a loss over the real tokens (as test_hf's, with the projection made outside:
    a generator created inside a compiled region is a graph break of the test's own)."""
    _, y = forward(model, ids, am)
    return y, ((y.float() * real_tokens(ids, am)[..., None]) @ proj).pow(2).sum()


def _grads(model):
    return {n: None if p.grad is None else p.grad.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("name", DECODERS + ENCODERS)
def test_a_compiled_model_on_attnkit_has_no_graph_break_and_equals_eager(name, padding):
    model = build(name)
    model.set_attn_implementation("attnkit")
    ids, am = inputs(padding)
    width = 64 if name in ENCODERS else V  # hidden states of the encoders, logits of the decoders
    proj = torch.randn(width, 8, generator=torch.Generator().manual_seed(2))
    step = lambda ids, am: _step(model, ids, am, proj)  # noqa: E731
    explained = dynamo.explain(step)(ids, am)
    assert explained.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    dynamo.reset()
    real = real_tokens(ids, am)
    if name in FORWARD_ONLY:
        with torch.no_grad():
            y_e, _ = step(ids, am)
            y_c, _ = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, am)
        assert_close(y_c[real], y_e[real], 1e-5, 1e-6, f"{name} compiled outputs on real tokens")
        return
    model.zero_grad(set_to_none=True)
    y_e, loss = step(ids, am)
    loss.backward()
    g_e = _grads(model)
    model.zero_grad(set_to_none=True)
    y_c, loss = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, am)
    loss.backward()
    assert_close(y_c[real].detach(), y_e[real].detach(), 1e-5, 1e-6, f"{name} compiled outputs on real tokens")
    assert_same_grads(_grads(model), g_e, 1e-4, 1e-5)
