"""Recipes the notebooks share, written once: the data split, the evaluation, the baseline model.

    split = synth_split(train_identities=200, test_identities=100, seed=0)  # disjoint identities
    bench = Evaluation(split.test)              # test pairs, easy/hard subsets, the ORL test people
    trainer = baseline(split.train, "arcface", seed=0)   # notebook 03's model, cached: 04 and 05 reuse it
    report, scores = bench.evaluate(trainer.model)       # {"all": {...}, "easy": ..., "hard": ..., "orl": ...}
    metric(report, "hard", "tpr@fpr=1e-03")              # NaN where the pairs cannot resolve it

Training identities are ids 0 .. n - 1 of a SynthFaces world; held-out identities start at
`TEST_OFFSET`, so no identity is in both. Every model embeds an image and its mirror (`flip`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from . import checks, heads, models, protocols, train
from . import eval as ev
from .data import ORL_TEST, SynthFaces, materialize, orl_faces
from .data.orl import orl_photos
from .data.synth import DEFAULT_GROUPS, FaceTensors, Nuisance

TEST_OFFSET = 10_000  # the first held-out identity id


@dataclass
class Split:
    """Rendered training and held-out faces (uint8, in memory) and the worlds they came from."""

    train: FaceTensors
    test: FaceTensors
    train_faces: SynthFaces
    test_faces: SynthFaces


def synth_split(
    train_identities: int = 200,
    test_identities: int = 100,
    images_per_identity: int = 10,
    seed: int = 0,
    size: int = 64,
    nuisance: Nuisance | None = None,
    groups=DEFAULT_GROUPS,
    device: str = "cpu",
    progress: bool = True,
) -> Split:
    """Identities 0 .. train_identities - 1 for training and TEST_OFFSET ... for testing, of one
    SynthFaces world (`seed`), each rendered once."""
    checks.integer("train_identities", train_identities, lo=2)
    checks.integer("test_identities", test_identities, lo=2, hi=TEST_OFFSET)
    kw = dict(
        images_per_identity=images_per_identity, seed=seed, size=size, nuisance=nuisance or Nuisance(), groups=groups
    )
    train_faces = SynthFaces(range(train_identities), **kw)
    test_faces = SynthFaces(range(TEST_OFFSET, TEST_OFFSET + test_identities), **kw)
    return Split(
        materialize(train_faces, device=device, progress=progress),
        materialize(test_faces, device=device, progress=progress),
        train_faces,
        test_faces,
    )


def orl_test(size: int = 64) -> tuple[FaceTensors, protocols.Pairs]:
    """The ten ORL test people (real faces no model here trains on) and all their pairs."""
    orl = orl_faces(ORL_TEST, size=size)
    return orl, protocols.verification_pairs(orl.labels)


def embed(model, data, device: str = "cpu", flip: bool = True) -> torch.Tensor:
    """Unit embeddings of every sample (image + mirror by default), on the CPU. A model that embeds
    faces its own way (`embed_faces`: the pretrained network aligns each image by its landmarks
    first) is asked to."""
    if hasattr(model, "embed_faces"):
        return model.embed_faces(data, device)
    return ev.embed(model.to(device), data, device=device, flip=flip)[0]


@dataclass
class Evaluation:
    """Held-out faces with their verification pairs and subsets (all, easy, hard; per group where
    asked), a gallery / probe split, and the ORL test people at the same size (the pretrained
    network sees them as photos, aligned by their landmarks)."""

    data: FaceTensors
    easy: protocols.EasyRule = field(default_factory=protocols.EasyRule)
    hard: protocols.HardRule = field(default_factory=protocols.HardRule)
    groups: bool = False
    orl: bool = True

    def __post_init__(self):
        meta = self.data.meta
        self.pairs = protocols.verification_pairs(meta["label"])
        self.subsets = protocols.pair_subsets(
            self.pairs, self.easy(meta), self.hard(meta), meta["group"] if self.groups else None
        )
        self.gallery, self.probe = protocols.gallery_probe_split(meta)
        self.orl_data, self.orl_pairs = orl_test(self.data.images.shape[-1]) if self.orl else (None, None)

    def evaluate(
        self,
        model,
        device: str = "cpu",
        identification: bool = False,
        max_rank: int = 5,
        subsets: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict, torch.Tensor]:
        """(report, pair scores): `protocols.verification_report` on each subset (or on `subsets`),
        "orl" on the ORL test people, and with `identification` rank-k of the probes."""
        emb = embed(model, self.data, device)
        scores = self.pairs.scores(emb)
        report = protocols.verification_report(scores, self.pairs, self.subsets if subsets is None else subsets)
        if self.orl:  # a model that aligns faces itself sees the ORL photos with their landmarks, not the crops
            orl = orl_photos(ORL_TEST) if hasattr(model, "embed_faces") else self.orl_data
            report["orl"] = ev.verification(self.orl_pairs.scores(embed(model, orl, device)), self.orl_pairs.same)
        if identification:
            labels = self.data.meta["label"]
            report["identification"] = ev.identification(
                emb[self.gallery], labels[self.gallery], emb[self.probe], labels[self.probe], max_rank=max_rank
            )
        return report, scores


def factor_worlds(faces: SynthFaces) -> dict[str, SynthFaces]:
    """The same identities and images under other conditions: "frontal" (`Nuisance.frontal()`),
    "all" (the default mix of every nuisance), and one world per nuisance factor whose default
    distribution differs from the frontal one: that factor drawn as by default, the others frontal.
    Each nuisance keeps its per-image draw, so the worlds differ in that factor only."""
    frontal, mixed = Nuisance.frontal(), Nuisance()
    worlds = {"frontal": replace(faces, nuisance=frontal), "all": replace(faces, nuisance=mixed)}
    for f in fields(Nuisance):
        if getattr(frontal, f.name) != getattr(mixed, f.name):
            worlds[f.name] = replace(faces, nuisance=replace(frontal, **{f.name: getattr(mixed, f.name)}))
    return worlds


def metric(report: dict, subset: str, key: str) -> float:
    """report[subset][key], or NaN where the subset or the level is missing (too few pairs)."""
    return float(report.get(subset, {}).get(key, float("nan")))


# ---------------------------------------------------------------- the shared baseline
@dataclass(frozen=True)
class BaselineConfig:
    """Notebook 03's recipe: the setting every head is compared in, and the baseline 04 and 05 build on."""

    arch: str = "ir8"
    width: float = 0.5
    embedding_size: int = 64
    scale: float = 16.0
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.1
    warmup_epochs: float = 1.0


