"""Looking inside: analyses and pictures of attention weights.

Capture the weights of any model built from attnkit (whatever backend computes them) with
:func:`attnkit.capture`, then:

* analyses (:mod:`attnkit.viz.analysis`): :func:`rollout` and :func:`flow` (Abnar & Zuidema
  2020), :func:`head_entropy`, :func:`head_distance`, :func:`head_stats`,
  :func:`gradient_x_attention`, and the alignments a translator needs, :func:`alignment_matrix`
  and :func:`align`;
* structure (:mod:`attnkit.viz.collect`): :func:`group_records` turns capture records into
  layers and groups of layers (decoder steps stitched), :func:`assign_tokens` labels them;
* pictures (matplotlib, Agg; no display): :func:`alignment_png` (source × target with token
  labels), :func:`head_grid_png` (every head of every layer, with the rollout), :func:`mask_png`
  (a mask and its tile classes); readable up to 100 tokens a side, longer sides summarized;
* pages: :func:`attention_page` -- the interactive view of every layer and head with rollout and
  flow, one self-contained HTML file (:mod:`attnkit.viz.view`); :func:`alignment_page` /
  :func:`alignment_html` -- a simpler page of alignments (the demo's);
* the command line: ``attnkit viz CHECKPOINT --text "..." --out DIR`` (:mod:`attnkit.viz.cli`).

Example::

    >>> import torch, attnkit
    >>> from attnkit import viz
    >>> layers = torch.nn.ModuleList(attnkit.nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(3))
    >>> x = torch.randn(1, 5, 8)
    >>> with attnkit.capture() as rec:
    ...     for mha in layers:
    ...         x = mha(x, need_weights=False)[0]
    >>> [(g.name, len(g.layers)) for g in viz.group_records(rec)]  # one module type called 3 times
    [('MultiheadAttention', 3)]
    >>> viz.rollout([r.weights for r in rec]).shape                     # (B, T, T)
    torch.Size([1, 5, 5])

Submodules are imported on first use, so ``import attnkit`` does not import matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "alignment_png": "heatmap",
    "alignment_size": "heatmap",
    "alignment_html": "html",
    "alignment_page": "html",
    "Alignment": "html",
    "rollout": "analysis",
    "flow": "analysis",
    "head_entropy": "analysis",
    "head_distance": "analysis",
    "head_stats": "analysis",
    "HeadStat": "analysis",
    "gradient_x_attention": "analysis",
    "GradAttention": "analysis",
    "alignment_matrix": "analysis",
    "align": "analysis",
    "AlignedToken": "analysis",
    "group_records": "collect",
    "assign_tokens": "collect",
    "Group": "collect",
    "Layer": "collect",
    "head_grid_png": "grid",
    "image_attention_png": "image",
    "head_grid_size": "grid",
    "mask_png": "masks",
    "mask_size": "masks",
    "attention_page": "view",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnkit.viz' has no attribute {name!r}")


def __dir__():
    return __all__


def _matrix(weights, src_tokens, tgt_tokens):
    """Validate an alignment: ``weights (T_out, T_in)`` as a float64 NumPy array, and the labels
    as lists of strings, with errors naming the argument, what it got and what was expected."""
    import numpy as np

    try:
        import torch

        if isinstance(weights, torch.Tensor):
            weights = weights.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"weights must be a (T_out, T_in) matrix of numbers (tensor, array or nested lists); {e}") from None
    if w.ndim != 2:
        raise ValueError(f"weights must be a 2-D (T_out, T_in) matrix; got shape {tuple(w.shape)}")
    labels = []
    for name, toks in (("src_tokens", src_tokens), ("tgt_tokens", tgt_tokens)):
        if isinstance(toks, str) or not all(isinstance(t, str) for t in toks):
            raise TypeError(f"{name} must be a sequence of strings (one label per token); got {type(toks).__name__}"
                            + ("" if isinstance(toks, str) else
                               f" holding {sorted({type(t).__name__ for t in toks if not isinstance(t, str)})}"))
        labels.append(list(toks))
    src, tgt = labels
    if w.shape != (len(tgt), len(src)):
        raise ValueError(f"weights must have shape (len(tgt_tokens), len(src_tokens)) = ({len(tgt)}, {len(src)}); "
                         f"got {tuple(w.shape)}")
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite; got NaN or inf")
    return w, src, tgt
