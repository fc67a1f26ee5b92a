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


PHOTO_FACTORS = ("resolution", "blur", "noise", "exposure", "white_balance", "glasses", "mask")  # what a photo can take
POSE_FACTORS = ("yaw", "pitch", "roll")


def varied_factors() -> list[str]:
    """The nuisances whose default distribution differs from the frontal one (`Nuisance`)."""
    frontal, mixed = Nuisance.frontal(), Nuisance()
    return [f.name for f in fields(Nuisance) if getattr(frontal, f.name) != getattr(mixed, f.name)]


def factor_worlds(faces: SynthFaces) -> dict[str, SynthFaces]:
    """The same identities and images under other conditions: "frontal" (`Nuisance.frontal()`),
    "all" (the default mix of every nuisance), "photo factors" (the default mix of the factors a
    photo can take, `PHOTO_FACTORS`, the others frontal: what `degrade_photos` does to real faces),
    "pose" (yaw, pitch and roll as by default, the others frontal), and one world per nuisance
    factor whose default distribution differs from the frontal one: that factor drawn as by
    default, the others frontal. Each nuisance keeps its per-image draw, so two worlds differ only
    in the factors one of them holds frontal."""
    frontal, mixed = Nuisance.frontal(), Nuisance()
    mix = lambda names: replace(faces, nuisance=replace(frontal, **{k: getattr(mixed, k) for k in names}))  # noqa: E731
    worlds = {"frontal": replace(faces, nuisance=frontal), "all": replace(faces, nuisance=mixed)}
    worlds |= {"photo factors": mix(PHOTO_FACTORS), "pose": mix(POSE_FACTORS)}
    return worlds | {k: mix([k]) for k in varied_factors()}


def held_frontal(faces: SynthFaces) -> dict[str, SynthFaces]:
    """The default mix with one factor held frontal: "all but yaw", ... for every nuisance whose
    default distribution differs from the frontal one, and "all but pose" (yaw, pitch and roll
    together). Against "all" (`factor_worlds`), what each factor adds to the mix's compound loss;
    each nuisance keeps its per-image draw, as in `factor_worlds`."""
    frontal, mixed = Nuisance.frontal(), Nuisance()
    hold = lambda names: replace(faces, nuisance=replace(mixed, **{k: getattr(frontal, k) for k in names}))  # noqa: E731
    return {f"all but {k}": hold([k]) for k in varied_factors()} | {"all but pose": hold(POSE_FACTORS)}


def identity_sensitivity(model, faces: SynthFaces, device: str = "cpu") -> dict[str, dict]:
    """What a model sees of each identity factor. Every identity of `faces`, frontal, is rendered
    twice with one factor changed and every other its own: a shape factor at the low and at the
    high end of its range, a colour (skin, hair, eyes, lips) its own and the next identity's.
    Per factor: its class (`synth.FACTOR_CLASSES`), the mean cosine similarity of the two
    renders' embeddings and the mean "move", 1 minus it. The row "two identities" holds the same
    for frontal renders of two different identities (every pair), for scale: a factor whose
    whole range moved a face as far would alone tell two identities apart."""
    from .data import face3d, synth

    n, size = faces.num_classes, faces.size
    if n < 2:
        raise ValueError(f"identity_sensitivity needs at least two identities (for scale), got {n}")
    labels = torch.arange(n)
    own = faces.identity_factors(labels)
    frontal = replace(faces, images_per_identity=1, nuisance=Nuisance.frontal())
    nuis = {k: v.float() for k, v in frontal.nuisance_of(labels).items()}

    def embedded(ident):
        images = synth.render(
            {k: v.to(device) for k, v in ident.items()}, {k: v.to(device) for k, v in nuis.items()}, size
        )
        meta = {"label": labels, "landmarks": face3d.landmarks(ident, nuis, size)}
        data = FaceTensors(images.mul(255).round_().to(torch.uint8).cpu(), labels, meta, n)
        return embed(model, data, device)

    base = embedded(own)
    i, j = torch.triu_indices(n, n, 1)
    impostor = float((base[i] * base[j]).sum(1).mean())
    rows = {"two identities": {"class": "-", "similarity": impostor, "move": 1 - impostor}}
    ranges = {name: (lo, hi) for name, lo, hi in synth.SHAPE}
    for cls, names in synth.FACTOR_CLASSES.items():
        for name in names:
            if name in ranges:
                a, b = ({**own, name: torch.full((n,), float(end))} for end in ranges[name])
                sim = (embedded(a) * embedded(b)).sum(1)
            else:
                sim = (base * embedded({**own, name: own[name].roll(1, 0)})).sum(1)
            rows[name] = {"class": cls, "similarity": float(sim.mean()), "move": 1 - float(sim.mean())}
    return rows


