"""The GPU benchmark: ``attnkit bench --device cuda`` (see :mod:`attnkit.bench_gpu`).

Usage (from the repository root, on a machine with a GPU)::

    python benchmarks/gpu.py --json benchmarks/results/gpu.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from attnkit.bench_gpu import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
