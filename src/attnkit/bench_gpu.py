"""``attnkit bench --device cuda``: attnkit on a CUDA GPU against the kernels it routes to, in
one run: TFLOP/s of live work and peak memory.

Cases (bfloat16, B=4, H=16, D=128, N=8192, forward + backward unless noted):

* ``sdpa_route``: causal softmax through ``attnkit.attention`` (auto -> SDPA) against
  ``F.scaled_dot_product_attention(is_causal=True)`` called directly (torch picks the kernel),
  and FlashAttention's ``flash_attn_func`` when ``flash_attn`` is installed;
* ``flex_route``: sliding window 1024 through ``attnkit.attention`` (auto -> flex) against
  compiled ``flex_attention`` called directly with a block mask built once;
* ``sigmoid_causal``: sigmoid attention (``b = -log n``), causal, through ``attnkit.attention``
  (auto -> attnkit's Triton kernel) against SDPA's flash kernel (forced) for *softmax* on the
  same shape, fwd+bwd and forward only;
* ``entmax_causal``: 1.5-entmax, causal, through ``attnkit.attention`` (auto -> attnkit's Triton
  entmax kernel) against SDPA's flash kernel for softmax on the same shape, fwd+bwd and forward
  only (live work counted as softmax's: the threshold passes are extra work the ratio shows);
* ``weights_rows``: ``return_weights`` for 2 heads and every 64th row, causal softmax (auto ->
  the Triton weights kernel, the output by SDPA) against the tiled engine forced;
* ``additive``: additive scores (hidden 128), softmax, B=4, one head, T=4096, fwd+bwd, through
  ``attnkit.attention`` (auto -> attnkit's Triton additive kernel) against the plain formula that
  builds the ``(B, T, T, hidden)`` tensor (the reference backend);
* ``sigmoid_sweep``, ``entmax_sweep``, ``additive_sweep`` (on request): a Triton kernel's tile and
  launch settings (forward alone, then forward + backward; for entmax also the candidates kept per
  row), to choose ``attnkit.backends.triton.GPU_CONFIG`` and ``GPU_CONFIG_ADDITIVE``.

Each case runs on its own: one that fails (out of memory, say) is stored with its error and the
others still run, and the JSON is written after every case, so a run cut short keeps what it
measured. ``--smoke`` runs every case (the sweep too) once on tiny shapes, on the GPU or, without
one, on CPU with the Triton kernels under Triton's interpreter (``TRITON_INTERPRET=1``; flex
forward only, CPU flex has no backward): a check of the script itself, whose figures mean
nothing (the test suite runs it).

Each variant is timed ``--repeat`` times (each a CUDA-event timing of ``--iters`` calls after
warm-up), round-robin over the variants of a case; the JSON keeps every repeat and the report
(``benchmarks/report.py``) gives the median with the spread. Live work: the forward's two matrix
products over the pairs the mask allows (a causal mask: about half), the backward 2.5 times the
forward.

Usage (on a machine with a GPU; ``python benchmarks/gpu.py`` is the same)::

    attnkit bench --device cuda --json benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks, normalizers

Tensor = torch.Tensor


@dataclass
class Run:
    """One benchmark run's shape, inputs and timing settings."""

    device: torch.device
    B: int
    H: int
    N: int
    D: int
    dtype: torch.dtype
    repeat: int
    iters: int
    warm: int
    #: the additive case's sequence length and hidden size
    T: int
    hidden: int
    q: Tensor
    k: Tensor
    v: Tensor
    dout: Tensor

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn``: CUDA events around ``iters`` calls (the wall clock on CPU)."""
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def peak_mib(fn, device: torch.device) -> float | None:
    """The most memory allocated above what was allocated before, during one call of ``fn``
    (None on CPU, where torch keeps no such count)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def inputs(B, H, N, D, dtype, grad, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


def step(f, q, k, v, dout, backward: bool):
    """One call of ``f(q, k, v)``, and its backward when ``backward``. Each call gets fresh views of
    the inputs, as a training step's projections are fresh tensors (attnkit's NaN check remembers
    the keys and values it found clean, :func:`attnkit.nonfinite.known_finite`: the same tensors
    again would be a decoding step's KV cache)."""
    def run():
        out = f(q.view_as(q), k.view_as(k), v.view_as(v))
        if backward:
            q.grad = k.grad = v.grad = None
            out.backward(dout)
    return run


def measure(run: Run, variants: dict) -> dict:
    """Every variant timed ``run.repeat`` times, round-robin, after warm-up; and its peak memory."""
    for fn in variants.values():
        for _ in range(run.warm):
            fn()
    if run.cuda:
        torch.cuda.synchronize()
    res = {name: {"seconds": [], "peak_mib": peak_mib(fn, run.device)} for name, fn in variants.items()}
    for _ in range(run.repeat):
        for name, fn in variants.items():
            res[name]["seconds"].append(timed(fn, run.iters, run.device))
    return res


def live_flops(B, H, N, D, live_pairs: float, backward: bool) -> float:
    """``4·B·H·D·pairs`` for the forward; 3.5 times that with the backward."""
    fwd = 4 * B * H * D * live_pairs
    return fwd * (3.5 if backward else 1.0)


def summarize(case: dict, flops: float) -> dict:
    """Each variant's median, spread and TFLOP/s, and the time ratio of the second (attnkit) to the
    first (the anchor)."""
    for r in case["variants"].values():
        med = statistics.median(r["seconds"])
        r["median_s"] = med
        r["tflops"] = flops / med / 1e12
        r["spread_s"] = [min(r["seconds"]), max(r["seconds"])]
    base, ours = list(case["variants"].values())[:2]
    case["ratio_time"] = ours["median_s"] / base["median_s"]
    return case


def causal_pairs(N: int) -> float:
    return N * (N + 1) / 2


def _x(run: Run, backward: bool):
    return (run.q, run.k, run.v) if backward else tuple(t.detach() for t in (run.q, run.k, run.v))


def flash_causal(q, k, v):
    """SDPA's flash kernel, forced, for causal softmax."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_route(run: Run) -> dict:
    m = masks.causal(align="top_left")
    q, k, v, dout = run.q, run.k, run.v, run.dout
    variants = {
        "SDPA (direct, torch's kernel choice)": step(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v, dout, True),
        "attnkit auto": step(lambda q, k, v: attnkit.attention(q, k, v, mask=m), q, k, v, dout, True),
    }
    try:
        from flash_attn import flash_attn_func

        def fa(q, k, v):  # FlashAttention takes (B, T, H, D)
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        variants["FlashAttention (flash_attn_func)"] = step(fa, q, k, v, dout.transpose(1, 2), True)
    except ImportError:
        pass
    c = {"what": "causal softmax, fwd+bwd", "routed": attnkit.explain(q, k, v, mask=m).backend,
         "variants": measure(run, variants)}
    return {"sdpa_route": summarize(c, live_flops(run.B, run.H, run.N, run.D, causal_pairs(run.N), True))}


def flex_route(run: Run) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N = run.N
    w = min(1024, N // 8)
    m = masks.sliding_window(w)
    cflex = torch.compile(flex_attention) if run.cuda else flex_attention
    bm = create_block_mask(lambda b, h, qi, kv: (kv <= qi) & (kv >= qi - w), None, None, N, N, device=run.device)
    backward = run.cuda   # FlexAttention has no backward on CPU
    x = _x(run, backward)
    c = {"what": f"sliding window {w}, softmax, " + ("fwd+bwd" if backward else "forward only"),
         "routed": attnkit.explain(*x, mask=m).backend,
         "variants": measure(run, {
             "compiled flex (direct)": step(lambda q, k, v: cflex(q, k, v, block_mask=bm), *x, run.dout, backward),
             "attnkit auto": step(lambda q, k, v: attnkit.attention(q, k, v, mask=m), *x, run.dout, backward),
         })}
    return {"flex_route": summarize(c, live_flops(run.B, run.H, N, run.D, N * (w + 1) - w * (w + 1) / 2, backward))}


def _against_flash(run: Run, name: str, what: str, routed: str, ours: dict) -> dict:
    """Cases ``name`` (fwd+bwd) and ``name_fwd`` (forward only), causal: SDPA's flash kernel for
    softmax, then the variants ``ours`` (name -> ``f(q, k, v)``), on the same shape."""
    out = {}
    for key, backward, how in ((name, True, "fwd+bwd"), (name + "_fwd", False, "forward only")):
        x = _x(run, backward)
        variants = {"SDPA flash softmax": flash_causal, **ours}
        c = {"what": f"{what}, causal, {how}", "routed": routed,
             "variants": measure(run, {n: step(f, *x, run.dout, backward) for n, f in variants.items()})}
        out[key] = summarize(c, live_flops(run.B, run.H, run.N, run.D, causal_pairs(run.N), backward))
    return out


def sigmoid_causal(run: Run) -> dict:
    m = masks.causal(align="top_left")
    sig = normalizers.Sigmoid(bias="log_n")
    routed = attnkit.explain(run.q, run.k, run.v, mask=m, normalizer=sig).backend
    return _against_flash(run, "sigmoid_causal", "sigmoid (b = -log n) vs softmax", routed, {
        "attnkit sigmoid (auto)": lambda q, k, v: attnkit.attention(q, k, v, mask=m, normalizer=sig)})


def entmax_causal(run: Run) -> dict:
    from attnkit.backends.triton import GPU_CONFIG, TritonBackend
    from attnkit.spec import canonicalize

    m = masks.causal(align="top_left")
    passes_only = TritonBackend(config={**GPU_CONFIG, "candidates": 0})
    routed = attnkit.explain(run.q, run.k, run.v, mask=m, normalizer="entmax15").backend
    return _against_flash(run, "entmax_causal", "1.5-entmax vs softmax", routed, {
        "attnkit 1.5-entmax (auto)": lambda q, k, v: attnkit.attention(q, k, v, mask=m, normalizer="entmax15"),
        "attnkit 1.5-entmax, threshold passes only (candidates 0)":
            lambda q, k, v: passes_only(q, k, v, canonicalize(q, k, v, mask=m, normalizer="entmax15"))[0]})


def weights_rows(run: Run) -> dict:
    N = run.N
    m = masks.causal(align="top_left")
    every = min(64, N // 2)
    req = attnkit.WeightsRequest(heads=[0, run.H // 2 - 1 if run.H > 2 else 1], rows=range(0, N, every))
    x = _x(run, False)

    def weights_with(backend):
        return lambda q, k, v: attnkit.attention(q, k, v, mask=m, return_weights=req, backend=backend)[1]
    c = {"what": f"weights of 2 heads x every {every}th row, causal softmax, no grad",
         "routed": attnkit.explain(*x, mask=m, return_weights=req).backend,
         "variants": measure(run, {"tiled engine (forced)": step(weights_with("tiled"), *x, None, False),
                                   "attnkit auto": step(weights_with("auto"), *x, None, False)})}
    return {"weights_rows": summarize(c, live_flops(run.B, run.H, N, run.D, (N / every) * (N / 2) * (2 / run.H),
                                                    False))}   # the chosen rows' pairs


def additive(run: Run) -> dict:
    T, hidden, B = run.T, run.hidden, run.B
    sc = attnkit.scores.Additive(run.D, run.D, hidden).to(run.device, run.dtype)
    xa = inputs(B, 1, T, run.D, run.dtype, True, run.device)
    da = torch.randn_like(xa[0])

    def additive_with(backend):
        return lambda q, k, v: attnkit.attention(q, k, v, score=sc, backend=backend)
    c = {"what": f"additive scores (hidden {hidden}), softmax, B={B}, one head, T={T}, fwd+bwd",
         "routed": attnkit.explain(*xa, score=sc).backend,
         "variants": measure(run, {"plain formula (B, T, T, hidden)": step(additive_with("reference"), *xa, da, True),
                                   "attnkit auto": step(additive_with("auto"), *xa, da, True)})}
    return {"additive": summarize(c, 2 * B * T * T * hidden * 3.5)}   # the tanh sums dominate: ~2 flops per pair and unit


def _sweep(run: Run, kernel: str, request: dict, base: dict, parts: dict, x=None) -> dict:
    """Time the ``triton`` backend on ``request`` (``canonicalize``'s options; causal) with each of
    the settings in ``parts``: for ``"fwd"``, ``"dq"`` and ``"dkdv"``, tuples ``(block of queries,
    block of keys, warps, stages)``; for ``"candidates"``, the entmax forward's candidates per row.
    ``fwd`` and ``candidates`` are timed forward alone, ``dq`` and ``dkdv`` forward + backward, the
    other settings at ``base`` (the first option of each list is the default). ``x``: ``(q, k, v,
    dout)``, default the run's inputs."""
    from attnkit.backends.triton import TritonBackend
    from attnkit.spec import canonicalize

    q, k, v, dout = x if x is not None else (run.q, run.k, run.v, run.dout)
    results = {}
    for part, opts in parts.items():
        backward = part in ("dq", "dkdv")
        for o in opts:
            key = f"{part} {o}"
            cfg = {n: (dict(c) if isinstance(c, dict) else c) for n, c in base.items()}
            cfg[part] = o if part == "candidates" else {"block": (o[0], o[1]), "num_warps": o[2], "num_stages": o[3]}
            b = TritonBackend(config=cfg)

            def f(q, k, v, b=b):
                return b(q, k, v, canonicalize(q, k, v, **request))[0]
            try:
                fn = step(f, *((q, k, v) if backward else (q.detach(), k.detach(), v.detach())), dout, backward)
                fn()
                if run.cuda:
                    torch.cuda.synchronize()
                ts = sorted(timed(fn, run.iters, run.device) for _ in range(3))
                results[key] = {"median_s": ts[1], "seconds": ts}
            except Exception as e:  # out of shared memory, say
                results[key] = {"error": repr(e)[:300]}
            print(kernel, key, results[key].get("median_s", results[key].get("error")), flush=True)
    return {"what": f"Triton {kernel} kernel settings (block_m, block_n, warps, stages; candidates per row): "
                    "fwd and candidates: forward alone; dq/dkdv: fwd+bwd; the median of 3 timings",
            "defaults": {n: c for n, c in base.items()}, "results": results}


#: (block of queries, block of keys, warps, stages) for the dot-product kernels' sweeps
_DOT_OPTIONS = {"fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)],
                "dq": [(128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
                "dkdv": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 4, 2)]}


def sigmoid_sweep(run: Run) -> dict:
    """The Triton sigmoid kernel's tile and launch settings, causal."""
    from attnkit.backends.triton import GPU_CONFIG

    request = dict(mask=masks.causal(align="top_left"), normalizer="sigmoid")
    return {"sigmoid_sweep": _sweep(run, "sigmoid", request, GPU_CONFIG, _DOT_OPTIONS)}


def entmax_sweep(run: Run) -> dict:
    """The Triton entmax kernels' settings for 1.5-entmax, causal, and the candidates kept per row."""
    from attnkit.backends.triton import GPU_CONFIG

    request = dict(mask=masks.causal(align="top_left"), normalizer="entmax15")
    return {"entmax_sweep": _sweep(run, "1.5-entmax", request, GPU_CONFIG,
                                   {"candidates": [128, 64, 256], **_DOT_OPTIONS})}


def additive_sweep(run: Run) -> dict:
    """The Triton additive kernel's settings (its ``(block, block, hidden)`` tile of tanh)."""
    from attnkit.backends.triton import GPU_CONFIG_ADDITIVE

    sc = attnkit.scores.Additive(run.D, run.D, run.hidden).to(run.device, run.dtype)
    q, k, v = inputs(run.B, 1, run.T, run.D, run.dtype, True, run.device)
    opts = [(16, 16, 4, 1), (16, 16, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1), (32, 32, 8, 1)]
    return {"additive_sweep": _sweep(run, "additive", dict(score=sc), GPU_CONFIG_ADDITIVE,
                                     {"fwd": opts, "dq": opts, "dkdv": opts}, x=(q, k, v, torch.randn_like(q)))}


#: the cases by name, in the order they run; the sweeps run only when asked for
CASES: dict[str, Callable[[Run], dict]] = {f.__name__: f for f in (
    sdpa_route, flex_route, sigmoid_causal, entmax_causal, weights_rows, additive, sigmoid_sweep, entmax_sweep,
    additive_sweep)}
DEFAULT_CASES = "sdpa_route,flex_route,sigmoid_causal,entmax_causal,weights_rows,additive"


def show(name: str, c: dict) -> None:
    if "error" in c:
        print(f"{name}: failed: {c['error']}", flush=True)
        return
    if "variants" not in c:
        return
    print(f"{name} ({c['what']}; routed to {c.get('routed', '-')}):")
    for n, r in c["variants"].items():
        peak = "" if r["peak_mib"] is None else f"  peak +{r['peak_mib']:.0f} MiB"
        print(f"  {n:36s} {r['median_s'] * 1e3:8.2f} ms ({r['spread_s'][0] * 1e3:.2f}-{r['spread_s'][1] * 1e3:.2f})"
              f"  {r['tflops']:6.1f} TFLOP/s{peak}")
    print(f"  time ratio attnkit / anchor: {c['ratio_time']:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench --device cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--json", default=None, help="write every repeat's figures to this JSON file (after each case)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help="comma-separated, of: " + ", ".join(CASES) + " (the sweeps time a Triton kernel's "
                        "settings)")
    p.add_argument("--smoke", action="store_true",
                   help="every case (the sweep too) once on tiny shapes, on CPU under Triton's interpreter where "
                        "there is no GPU: checks the script; the figures mean nothing")
    a = p.parse_args(argv)
    cases = list(CASES) if a.smoke and a.cases == DEFAULT_CASES else a.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"attnkit bench --device cuda: unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not a.smoke:
        print("attnkit bench --device cuda: no CUDA device here; nothing to measure", file=sys.stderr)
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        B, H, N, D, T, hidden, repeat, iters, warm = 1, 2, 128, 32, 64, 16, 1, 1, 1
    else:
        B, H, N, D, T, hidden, repeat, iters, warm = 4, 16, a.N, 128, 4096, 128, a.repeat, a.iters, 3
    dt = torch.bfloat16
    q, k, v = inputs(B, H, N, D, dt, True, device)
    run = Run(device, B, H, N, D, dt, repeat, iters, warm, T, hidden, q, k, v, torch.randn_like(q))
    out = {"machine": torch.cuda.get_device_name() if run.cuda else f"CPU ({platform.processor() or 'unknown'})",
           "torch": torch.__version__, "python": platform.python_version(),
           "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16"}, "repeat": repeat, "iters": iters,
           "date": time.strftime("%Y-%m-%d"), "smoke": a.smoke, "cases": {},
           "command": "attnkit bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    failed = []
    for name in cases:
        try:
            done = CASES[name](run)
        except Exception as e:   # out of memory, say: keep it and go on with the other cases
            done = {name: {"error": f"{type(e).__name__}: {e}"[:1000]}}
            failed.append(name)
        for key, c in done.items():
            out["cases"][key] = c
            show(key, c)
        if run.cuda:
            torch.cuda.empty_cache()
        if a.json:   # after every case: a run cut short keeps what it measured
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(out, indent=1))
    if failed:
        print(f"attnkit bench --device cuda: {len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