def identity_spread(embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
    """How far apart, and along how many directions, a model places identities: each identity's
    unit mean embedding (of its samples `labels`); "similarity": the mean cosine similarity of two
    identities' means; then the spread of the means about their centre. "total variance": the mean
    squared distance of an identity from the centre (with n identities, (n - 1) / n times 1 minus
    the similarity); "directions": the participation ratio of the spread's eigenvalues, (sum)^2 /
    sum of squares, the number of directions that would share it evenly (1 where identities lie on
    a line; at most n - 1). Compare data sets at the same number of identities: both grow with it."""
    classes, index = labels.unique(return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"identity_spread needs at least two identities, got {len(classes)}")
    sums = torch.zeros(len(classes), embeddings.shape[1], dtype=torch.float64, device=embeddings.device)
    sums.index_add_(0, index, embeddings.double())
    means = torch.nn.functional.normalize(sums, dim=1)
    n = len(means)
    similarity = ((means @ means.T).sum() - n) / (n * (n - 1))  # the off-diagonal mean (each diagonal entry is 1)
    centred = means - means.mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred / n).clamp(min=0)
    return {
        "identities": n,
        "similarity": float(similarity),
        "total variance": float(eig.sum()),
        "directions": float(eig.sum() ** 2 / (eig**2).sum()),
    }


def real_detail(renders: FaceTensors, photos: FaceTensors, strength: float = 2.0) -> FaceTensors:
    """The renders with a real face's fine detail: render k takes photo k's (in order; both with
    their five landmarks) high-pass, the photo minus its Gaussian blur at a tenth of its eye
    distance, moved onto the render by their landmarks (`pretrained.warp`) and applied as a
    relative change of brightness, `strength` times it, inside an ellipse round the render's face.
    A test of what a model misses in the renders: the same photo on every render adds realism
    alone; each render its own person's photo adds identity in detail too."""
    from .data import synth
    from .pretrained import warp

    checks.number("strength", strength, lo=0)
    if "landmarks" not in photos.meta or "landmarks" not in renders.meta:
        raise ValueError("real_detail needs the five landmarks of the renders and the photos (meta['landmarks'])")
    if len(photos) != len(renders):
        raise ValueError(f"one photo per render: {len(photos)} photos for {len(renders)} renders")
    grey = photos.images.float().div(255).mean(1, keepdim=True)
    _, _, H, W = grey.shape
    marks = photos.meta["landmarks"].float()
    sigma = 0.1 * (marks[:, 1] - marks[:, 0]).norm(dim=1)
    r = int(3 * float(sigma.max())) + 1
    rows, cols = synth._blur_matrices(sigma, H, r), synth._blur_matrices(sigma, W, r)
    detail = grey - rows[:, None] @ grey @ cols[:, None].transpose(-1, -2)
    images = renders.images.float().div(255)
    size = images.shape[-2:]
    detail = warp(detail, marks, renders.meta["landmarks"], tuple(size))
    to = renders.meta["landmarks"].float()  # the face's ellipse, centred on the landmarks' mean
    centre = to.mean(1)
    eyes = (to[:, 1] - to[:, 0]).norm(dim=1)
    height = (to[:, 3:].mean(1) - to[:, :2].mean(1)).norm(dim=1)
    ys, xs = torch.meshgrid(torch.arange(size[0]).float(), torch.arange(size[1]).float(), indexing="ij")
    inside = ((xs - centre[:, 0, None, None]) / (1.1 * eyes[:, None, None])) ** 2 + (
        (ys - centre[:, 1, None, None]) / (1.2 * height[:, None, None])
    ) ** 2 < 1
    out = images.mul_(1 + strength * detail * inside[:, None].float()).clamp_(0, 1)
    return FaceTensors(
        out.mul_(255).round_().to(torch.uint8),
        renders.labels,
        renders.meta,
        renders.num_classes,
        f"{renders.fingerprint} + detail of {photos.fingerprint} x {strength}",
    )