BASELINE = BaselineConfig()


def baseline(
    data: FaceTensors,
    head: str = "arcface",
    seed: int = 0,
    epochs: int = BASELINE.epochs,
    batch_size: int = BASELINE.batch_size,
    lr: float = BASELINE.lr,
    scale: float = BASELINE.scale,
    embedding_size: int = BASELINE.embedding_size,
    device: str = "cpu",
    track=None,
    extra: Callable[[nn.Module], dict] | None = None,
    name: str = "",
    **head_kwargs,
) -> train.Trainer:
    """Train (or reload from the cache) notebook 03's model with the named head: an IR-ResNet-8 at
    half width, `scale` for the normalized heads and the heads' published margins unless given in
    `head_kwargs` (passed to `heads.make_head`, hyper-parameters a head lacks ignored). The same
    arguments give the same cache key in every notebook. `extra` builds auxiliary terms from the
    head (`lambda head: {"centre": CentrePull(head)}`); such a model is cached under `name`."""
    if extra is not None and not name:
        raise ValueError("a baseline with extra terms is another model: give it a name")
    torch.manual_seed(seed)
    model = models.iresnet(
        BASELINE.arch, width=BASELINE.width, input_size=data.images.shape[-1], embedding_size=embedding_size
    )
    classifier = heads.make_head(head, embedding_size, data.num_classes, ignore_unknown=True, s=scale, **head_kwargs)
    cfg = train.TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=BASELINE.warmup_epochs, seed=seed, device=device
    )
    terms = extra(classifier) if extra is not None else {}
    return train.fit_cached(name or f"baseline_{head}", model, classifier, data, cfg, extra=terms, track=track or {})
