"""The tiled engine's second round: the cases to measure and how each target is judged.

``--run`` runs the ``attnkit bench`` harness on ``CASES`` (every repeat of every variant a fresh
process, round-robin) and writes every repeat's seconds and peak memory to ``--json``;
``benchmarks/report.py`` renders the table into docs/benchmarks.md.

Usage (from the repository root)::

    python benchmarks/engine_round2.py --run --threads 2 --repeat 3 --json benchmarks/results/engine_round2.json
    python benchmarks/engine_round2.py --run --threads 1 --repeat 3 --cases window256_fwdbwd window256_fwd_ \
        --json benchmarks/results/engine_round2_1thread.json                    # what the second thread buys
    python benchmarks/engine_round2.py --run --threads 2 --repeat 3 --cases sparse_causal_fwdbwd_N65536 \
        --json benchmarks/results/engine_round2_65k.json                        # N=65536 memory (~20 min: one call per repeat)
    python benchmarks/engine_round2.py benchmarks/results/engine_round2.json     # print its table again
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_targets import Target, targets_main  # noqa: E402

# the memory target at N=65536 runs on its own (several minutes a run): --cases sparse_causal_fwdbwd_N65536
EXTRA_CASES = ("sparse_causal_fwdbwd_N65536", "profile_alibi_causal_N8192")
CASES = ["window256_fwdbwd", "window256_fwd_", "alibi", "mha_weights", "sparse_causal_fwdbwd_N16384"]

W16, W8, AL = "window256_fwdbwd_N16384", "window256_fwd_N8192", "alibi_causal_fwdbwd_N8192"
MW = "mha_weights_eval_N16384"
TARGETS = [
    Target("sliding window w=256, causal, N=16384, fwd+bwd: time", "seconds", (W16, "attnkit tiled"),
           (W16, "sdpa dense mask"), "faster", "≥ 25×", lambda r: r >= 25, anchor_label="SDPA + dense mask"),
    Target("sliding window, forward only, N=8192: time", "seconds", (W8, "attnkit tiled"), (W8, "flex compiled"),
           "faster", "≥ 1× (flex's speed)", lambda r: r >= 1, anchor_label="compiled flex"),
    Target("ALiBi + causal, N=8192, fwd+bwd: time", "seconds", (AL, "attnkit tiled"),
           (AL, "sdpa is_causal, no bias"), "ratio", "≤ 1.10×", lambda r: r <= 1.10,
           anchor_label="SDPA `is_causal` without the bias"),
    Target("`nn.MultiheadAttention(need_weights=True)` (weights averaged over the heads), causal, N=16384, "
           "eval: time", "seconds", (MW, "attnkit nn.MultiheadAttention"), (MW, "torch nn.MultiheadAttention"),
           "faster", "≥ 2×", lambda r: r >= 2, anchor_label="`torch.nn.MultiheadAttention`"),
    Target("same: peak memory (the returned (1, 16384, 16384) float32 weights are 1,024 MiB)", "peak_mib",
           (MW, "attnkit nn.MultiheadAttention"), (MW, "torch nn.MultiheadAttention"), "fraction", "≤ 1/4",
           lambda r: r <= 0.25, anchor_label="`torch.nn.MultiheadAttention`"),
]


SP = "sparse_causal_fwdbwd_N16384"
for _name in ("sparsemax", "1.5-entmax"):
    TARGETS += [
        Target(f"{_name}, causal, N=16384, fwd+bwd: time", "seconds", (SP, f"attnkit tiled {_name}"),
               (SP, "attnkit tiled softmax"), "ratio", "≤ 4×", lambda r: r <= 4, anchor_label="tiled softmax"),
        Target("same: peak memory", "peak_mib", (SP, f"attnkit tiled {_name}"), (SP, "attnkit tiled softmax"),
               "ratio", "≤ 1.5×", lambda r: r <= 1.5, anchor_label="tiled softmax"),
    ]


SP64 = "sparse_causal_fwdbwd_N65536"
TARGETS_65K = []
for _name in ("sparsemax", "1.5-entmax"):
    TARGETS_65K += [
        Target(f"{_name}, causal, N=65536, fwd+bwd: time", "seconds", (SP64, f"attnkit tiled {_name}")),
        Target("same: peak memory (growth over the inputs)", "peak_mib", (SP64, f"attnkit tiled {_name}"),
               target="< 4 GiB", ok=lambda v: v < 4096),
    ]


PA = "profile_alibi_causal_N8192"
TARGETS_ALIBI_PROFILE = [
    Target("ALiBi + causal, N=8192, fwd+bwd: time", "seconds", (PA, "attnkit tiled"), (PA, "sdpa is_causal, no bias"),
           "ratio", "≤ 1.10×", lambda r: r <= 1.10, anchor_label="SDPA `is_causal` without the bias"),
    Target("the tiled engine's causal plan alone (no bias): time", "seconds", (PA, "attnkit tiled, no bias"),
           (PA, "sdpa is_causal, no bias"), "ratio", anchor_label="SDPA `is_causal`"),
    Target("the bias's share: ALiBi + causal over causal alone, both tiled", "seconds", (PA, "attnkit tiled"),
           (PA, "attnkit tiled, no bias"), "ratio", anchor_label="tiled, no bias"),
]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    big = any(a.startswith("sparse_causal_fwdbwd_N65536") for a in args) or any("65k" in a for a in args)
    profile = any(a.startswith("profile_alibi") for a in args) or any("alibi_profile" in a for a in args)
    targets = TARGETS_65K if big else TARGETS_ALIBI_PROFILE if profile else TARGETS
    return targets_main(argv, script="engine_round2.py", doc=__doc__, cases=CASES, targets=targets,
                        default_json="engine_round2.json", what="target", extra_cases=EXTRA_CASES)


if __name__ == "__main__":
    raise SystemExit(main())
