"""attnkit's Triton kernels compile for a GPU (sm_90, Hopper) without one: Triton lowers each kernel
to PTX and runs ``ptxas`` (shipped in the triton wheel) to a cubin. The interpreter tests check
what the kernels compute; this checks what only the compiler sees (types of loop-carried values,
the while loop of the entmax threshold passes, layouts of ``tl.dot``). The compiler runs in a
child process without ``TRITON_INTERPRET`` (the kernels of this one are the interpreter's). Part of
the long set: ``python -m pytest -m interpreter``."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason='triton is not installed (pip install -e ".[gpu]")')
pytestmark = pytest.mark.interpreter

#: pointer arguments and their element types ("io": the inputs' dtype); every other argument not a
#: constexpr is an int32, except the floats below
POINTERS = {"Q": "io", "K": "io", "V": "io", "O": "io", "W": "io", "DO": "io", "DQ": "io", "DK": "io", "DV_": "io",
            "A": "io", "Bp": "io", "DA": "io", "DB": "io", "DW": "fp32", "LSE": "fp32", "DR": "fp32",
            "OG": "fp32", "TAU": "fp32", "CAND": "fp32", "R": "fp32", "SLOPES": "fp32", "STAT": "fp32", "PTR": "i32",
            "COLS": "i32", "ROWS": "i32", "TILES": "i32", "STEPS": "i32", "HEADS": "i64", "MT": "i8", "MASK": "i8", "LIVE": "i8"}
FLOATS = {"scale", "offset", "xscale", "inv_heads", "inv"}
BLOCKS = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128, HAS_MASK=True, HAS_ALIBI=True)
CASES = {
    "sigmoid_fwd": ("sigmoid._fwd", BLOCKS),
    "sigmoid_dq": ("sigmoid._bwd_dq", BLOCKS),
    "sigmoid_dkdv": ("sigmoid._bwd_dkdv", dict(BLOCKS, BLOCK_M=64)),
    "sparsemax_fwd": ("entmax._fwd", dict(BLOCKS, MODE=1, CAND_C=0)),
    "entmax15_fwd": ("entmax._fwd", dict(BLOCKS, MODE=0, CAND_C=0)),
    "sparsemax_fwd_candidates": ("entmax._fwd", dict(BLOCKS, MODE=1, CAND_C=128)),
    "entmax_alpha_fwd_candidates": ("entmax._fwd", dict(BLOCKS, MODE=2, CAND_C=128)),
    "entmax_alpha_dkdv": ("entmax._bwd_dkdv", dict(BLOCKS, BLOCK_M=64, MODE=2)),
    "entmax15_fwd_candidates": ("entmax._fwd", dict(BLOCKS, MODE=0, CAND_C=128)),
    "entmax15_dq": ("entmax._bwd_dq", dict(BLOCKS, MODE=0)),
    "sparsemax_dkdv": ("entmax._bwd_dkdv", dict(BLOCKS, BLOCK_M=64, MODE=1)),
    "additive_fwd": ("additive._fwd", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_H=128, BLOCK_DV=128, HAS_MASK=True)),
    "additive_da": ("additive._bwd_da", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_H=128, BLOCK_DV=128, HAS_MASK=True)),
    "additive_dbdv": ("additive._bwd_dbdv", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_H=128, BLOCK_DV=128, HAS_MASK=False)),
    "weights_softmax_average": ("weights._weights", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, HAS_MASK=True,
                                                         HAS_ALIBI=True, HAS_STAT=False, KIND=0, AVERAGE=True)),
    "weights_entmax15": ("weights._weights", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, HAS_MASK=False,
                                                  HAS_ALIBI=False, HAS_STAT=True, KIND=3, AVERAGE=False)),
    "weights_entmax_alpha": ("weights._weights", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, HAS_MASK=True,
                                                      HAS_ALIBI=True, HAS_STAT=True, KIND=4, AVERAGE=False)),
}
PRECISIONS = {"bf16": None, "fp32": "tf32x3"}


def compile_all() -> None:
    """Compile every case for sm_90 and print one JSON line per case (run in the child process)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for case, (path, consts) in CASES.items():
        module, name = path.split(".")
        fn = getattr(importlib.import_module(f"attnkit.kernels.triton.{module}"), name)
        for io, prec in PRECISIONS.items():
            sig = {}
            for arg in fn.arg_names:
                if arg in consts or arg == "PREC":
                    sig[arg] = "constexpr"
                elif arg in POINTERS and not (name == "_weights" and arg == "R"):  # R: a row count there
                    kind = "fp32" if module == "additive" and arg == "W" else POINTERS[arg]   # w: float32 there
                    sig[arg] = "*" + (io if kind == "io" else kind)
                else:
                    sig[arg] = "fp32" if arg in FLOATS else "i32"
            try:
                k = triton.compile(ASTSource(fn, signature=sig, constexprs=dict(consts, PREC=prec)),
                                   target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": 8 if consts["BLOCK_M"] == 128 else 4,
                                            "num_stages": 1 if module == "additive" else 2})
                ok, why = bool(k.asm.get("cubin")) and ".entry" in k.asm["ptx"], ""
                f64 = sorted({line.split()[0] for line in k.asm["ptx"].splitlines() if ".f64" in line})
                if f64:   # float64 arithmetic on a GPU: a literal or a mixed op promoted a value
                    ok, why = False, "float64 instructions in the PTX: " + ", ".join(f64[:10])
            except Exception as e:  # noqa: BLE001 - reported to the parent
                ok, why = False, f"{type(e).__name__}: {e}"[:2000]
            print(json.dumps({"case": f"{case}-{io}", "ok": ok, "why": why}), flush=True)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", "from tests.backends.test_triton_compiles import compile_all; "
                           "compile_all()"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            found[r["case"]] = r
    if not found:
        pytest.fail(f"the compiler's process printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return found


@pytest.mark.parametrize("io", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_compiles_to_a_cubin_for_sm90(results, case, io):
    r = results.get(f"{case}-{io}")
    assert r is not None, f"{case}-{io} was not compiled"
    assert r["ok"], r["why"]
