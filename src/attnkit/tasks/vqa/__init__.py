"""Visual question answering with stacked attention (Yang et al. 2016,
https://arxiv.org/abs/1511.02274) and with a Transformer over image regions and question words.

* :mod:`.data`: generated Sort-of-CLEVR (the Relation Networks paper's relational and
  non-relational questions; the default without a download), the easy-VQA data the ``easy-vqa``
  package ships (the default when installed) and the VQA v2 reader (COCO images).
* :mod:`.metrics`: accuracy, accuracy per kind of question and VQA accuracy.
* :mod:`.recipe`: the models (:mod:`attnkit.models.vqa`), training, prediction and the metrics
  of a split.
* :mod:`.task`: ``attnkit train vqa``, ``attnkit eval``, ``attnkit translate`` (answer a question
  about an image), ``attnkit viz`` (one attention map per hop).
"""

from .data import Question, VqaObject, VqaSplit, generate_sort_of_clevr, read_easy_vqa

__all__ = ["Question", "VqaObject", "VqaSplit", "generate_sort_of_clevr", "read_easy_vqa"]
