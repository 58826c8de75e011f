"""Speech recognition with Listen, Attend and Spell (Chan et al. 2016,
https://arxiv.org/abs/1508.01211) and location-aware attention (Chorowski et al. 2015).

* :mod:`.data`: dates and numbers in several languages synthesized with ``espeak-ng`` (the
  default, with speakers disjoint between the splits), and the readers of real audio (a
  transcript TSV, LibriSpeech's layout).
* :mod:`.features`: log-mel filterbank features in plain torch.
* :mod:`.metrics`: CER and WER (``jiwer``), exact match, how monotonic an alignment is.
* :mod:`.reading`: a spoken date read back from a (misrecognized) transcript: the closest phrase
  the date grammar can say.
* :mod:`.recipe`: the model (:mod:`attnkit.models.las`), training, decoding (a date chosen from
  both outputs' beams) and the metrics of a split.
* :mod:`.task`: ``attnkit train speech``, ``attnkit eval``, ``attnkit translate`` (transcribe
  audio files), ``attnkit viz`` (the alignment over the spectrogram).
"""

from .data import Utterance, Voice, generate, read_librispeech, read_tsv

__all__ = ["Utterance", "Voice", "generate", "read_librispeech", "read_tsv"]