def degrade_photos(
    photos: FaceTensors, factors=PHOTO_FACTORS, nuisance: Nuisance | None = None, seed: int = 0, scale: float = 1.0
) -> FaceTensors:
    """Photos (e.g. `orl_photos()`, with landmarks) degraded the way SynthFaces degrades its
    renders, by the nuisances in `factors` drawn per image from `nuisance` (default: SynthFaces'
    default mix), keyed by (seed, identity, image) as SynthFaces keys its own: the same
    resolution, blur, noise, exposure and white balance code, and glasses and a surgical mask
    drawn on the face from its five landmarks. `scale` resizes the photos first (area), so that
    their faces span as many pixels as the renders' (`face_scale`). Returns RGB uint8 faces with
    their landmarks and, in meta, every nuisance's value per image as SynthFaces records it (the
    frontal value for a factor not in `factors`: a photo's own pose is not known), so that
    `synth.difficulty(meta)` is the degradation added."""
    from .data import synth

    nuisance = nuisance or Nuisance()
    unknown = set(factors) - set(PHOTO_FACTORS)
    if unknown:
        raise ValueError(f"a photo cannot take {sorted(unknown)}; choose from {', '.join(PHOTO_FACTORS)}")
    meta = photos.meta
    u = synth.hash_uniform(
        seed, meta["identity"][:, None], meta["image"][:, None], 100 + torch.arange(len(synth.NUISANCES))
    )
    frontal = {k: c.value for k, c in vars(Nuisance.frontal()).items() if isinstance(c, synth.Const)}
    values = {
        k: (
            getattr(nuisance, k)(u[:, i]).float()
            if k in factors
            else torch.full((len(photos),), float(frontal.get(k, 0.0)))
        )
        for i, k in enumerate(synth.NUISANCES)
    }
    images = photos.images.float().div(255).expand(-1, 3, -1, -1).contiguous()
    marks = meta["landmarks"]
    if scale != 1.0:
        size = (round(images.shape[2] * scale), round(images.shape[3] * scale))
        images = torch.nn.functional.interpolate(images, size=size, mode="area" if scale < 1 else "bilinear")
        marks = (marks + 0.5) * torch.tensor([size[1] / photos.images.shape[3], size[0] / photos.images.shape[2]]) - 0.5
    meta = {**meta, "landmarks": marks, **values}
    N, _, H, W = images.shape
    images = _occlude(images, marks, values["glasses"], values["mask"])
    wb = values["white_balance"].view(-1, 1, 1, 1) * torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    images = images.mul_(values["exposure"].view(-1, 1, 1, 1) * (1 + wb)).clamp_(0, 1)
    pad = (H - W) // 2  # the camera model works on square images: replicate the edges, then crop
    square = torch.nn.functional.pad(images, (pad, H - W - pad, 0, 0), mode="replicate")
    square = synth._degrade(square, values).clamp_(0, 1)
    square = synth._add_noise(square, seed, meta["identity"], meta["image"], values["noise"])
    out = square[:, :, :, pad : pad + W].mul(255).round_().to(torch.uint8)
    return FaceTensors(
        out,
        photos.labels,
        dict(meta),
        photos.num_classes,
        f"{photos.fingerprint} degraded({sorted(factors)}, {nuisance!r}, seed={seed})",
    )


def greyscale(data: FaceTensors) -> FaceTensors:
    """The same faces with their colour removed (each pixel the mean of its channels)."""
    grey = data.images.float().mean(1, keepdim=True).round_().to(torch.uint8).expand_as(data.images).contiguous()
    return FaceTensors(grey, data.labels, data.meta, data.num_classes, f"{data.fingerprint} grey")


def face_scale(faces: FaceTensors) -> float:
    """The median distance between the eyes, in pixels, of faces with landmarks."""
    marks = faces.meta["landmarks"]
    return float((marks[:, 1] - marks[:, 0]).norm(dim=1).median())


