"""Positions and score biases: ALiBi, T5 relative buckets, Shaw relative, soft-capping (score
mods), and the embeddings that are added to or rotate the inputs (sinusoidal, learned, RoPE)."""

from .base import FromScoreMod, ScoreMod, SoftCap, TensorBias, as_score_mod, softcap

__all__ = ["ScoreMod", "TensorBias", "FromScoreMod", "SoftCap", "softcap", "as_score_mod"]
