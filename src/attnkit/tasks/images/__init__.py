"""Image classification with attention: scikit-learn's 8×8 digits (embedded, no download) and
MNIST (idx files from ``--data``).

* ``attnkit train digits``: :class:`~attnkit.models.AttentionClassifier` over 2×2 patches
  (16 tokens) of the 1,797 digits that scikit-learn ships (``sklearn.datasets.load_digits``),
  with a seeded stratified split of 1,257 train / 180 valid / 360 test images.
* ``attnkit train mnist``: :class:`~attnkit.models.AttentionMemoryClassifier` (seed 001's
  gated attention memory) reading each image row by row, or ``--model AttentionClassifier``
  (patches). The idx files are read by :func:`read_idx` (gzipped or not); the last 5,000
  training images are held out for validation, the 10,000 test images are the test split.

Both report accuracy; training goes through :func:`attnkit.tasks.classification.train_classifier`.
``attnkit viz CHECKPOINT --index N`` draws where a trained model looks in image ``N`` of a split
(:meth:`DigitsTask.viz_image` -> :func:`image_attention` -> :func:`attnkit.viz.image.image_attention_png`).
"""

from __future__ import annotations

from typing import Any

from .. import lazy_attribute
from .data import load_digits_splits, load_mnist_splits, random_shift, read_idx, read_mnist

# Imported on first use (they import the model and training code): name -> module of this package.
_LAZY = {"ImageAttention": "recipe", "image_attention": "recipe", "DigitsTask": "task", "MnistTask": "task"}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)


__all__ = ["DigitsTask", "MnistTask", "ImageAttention", "image_attention", "read_idx", "read_mnist",
           "load_mnist_splits", "load_digits_splits", "random_shift"]
