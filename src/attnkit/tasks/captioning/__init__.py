"""Image captioning with soft and hard attention (Show, Attend and Tell; Xu et al. 2015,
https://arxiv.org/abs/1502.03044).

* :mod:`.data`: generated scenes of MNIST digits and coloured shapes with grounded captions (the
  default, no download) and the Karpathy-split reader (Flickr8k/Flickr30k/COCO).
* :mod:`.metrics`: BLEU-4, CIDEr-D and attention correctness.
* :mod:`.recipe`: the model (:class:`attnkit.models.captioner.ShowAttendTell`), its training
  (soft: the doubly stochastic penalty; hard: REINFORCE) and decoding.
* :mod:`.task`: ``attnkit train captioning``, ``attnkit eval``, ``attnkit viz``.
"""

from .data import Caption, Scene, SceneObject, generate_scenes, read_karpathy
from .metrics import attention_correctness, bleu4, cider_d

__all__ = ["Caption", "Scene", "SceneObject", "generate_scenes", "read_karpathy", "attention_correctness", "bleu4",
           "cider_d"]
