"""Context parallelism: exact attention over a sequence split across the ranks of a
``torch.distributed`` process group (gloo on CPU, NCCL on CUDA).

=========================  =====================================================================
function                   what it does
=========================  =====================================================================
:func:`ring_attention`     K/V shards travel around a ring; softmax (log-sum-exp merge) or
                           sigmoid; masks and biases at global positions; fully masked shards
                           skipped; exact custom backward (K/V and dK/dV around the ring again)
:func:`ulysses_attention`  all-to-all over heads, any local :func:`attnkit.attention` on whole
                           rows (sparsemax, entmax, any mask or bias), all-to-all back
:func:`shard`              this rank's shard of a full tensor, ``"zigzag"`` or ``"contiguous"``
:func:`gather`             the full sequence from every rank's shard (one ``all_gather``)
:func:`shard_positions`    the global positions a rank holds in a layout
:class:`RingStats`         what a ring call computed on this rank (shards, tiles, ring steps)
=========================  =====================================================================

Every function checks its process group first (a ``RuntimeError`` when torch.distributed is not
initialized) and exchanges one small ``all_gather`` of the request's shapes before any other
traffic, so a rank with bad or mismatched arguments makes every rank raise the same way instead
of leaving the others waiting.
"""

from .layout import LAYOUTS, gather, shard, shard_positions
from .ring import RingStats, ring_attention
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard", "gather", "shard_positions", "RingStats", "LAYOUTS"]
