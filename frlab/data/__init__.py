"""Face data: the SynthFaces renderer, the ORL faces, and sampling helpers."""
from .synth import (  # noqa: F401
    NUISANCES, Bernoulli, Const, Group, Normal, Nuisance, SynthFaces, Uniform, difficulty, hash_uniform, render,
)
