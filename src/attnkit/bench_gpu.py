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
* ``sigmoid_sweep`` (on request): the Triton kernel's tile and launch settings (forward alone,
  then forward + backward), to choose ``attnkit.backends.triton.GPU_CONFIG``.

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
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks, normalizers


def timed(fn, iters: int) -> float:
    """Seconds per call of ``fn``, from CUDA events around ``iters`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def peak_mib(fn) -> float:
    """The most memory allocated above what was allocated before, during one call of ``fn``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def inputs(B, H, N, D, dtype, grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


def step(f, q, k, v, dout, backward: bool):
    """One call of ``f(q, k, v)``, and its backward when ``backward``."""
    def run():
        out = f(q, k, v)
        if backward:
            q.grad = k.grad = v.grad = None
            out.backward(dout)
    return run


def measure(variants: dict, repeat: int, iters: int, warm: int = 3) -> dict:
    for fn in variants.values():
        for _ in range(warm):
            fn()
    torch.cuda.synchronize()
    res = {name: {"seconds": [], "peak_mib": peak_mib(fn)} for name, fn in variants.items()}
    for _ in range(repeat):
        for name, fn in variants.items():
            res[name]["seconds"].append(timed(fn, iters))
    return res


def live_flops(B, H, N, D, live_pairs: float, backward: bool) -> float:
    """``4·B·H·D·pairs`` for the forward; 3.5 times that with the backward."""
    fwd = 4 * B * H * D * live_pairs
    return fwd * (3.5 if backward else 1.0)


def summarize(case: dict, flops: float) -> None:
    for r in case["variants"].values():
        med = statistics.median(r["seconds"])
        r["median_s"] = med
        r["tflops"] = flops / med / 1e12
        r["spread_s"] = [min(r["seconds"]), max(r["seconds"])]


def _sweep(q, k, v, dout, iters: int) -> dict:
    from attnkit.backends.triton import GPU_CONFIG, TritonBackend
    from attnkit.spec import canonicalize

    m = masks.causal(align="top_left")
    # (block of queries, block of keys, warps, stages); the first of each list is the default
    fwd_opts = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)]
    dq_opts = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
    kv_opts = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 4, 2)]
    sweep = {}
    for name, opts, backward in (("fwd", fwd_opts, False), ("dq", dq_opts, True), ("dkdv", kv_opts, True)):
        for o in opts:
            key = f"{name} {o}"
            cfg = {n: dict(c) for n, c in GPU_CONFIG.items()}
            cfg[name] = {"block": (o[0], o[1]), "num_warps": o[2], "num_stages": o[3]}
            b = TritonBackend(config=cfg)

            def f(q, k, v, b=b):
                return b(q, k, v, canonicalize(q, k, v, mask=m, normalizer="sigmoid"))[0]
            x = (q, k, v) if backward else (q.detach(), k.detach(), v.detach())
            try:
                fn = step(f, *x, dout, backward)
                fn()
                torch.cuda.synchronize()
                ts = sorted(timed(fn, iters) for _ in range(3))
                sweep[key] = {"median_s": ts[1], "seconds": ts}
            except Exception as e:  # out of shared memory, say
                sweep[key] = {"error": repr(e)[:300]}
            print(key, sweep[key].get("median_s", sweep[key].get("error")), flush=True)
    return sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench --device cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--json", default=None, help="write every repeat's figures to this JSON file")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--cases", default="sdpa_route,flex_route,sigmoid_causal,entmax_causal,weights_rows,additive",
                   help="comma-separated; add sigmoid_sweep to time the Triton kernel's settings")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attnkit bench --device cuda: no CUDA device here; nothing to measure", file=sys.stderr)
        return 1
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, N, D, dt = 4, 16, a.N, 128, torch.bfloat16
    q, k, v = inputs(B, H, N, D, dt, True)
    dout = torch.randn_like(q)
    causal_pairs = N * (N + 1) / 2
    out = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16"}, "repeat": a.repeat, "iters": a.iters,
           "date": time.strftime("%Y-%m-%d"), "cases": {},
           "command": "attnkit bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass

    def flash_causal(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    cases = a.cases.split(",")
    if "sdpa_route" in cases:
        m = masks.causal(align="top_left")
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
        out["cases"]["sdpa_route"] = c = {
            "what": "causal softmax, fwd+bwd", "routed": attnkit.explain(q, k, v, mask=m).backend,
            "variants": measure(variants, a.repeat, a.iters)}
        summarize(c, live_flops(B, H, N, D, causal_pairs, True))
    if "flex_route" in cases:
        w = 1024
        m = masks.sliding_window(w)
        cflex = torch.compile(flex_attention)
        bm = create_block_mask(lambda b, h, qi, kv: (kv <= qi) & (kv >= qi - w), None, None, N, N, device="cuda")
        out["cases"]["flex_route"] = c = {
            "what": f"sliding window {w}, softmax, fwd+bwd", "routed": attnkit.explain(q, k, v, mask=m).backend,
            "variants": measure({
                "compiled flex (direct)": step(lambda q, k, v: cflex(q, k, v, block_mask=bm), q, k, v, dout, True),
                "attnkit auto": step(lambda q, k, v: attnkit.attention(q, k, v, mask=m), q, k, v, dout, True),
            }, a.repeat, a.iters)}
        summarize(c, live_flops(B, H, N, D, N * (w + 1) - w * (w + 1) / 2, True))
    if "sigmoid_causal" in cases:
        m = masks.causal(align="top_left")
        sig = normalizers.Sigmoid(bias="log_n")
        routed = attnkit.explain(q, k, v, mask=m, normalizer=sig).backend
        for name, backward, what in (("sigmoid_causal", True, "fwd+bwd"), ("sigmoid_causal_fwd", False, "forward only")):
            x = (q, k, v) if backward else tuple(t.detach() for t in (q, k, v))
            out["cases"][name] = c = {
                "what": f"sigmoid (b = -log n) vs softmax, causal, {what}", "routed": routed,
                "variants": measure({
                    "SDPA flash softmax": step(flash_causal, *x, dout, backward),
                    "attnkit sigmoid (auto)": step(lambda q, k, v: attnkit.attention(q, k, v, mask=m, normalizer=sig),
                                                   *x, dout, backward),
                }, a.repeat, a.iters)}
            summarize(c, live_flops(B, H, N, D, causal_pairs, backward))
    if "entmax_causal" in cases:
        from attnkit.backends.triton import GPU_CONFIG, TritonBackend
        from attnkit.spec import canonicalize

        m = masks.causal(align="top_left")
        passes_only = TritonBackend(config={**GPU_CONFIG, "candidates": 0})
        routed = attnkit.explain(q, k, v, mask=m, normalizer="entmax15").backend
        for name, backward, what in (("entmax_causal", True, "fwd+bwd"), ("entmax_causal_fwd", False, "forward only")):
            x = (q, k, v) if backward else tuple(t.detach() for t in (q, k, v))
            out["cases"][name] = c = {
                "what": f"1.5-entmax vs softmax, causal, {what}", "routed": routed,
                "variants": measure({
                    "SDPA flash softmax": step(flash_causal, *x, dout, backward),
                    "attnkit 1.5-entmax (auto)": step(
                        lambda q, k, v: attnkit.attention(q, k, v, mask=m, normalizer="entmax15"), *x, dout, backward),
                    "attnkit 1.5-entmax, threshold passes only (candidates 0)": step(
                        lambda q, k, v: passes_only(q, k, v, canonicalize(q, k, v, mask=m, normalizer="entmax15"))[0],
                        *x, dout, backward),
                }, a.repeat, a.iters)}
            summarize(c, live_flops(B, H, N, D, causal_pairs, backward))
    if "weights_rows" in cases:
        m = masks.causal(align="top_left")
        req = attnkit.WeightsRequest(heads=[0, 7], rows=range(0, N, 64))
        x = tuple(t.detach() for t in (q, k, v))

        def weights_with(backend):
            return lambda q, k, v: attnkit.attention(q, k, v, mask=m, return_weights=req, backend=backend)[1]
        out["cases"]["weights_rows"] = c = {
            "what": "weights of 2 heads x every 64th row, causal softmax, no grad",
            "routed": attnkit.explain(*x, mask=m, return_weights=req).backend,
            "variants": measure({"tiled engine (forced)": step(weights_with("tiled"), *x, None, False),
                                 "attnkit auto": step(weights_with("auto"), *x, None, False)},
                                a.repeat, a.iters)}
        summarize(c, live_flops(B, H, N, D, (N / 64) * (N / 2) * (2 / H), False))  # the chosen rows' pairs
    if "additive" in cases:
        T, hidden = 4096, 128
        sc = attnkit.scores.Additive(D, D, hidden).to("cuda", dt)
        xa = inputs(B, 1, T, D, dt, True)
        da = torch.randn_like(xa[0])

        def additive_with(backend):
            return lambda q, k, v: attnkit.attention(q, k, v, score=sc, backend=backend)
        out["cases"]["additive"] = c = {
            "what": f"additive scores (hidden {hidden}), softmax, B={B}, one head, T={T}, fwd+bwd",
            "routed": attnkit.explain(*xa, score=sc).backend,
            "variants": measure({"plain formula (B, T, T, hidden)": step(additive_with("reference"), *xa, da, True),
                                 "attnkit auto": step(additive_with("auto"), *xa, da, True)}, a.repeat, a.iters)}
        summarize(c, 2 * B * T * T * hidden * 3.5)   # the tanh sums dominate: ~2 flops per pair and unit
    if "sigmoid_sweep" in cases:
        out["cases"]["sigmoid_sweep"] = {"what": "Triton sigmoid kernel settings (block_m, block_n, warps, "
                                                 "stages); fwd: forward alone; dq/dkdv: fwd+bwd",
                                         "results": _sweep(q, k, v, dout, a.iters)}
    for name, c in out["cases"].items():
        if "variants" not in c:
            continue
        names = list(c["variants"])
        base, ours = c["variants"][names[0]], c["variants"][names[1]]
        c["ratio_time"] = ours["median_s"] / base["median_s"]
        print(f"{name} ({c['what']}; routed to {c.get('routed', '-')}):")
        for n, r in c["variants"].items():
            print(f"  {n:36s} {r['median_s'] * 1e3:8.2f} ms ({r['spread_s'][0] * 1e3:.2f}-{r['spread_s'][1] * 1e3:.2f})"
                  f"  {r['tflops']:6.1f} TFLOP/s  peak +{r['peak_mib']:.0f} MiB")
        print(f"  time ratio attnkit / anchor: {c['ratio_time']:.3f}", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0