def _occlude(images: torch.Tensor, marks: torch.Tensor, glasses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Glasses (a dark rim round each eye, a faint lens) and a surgical mask (light blue, from just
    below the nose tip to below the chin), placed by the five landmarks, on the images that have them."""
    N, _, H, W = images.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    eyes, nose, mouth = marks[:, :2], marks[:, 2], marks[:, 3:].mean(1)
    iod = (eyes[:, 1] - eyes[:, 0]).norm(dim=1).view(-1, 1, 1)  # the distance between the eyes sets the scale
    for k in (glasses > 0.5).nonzero().squeeze(1).tolist():
        for e in eyes[k]:
            d = torch.sqrt(((xs - e[0]) / (0.42 * iod[k])) ** 2 + ((ys - e[1]) / (0.3 * iod[k])) ** 2)
            rim = (1 - (d - 1).abs() / 0.15).clamp(0, 1)  # a ring a few pixels wide round each eye
            images[k] = images[k].lerp(torch.full_like(images[k], 0.08), rim)
            images[k] = images[k].lerp(torch.full_like(images[k], 0.6), 0.12 * (d < 1).float())
    for k in (mask > 0.5).nonzero().squeeze(1).tolist():
        top = nose[k, 1] + 0.15 * (mouth[k, 1] - nose[k, 1])
        half = 1.25 * iod[k, 0, 0]
        inside = (
            (ys > top) & ((xs - mouth[k, 0]).abs() < half) & (ys < mouth[k, 1] + 1.6 * (mouth[k, 1] - nose[k, 1]))
        ).float()
        images[k] = images[k].lerp(torch.tensor([0.72, 0.82, 0.92]).view(3, 1, 1).expand_as(images[k]), inside)
    return images


def at_resolutions(faces: SynthFaces, levels) -> dict[float, SynthFaces]:
    """The same identities and images with the resolution factor fixed at each level (every other
    nuisance as in `faces`): surveillance-like probes at a few distances."""
    return {
        float(level): replace(faces, nuisance=replace(faces.nuisance, resolution=_const(level))) for level in levels
    }


def _const(value):
    from .data.synth import Const

    return Const(float(value))


def gallery_probe(model, gallery: FaceTensors, probes: FaceTensors, device: str = "cpu", levels=(1e-2, 1e-3)) -> dict:
    """A watch-list protocol: every probe against every gallery face (one or more per identity,
    the same labels): rank-1 identification, and verification of all gallery-probe pairs (AUC,
    TPR at the FPR levels the impostor count resolves)."""
    g, p = embed(model, gallery, device), embed(model, probes, device)
    out = {"rank1": ev.identification(g, gallery.labels, p, probes.labels, max_rank=1)["rank1"]}
    scores = p @ g.T
    same = probes.labels[:, None] == gallery.labels[None, :]
    report = ev.verification(scores.reshape(-1), same.reshape(-1), levels)
    return out | {k: v for k, v in report.items() if k == "auc" or k.startswith("tpr")}


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
    sampler: str = "random",
    images_per_identity: int = 4,
    **head_kwargs,
) -> train.Trainer:
    """Train (or reload from the cache) notebook 03's model with the named head: an IR-ResNet-8 at
    half width, `scale` for the normalized heads and the heads' published margins unless given in
    `head_kwargs` (passed to `heads.make_head`, hyper-parameters a head lacks ignored). The same
    arguments give the same cache key in every notebook. `extra` builds auxiliary terms from the
    head (`lambda head: {"centre": CentrePull(head)}`); such a model is cached under `name`.
    `sampler` and `images_per_identity` go to `TrainConfig` (P x K batches: sampler="pk")."""
    if extra is not None and not name:
        raise ValueError("a baseline with extra terms is another model: give it a name")
    torch.manual_seed(seed)
    model = models.iresnet(
        BASELINE.arch, width=BASELINE.width, input_size=data.images.shape[-1], embedding_size=embedding_size
    )
    classifier = heads.make_head(head, embedding_size, data.num_classes, ignore_unknown=True, s=scale, **head_kwargs)
    cfg = train.TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_epochs=BASELINE.warmup_epochs,
        seed=seed,
        device=device,
        sampler=sampler,
        images_per_identity=images_per_identity,
    )
    terms = extra(classifier) if extra is not None else {}
    return train.fit_cached(name or f"baseline_{head}", model, classifier, data, cfg, extra=terms, track=track or {})


def paired(table, control: str, metrics, models=None):
    """Each model minus `control`, seed by seed, per metric: the mean, smallest and largest
    difference and the number of seeds ahead; `consistent` where every seed agrees in sign. `table`
    is a pandas DataFrame with columns "model", "seed" and the metrics (one row per model and seed)."""
    import pandas as pd

    models = [m for m in dict.fromkeys(table["model"]) if m != control] if models is None else list(models)
    base = table[table["model"] == control].set_index("seed")
    rows = []
    for model in models:
        runs = table[table["model"] == model].set_index("seed")
        seeds = runs.index.intersection(base.index)
        if not len(seeds):
            raise ValueError(f"{model!r} and {control!r} share no seed")
        for metric in metrics:
            d = runs.loc[seeds, metric] - base.loc[seeds, metric]
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "mean difference": float(d.mean()),
                    "min": float(d.min()),
                    "max": float(d.max()),
                    "seeds ahead": int((d > 0).sum()),
                    "seeds": len(seeds),
                    "consistent": bool((d > 0).all() or (d < 0).all()),
                }
            )
    return pd.DataFrame(rows)


def paired_findings(paired, metrics=None) -> list[str]:
    """One sentence per row of a `paired` table (optionally only `metrics`): the mean difference,
    its range over seeds, the seeds ahead, and "within the seed spread" where they disagree."""
    against = "against" in paired.columns
    out = []
    for _, r in paired.iterrows():
        if metrics is not None and r["metric"] not in metrics:
            continue
        who = f"{r['model']} vs {r['against']}" if against else r["model"]
        out.append(
            f"{who}, {r['metric']}: {r['mean difference']:+.4f} on average (per seed {r['min']:+.4f} .. "
            f"{r['max']:+.4f}, ahead in {r['seeds ahead']} of {r['seeds']})"
            + ("" if r["consistent"] else ": within the seed spread")
        )
    return out
