"""Issue #4's engine targets: the cases to measure and how each target is judged.

``--run`` runs the ``attnkit bench`` harness on ``CASES`` (every repeat of every variant a fresh
process, round-robin) and writes every repeat's seconds and peak memory to ``--json``, with the
command line, the date and the machine. The table (median and min–max over the repeats, ratios
taken repeat by repeat) is rendered by ``benchmarks/report.py``, which also writes it into the docs.

Usage (from the repository root)::

    python benchmarks/engine_targets.py --run --threads 2 --repeat 3 --json benchmarks/results/engine_2threads.json
    python benchmarks/engine_targets.py benchmarks/results/engine_2threads.json     # print its table again
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: the cases ``--run`` measures (``attnkit bench`` name prefixes)
CASES = ["window256_fwdbwd", "window256_fwd_", "window256_scaling", "alibi", "blocksparse",
         "additive_fwdbwd_T1024", "additive_fwdbwd_T4096", "softmax", "mha"]


@dataclass(frozen=True)
class Target:
    """One row: ``ours`` and ``anchor`` are ``(case, variant)`` of the same run; ``kind`` says how they
    compare, repeat by repeat: ``faster`` = anchor / ours, ``ratio`` = ours / anchor, ``fraction`` =
    ours / anchor shown as 1/x. ``ok`` judges that ratio (or the value itself when there is no anchor)."""

    label: str
    metric: str  # "seconds" or "peak_mib"
    ours: tuple[str, str]
    anchor: tuple[str, str] | None = None
    kind: str = "ratio"
    target: str = "—"
    ok: Callable[[float], bool] | None = None
    ours_label: str = ""
    anchor_label: str = ""


W16, W8 = "window256_fwdbwd_N16384", "window256_fwd_N8192"
AL, BS, AD = "alibi_causal_fwdbwd_N8192", "blocksparse_fwdbwd_N16384", "additive_fwdbwd_T1024"
TARGETS = [
    Target("sliding window w=256, causal, N=16384, fwd+bwd: time", "seconds", (W16, "attnkit tiled"),
           (W16, "sdpa dense mask"), "faster", "≥ 20×", lambda r: r >= 20, anchor_label="SDPA + dense mask"),
    Target("same: peak memory", "peak_mib", (W16, "attnkit tiled"), (W16, "sdpa no mask"), "ratio", "≤ 1.5×",
           lambda r: r <= 1.5, anchor_label="SDPA without mask"),
    Target("sliding window, forward only, N=8192: time", "seconds", (W8, "attnkit tiled"), (W8, "flex compiled"),
           "faster", "≥ 1× (flex's speed)", lambda r: r >= 1, anchor_label="compiled flex"),
    Target("sliding window cost linear: time(N=65536) / time(N=16384)", "seconds",
           ("window256_scaling_N65536", "attnkit tiled"), ("window256_scaling_N16384", "attnkit tiled"), "ratio",
           "≤ 4.5", lambda r: r <= 4.5, ours_label="N=65536: ", anchor_label="N=16384:"),
    Target("ALiBi + causal, N=8192, fwd+bwd: time", "seconds", (AL, "attnkit tiled"), (AL, "sdpa dense bias"),
           "faster", "≥ 3×", lambda r: r >= 3, anchor_label="SDPA + dense bias"),
    Target("bound of the above: torch's causal kernel without the bias vs SDPA + dense bias", "seconds",
           (AL, "sdpa is_causal, no bias"), (AL, "sdpa dense bias"), "faster", ours_label="SDPA `is_causal`: ",
           anchor_label="SDPA + dense bias"),
    Target("ALiBi + causal: peak memory", "peak_mib", (AL, "attnkit tiled"), (AL, "sdpa dense bias"), "fraction",
           "≤ 1/4", lambda r: r <= 0.25, anchor_label="SDPA + dense bias"),
    Target("block sparse (a tenth of the 128-blocks drawn at random, plus the diagonal) vs all of them, N=16384, "
           "fwd+bwd: time", "seconds", (BS, "attnkit tiled 10%"),
           (BS, "attnkit tiled 100%"), "ratio", "≤ 0.2", lambda r: r <= 0.2, anchor_label="same layout at 100%"),
    Target("additive, B=4, d=128, T=1024, fwd+bwd: peak memory", "peak_mib", (AD, "attnkit tiled"),
           (AD, "naive (B,T,T,d)"), "fraction", "≤ 1/20", lambda r: r <= 0.05, anchor_label="naive (B,T,T,d)"),
    Target("same: time", "seconds", (AD, "attnkit tiled"), (AD, "naive (B,T,T,d)"), "ratio", "≤ 0.7×",
           lambda r: r <= 0.7, anchor_label="naive"),
    Target(f"additive, T=4096, fwd+bwd: peak memory (naive: one (B,T,T,d) float32 tensor is "
           f"{4 * 4096 * 4096 * 128 * 4 / 2 ** 30:.0f} GiB)", "peak_mib",
           ("additive_fwdbwd_T4096", "attnkit tiled"), target="< 2 GiB", ok=lambda v: v < 2048),
    Target("plain softmax through `auto`, N=4096, forward: time", "seconds", ("softmax_auto_fwd_N4096", "attnkit auto"),
           ("softmax_auto_fwd_N4096", "sdpa direct"), "ratio", "≤ 1.05 (within 5%)", lambda r: r <= 1.05,
           anchor_label="SDPA called directly"),
    Target("causal self-attention module, N=2048, E=512, fwd+bwd: time", "seconds",
           ("mha_causal_fwdbwd_N2048", "attnkit nn.MultiheadAttention"),
           ("mha_causal_fwdbwd_N2048", "torch nn.MultiheadAttention"), "faster",
           ours_label="`attnkit.nn.MultiheadAttention` ", anchor_label="`torch.nn.MultiheadAttention`"),
]


def targets_main(argv: list[str] | None, *, script: str, doc: str, cases: list[str], targets: list[Target],
                 default_json: str, what: str = "issue #4 target", extra_cases: tuple[str, ...] = ()) -> int:
    """The command line of a targets script: ``--run`` measures ``cases`` with the ``attnkit bench``
    harness and stores every repeat; a stored file's table (``targets``) is printed either way."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("json_file", nargs="?", help="a file written by --run: print its table")
    p.add_argument("--run", action="store_true", help="run `attnkit bench` on the target cases first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per variant (default 3)")
    p.add_argument("--quick", action="store_true", help="every size divided by 4 (smoke run; the docs ignore it)")
    p.add_argument("--json", default=default_json, help="where --run writes its results")
    p.add_argument("--cases", nargs="+", metavar="PREFIX", help="only the cases whose names start so")
    args = p.parse_args(argv)
    if args.cases:
        unknown = [c for c in args.cases if not any(k.startswith(c) or c.startswith(k)
                                                    for k in (*cases, *extra_cases))]
        if unknown:
            p.error(f"--cases: {unknown} are not among this script's cases {cases}")
        cases = args.cases
    path = args.json_file
    if args.run:
        from attnkit import bench

        head = bench.header(f"python benchmarks/{script} " + shlex.join(argv), args.threads)
        bench.write_json(args.json, head, bench.run(cases, threads=args.threads, repeat=args.repeat, quick=args.quick))
        path = args.json
    if not path:
        p.error("give a JSON file or --run")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report as rep

    print(rep.engine_table(rep.read_json(Path(path)), f"python benchmarks/{script} {path}", targets=targets,
                           what=what))
    return 0


def main(argv: list[str] | None = None) -> int:
    return targets_main(argv, script="engine_targets.py", doc=__doc__, cases=CASES, targets=TARGETS,
                        default_json="engine_targets.json")


if __name__ == "__main__":
    raise SystemExit(main())
