"""Face data: the SynthFaces renderer, the ORL faces, and sampling helpers."""
from .orl import TEST_IDENTITIES as ORL_TEST, TRAIN_IDENTITIES as ORL_TRAIN, orl_faces  # noqa: F401
from .synth import (  # noqa: F401
    NUISANCES, SWEEPS, Bernoulli, Const, FaceTensors, Group, Normal, Nuisance, SynthFaces, Uniform, difficulty, hash_uniform,
    materialize, render,
)
