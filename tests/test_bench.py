"""The benchmark harness's arithmetic and its process isolation."""

import torch

from attnkit import masks
from attnkit.bench import attention_flops, cases, live_pairs, run_variant


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
    r = run_variant(case, case.variants[1], threads=1, repeat=1, quick=True, timeout=300)
    assert r.error is None and r.seconds > 0 and r.peak_mib >= 0 and r.gflops > 0


def test_case_flops_use_each_case_s_own_sizes():
    cs = {c.name: c for c in cases(quick=True)}
    win = masks.sliding_window(256)
    assert cs["window256_fwdbwd_N4096"].flops() == attention_flops(1, 8, live_pairs(win, 4096, 4096), 64, True)
    assert cs["alibi_causal_fwdbwd_N2048"].flops() == attention_flops(1, 8, 2048 * 2049 // 2, 64, True)
    bs = cs["blocksparse_fwdbwd_N4096"]
    assert bs.variants[1].flops() == attention_flops(1, 8, 4096 * 4096, 64, True)  # the 100% variant
    assert bs.flops() < 0.2 * bs.variants[1].flops()


def test_engine_targets_script_reads_bench_json(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_targets.py"
    spec = importlib.util.spec_from_file_location("engine_targets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def r(case, variant, seconds, peak=100.0):
        return dict(case=case, variant=variant, seconds=seconds, peak_mib=peak, gflops=1.0, error=None, note="")

    first = {"results": [r("window256_fwdbwd_N16384", "attnkit tiled", 1.0), r("window256_fwdbwd_N16384", "sdpa dense mask", 30.0),
                         r("window256_fwdbwd_N16384", "sdpa no mask", 20.0, 90.0),
                         r("alibi_causal_fwdbwd_N8192", "attnkit tiled", 4.0, 200.0),
                         r("alibi_causal_fwdbwd_N8192", "sdpa dense bias", 6.0, 4000.0),
                         r("window256_scaling_N16384", "attnkit tiled", 1.0), r("window256_scaling_N65536", "attnkit tiled", 5.0)]}
    later = {"results": [r("window256_fwdbwd_N16384", "attnkit tiled", 1.2)]}  # overrides the first file's row
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(later))
    assert mod.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| 1.200 s | SDPA dense mask 30.0 s | 25.0× faster | ≥ 20× | met |" in out
    assert "| +100 MiB | SDPA no mask +90 MiB | 1.11× | ≤ 1.5× | met |" in out
    assert "| 1.50× faster | ≥ 3× | **missed** |" in out and "| 1/20.0 | ≤ 1/4 | met |" in out
    assert "| 5.00 s / 1.000 s | — | 5.00 | ≤ 4.5 | **missed** |" in out
    assert "block sparse" not in out  # no data, no row
