"""The image tasks' recipe beyond the shared classifier loop
(:func:`attnkit.tasks.classification.train_classifier`): where a trained model looks in an image,
for ``attnkit viz CHECKPOINT --index N`` (:func:`image_attention`, :class:`ImageAttention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class ImageAttention:
    """One image, the model's answer and its attention maps over the image's tokens.

    Attributes:
        image: ``(H, W)`` pixels for display.
        grid: ``(rows, cols)`` of the token grid: ``(H/p, W/p)`` patches (row-major), or ``(H, 1)``
            when the model reads the image row by row.
        maps: ``{label: weights (rows·cols,)}``, each a distribution over the tokens.
        label, prediction, probability: the true class, the predicted one and its probability.
        description: the model and what the maps are, in a few words.
    """

    image: Tensor
    grid: tuple[int, int]
    maps: dict[str, Tensor]
    label: int
    prediction: int
    probability: float
    description: str = ""


def image_attention(model: torch.nn.Module, x: Tensor, image: Tensor, label: int = -1) -> ImageAttention:
    """Run one image ``x (1, C, H, W)`` (as the model reads it) through ``model`` and collect its
    attention over the image's tokens, for drawing over ``image (H, W)``:

    * :class:`~attnkit.models.AttentionClassifier` over patches: ``pooling``, the weights with which
      the classifier's pooling query reads the patches (what the logits are computed from); with a
      Transformer encoder also ``pooling · rollout`` (Abnar & Zuidema 2020,
      https://arxiv.org/abs/2005.00928: the pooling traced back through every layer, residual
      included) and, for each head ``h`` of the last layer, ``pooling · A_h``: where the patches
      that the pooling reads were themselves looking in that head;
    * :class:`~attnkit.models.AttentionMemoryClassifier` (rows): the memory's attention at each
      step, their mean, and each gated head's weights.

    Example::

        >>> from attnkit.models import AttentionClassifier
        >>> m = AttentionClassifier(10, input="patches", image_size=8, patch_size=2, dim=16, depth=1, num_heads=2)
        >>> r = image_attention(m.eval(), torch.rand(1, 1, 8, 8), torch.rand(8, 8))
        >>> r.grid, list(r.maps), tuple(r.maps["pooling"].shape)
        ((4, 4), ['pooling', 'pooling · rollout', 'pooling · layer 1 head 1', 'pooling · layer 1 head 2'], (16,))
    """
    from ...models import AttentionClassifier, AttentionMemoryClassifier

    model.eval()
    with torch.no_grad():
        logits, attn = model(x, return_attention=True)
    attn = {k: v.detach().float().cpu() for k, v in attn.items()}
    probs = torch.softmax(logits.float().cpu(), -1)[0]
    pred = int(probs.argmax())
    H, W = image.shape[-2:]
    maps: dict[str, Tensor] = {}
    if isinstance(model, AttentionClassifier):
        cfg = model.config
        if cfg["input"] != "patches":
            raise ValueError("image_attention draws AttentionClassifier models over image patches (input='patches')")
        (ph, pw) = cfg["patch_size"]
        grid = (H // ph, W // pw)
        alpha = attn["pooling"][0]                                              # (T,)
        maps["pooling"] = alpha
        layers = [attn[f"layer{i}"][0] for i in range(cfg["depth"]) if f"layer{i}" in attn]  # each (heads, T, T)
        if layers:
            eye = torch.eye(alpha.numel())
            roll = eye
            for w in layers:  # rollout: the residual as identity, rows renormalized
                a = 0.5 * w.mean(0) + 0.5 * eye
                roll = (a / a.sum(-1, keepdim=True)) @ roll
            maps["pooling · rollout"] = alpha @ roll
            for h, w in enumerate(layers[-1]):
                maps[f"pooling · layer {len(layers)} head {h + 1}"] = alpha @ w
        what = (f"AttentionClassifier over {grid[0]}×{grid[1]} patches of {ph}×{pw} pixels "
                f"({cfg['encoder']} encoder, {cfg['pooling']} pooling)")
    elif isinstance(model, AttentionMemoryClassifier):
        F = attn["memory"][0]                                                   # (steps, rows)
        grid = (F.shape[-1], 1)
        for t, row in enumerate(F):
            maps[f"memory step {t + 1}"] = row
        maps["memory, steps averaged"] = F.mean(0)
        for k, row in enumerate(attn.get("heads", torch.empty(1, 0, 0))[0]):
            maps[f"gated head {k + 1}"] = row
        what = f"AttentionMemoryClassifier reading the {grid[0]} rows ({model.config['num_steps']} memory steps)"
    else:
        raise ValueError(f"image_attention draws AttentionClassifier and AttentionMemoryClassifier models; got "
                         f"{type(model).__name__}")
    return ImageAttention(image=image.float().cpu(), grid=grid, maps=maps, label=label, prediction=pred,
                          probability=float(probs[pred]), description=what)
