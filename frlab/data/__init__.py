"""Face data: the SynthFaces renderer and the ORL faces (samplers live in `frlab.train`)."""

from .orl import TEST_IDENTITIES as ORL_TEST
from .orl import TRAIN_IDENTITIES as ORL_TRAIN
from .orl import orl_faces
from .synth import (
    NUISANCES,
    SWEEPS,
    Bernoulli,
    Const,
    FaceTensors,
    Group,
    Normal,
    Nuisance,
    SynthFaces,
    Uniform,
    difficulty,
    hash_uniform,
    materialize,
    render,
)

__all__ = [
    "NUISANCES",
    "ORL_TEST",
    "ORL_TRAIN",
    "SWEEPS",
    "Bernoulli",
    "Const",
    "FaceTensors",
    "Group",
    "Normal",
    "Nuisance",
    "SynthFaces",
    "Uniform",
    "difficulty",
    "hash_uniform",
    "materialize",
    "orl_faces",
    "render",
]
