"""Backends that compute attention: ``reference`` (the oracle), ``sdpa`` (torch's fused kernel),
``flex`` (compiled FlexAttention), ``triton`` (attnkit's GPU kernels: sigmoid), ``tiled`` (exact
online-softmax tiles, memory-efficient, any mask or score mod).

See :mod:`attnkit.backends.registry` for how ``auto`` chooses and how to add one.
"""

from .reference import ReferenceBackend, expand_kv, reference_attention
from .registry import PRIORITY, REGISTRY, Backend, Choice, choose, names, register, use_backend
from .sdpa import SDPABackend
from .tiled import TiledBackend
from .flex import FlexBackend
from .triton import TritonBackend

# auto's order: on CUDA, SDPA for plain and causal softmax, compiled flex for any other mask or
# score mod it expresses, attnkit's Triton kernels for what neither can (sigmoid), then the
# tiled engine; on CPU flex and Triton decline for auto (their auto_reasons) and the tiled
# engine serves what SDPA does not
register(ReferenceBackend())
register(SDPABackend(), priority=0)
register(FlexBackend(), priority=1)
register(TritonBackend(), priority=2)
register(TiledBackend(), priority=3)

__all__ = ["Backend", "Choice", "REGISTRY", "PRIORITY", "register", "choose", "names", "use_backend",
           "reference_attention", "expand_kv"]
