"""Benchmark harness: attnkit against the anchors (SDPA with a dense mask or bias, compiled flex,
the naive materializing version, ``nn.MultiheadAttention``), in the same run.

Each repeat of a variant is a fresh subprocess (one warm-up call, then one timed call; calls of
minutes skip the warm-up: ``Case.warm_up``), so the peak memory is that process's own: the growth of its peak resident set over its size once the
inputs exist. The repeats of a case run round-robin over its variants, so that a slow spell of
the machine hits every variant alike. ``--json`` stores every repeat's seconds and peak memory
(never only a summary), with the command line, the date and the machine; the median and the
spread are computed by whoever reads the file (``benchmarks/report.py``). GFLOP/s count only
live work (pairs the mask allows): ``4·B·H·pairs·D`` for the forward and 2.5 times that for the
backward (FlashAttention's convention). The float32 matmul ceiling is measured in the same run.

Example::

    >>> from attnkit.bench import attention_flops
    >>> attention_flops(batch=1, heads=1, pairs=10, head_dim=4, backward=False)
    160
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def attention_flops(batch: int, heads: int, pairs: int, head_dim: int, backward: bool) -> int:
    """FLOPs of exact attention over ``pairs`` live (query, key) pairs: QKᵀ and PV, ×3.5 with backward."""
    fwd = 4 * batch * heads * pairs * head_dim
    return int(fwd * 3.5) if backward else fwd


def live_pairs(mask, Tq: int, Tk: int, block: int = 1024) -> int:
    """Number of (query, key) pairs a mask allows (None: all), counted stripe by stripe."""
    if mask is None:
        return Tq * Tk
    from .masks.base import index_grid

    total = 0
    b, h, _, kv = index_grid(1, 1, Tq, Tk)
    for s in range(0, Tq, block):
        q = torch.arange(s, min(s + block, Tq)).view(1, 1, -1, 1)
        total += int(torch.as_tensor(mask.mask_mod(b, h, q, kv, Tq, Tk)).expand(1, 1, q.shape[2], Tk).sum())
    return total


def matmul_gflops(n: int = 2048, repeat: int = 5) -> list[float]:
    """Float32 GEMM throughput (GFLOP/s) of this process's threads, one value per repeat."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return [2 * n ** 3 / _timed(lambda: a @ b) / 1e9 for _ in range(repeat)]


def matmul_ceiling(n: int = 2048, repeat: int = 5) -> float:
    """Best float32 GEMM throughput (GFLOP/s) of this process's threads."""
    return max(matmul_gflops(n, repeat))


def machine(threads: int | None = None) -> dict:
    """What a stored result needs to be judged: CPU model, cores, threads used, versions, load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads if threads is not None else torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def header(command: str, threads: int | None = None) -> dict:
    """The head of a results file, taken as the run starts: the command line, the date, the machine."""
    return {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(threads)}


def write_json(path: str, head: dict, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**head, **report}, f, indent=2, ensure_ascii=False)
        f.write("\n")


def command_line(prog: str, argv: list[str]) -> str:
    return " ".join([prog, shlex.join(argv)]) if argv else prog


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> None:
    """Restart the process's peak-RSS counter (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_bytes() -> int:
    """Peak resident set since :func:`_reset_peak`: ``VmHWM`` of ``/proc/self/status``. Not
    ``getrusage``'s ``ru_maxrss``, which a spawned child inherits from its parent across
    ``exec`` (every small variant then reported the parent's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Result:
    case: str
    variant: str
    seconds: float | None
    peak_mib: float | None
    gflops: float | None
    error: str | None = None
    note: str = ""


@dataclass
class Variant:
    """One implementation of a case: ``setup() -> (fn, note)``; ``fn()`` runs it once. ``flops``
    overrides the case's count when this variant does different work (e.g. another density)."""

    name: str
    setup: Callable[[], tuple[Callable[[], object], str]]
    flops: Callable[[], int] | None = None


@dataclass
class Case:
    name: str
    description: str
    flops: Callable[[], int]
    variants: list[Variant] = field(default_factory=list)
    #: run only when asked for by name (cases that need an extra, e.g. transformers)
    explicit: bool = False
    #: call once untimed before the timed call (compiles flex, fills caches); off for calls of
    #: minutes, where that first-call cost is nothing and a warm-up would double the run
    warm_up: bool = True


