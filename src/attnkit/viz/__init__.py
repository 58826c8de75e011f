"""Looking inside: pictures of attention weights.

* :func:`attnkit.viz.heatmap.alignment_png` -- a source × target alignment heatmap as a PNG
  (matplotlib, Agg backend, no display needed).
* :func:`attnkit.viz.html.alignment_html` / :func:`~attnkit.viz.html.alignment_page` -- a
  self-contained interactive HTML page (inline CSS and JavaScript, no network): hover a target
  token to highlight the source tokens it attends to. Every token is HTML-escaped.

Both take a weights matrix ``(T_out, T_in)`` (rows: target/query tokens, columns: source/key
tokens; a tensor, an array or nested lists) and the token labels. Submodules are imported on
first use, so ``import attnkit`` does not import matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "alignment_png": "heatmap",
    "alignment_size": "heatmap",
    "alignment_html": "html",
    "alignment_page": "html",
    "Alignment": "html",
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
