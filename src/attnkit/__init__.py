"""attnkit: every attention mechanism, exact, tested against an oracle, weights always visible.

Conventions (SPEC §1): functional tensors are ``(B, H, T, D)``; boolean masks use ``True`` =
may attend; causal masks with ``Tq != Tk`` align bottom-right. ``attnkit.nn`` modules take
``(B, T, E)`` and mirror ``torch.nn.MultiheadAttention`` (whose ``key_padding_mask`` uses
``True`` = padding).
"""

from . import backends, distributed, linear, masks, models, nn, normalizers, positions, scores, tasks
from .backends import use_backend
from .recording import capture
from .functional import attention, explain
from .spec import AttentionSpec, WeightsRequest, canonicalize

__version__ = "0.1.0"

__all__ = ["attention", "explain", "use_backend", "capture", "AttentionSpec", "WeightsRequest", "canonicalize", "scores", "normalizers",
           "masks", "positions", "linear", "backends", "distributed", "nn", "models", "tasks", "__version__"]
