"""The recipes notebooks share: disjoint identities, one evaluation, one cached baseline."""

import math

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


def test_identity_spread_against_a_loop_and_a_case_worked_by_hand():
    import numpy as np

    # four identities at +-e1 and +-e2, two samples each (their noise cancels in the mean):
    # centre 0, each identity at distance 1, the spread shared by two directions
    e = torch.eye(3, dtype=torch.float64)
    noise = 0.3 * e[2]
    points = [e[0], -e[0], e[1], -e[1]]
    emb = torch.stack([p + s * noise for p in points for s in (1, -1)])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = experiment.identity_spread(emb, labels)
    assert out["identities"] == 4
    assert out["total variance"] == pytest.approx(1.0) and out["directions"] == pytest.approx(2.0)
    assert out["similarity"] == pytest.approx(-1 / 3)  # each identity: -1 to its opposite, 0 to the other two
    # random embeddings, labels in any order: a loop in float64 and numpy's eigenvalues
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 6, (30,), generator=g)
    means = []
    for c in sorted(set(labels.tolist())):
        m = sum(emb[i].double().numpy() for i in range(30) if labels[i] == c)
        means.append(m / np.linalg.norm(m))
    means = np.array(means)
    centred = means - means.mean(0)
    eig = np.linalg.eigvalsh(centred.T @ centred / len(means))
    out = experiment.identity_spread(emb, labels)
    assert out["total variance"] == pytest.approx(eig.sum(), rel=1e-9)
    assert out["directions"] == pytest.approx(eig.sum() ** 2 / (eig**2).sum(), rel=1e-9)
    n = len(means)  # total variance = (n - 1) / n (1 - the mean cosine of two identities)
    cos = means @ means.T
    assert out["similarity"] == pytest.approx(cos[~np.eye(n, dtype=bool)].mean(), rel=1e-9)
    assert out["total variance"] == pytest.approx((n - 1) / n * (1 - out["similarity"]), rel=1e-9)
    with pytest.raises(ValueError, match="at least two identities"):
        experiment.identity_spread(emb, torch.zeros(30, dtype=torch.long))


def test_real_detail_moves_a_photos_detail_onto_the_render_by_their_landmarks():
    from frlab.data import SynthFaces, materialize
    from frlab.data.synth import FaceTensors, Nuisance

    faces = materialize(
        SynthFaces(range(2), images_per_identity=1, size=64, nuisance=Nuisance.frontal()), progress=False
    )
    # flat grey renders with the faces' landmarks: a change there is the photo's detail alone
    renders = FaceTensors(torch.full_like(faces.images, 128), faces.labels, faces.meta, 2)
    H, W = 112, 92
    # each photo's landmarks an exact similarity image of its render's (larger, turned, moved; the
    # second elsewhere), so the transform maps every landmark onto the render's
    turn = torch.tensor([[math.cos(0.1), -math.sin(0.1)], [math.sin(0.1), math.cos(0.1)]])
    marks = 1.6 * faces.meta["landmarks"] @ turn.T + torch.tensor([[[2.0, 5.0]], [[14.0, -3.0]]])
    flat = torch.full((2, 1, H, W), 120, dtype=torch.uint8)
    dot = flat.clone()
    for k in range(2):  # a bright dot at each photo's left eye
        x, y = marks[k, 0].round().long().tolist()
        dot[k, 0, y - 1 : y + 2, x - 1 : x + 2] = 250
    photos = lambda images: FaceTensors(images, torch.arange(2), {"landmarks": marks}, 2)  # noqa: E731
    base = renders.images.float()
    assert torch.equal(experiment.real_detail(renders, photos(dot), 0.0).images, renders.images)
    assert torch.equal(experiment.real_detail(renders, photos(flat), 2.0).images, renders.images)  # no detail
    changed = (experiment.real_detail(renders, photos(dot), 2.0).images.float() - base).abs().sum(1)
    for k in range(2):
        y, x = divmod(int(changed[k].argmax()), 64)
        eye = renders.meta["landmarks"][k, 0]
        assert abs(x - float(eye[0])) <= 1 and abs(y - float(eye[1])) <= 1  # where the render's left eye is
    assert changed[:, :, :4].sum() == 0 and changed[:, :4].sum() == 0  # outside the face: untouched
    with pytest.raises(ValueError, match="one photo per render"):
        experiment.real_detail(renders, photos(dot).subset(torch.tensor([0])), 2.0)
    with pytest.raises(ValueError, match="strength"):
        experiment.real_detail(renders, photos(dot), -1.0)
    bare = FaceTensors(dot, torch.arange(2), {}, 2)
    with pytest.raises(ValueError, match="landmarks"):
        experiment.real_detail(renders, bare, 2.0)
