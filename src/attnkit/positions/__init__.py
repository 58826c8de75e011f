"""Positions and score biases: ALiBi, T5 relative buckets, Shaw relative, soft-capping (score
mods), and the embeddings that are added to or rotate the inputs (sinusoidal, learned, RoPE).

===========================  ==================================================  ======================
piece                        how it enters attention                             paper
===========================  ==================================================  ======================
sinusoidal / Sinusoidal…     added to the ``(B, T, E)`` inputs                   Vaswani et al. 2017
LearnedPositionalEmbedding   added to the ``(B, T, E)`` inputs                   BERT, GPT-2
apply_rope / Rotary…         rotates q and k ``(B, H, T, D)``                    Su et al. 2021
ALiBi                        additive score mod ``bias=ALiBi(H)``                Press et al. 2022
T5RelativeBias               additive score mod (+ learned embedding)            Raffel et al. 2020
ShawRelative                 ``key_bias`` (q-dependent bias) + ``value_term``    Shaw et al. 2018
softcap                      score mod ``cap * tanh(s / cap)``                   Gemma 2
===========================  ==================================================  ======================
"""

from .alibi import ALiBi, alibi_slopes
from .base import FromBias, FromScoreMod, ScoreMod, SoftCap, TensorBias, as_score_mod, bias_mod, softcap
from .embeddings import LearnedPositionalEmbedding, SinusoidalEmbedding, sinusoidal
from .relative import ShawRelative, T5RelativeBias, relative_positions, t5_bucket
from .rope import RotaryEmbedding, apply_rope, rope_inv_freq, rotate_half

__all__ = ["ScoreMod", "TensorBias", "FromScoreMod", "FromBias", "bias_mod", "SoftCap", "softcap", "as_score_mod",
           "sinusoidal", "SinusoidalEmbedding", "LearnedPositionalEmbedding",
           "apply_rope", "rotate_half", "rope_inv_freq", "RotaryEmbedding",
           "ALiBi", "alibi_slopes", "T5RelativeBias", "t5_bucket", "relative_positions", "ShawRelative"]
