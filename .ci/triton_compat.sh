#!/usr/bin/env bash
# attnkit's Triton kernels also compile with an older triton (default 3.6.0, the version beside
# torch 2.11's CUDA wheels, which the GPU machines lent to this project run): versions differ in
# what they accept and in how they type literals (3.6 types a float below 2**-126 as float64), and
# without a GPU only the compiler can show it. Runs tests/backends/test_triton_compiles.py (every
# kernel to an sm_90 cubin, no float64 instruction) in a side environment; about 3 minutes.
# Usage: bash .ci/triton_compat.sh [triton version]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.6.0}"
env_dir="${TMPDIR:-/tmp}/attnkit-triton-$version"
[ -x "$env_dir/bin/python" ] || python3 -m venv "$env_dir"
if ! "$env_dir/bin/pip" install -q torch==2.13.0 "triton==$version" pytest hypothesis numpy >"$env_dir/pip.log" 2>&1; then
    cat "$env_dir/pip.log" >&2
    exit 1
fi
"$env_dir/bin/python" -c "import triton; assert triton.__version__ == '$version', triton.__version__"
PYTHONPATH="$PWD/src" "$env_dir/bin/python" -m pytest -q -p no:cacheprovider -m interpreter \
    tests/backends/test_triton_compiles.py
