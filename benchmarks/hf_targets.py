"""Hugging Face models on attnkit: the targets to measure and how each is judged.

A tiny Mistral-like model (2 layers, 8 heads, 2 KV heads, head dim 64, random weights, built from
a config) runs with ``attn_implementation="attnkit"`` and with transformers' own ``"sdpa"`` /
``"eager"`` in the same run. ``--run`` runs the ``attnkit bench`` harness on the ``hf_`` cases (every
repeat of every variant a fresh process, round-robin) and writes every repeat's seconds and peak
memory to ``--json``; ``benchmarks/report.py`` renders the table into docs/benchmarks.md.

Usage (from the repository root; needs ``pip install -e ".[hf]"``)::

    python benchmarks/hf_targets.py --run --threads 2 --repeat 3 --json benchmarks/results/hf_2threads.json
    python benchmarks/hf_targets.py benchmarks/results/hf_2threads.json     # print its table again
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_targets import Target, targets_main  # noqa: E402

CASES = ["hf_"]

WFB, WF, CF, WT = "hf_window_fwdbwd_N16384", "hf_window_fwd_N4096", "hf_causal_fwd_N4096", "hf_weights_N8192"
#: the weights output_attentions returns at N=8192: 2 layers x 8 heads x 8192² float32
WEIGHTS_MIB = 2 * 8 * 8192 * 8192 * 4 / 2 ** 20
TARGETS = [
    Target("sliding window 256, N=16384, fwd+bwd: time", "seconds", (WFB, "attnkit"), (WFB, "sdpa"), "faster",
           "≥ 10×", lambda r: r >= 10, anchor_label='"sdpa"'),
    Target("same: peak memory", "peak_mib", (WFB, "attnkit"), (WFB, "sdpa"), "fraction", "≤ 1/5",
           lambda r: r <= 0.2, anchor_label='"sdpa"'),
    Target("sliding window 256, N=4096, forward: time", "seconds", (WF, "attnkit"), (WF, "sdpa"), "ratio",
           "≤ 1.10 (within 10%)", lambda r: r <= 1.10, anchor_label='"sdpa"'),
    Target("full causal, N=4096, forward: time", "seconds", (CF, "attnkit"), (CF, "sdpa"), "ratio",
           "≤ 1.10 (within 10%)", lambda r: r <= 1.10, anchor_label='"sdpa"'),
    Target(f"output_attentions=True, N=8192, no_grad: peak memory (the returned weights are {WEIGHTS_MIB:,.0f} MiB)",
           "peak_mib", (WT, "attnkit output_attentions"), target=f"≤ {1.25 * WEIGHTS_MIB:,.0f} MiB (weights + 25%)",
           ok=lambda v: v <= 1.25 * WEIGHTS_MIB),
    Target("same: time", "seconds", (WT, "attnkit output_attentions"), (WT, "eager output_attentions"), "faster",
           "≥ 2×", lambda r: r >= 2, anchor_label='"eager"'),
    Target("`attnkit.capture(heads=[0], rows=range(0, 8192, 64))` vs eager's output_attentions: peak memory",
           "peak_mib", (WT, "attnkit capture head 0, every 64th row"), (WT, "eager output_attentions"), "fraction",
           "≤ 1/20", lambda r: r <= 0.05, anchor_label='"eager"'),
]


def main(argv: list[str] | None = None) -> int:
    return targets_main(argv, script="hf_targets.py", doc=__doc__, cases=CASES, targets=TARGETS,
                        default_json="hf_targets.json", what="target")


if __name__ == "__main__":
    raise SystemExit(main())
