"""The benchmark harness's arithmetic and its process isolation."""

import json
import sys

import pytest
import torch

from attnkit import masks
from attnkit.bench import attention_flops, cases, live_pairs, run_variant

from .test_report import report


def test_live_pairs_counts_exactly():
    assert live_pairs(None, 7, 5) == 35
    assert live_pairs(masks.causal(), 6, 6) == 21
    w = masks.sliding_window(3)
    assert live_pairs(w, 50, 50, block=7) == int(w.materialize(50, 50).sum())
    bs = masks.block_sparse(torch.tensor([[True, False], [True, True]]), 4)
    assert live_pairs(bs, 8, 8) == 48


def test_flops_formula():
    assert attention_flops(2, 3, 10, 4, backward=False) == 4 * 2 * 3 * 10 * 4
    assert attention_flops(1, 1, 10, 4, backward=True) == 560


def test_every_case_has_an_attnkit_variant_first_and_an_anchor_where_one_exists():
    cs = cases(quick=True)
    assert all(c.variants[0].name.startswith("attnkit") for c in cs)
    names = {c.name.split("_N")[0].split("_T")[0] for c in cs}
    assert {"window256_fwdbwd", "window256_fwd", "alibi_causal_fwdbwd", "blocksparse_fwdbwd",
            "additive_fwdbwd", "softmax_auto_fwd", "causal_fwdbwd"} <= names


def test_a_variant_runs_in_its_own_process_and_reports_time_memory_and_throughput():
    case = next(c for c in cases(quick=True) if c.name.startswith("softmax_auto_fwd"))
    r = run_variant(case, case.variants[1], threads=1, quick=True, timeout=300)
    assert r.error is None and r.seconds > 0 and r.peak_mib >= 0 and r.gflops > 0


def test_case_flops_use_each_case_s_own_sizes():
    cs = {c.name: c for c in cases(quick=True)}
    win = masks.sliding_window(256)
    assert cs["window256_fwdbwd_N4096"].flops() == attention_flops(1, 8, live_pairs(win, 4096, 4096), 64, True)
    assert cs["alibi_causal_fwdbwd_N2048"].flops() == attention_flops(1, 8, 2048 * 2049 // 2, 64, True)
    bs = cs["blocksparse_fwdbwd_N4096"]
    assert bs.variants[1].flops() == attention_flops(1, 8, 4096 * 4096, 64, True)  # the 100% variant
    assert bs.flops() < 0.2 * bs.variants[1].flops()


def test_engine_targets_script_prints_the_table_of_a_bench_json(tmp_path, capsys):
    """The table itself (medians, spreads, ratios) is tested in tests/test_report.py."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_targets.py"
    spec = importlib.util.spec_from_file_location("engine_targets", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["engine_targets"] = mod   # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("engine_targets", None)

    def r(variant, seconds):
        return dict(case="window256_fwdbwd_N16384", variant=variant, flops=1, note="", seconds=seconds,
                    peak_mib=[100.0] * len(seconds), errors=[None] * len(seconds))

    report = {"command": "attnkit bench", "date": "today", "machine": {}, "threads": 2, "repeat": 3, "quick": False,
              "matmul_gflops": [1.0], "results": [r("attnkit tiled", [1.0, 1.0, 1.0]),
                                                 r("sdpa dense mask", [30.0, 30.0, 30.0])]}
    (tmp_path / "a.json").write_text(json.dumps(report))
    assert mod.main([str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "| speed-up 30.0× (30.0–30.0, n=3) | ≥ 20× | met |" in out
    assert "| ALiBi + causal, N=8192, fwd+bwd: time | not yet measured with 3 repeats" in out


def test_bench_device_cuda_without_a_gpu_says_so(capsys):
    from attnkit.bench import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU cases would run")
    assert main(["--device", "cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["--device=tpu"]) == 2
    assert "--device must be 'cpu' or 'cuda'" in capsys.readouterr().err


def _smoke(tmp_path, *args):
    from attnkit import bench_gpu

    path = tmp_path / "gpu.json"
    rc = bench_gpu.main(["--smoke", "--json", str(path), *args])
    return rc, json.loads(path.read_text())


@pytest.mark.interpreter
def test_the_gpu_benchmark_runs_every_case_at_tiny_sizes(tmp_path):
    # the script a lent GPU's short session runs: every case (the sweep too) once on tiny shapes,
    # here on CPU with the Triton kernels under the interpreter; the figures mean nothing
    pytest.importorskip("triton")
    rc, d = _smoke(tmp_path)
    assert rc == 0 and d["smoke"] is True
    assert set(d["cases"]) == {"sdpa_route", "flex_route", "sigmoid_causal", "sigmoid_causal_fwd", "entmax_causal",
                               "entmax_causal_fwd", "weights_rows", "additive", "sigmoid_sweep", "entmax_sweep",
                               "additive_sweep"}
    sweeps = {"sigmoid_sweep": 13, "entmax_sweep": 16, "additive_sweep": 15}   # settings tried by each
    for name, c in d["cases"].items():
        assert "error" not in c, (name, c)
        if name in sweeps:
            assert len(c["results"]) == sweeps[name], name
            assert all("median_s" in r for r in c["results"].values()), c["results"]
            continue
        assert len(c["variants"]) >= 2 and c["ratio_time"] > 0
        for r in c["variants"].values():
            assert len(r["seconds"]) == d["repeat"] and r["median_s"] > 0 and r["tflops"] > 0
    assert len(d["cases"]["entmax_causal"]["variants"]) == 3   # auto, and the Triton kernel without candidates
    # a smoke run is never taken for GPU figures by the docs' generator
    assert report.gpu_block(tmp_path).startswith("Not yet measured")
    assert report.readme_gpu(tmp_path).startswith("Not yet measured")
    # the same file as a real run renders every case with its target (no peak memory on CPU: "—")
    (tmp_path / "gpu.json").write_text(json.dumps({**d, "smoke": False}))
    text = report.gpu_block(tmp_path)
    assert text.count("| attnkit 1.5-entmax (auto) |") == 2 and "| ≥ 0.35× |" in text
    assert "| plain formula (B, T, T, hidden) |" in text and "| — | ≤ 1/20 |" in text
    assert "`entmax_sweep`: Triton 1.5-entmax kernel settings" in text and "| candidates | 256 |" in text
    assert "1.5-entmax" in report.readme_gpu(tmp_path) and "additive scores take" in report.readme_gpu(tmp_path)


def test_a_failing_gpu_case_is_stored_with_its_error_and_the_others_still_run(tmp_path, monkeypatch):
    from attnkit import bench_gpu

    def out_of_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setitem(bench_gpu.CASES, "additive", out_of_memory)
    rc, d = _smoke(tmp_path, "--cases", "additive,sdpa_route")
    assert rc == 1
    assert d["cases"]["additive"] == {"error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00 GiB"}
    assert d["cases"]["sdpa_route"]["ratio_time"] > 0      # ran after the failure
    (tmp_path / "gpu.json").write_text(json.dumps({**d, "smoke": False}))
    assert "| failed: OutOfMemoryError: CUDA out of memory." in report.gpu_block(tmp_path)
    assert "Failed in that run: additive" in report.readme_gpu(tmp_path)
    assert bench_gpu.main(["--smoke", "--cases", "nope"]) == 2
