"""Backends that compute attention: ``reference`` (the oracle), ``sdpa`` (torch's fused kernel),
``tiled`` (exact online-softmax tiles, memory-efficient, any mask or score mod).

See :mod:`attnkit.backends.registry` for how ``auto`` chooses and how to add one.
"""

from .reference import ReferenceBackend, expand_kv, reference_attention
from .registry import PRIORITY, REGISTRY, Backend, Choice, choose, names, register, use_backend
from .sdpa import SDPABackend
from .tiled import TiledBackend
from .flex import FlexBackend

register(ReferenceBackend())
register(SDPABackend(), priority=0)
register(TiledBackend(), priority=1)
register(FlexBackend(), priority=2)

__all__ = ["Backend", "Choice", "REGISTRY", "PRIORITY", "register", "choose", "names", "use_backend",
           "reference_attention", "expand_kv"]
