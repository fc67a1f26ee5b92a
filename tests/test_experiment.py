"""The recipes notebooks share: disjoint identities, one evaluation, one cached baseline."""

import pytest
import torch

from frlab import experiment
from frlab.data import Const, materialize


def test_split_identities_are_disjoint_and_the_evaluation_covers_every_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("FRLAB_HOME", str(tmp_path))
    split = experiment.synth_split(6, 4, images_per_identity=4, seed=3, size=32, progress=False)
    train_ids, test_ids = set(split.train.meta["identity"].tolist()), set(split.test.meta["identity"].tolist())
    assert train_ids == set(range(6)) and test_ids == set(range(experiment.TEST_OFFSET, experiment.TEST_OFFSET + 4))
    bench = experiment.Evaluation(split.test)
    trainer = experiment.baseline(split.train, "cosface", seed=0, epochs=1, batch_size=8)
    report, scores = bench.evaluate(trainer.model, identification=True)
    assert {"all", "orl", "identification"} <= set(report) and len(scores) == len(bench.pairs)
    # the same arguments in another notebook reload the same model
    again = experiment.baseline(split.train, "cosface", seed=0, epochs=1, batch_size=8)
    assert (
        torch.equal(again.head.weight, trainer.head.weight)
        and len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 1
    )
    sharp = experiment.synth_split(
        6,
        4,
        images_per_identity=4,
        seed=3,
        size=32,
        progress=False,
        nuisance=split.train_faces.nuisance.__class__(resolution=Const(1.0)),
    )
    assert float(sharp.train.meta["resolution"].max()) == 1.0


def test_metric_is_nan_where_a_subset_cannot_resolve_a_level():
    report = {"all": {"auc": 0.9, "tpr@fpr=1e-02": 0.5}}
    assert experiment.metric(report, "all", "tpr@fpr=1e-02") == 0.5
    assert torch.isnan(torch.tensor(experiment.metric(report, "hard", "tpr@fpr=1e-02")))
    assert torch.isnan(torch.tensor(experiment.metric(report, "all", "tpr@fpr=1e-04")))


def test_degraded_photos_take_the_renderers_camera_and_occlusions():
    from frlab.data import Bernoulli, Const, Nuisance
    from frlab.data.orl import orl_photos

    photos = orl_photos([3])
    same = experiment.degrade_photos(photos, ())
    assert same.images.shape == (10, 3, 112, 92)
    assert torch.equal(same.images, photos.images.expand(-1, 3, -1, -1))  # no factor: the photos, in RGB
    low = experiment.degrade_photos(photos, ("resolution",), Nuisance(resolution=Const(4.0)))
    assert (low.images.float() - same.images.float()).abs().mean() > 2  # a quarter of the pixels per side: blurred
    assert torch.equal(
        low.images, experiment.degrade_photos(photos, ("resolution",), Nuisance(resolution=Const(4.0))).images
    )
    # the drawn values are recorded as SynthFaces records them: the added degradation is measurable
    from frlab.data.synth import difficulty

    assert (low.meta["resolution"] == 4.0).all() and (same.meta["resolution"] == 1.0).all()
    assert (
        (difficulty(same.meta) == 0).all()
        and (difficulty(low.meta) == difficulty(low.meta)[0]).all()
        and difficulty(low.meta)[0] > 0.3
    )
    masked = experiment.degrade_photos(photos, ("mask",), Nuisance(mask=Bernoulli(1.0)))
    changed = (masked.images.float() - same.images.float()).abs().sum(1) > 0
    nose_y = photos.meta["landmarks"][:, 2, 1]
    rows = changed.any(2)  # (N, H): which rows the mask touched
    first = rows.float().argmax(1)
    assert (first.float() > nose_y).all() and rows.any(1).all()  # below the nose tip, on every photo
    half = experiment.degrade_photos(photos, (), scale=0.5)
    assert half.images.shape == (10, 3, 56, 46)
    torch.testing.assert_close(half.meta["landmarks"], (photos.meta["landmarks"] + 0.5) * 0.5 - 0.5)
    grey = experiment.greyscale(
        experiment.degrade_photos(photos, ("white_balance",), Nuisance(white_balance=Const(0.2)))
    )
    assert torch.equal(grey.images[:, 0], grey.images[:, 2])