def _child(conn, case_name: str, variant_name: str, threads: int, quick: bool) -> None:
    try:
        torch.set_num_threads(threads)
        case = {c.name: c for c in cases(quick)}[case_name]
        variant = {v.name: v for v in case.variants}[variant_name]
        fn, note = variant.setup()
        base = _rss_bytes()
        _reset_peak()
        if case.warm_up:
            fn()  # warm-up (compiles flex, fills caches)
        seconds = _timed(fn)
        conn.send((seconds, max(0, _peak_bytes() - base), note, None))
    except BaseException as e:  # noqa: BLE001 - report any failure (OOM, unsupported) as a result
        conn.send((None, None, "", f"{type(e).__name__}: {e}"[:300]))
    finally:
        conn.close()


def run_variant(case: Case, variant: Variant, *, threads: int, quick: bool, timeout: float = 1800,
                flops: int | None = None) -> Result:
    """One repeat: a fresh process runs the variant once to warm up, then once timed."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, case.name, variant.name, threads, quick))
    p.start()
    child.close()
    seconds = peak = None
    note, error = "", None
    if parent.poll(timeout):
        try:
            seconds, peak, note, error = parent.recv()
        except EOFError:
            error = "the process died (out of memory?)"
    else:
        error = f"timed out after {timeout:.0f}s"
        p.kill()
    p.join()
    if error is None and p.exitcode not in (0, None):
        error = f"exit code {p.exitcode}"
    flops = (variant.flops or case.flops)() if flops is None and seconds else flops
    gflops = flops / seconds / 1e9 if seconds else None
    return Result(case.name, variant.name, seconds, None if peak is None else peak / 2 ** 20, gflops, error, note)


# -- the cases --------------------------------------------------------------------------------------

def _qkv(B, H, T, D, grad, Hkv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v


def _runner(call, qkv, grad):
    def fn():
        if grad:
            out = call(*qkv)
            out.backward(torch.ones_like(out))
            for x in qkv:
                x.grad = None
        else:
            with torch.no_grad():
                call(*qkv)
    return fn


def _attnkit(backend, grad, B, H, T, D, **kw):
    import attnkit

    def setup():
        qkv = _qkv(B, H, T, D, grad)
        return _runner(lambda q, k, v: attnkit.attention(q, k, v, backend=backend, **kw), qkv, grad), ""
    return setup


def _sdpa_dense(grad, B, H, T, D, mask=None, bias=None, is_causal=False):
    import torch.nn.functional as F

    def setup():
        qkv = _qkv(B, H, T, D, grad)
        built: dict[str, torch.Tensor | None] = {}

        def attn_mask():
            # built by the first (warm-up) call and then held, so the dense tensor, which this
            # approach needs, counts in its peak memory (setup happens before the baseline)
            if "mask" not in built:
                m = None if mask is None else mask.materialize(T, T)[0, 0]
                if bias is not None:
                    b = bias.materialize_bias(T, T, 1, H)
                    m = b if m is None else b.masked_fill_(~m, float("-inf"))
                built["mask"] = m
            return built["mask"]

        return _runner(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask(),
                                                                        is_causal=is_causal), qkv, grad), \
            ("dense mask" if mask is not None or bias is not None else "")
    return setup


def _naive(grad, B, H, T, D, mask=None, score=None):
    import attnkit

    def setup():
        qkv = _qkv(B, H, T, D, grad)
        return _runner(lambda q, k, v: attnkit.attention(q, k, v, backend="reference", mask=mask,
                                                         score=score if score is not None else "scaled_dot"),
                       qkv, grad), "materializes (B,H,T,T)"
    return setup


def _additive_naive(grad, B, T, d):
    def setup():
        import attnkit

        torch.manual_seed(0)
        score = attnkit.scores.Additive(d, d, d)
        qkv = _qkv(B, 1, T, d, grad)
        return _runner(lambda q, k, v: attnkit.attention(q, k, v, score=score, backend="reference"), qkv, grad), \
            "materializes (B,T,T,d)"
    return setup


def _additive_tiled(grad, B, T, d):
    def setup():
        import attnkit

        torch.manual_seed(0)
        score = attnkit.scores.Additive(d, d, d)
        qkv = _qkv(B, 1, T, d, grad)
        return _runner(lambda q, k, v: attnkit.attention(q, k, v, score=score, backend="tiled"), qkv, grad), ""
    return setup


def _flex(B, H, T, D, mask):
    def setup():
        import warnings

        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        warnings.simplefilter("ignore")
        qkv = _qkv(B, H, T, D, False)
        bm = create_block_mask(mask.bind(T, T), None, None, T, T, device="cpu")
        f = torch.compile(flex_attention, dynamic=False)
        return _runner(lambda q, k, v: f(q, k, v, block_mask=bm), qkv, False), "compiled, forward only"
    return setup


def _mha(grad, B, H, T, D, need_weights=False):
    def setup():
        E = H * D
        mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
        x = torch.randn(B, T, E, requires_grad=grad)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)

        def fn():
            if grad:
                out = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
                out.sum().backward()
            else:
                with torch.no_grad():
                    mha.eval()(x, x, x, attn_mask=mask, need_weights=need_weights)
        return fn, "with projections" + (", head-averaged weights returned" if need_weights else "")
    return setup


def cases(quick: bool = False) -> list[Case]:
    """The issue's targets as cases (``quick`` shrinks every size by 4x for a smoke run)."""
    from . import masks, positions

    s = 4 if quick else 1
    B, H, D = 1, 8, 64
    out = []

    N, w = 16384 // s, 256
    win = masks.sliding_window(w)
    out.append(Case(f"window{w}_fwdbwd_N{N}", f"sliding window w={w}, causal, N={N}, forward+backward",
                    lambda N=N: attention_flops(B, H, live_pairs(win, N, N), D, True), [
                        Variant("attnkit tiled", _attnkit("tiled", True, B, H, N, D, mask=win)),
                        Variant("sdpa dense mask", _sdpa_dense(True, B, H, N, D, mask=win)),
                        Variant("sdpa no mask", _sdpa_dense(True, B, H, N, D)),
                    ]))
    N = 8192 // s
    out.append(Case(f"window{w}_fwd_N{N}", f"sliding window w={w}, causal, N={N}, forward only",
                    lambda N=N: attention_flops(B, H, live_pairs(win, N, N), D, False), [
                        Variant("attnkit tiled", _attnkit("tiled", False, B, H, N, D, mask=win)),
                        Variant("flex compiled", _flex(B, H, N, D, win)),
                        Variant("sdpa dense mask", _sdpa_dense(False, B, H, N, D, mask=win)),
                    ]))
    for N in (16384 // s, 65536 // s):
        out.append(Case(f"window{w}_scaling_N{N}", f"sliding window w={w} cost is linear in N: N={N}",
                        lambda N=N: attention_flops(B, H, live_pairs(win, N, N), D, True), [
                            Variant("attnkit tiled", _attnkit("tiled", True, B, H, N, D, mask=win))]))
    N = 8192 // s
    alibi, causal = positions.ALiBi(H), masks.causal()
    out.append(Case(f"alibi_causal_fwdbwd_N{N}", f"ALiBi + causal, N={N}, forward+backward",
                    lambda N=N: attention_flops(B, H, N * (N + 1) // 2, D, True), [
                        Variant("attnkit tiled", _attnkit("tiled", True, B, H, N, D, mask=causal, bias=alibi)),
                        Variant("sdpa dense bias", _sdpa_dense(True, B, H, N, D, mask=causal, bias=alibi)),
                        # the profile of the miss: torch's own causal kernel, which skips the upper
                        # triangle as the tiled engine does, without the bias
                        Variant("sdpa is_causal, no bias", _sdpa_dense(True, B, H, N, D, is_causal=True)),
                    ]))
    # where the ALiBi target's time goes: the tiled causal plan with and without the bias, against
    # torch's causal kernel (benchmarks/engine_round2.py --cases profile_alibi)
    out.append(Case(f"profile_alibi_causal_N{N}", f"ALiBi + causal, N={N}, fwd+bwd: the tiled engine with and "
                    "without the bias against torch's causal kernel",
                    lambda N=N: attention_flops(B, H, N * (N + 1) // 2, D, True), [
                        Variant("attnkit tiled", _attnkit("tiled", True, B, H, N, D, mask=causal, bias=alibi)),
                        Variant("attnkit tiled, no bias", _attnkit("tiled", True, B, H, N, D, mask=causal)),
                        Variant("sdpa is_causal, no bias", _sdpa_dense(True, B, H, N, D, is_causal=True)),
                    ]))
    N, bs = 16384 // s, 128
    nb = N // bs
    g = torch.Generator().manual_seed(0)
    layout10 = torch.rand(nb, nb, generator=g) < 0.1
    layout10 |= torch.eye(nb, dtype=torch.bool)
    sparse10 = masks.block_sparse(layout10, bs)
    dense = masks.block_sparse(torch.ones(nb, nb, dtype=torch.bool), bs)
    density = layout10.float().mean().item()
    out.append(Case(f"blocksparse_fwdbwd_N{N}", f"block sparse ({density:.0%} vs 100% of {bs}-blocks), N={N}",
                    lambda: attention_flops(B, H, int(layout10.sum()) * bs * bs, D, True), [
                        Variant("attnkit tiled 10%", _attnkit("tiled", True, B, H, N, D, mask=sparse10)),
                        Variant("attnkit tiled 100%", _attnkit("tiled", True, B, H, N, D, mask=dense),
                                flops=lambda N=N: attention_flops(B, H, N * N, D, True)),
                    ]))
    for T in (1024 // s, 4096 // s):
        variants = [Variant("attnkit tiled", _additive_tiled(True, 4, T, 128))]
        if T <= 1024 // s:
            variants.append(Variant("naive (B,T,T,d)", _additive_naive(True, 4, T, 128)))
        out.append(Case(f"additive_fwdbwd_T{T}", f"additive attention B=4 d=128 T={T}, forward+backward",
                        lambda T=T: 4 * T * T * 128 * 4, variants))
    N = 4096 // s
    out.append(Case(f"softmax_auto_fwd_N{N}", f"plain softmax, N={N}, forward: auto vs calling SDPA",
                    lambda N=N: attention_flops(B, H, N * N, D, False), [
                        Variant("attnkit auto", _attnkit("auto", False, B, H, N, D)),
                        Variant("sdpa direct", _sdpa_dense(False, B, H, N, D)),
                    ]))
    N = 65536 // s
    out.append(Case(f"causal_fwdbwd_N{N}", f"exact causal attention, N={N}, forward+backward",
                    lambda N=N: attention_flops(B, H, N * (N + 1) // 2, D, True), [
                        Variant("attnkit tiled", _attnkit("tiled", True, B, H, N, D, mask=causal))]))
    N = 2048 // s
    out.append(Case(f"mha_causal_fwdbwd_N{N}", f"causal self-attention module, N={N}, E=512, forward+backward",
                    lambda N=N: attention_flops(B, H, N * (N + 1) // 2, D, True), [
                        Variant("attnkit nn.MultiheadAttention", _attnkit_mha(True, B, H, N, D)),
                        Variant("torch nn.MultiheadAttention", _mha(True, B, H, N, D)),
                    ]))
    for N in (16384 // s, 65536 // s):
        variants = [Variant("attnkit tiled sparsemax", _attnkit("tiled", True, B, H, N, D, mask=causal,
                                                                normalizer="sparsemax")),
                    Variant("attnkit tiled 1.5-entmax", _attnkit("tiled", True, B, H, N, D, mask=causal,
                                                                 normalizer="entmax15"))]
        if N <= 16384 // s:  # the anchor: tiled softmax on the same work
            variants.append(Variant("attnkit tiled softmax", _attnkit("tiled", True, B, H, N, D, mask=causal)))
        out.append(Case(f"sparse_causal_fwdbwd_N{N}", f"sparsemax and 1.5-entmax, causal, N={N}, forward+backward "
                        "(no other library tiles them)", lambda N=N: attention_flops(B, H, N * (N + 1) // 2, D, True),
                        variants, warm_up=N <= 16384 // s))
    N = 16384 // s
    out.append(Case(f"mha_weights_eval_N{N}", f"causal self-attention module with need_weights=True (torch's "
                    f"default: weights averaged over the heads), N={N}, E=512, eval, no grad",
                    lambda N=N: attention_flops(B, H, N * (N + 1) // 2, D, False), [
                        Variant("attnkit nn.MultiheadAttention", _attnkit_mha(False, B, H, N, D, True)),
                        Variant("torch nn.MultiheadAttention", _mha(False, B, H, N, D, True)),
                    ]))
    return out + _hf_cases(s)


# -- Hugging Face models (the [hf] extra; run only when named: attnkit bench hf_) --------------------

def _hf_model(N: int, impl: str, window: int | None):
    """A tiny Mistral (2 layers, 8 heads, 2 KV heads, head dim 64, random weights) on ``impl``."""
    import transformers

    import attnkit.integrations.hf  # noqa: F401 -- registers "attnkit"

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=window,
                                     max_position_embeddings=N + 1)
    model = transformers.MistralForCausalLM(cfg)
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 256, (1, N), generator=torch.Generator().manual_seed(1))
    return model, ids


def _hf(impl: str, N: int, window: int | None, grad: bool, weights: bool = False, capture: bool = False):
    def setup():
        model, ids = _hf_model(N, impl, window)
        model.train(grad)

        def fn():
            if grad:
                model(ids).logits.float().square().mean().backward()
                for p in model.parameters():
                    p.grad = None
                return
            with torch.no_grad():
                if capture:
                    import attnkit

                    with attnkit.capture(heads=[0], rows=range(0, N, 64)):
                        model(ids)
                else:
                    model(ids, output_attentions=weights)
        note = ""
        if weights:
            note = f"returned weights: {2 * 8 * N * N * 4 / 2 ** 20:.0f} MiB"
        elif capture:
            note = f"captured: {2 * 1 * (N // 64) * N * 4 / 2 ** 20:.1f} MiB"
        return fn, note
    return setup


def _hf_cases(s: int) -> list[Case]:
    out = []
    L, H, D = 2, 8, 64
    N = 16384 // s
    win = 256
    out.append(Case(f"hf_window_fwdbwd_N{N}", f"tiny Mistral (2 layers, 8 heads, 2 KV heads, window {win}), N={N}, "
                    "forward+backward", lambda N=N: L * attention_flops(1, H, N * win, D, True), [
                        Variant("attnkit", _hf("attnkit", N, win, True)),
                        Variant("sdpa", _hf("sdpa", N, win, True))], explicit=True))
    N = 4096 // s
    out.append(Case(f"hf_window_fwd_N{N}", f"the same model, N={N}, forward",
                    lambda N=N: L * attention_flops(1, H, N * win, D, False), [
                        Variant("attnkit", _hf("attnkit", N, win, False)),
                        Variant("sdpa", _hf("sdpa", N, win, False))], explicit=True))
    out.append(Case(f"hf_causal_fwd_N{N}", f"the same model with full causal attention, N={N}, forward",
                    lambda N=N: L * attention_flops(1, H, N * (N + 1) // 2, D, False), [
                        Variant("attnkit", _hf("attnkit", N, None, False)),
                        Variant("sdpa", _hf("sdpa", N, None, False))], explicit=True))
    N = 8192 // s
    out.append(Case(f"hf_weights_N{N}", f"output_attentions=True, full causal, N={N}, forward under no_grad",
                    lambda N=N: L * attention_flops(1, H, N * (N + 1) // 2, D, False), [
                        Variant("attnkit output_attentions", _hf("attnkit", N, None, False, weights=True)),
                        Variant("eager output_attentions", _hf("eager", N, None, False, weights=True)),
                        Variant("attnkit capture head 0, every 64th row", _hf("attnkit", N, None, False,
                                                                               capture=True))], explicit=True))
    return out


def _attnkit_mha(grad, B, H, T, D, need_weights=False):
    def setup():
        import attnkit

        E = H * D
        mha = attnkit.nn.MultiheadAttention(E, H, batch_first=True)
        x = torch.randn(B, T, E, requires_grad=grad)

        def fn():
            if grad:
                out = mha(x, is_causal=True, need_weights=False)[0]
                out.sum().backward()
            else:
                with torch.no_grad():
                    mha.eval()(x, is_causal=True, need_weights=need_weights)
        return fn, "with projections" + (", head-averaged weights returned" if need_weights else "")
    return setup


def _spread(values: list[float | None], fmt: str) -> str:
    ok = [v for v in values if v is not None]
    if not ok:
        return "—"
    return f"{statistics.median(ok):{fmt}} ({min(ok):{fmt}}–{max(ok):{fmt}}, n={len(ok)})"


def run(selected: list[str] | None = None, *, threads: int = 2, repeat: int = 3, quick: bool = False,
        log: Callable[[str], None] = print) -> dict:
    """Run the cases whose names start with one of ``selected`` (all when None), ``repeat`` fresh
    processes per variant; return every repeat's figures (lists, one entry per repeat)."""
    torch.set_num_threads(threads)
    gemm = matmul_gflops()
    log(f"machine: {torch.get_num_threads()} threads, float32 matmul {_spread(gemm, '.0f')} GFLOP/s, "
        f"torch {torch.__version__}; {repeat} repeats per variant")
    records = []
    for case in cases(quick):
        if selected and not any(case.name.startswith(s) for s in selected):
            continue
        if case.explicit and not selected:
            continue
        log(f"\n{case.name}: {case.description}")
        rows = [{"case": case.name, "variant": v.name, "flops": (v.flops or case.flops)(), "note": "",
                 "seconds": [], "peak_mib": [], "errors": []} for v in case.variants]
        for i in range(repeat):  # round-robin: repeat i of every variant before repeat i + 1
            for v, row in zip(case.variants, rows):
                r = run_variant(case, v, threads=threads, quick=quick, flops=row["flops"])
                row["seconds"].append(r.seconds)
                row["peak_mib"].append(r.peak_mib)
                row["errors"].append(r.error)
                row["note"] = r.note or row["note"]
                log(f"  [{i + 1}/{repeat}] {v.name:<30} " + (f"failed: {r.error}" if r.error else
                    f"{r.seconds:9.3f} s  peak +{r.peak_mib:8.1f} MiB"))
        for row in rows:
            ok = [t for t in row["seconds"] if t is not None]
            gf = f"{row['flops'] / statistics.median(ok) / 1e9:7.1f} GFLOP/s" if ok else ""
            log(f"  {row['variant']:<30} {_spread(row['seconds'], '.3f')} s  {gf}  "
                f"peak +{_spread(row['peak_mib'], '.0f')} MiB  {row['note']}")
        records.extend(rows)
    return {"threads": threads, "repeat": repeat, "quick": quick, "matmul_gflops": gemm, "results": records}


def main(argv: list[str] | None = None) -> int:
    import argparse

    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--device" in args_in or any(a.startswith("--device=") for a in args_in):
        i = next(i for i, a in enumerate(args_in) if a.startswith("--device"))
        dev = args_in[i].split("=", 1)[1] if "=" in args_in[i] else (args_in[i + 1] if i + 1 < len(args_in) else "")
        if dev == "cuda":
            from .bench_gpu import main as gpu_main  # the GPU cases: routes against their kernels

            return gpu_main(args_in)
        if dev != "cpu":
            print(f"attnkit bench: --device must be 'cpu' or 'cuda'; got {dev!r}", file=sys.stderr)
            return 2
        del args_in[i:i + (1 if "=" in args_in[i] else 2)]
        argv = args_in
    p = argparse.ArgumentParser(prog="attnkit bench", description=__doc__.split("\n\n")[0],
                                epilog="attnkit bench --device cuda runs the GPU cases (attnkit.bench_gpu)")
    p.add_argument("cases", nargs="*", help="case name prefixes (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per variant (default 3)")
    p.add_argument("--quick", action="store_true", help="every size divided by 4 (smoke run)")
    p.add_argument("--json", default=None, help="also write every repeat's figures to this JSON file")
    args = p.parse_args(argv)
    if args.list:
        for c in cases(args.quick):
            print(f"{c.name:<28} {c.description}")
        return 0
    head = header(command_line("attnkit bench", list(sys.argv[1:] if argv is None else argv)), args.threads)
    report = run(args.cases or None, threads=args.threads, repeat=args.repeat, quick=args.quick)
    if args.json:
        write_json(args.json, head, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
