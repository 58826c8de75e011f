"""attnkit's Triton kernels (``pip install -e ".[gpu]"``): variants that no fused GPU kernel
offers: the sigmoid normalizer (:mod:`.sigmoid`), sparsemax / α-entmax with α <= 2 (:mod:`.entmax`) and
additive (Bahdanau) scores (:mod:`.additive`), forward and backward, under any mask (:mod:`.blocks`) and ALiBi, with GQA, in float16, bfloat16
and float32; and the weights of chosen heads and rows for ``return_weights`` and
:func:`attnkit.capture` (:mod:`.weights`). :mod:`.common` holds what they share.

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before the kernels are imported), which is how the tests check them without a GPU. This
package imports ``triton`` only when a kernel module is imported; :func:`available` asks
without importing it.
"""

from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """Whether ``triton`` is installed."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