def test_factor_worlds_differ_only_in_the_factors_they_hold_frontal():
    from frlab.data import Nuisance, SynthFaces

    faces = SynthFaces(range(3), images_per_identity=4, seed=2)
    worlds = experiment.factor_worlds(faces)
    frontal, mixed = Nuisance.frontal(), Nuisance()
    index = torch.arange(12)
    every = worlds["all"].nuisance_of(index)
    drawn = {
        "photo factors": experiment.PHOTO_FACTORS,
        "pose": ("yaw", "pitch", "roll"),
        "yaw": ("yaw",),
        "mask": ("mask",),
        "frontal": (),
        "all": tuple(every),
    }
    for name, factors in drawn.items():
        got = worlds[name].nuisance_of(index)
        for k, v in got.items():
            if k in factors or getattr(frontal, k) == getattr(mixed, k):  # (background is the same in both)
                torch.testing.assert_close(v, every[k], msg=f"{name}: {k} as in the default mix")
            else:
                assert torch.all(v == getattr(frontal, k).value), f"{name}: {k} frontal"
    singles = set(worlds) - {"frontal", "all", "photo factors", "pose"}
    assert singles == {k for k in every if getattr(frontal, k) != getattr(mixed, k)}


def test_held_frontal_worlds_hold_exactly_their_factors_frontal():
    from frlab.data import Nuisance, SynthFaces

    faces = SynthFaces(range(3), images_per_identity=4, seed=2)
    worlds = experiment.held_frontal(faces)
    frontal, mixed = Nuisance.frontal(), Nuisance()
    index = torch.arange(12)
    every = experiment.factor_worlds(faces)["all"].nuisance_of(index)
    varied = {k for k in every if getattr(frontal, k) != getattr(mixed, k)}
    assert set(worlds) == {f"all but {k}" for k in varied} | {"all but pose"}
    for name, held in (
        ("all but yaw", {"yaw"}),
        ("all but mask", {"mask"}),
        ("all but pose", {"yaw", "pitch", "roll"}),
    ):
        got = worlds[name].nuisance_of(index)
        for k, v in got.items():
            if k in held:
                assert torch.all(v == getattr(frontal, k).value), f"{name}: {k} frontal"
            else:
                torch.testing.assert_close(v, every[k], msg=f"{name}: {k} as in the default mix")


def test_gallery_and_probes_at_fixed_resolutions():
    from frlab.data import Nuisance, SynthFaces

    faces = SynthFaces(range(5), images_per_identity=3, size=32, seed=1)
    levels = experiment.at_resolutions(faces, (1, 4))
    assert set(levels) == {1.0, 4.0} and float(levels[4.0].meta["resolution"].unique()) == 4.0
    assert torch.equal(levels[4.0].meta["yaw"], faces.meta["yaw"])  # only the resolution changed
    gallery = materialize(
        SynthFaces(range(5), images_per_identity=1, size=32, seed=1, nuisance=Nuisance.frontal()), progress=False
    )
    probes = materialize(levels[1.0], progress=False)

    class Oracle(torch.nn.Module):  # a model that knows the identity: one-hot embeddings from the image's label
        def embed_faces(self, data, device="cpu"):
            return torch.nn.functional.one_hot(data.labels, 5).float()

    out = experiment.gallery_probe(Oracle(), gallery, probes)
    assert out["rank1"] == 1.0 and out["auc"] == 1.0


def test_gradient_share_sits_on_the_k_nearest_negatives_for_npt():
    from frlab import eval as ev
    from frlab import heads

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 10, (64,))
    assert ev.gradient_share(heads.NPT(8, 10, k=1, delta=3.0), x, y, tops=(1,))["top1"] == 1.0
    share = ev.gradient_share(heads.NPT(8, 10, k=3, delta=3.0), x, y, tops=(1, 3))
    assert share["top3"] == 1.0 and share["top1"] < 0.5  # spread evenly over the three nearest
    soft = ev.gradient_share(heads.NormFace(8, 10, s=4.0), x, y, tops=(1, 9))
    assert 0.1 < soft["top1"] < 0.9 and soft["top9"] == pytest.approx(1.0)
    head = heads.CosFace(8, 10).double()
    ev.gradient_share(head, x, y)
    assert head.weight.dtype == torch.float64  # the caller's head is left as it was


