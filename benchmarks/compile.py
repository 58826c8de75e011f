"""Compiled against eager training: ``torch.compile`` (inductor) of a training step's forward and
loss, the backward and the optimizer step as usual, against the same step in eager mode, in the
same run, on the models of two tasks with their default sizes:

* the Multi30k Transformer (d_model 256, 4 heads, 3 + 3 pre-norm layers, feed-forward 1024), a
  batch of 64 sentence pairs of 32 source and 32 target tokens (the task's 2,048-token batches),
  vocabularies of 8,000;
* the dates Seq2Seq (GRU 128, Luong general attention with input feeding), a batch of 128 examples
  of 32 source and 12 target tokens.

* a long-window encoder (``--cases "long-window encoder"``, its own JSON): 2 pre-norm layers of
  ``attnkit.nn.MultiheadAttention`` (d_model 256, 4 heads, a sliding window of 128 keys each way and
  key padding) and a feed-forward of 1024, a batch of 2 sequences of 4,096 positions; compiled,
  attnkit runs its tiled operator (``attnkit::tiled_attention``), and the anchor is the same
  model compiled with ``backend="sdpa"`` (SDPA with the window as a dense (B, H, T, T) mask);

and decoding in ``no_grad`` and eval mode: the dates Seq2Seq's greedy decoding of the same batch for
12 steps with the decoder step (GRU, attention, output layer) compiled, and the Transformer's
greedy decoding of 64 sentences for 20 steps with its KV cache, ``decode_step`` compiled with
dynamic shapes (one graph for the first step, one for all later ones).

Shapes are fixed (every batch padded to the same lengths), so compilation happens once; its cost
is the first compiled step's time less a steady step's, with inductor's on-disk caches off (a cold
compile, as on a fresh machine). The RNN models need torch's switch
``torch._dynamo.config.allow_rnn = True`` (else every GRU is a graph break); it is set here. Each timed repeat runs ``--steps`` steps;
the figures are the median over ``--repeat`` repeats with the spread, throughput in target tokens
per second.

    python benchmarks/compile.py --threads 2 --repeat 3 --json benchmarks/results/compile.json
    python benchmarks/compile.py --threads 2 --repeat 3 --steps 3 --cases "long-window encoder" \
        --json benchmarks/results/compile_window.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_runs  # noqa: E402

import attnkit  # noqa: E402
from attnkit import models  # noqa: E402


def transformer_case():
    m = models.Transformer(8000, 8000, d_model=256, num_heads=4, num_encoder_layers=3, num_decoder_layers=3,
                           dim_feedforward=1024, dropout=0.1, norm_first=True, tie_embeddings="decoder")
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 8000, (64, 32), generator=g)
    pad = torch.arange(32) >= torch.randint(12, 33, (64, 1), generator=g)
    tgt = torch.randint(3, 8000, (64, 33), generator=g)

    def loss(src, pad, tgt):
        logits = m(src, pad, tgt[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt[:, 1:].reshape(-1),
                               label_smoothing=0.1)

    return m, loss, (src, pad, tgt), 64 * 32


def seq2seq_case():
    m = models.Seq2Seq(40, 16, emb_dim=64, hidden_dim=128, rnn="gru", attention="luong-general", input_feeding=True)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 40, (128, 32), generator=g)
    lengths = torch.randint(12, 33, (128,), generator=g)
    lengths[0] = 32
    tgt = torch.randint(3, 16, (128, 13), generator=g)

    def loss(src, lengths, tgt):
        logits = m(src, lengths, tgt[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt[:, 1:].reshape(-1))

    return m, loss, (src, lengths, tgt), 128 * 12


def greedy_case():
    """The dates Seq2Seq in eval mode; the "loss" is a whole greedy decode (12 steps) whose step
    function is what gets compiled."""
    m, _, (src, lengths, _), _ = seq2seq_case()
    m.eval()

    def step(y, state, feed, memory, pad):
        logits, state, feed, _ = m._step(y, state, feed, memory, pad, False, None)
        return logits.argmax(-1), state, feed

    def decode(step_fn):
        with torch.no_grad():
            memory, pad, state = m.encode(src, lengths)
            feed = memory.new_zeros(src.shape[0], m.hidden_dim)
            y = torch.full((src.shape[0],), m.bos_id, dtype=torch.long)
            out = []
            for _ in range(12):
                y, state, feed = step_fn(y, state, feed, memory, pad)
                out.append(y)
            return torch.stack(out, 1)

    return m, step, decode, 128 * 12, {}


def transformer_greedy_case():
    """The Multi30k Transformer in eval mode decoding 20 tokens of 64 sentences greedily with its KV
    cache; ``decode_step`` is compiled with dynamic shapes (the cache grows every step)."""
    m, _, (src, pad, _), _ = transformer_case()
    m.eval()

    def decode(step_fn):
        with torch.no_grad():
            state = m.init_state(m.encode(src, pad), pad, 40)
            tok, out = torch.full((src.shape[0], 1), m.bos_id, dtype=torch.long), []
            for _ in range(20):
                tok = step_fn(tok, state)[:, -1].argmax(-1, keepdim=True)
                out.append(tok)
            return torch.cat(out, 1)

    return m, m.decode_step, decode, 64 * 20, {"dynamic": True}


class WindowEncoder(torch.nn.Module):
    """Pre-norm encoder layers whose self-attention sees ``window`` keys each way."""

    def __init__(self, d_model=256, heads=4, layers=2, window=128, ff=1024, backend="auto"):
        super().__init__()
        mask = attnkit.masks.sliding_window(window, window)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "norm1": torch.nn.LayerNorm(d_model), "norm2": torch.nn.LayerNorm(d_model),
            "attn": attnkit.nn.MultiheadAttention(d_model, heads, batch_first=True, mask=mask, backend=backend),
            "ff": torch.nn.Sequential(torch.nn.Linear(d_model, ff), torch.nn.GELU(), torch.nn.Linear(ff, d_model)),
        }) for _ in range(layers))

    def forward(self, x, pad):
        for b in self.blocks:
            h = b["norm1"](x)
            x = x + b["attn"](h, h, h, key_padding_mask=pad, need_weights=False)[0]
            x = x + b["ff"](b["norm2"](x))
        return x


def window_case():
    m = WindowEncoder()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 256, generator=g)
    pad = torch.arange(4096) >= torch.tensor([[4096], [3000]])
    target = torch.randn(2, 4096, 256, generator=g)

    def loss(x, pad, target):
        return F.mse_loss(m(x, pad), target)

    return m, loss, (x, pad, target), 2 * 4096


def window_anchor(m):
    """The same weights, attention by SDPA with the window as a dense mask."""
    anchor = copy.deepcopy(m)
    for b in anchor.blocks:
        b["attn"].backend = "sdpa"

    def loss(x, pad, target):
        return F.mse_loss(anchor(x, pad), target)

    return "the same model compiled with SDPA and the window as a dense mask", anchor, loss


#: cases with an anchor: a second compiled model timed in the same run
ANCHORS = {"long-window encoder": window_anchor}

CASES = {"Multi30k Transformer": transformer_case, "dates Seq2Seq": seq2seq_case,
         "dates Seq2Seq, greedy decoding": greedy_case,
         "Multi30k Transformer, greedy decoding with the KV cache": transformer_greedy_case,
         "long-window encoder": window_case}
DEFAULT_CASES = [c for c in CASES if c != "long-window encoder"]


def _timed(fn, steps: int, repeat: int) -> list[float]:
    per_step = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def run_case(name: str, steps: int, repeat: int) -> dict:
    torch.manual_seed(0)
    decoding = "greedy decoding" in name
    if decoding:
        model, step_fn, decode, tokens, options = CASES[name]()
        eager_call = lambda: decode(step_fn)  # noqa: E731
        compiled_step = torch.compile(step_fn, **options)
        compiled_call = lambda: decode(compiled_step)  # noqa: E731
    else:
        model, loss, args, tokens = CASES[name]()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        compiled_loss = torch.compile(loss)

        def train_step(fn):
            opt.zero_grad(set_to_none=True)
            value = fn(*args)
            value.backward()
            opt.step()
            return value

        eager_call = lambda: train_step(loss)  # noqa: E731
        compiled_call = lambda: train_step(compiled_loss)  # noqa: E731
        anchor = None
        if name in ANCHORS:
            label, anchor_model, anchor_loss = ANCHORS[name](model)
            anchor_opt = torch.optim.AdamW(anchor_model.parameters(), lr=1e-4)
            compiled_anchor = torch.compile(anchor_loss)

            def anchor_call():
                anchor_opt.zero_grad(set_to_none=True)
                value = compiled_anchor(*args)
                value.backward()
                anchor_opt.step()
                return value

            anchor = anchor_call
    for _ in range(2):  # warm-up
        eager_call()
    eager = _timed(eager_call, steps, repeat)
    start = time.perf_counter()
    compiled_call()
    first = time.perf_counter() - start
    compiled_call()
    fast = _timed(compiled_call, steps, repeat)
    # eager again after the compiled runs: the machine has not drifted between the two
    eager += _timed(eager_call, steps, repeat)
    same = bool(torch.equal(eager_call(), compiled_call())) if decoding else None
    e, c = statistics.median(eager), statistics.median(fast)
    record = {"case": name, "steps": steps, "repeat": repeat, "tokens_per_step": tokens,
              "eager_s": eager, "compiled_s": fast, "first_compiled_step_s": round(first, 2),
              "compile_cost_s": round(first - c, 2), "speedup": e / c,
              "eager_tokens_per_s": tokens / e, "compiled_tokens_per_s": tokens / c,
              "same_tokens": same}
    if not decoding and anchor is not None:
        start = time.perf_counter()
        anchor()
        anchor_first = time.perf_counter() - start
        a = _timed(anchor, steps, repeat)
        fast += _timed(compiled_call, steps, repeat)  # attnkit again after the anchor
        c = statistics.median(fast)
        record.update(compiled_s=fast, speedup=e / c, compiled_tokens_per_s=tokens / c, anchor=label,
                      anchor_compiled_s=a, anchor_compile_cost_s=round(anchor_first - statistics.median(a), 2),
                      anchor_over_compiled=statistics.median(a) / c)
    record["loadavg"] = os.getloadavg()
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    p.add_argument("--json", default="benchmarks/results/compile.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.allow_rnn = True  # trace nn.GRU instead of breaking the graph at it
    # a cold compile every run: the compile cost reported is not a cache hit from an earlier run
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    results = []
    for name in args.cases:
        r = run_case(name, args.steps, args.repeat)
        print(f"{name}: eager {statistics.median(r['eager_s']):.3f} s/step, compiled {statistics.median(r['compiled_s']):.3f} "
              f"s/step ({r['speedup']:.2f}x), compile cost {r['compile_cost_s']:.1f} s"
              + (f"; anchor {statistics.median(r['anchor_compiled_s']):.3f} s/step ({r['anchor_over_compiled']:.2f}x "
                 "attnkit's time)" if "anchor" in r else ""), flush=True)
        results.append(r)
    cases = "" if args.cases == DEFAULT_CASES else " --cases " + " ".join(f'"{c}"' for c in args.cases)
    train_runs.write_record(args.json, f"python benchmarks/compile.py --threads {args.threads} --repeat {args.repeat} "
                            f"--steps {args.steps}{cases} --json {args.json}", args.threads, repeat=args.repeat,
                            results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
