#!/usr/bin/env bash
# Everything a GPU session checks, in one run (a lent GPU's time is short): the CUDA tests of every
# route and kernel, then the GPU benchmark, then the generated tables. Run from the repository root
# on a machine with a GPU and torch + triton installed (pip install -e ".[gpu]"; or the image's own
# torch with PYTHONPATH=src). Writes benchmarks/results/gpu.json; copy it back and run
# `python benchmarks/report.py` where the repository lives.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# the CUDA tests (tests/conftest.py leaves the interpreter off where a GPU is present); -o addopts=""
# drops the default marker filter so that the cuda-marked tests run
timeout "${TEST_SECONDS:-300}" python -m pytest -q -x -p no:cacheprovider -o addopts="" tests/cuda \
    tests/backends/test_triton.py tests/backends/test_triton_entmax.py tests/backends/test_triton_additive.py \
    tests/backends/test_triton_weights.py -m "not slow and not interpreter" 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
# the cases not yet measured on a GPU first: the JSON is written after each case, so a run cut
# short by the time limit keeps what it measured
timeout "${BENCH_SECONDS:-420}" python benchmarks/gpu.py --json "$OUT/gpu.json" \
    --cases "${CASES:-entmax_causal,additive,sigmoid_causal,flex_route,sdpa_route,weights_rows}" "$@"