def test_paired_differences_seed_by_seed():
    import pandas as pd

    table = pd.DataFrame(
        {
            "model": ["a", "a", "a", "b", "b", "b", "c", "c"],
            "seed": [0, 1, 2, 0, 1, 2, 2, 0],
            "x": [1.0, 2.0, 3.0, 1.5, 2.5, 2.0, 3.5, 0.0],
        }
    )
    out = experiment.paired(table, "a", ["x"]).set_index("model")
    assert out.loc["b", "mean difference"] == pytest.approx((0.5 + 0.5 - 1.0) / 3)
    assert (out.loc["b", "min"], out.loc["b", "max"], out.loc["b", "seeds ahead"]) == (-1.0, 0.5, 2)
    assert not out.loc["b", "consistent"]
    # c has seeds 2 and 0 only, in another order: paired by seed, not by position
    assert (out.loc["c", "seeds"], out.loc["c", "mean difference"]) == (2, pytest.approx((0.5 - 1.0) / 2))
    with pytest.raises(ValueError, match="share no seed"):
        experiment.paired(
            table[table["seed"] != 1].assign(seed=lambda t: t["seed"] + 10 * (t["model"] == "b")), "a", ["x"], ["b"]
        )


def test_paired_findings_say_the_spread_and_when_seeds_disagree():
    import pandas as pd

    table = pd.DataFrame(
        {"model": ["A", "A", "B", "B", "C", "C"], "seed": [0, 1, 0, 1, 0, 1], "m": [1.0, 2.0, 1.5, 2.5, 0.5, 2.5]}
    )
    paired = experiment.paired(table, "A", ["m"]).assign(against="A")
    b, c = experiment.paired_findings(paired)
    assert b == "B vs A, m: +0.5000 on average (per seed +0.5000 .. +0.5000, ahead in 2 of 2)"
    assert c.endswith("ahead in 1 of 2): within the seed spread") and c.startswith("C vs A, m: +0.0000")
    assert experiment.paired_findings(paired, ("other",)) == []


def test_identity_sensitivity_measures_each_factor_against_renders_made_here():
    from frlab.data import SynthFaces, synth
    from frlab.data.synth import COLOUR, FACTOR_CLASSES, SHAPE_NAMES

    classified = [n for names in FACTOR_CLASSES.values() for n in names]
    assert sorted(classified) == sorted(SHAPE_NAMES + tuple(n for n, _ in COLOUR))  # each factor, once
    faces = SynthFaces(range(4), images_per_identity=3, seed=5, size=32)
    pixels = torch.nn.Flatten()  # a "model" whose embedding is the image itself
    rows = experiment.identity_sensitivity(pixels, faces)
    assert set(rows) == {"two identities", *classified}

    def unit(ident):  # the frontal renders the same way, by hand: pixels, quantized, normalized
        n = len(ident["skin"])
        frontal = vars(synth.Nuisance.frontal())
        drawn = faces.with_nuisance(**frontal).nuisance_of(torch.arange(n) * 3)  # image 0 of each identity
        nuis = {
            k: torch.full((n,), float(c.value)) if isinstance(c, synth.Const) else drawn[k] for k, c in frontal.items()
        }
        img = synth.render(ident, nuis, 32).mul(255).round().div(255).flatten(1)
        return torch.nn.functional.normalize(img, dim=1)

    own = faces.identity_factors(torch.arange(4))
    lo, hi = next((lo, hi) for n, lo, hi in synth.SHAPE if n == "jaw")
    a, b = unit({**own, "jaw": torch.full((4,), lo)}), unit({**own, "jaw": torch.full((4,), hi)})
    assert rows["jaw"]["similarity"] == pytest.approx(float((a * b).sum(1).mean()), abs=1e-5)
    base = unit(own)
    swapped = unit({**own, "skin": own["skin"].roll(1, 0)})
    assert rows["skin"]["similarity"] == pytest.approx(float((base * swapped).sum(1).mean()), abs=1e-5)
    i, j = torch.triu_indices(4, 4, 1)
    assert rows["two identities"]["similarity"] == pytest.approx(float((base[i] * base[j]).sum(1).mean()), abs=1e-5)
    assert rows["skin"]["class"] == "colour" and rows["jaw"]["move"] == pytest.approx(1 - rows["jaw"]["similarity"])
    assert rows["jaw"]["similarity"] < 1 - 1e-3 and rows["skin"]["similarity"] < 1 - 1e-3  # both change the image
    with pytest.raises(ValueError, match="at least two identities"):
        experiment.identity_sensitivity(pixels, SynthFaces(range(1), images_per_identity=2, size=32))
