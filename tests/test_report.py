"""benchmarks/report.py: the docs' figures are generated from benchmarks/results/, never typed.

``--check`` on the repository fails CI when a generated table disagrees with the JSON files (a
hand-edited number) or when a measured-looking figure is typed into the prose; the arithmetic
(median, min–max, ratios repeat by repeat, met / missed) is checked on tiny synthetic files.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("attnkit_benchmarks_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _report()


def _engine(series, threads=2):
    """A bench file: ``series[(case, variant)] = (seconds, peak_mib)`` lists, one entry per repeat."""
    results = [{"case": c, "variant": v, "flops": 1, "note": "", "seconds": s, "peak_mib": m,
                "errors": [None] * len(s)} for (c, v), (s, m) in series.items()]
    return {"command": "python benchmarks/engine_targets.py --run", "date": "2026-01-01 00:00:00",
            "machine": {"cpu": "Test CPU", "cores": 2, "threads": threads, "torch": "2.x", "loadavg": [0.1, 0.1, 0.1]},
            "threads": threads, "repeat": 3, "quick": False, "matmul_gflops": [100.0, 110.0, 90.0], "results": results}


def test_median_and_spread_of_the_repeats():
    assert report.measured([3.0, 1.0, 2.0], "s") == "2.00 s (1.00–3.00, n=3)"
    assert report.measured([0.5, None, 0.25, 0.125], "s") == "0.250 s (0.125–0.500, n=3)"  # a failed repeat is skipped
    assert report.measured([200.0, 240.0, 260.0, 250.0], "MiB", "+") == "+245 MiB (200–260, n=4)"
    assert report.measured([1.0, 2.0], "s") is None  # fewer than 3 repeats: no figure
    assert report.measured(None) is None


def test_engine_rows_take_ratios_repeat_by_repeat_and_say_when_repeats_disagree():
    w, a = "window256_fwdbwd_N16384", "alibi_causal_fwdbwd_N8192"
    data = _engine({
        (w, "attnkit tiled"): ([1.0, 1.2, 0.8], [100.0, 110.0, 90.0]),
        (w, "sdpa dense mask"): ([30.0, 24.0, 20.0], [1500.0] * 3),  # ratios 30, 20, 25
        (w, "sdpa no mask"): ([20.0] * 3, [100.0, 100.0, 100.0]),
        (a, "attnkit tiled"): ([1.0, 1.0, 1.0], [100.0, 100.0, 100.0]),
        (a, "sdpa dense bias"): ([2.0, 4.0, 3.5], [2000.0, 2500.0, 3000.0]),  # ratios 2, 4, 3.5
        ("softmax_auto_fwd_N4096", "attnkit auto"): ([0.2, 0.2], [1.0, 1.0]),  # only 2 repeats
        ("softmax_auto_fwd_N4096", "sdpa direct"): ([0.2, 0.2], [1.0, 1.0]),
    })
    table = report.engine_table(data, "CMD", "engine_2threads.json")
    assert "Command: `CMD` → `benchmarks/results/engine_2threads.json`; run 2026-01-01 00:00:00 on Test CPU" in table
    assert "Float32 matmul in the same run: 100 GFLOP/s (90–110, n=3)." in table
    assert ("| 1.00 s (0.800–1.20, n=3) | SDPA + dense mask 24.0 s (20.0–30.0, n=3) | speed-up 25.0× (20.0–30.0, n=3)"
            " | ≥ 20× | met |") in table
    assert "| +100 MiB (90–110, n=3) | SDPA without mask +100 MiB (100–100, n=3) | 1.00 (0.900–1.10, n=3) | ≤ 1.5× | met |" in table
    assert "| speed-up 3.50× (2.00–4.00, n=3) | ≥ 3× | met (2 of 3 repeats meet it) |" in table
    assert "| 1/25 (1/20–1/30, n=3) | ≤ 1/4 | met |" in table
    softmax = next(line for line in table.splitlines() if line.startswith("| plain softmax"))
    assert "not yet measured with 3 repeats — run: the command above" in softmax and "s (" not in softmax
    missing = report.engine_table(None, "CMD", "engine_2threads.json")
    assert missing.startswith("Not yet measured with 3 repeats — run: `CMD`") and " s (" not in missing


def _tree(tmp_path: Path) -> Path:
    """A copy of the files report.py reads and writes."""
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs" / "benchmarks.md")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def test_check_passes_on_the_repository():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_hand_edited_number_or_a_typed_figure_fails_the_check(tmp_path, capsys):
    root = _tree(tmp_path)
    args = ["--check", "--root", str(root)]
    assert report.main(args) == 0
    docs = root / "docs" / "benchmarks.md"
    text = docs.read_text(encoding="utf-8")
    assert "**BLEU 36.04**" in text  # read from multi30k_transformer.json
    docs.write_text(text.replace("**BLEU 36.04**", "**BLEU 37.04**"), encoding="utf-8")
    assert report.main(args) == 1
    assert "stale generated blocks multi30k-transformer" in capsys.readouterr().err
    assert report.main(["--root", str(root)]) == 0  # rewriting restores the figure from the JSON
    assert docs.read_text(encoding="utf-8") == text
    docs.write_text(text.replace("## Models and tasks (issue #3)\n",
                                 "## Models and tasks (issue #3)\n\nThe demo takes 155 s.\n"), encoding="utf-8")
    assert report.main(args) == 1
    assert "typed figure '155 s'" in capsys.readouterr().err
    readme = root / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8") + "\n## Elsewhere\n\nThe tests take 3 min.\n", encoding="utf-8")
    docs.write_text(text, encoding="utf-8")
    assert report.main(args) == 0  # README sections this script does not own are not policed


def test_repeated_results_fill_every_table_and_smoke_runs_are_ignored(tmp_path):
    root = _tree(tmp_path)
    res = root / "benchmarks" / "results"
    w = "window256_fwd_N8192"
    (res / "engine_2threads.json").write_text(json.dumps(_engine({
        (w, "attnkit tiled"): ([0.10, 0.11, 0.12], [40.0] * 3), (w, "flex compiled"): ([0.07, 0.06, 0.13], [60.0] * 3)})))
    head = {"command": "c", "date": "d", "machine": {"cpu": "x", "cores": 2, "threads": 1, "torch": "t"}}
    runs = [{"forward_s": 20.0, "total_s": t, "peak_gib": p, "growth_gib": 1.0} for t, p in ((130, 1.5), (120, 1.6), (140, 1.4))]
    (res / "causal_64k.json").write_text(json.dumps({**head, "n": 65536, "threads": 2, "repeat": 3, "runs": runs}))
    demo = [{"run": "demo", "command": "python -m attnkit demo", "split": "test (2000 examples)",
             "test_exact_match_percent": acc, "wall_seconds": wall, "epochs": ep, "load_before": [0.1, 0, 0]}
            for acc, wall, ep in ((100.0, 155.0, 16), (99.9, 158.0, 15), (100.0, 152.0, 16))]
    (res / "demo_quality.json").write_text(json.dumps({**head, "threads": 1, "repeat": 3, "max_seconds": 150,
                                                       "epochs": 10, "runs": demo}))
    assert report.main(["--root", str(root)]) == 0
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "demo 100.0% (99.9–100.0, n=3) test exact match in 155 s (152–158, n=3) wall time" in readme
    assert "| speed-up 0.700× (0.545–1.08, n=3) | ≥ 1× (flex's speed) | **missed** (1 of 3 repeats meet it) |" in readme
    assert "| 130 s (120–140, n=3) | 20.0 s (20.0–20.0, n=3) | 1.50 GiB (1.40–1.60, n=3) |" in readme
    assert report.main(["--check", "--root", str(root)]) == 0
    # a smoke run (other sizes) in the results folder is not taken for the real one
    (res / "causal_64k.json").write_text(json.dumps({**head, "n": 2048, "threads": 2, "repeat": 3, "runs": runs}))
    assert report.main(["--check", "--root", str(root)]) == 1
    assert report.main(["--root", str(root)]) == 0
    assert "1.50 GiB" not in (root / "README.md").read_text(encoding="utf-8")


def _gpu_file(tmp_path, sdpa=(1.0, 1.02), flex=(1.0, 1.10), sig=(10.0, 11.0)):
    def case(a, b, names):
        return {"what": "w", "variants": {n: {"seconds": [t] * 3, "median_s": t, "spread_s": [t, t],
                                              "tflops": 1.0 / t, "peak_mib": 100.0}
                                          for n, t in zip(names, (a, b))}}
    d = {"machine": "GPU X", "torch": "2.x", "triton": "3.x", "date": "2026-01-01", "repeat": 3, "iters": 10,
         "command": "attnkit bench --device cuda", "shape": {"B": 1, "H": 2, "N": 64, "D": 8, "dtype": "bfloat16"},
         "cases": {"sdpa_route": case(*sdpa, ["SDPA", "attnkit"]), "flex_route": case(*flex, ["flex", "attnkit"]),
                   "sigmoid_causal": case(*sig, ["flash", "sigmoid"]),
                   "sigmoid_causal_fwd": case(*sig, ["flash", "sigmoid"])}}
    (tmp_path / "gpu.json").write_text(json.dumps(d))
    return tmp_path


def _verdicts(text):
    """The verdict column of each case's attnkit row (the row after the case's first row)."""
    lines = text.splitlines()
    return [lines[i + 1].rstrip(" |").rsplit("|", 1)[-1].strip() for i, line in enumerate(lines)
            if line.startswith("| ") and not line.startswith("|  |") and "|---" not in lines[i]
            and i + 1 < len(lines) and lines[i + 1].startswith("|  |")]


def test_gpu_block_judges_each_route_against_its_target(tmp_path):
    # time ratios 1.02 (<= 1.03: met) and 1.10 (> 1.05: missed); TFLOP/s ratio 10/14 = 0.71 (< 0.80)
    text = report.gpu_block(_gpu_file(tmp_path, sig=(10.0, 14.0)))
    assert "1.020×" in text and "1.100×" in text and "0.714×" in text
    assert _verdicts(text)[:3] == ["met", "**missed**", "**missed**"]   # the forward-only row has no target
    # 10/12 = 0.83 of flash's TFLOP/s meets >= 0.80
    assert _verdicts(report.gpu_block(_gpu_file(tmp_path, sig=(10.0, 12.0))))[2] == "met"


def test_gpu_block_says_how_to_measure_when_nothing_is_stored(tmp_path):
    assert "attnkit" in report.gpu_block(tmp_path) or "gpu.py" in report.gpu_block(tmp_path)


def test_the_second_thread_table_pairs_one_machine_only():
    series = {("window", "attnkit tiled"): ([2.0, 2.0, 2.0], [1, 1, 1])}
    one, two = _engine(series, threads=1), _engine({k: ([1.0, 1.0, 1.0], m) for k, (s, m) in series.items()})
    for d, cpu in ((one, "CPU A"), (two, "CPU A")):
        d["machine"] = {"cpu": cpu}
    one["matmul_gflops"], two["matmul_gflops"] = [100.0] * 3, [190.0] * 3
    table = report.threads_table(one, two)
    assert "| window | attnkit tiled | 2.00 s" in table and "2.00× (2.00–2.00, n=9)" in table
    assert "1.90× (1.90–1.90, n=9)" in table  # the machine's own GEMM scaling
    one["date"], two["date"] = "2026-12-04 10:00:00", "2026-12-04 10:40:00"
    assert "not of one sitting" not in report.threads_table(one, two)
    two["date"] = "2026-12-04 13:05:00"  # hours apart: said, with both dates
    assert "2026-12-04 10:00:00 and 2026-12-04 13:05:00" in report.threads_table(one, two)
    two["machine"] = {"cpu": "CPU B"}
    assert "no speed-up across two machines" in report.threads_table(one, two)
