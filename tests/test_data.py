"""SynthFaces is deterministic and keeps identity across nuisances; ORL reads; splits are disjoint."""

import hashlib
import math

import pytest
import torch

from frlab.data import (
    ORL_TEST,
    ORL_TRAIN,
    Const,
    Group,
    Normal,
    SynthFaces,
    hash_uniform,
    materialize,
    orl_faces,
    synth,
)
from frlab.train import pk_batches


def digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_same_seed_same_bytes_in_any_batch():
    a = SynthFaces(range(20), images_per_identity=5, seed=3)
    b = SynthFaces(range(20), images_per_identity=5, seed=3)
    x, _, _ = a.batch(torch.arange(40))
    y, _, _ = b.batch(torch.arange(39, -1, -1))
    assert digest(x) == digest(y.flip(0))
    single, _, _ = a.batch([17])
    assert torch.equal(single[0], x[17]), "an image must not depend on the rest of its batch"


def test_large_batches_render_in_blocks_with_the_same_images(monkeypatch):
    from frlab.data import face3d

    faces = SynthFaces(range(5), images_per_identity=4, size=32, seed=1)
    monkeypatch.setattr(face3d, "CPU_BLOCK_PIXELS", 3 * 32 * 32)  # blocks of 3, 3, 3, 3, 3, 3 and 2 images
    blocked, _, _ = faces.batch(torch.arange(20))
    monkeypatch.setattr(face3d, "CPU_BLOCK_PIXELS", 1 << 40)
    whole, _, _ = faces.batch(torch.arange(20))
    alone = torch.cat([faces.batch([i])[0] for i in range(20)])
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(blocked, alone, atol=1e-6, rtol=0)


def _factors(faces, index):
    """Identity factors and nuisances of samples `index`, as the renderer takes them."""
    meta = faces.meta_of(torch.as_tensor(index))
    return faces.identity_factors(meta["label"]), {k: meta[k] for k in synth.NUISANCES}


def test_the_ray_cast_finds_the_first_surface_a_ray_meets():
    """Against a brute-force march along every pixel's ray in float64: the camera depth at which
    the ray first enters any skin primitive (the union of cranium, lower face, nose and ears)."""
    from frlab.data import face3d

    size = 24
    faces = SynthFaces(range(4), images_per_identity=3, size=size, seed=5)
    identity, nuis = _factors(faces, torch.arange(12))
    ray = face3d.cast(identity, nuis, size)
    f, n = face3d._factors(identity, nuis)
    geo = face3d.geometry(f)
    t = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    s = torch.linspace(2.0, -2.0, 4001, dtype=torch.float64)  # camera depths, front to back
    for b in range(12):
        M = face3d.rotation(
            torch.deg2rad(n["yaw"].view(-1)[b : b + 1]).double(), torch.deg2rad(n["pitch"].view(-1)[b : b + 1]).double()
        )[0]
        roll = math.radians(float(n["roll"].view(-1)[b]))
        ti, tj = torch.meshgrid(t, t, indexing="ij")
        x, y = tj * math.cos(roll) + ti * math.sin(roll), tj * math.sin(roll) - ti * math.cos(roll)
        P = torch.stack(torch.broadcast_tensors(x[..., None], y[..., None], s), -1)  # (S, S, steps, 3) camera points
        Q = P @ M  # head points: M^T p for each row vector p
        inside = torch.zeros(Q.shape[:-1], dtype=torch.bool)
        for name in face3d.SKIN:
            c, a = (v[b].double() for v in geo[name])
            inside |= (((Q - c) / a) ** 2).sum(-1) <= 1
        entered = inside.any(-1)
        first = s[inside.float().argmax(-1)]  # the front-most depth inside
        skin = ray["winner"][b] != face3d.PRIMITIVES.index("hair")  # (where hair is in front, skin is not seen)
        hit = (ray["depth"][b] > -1e3) & skin
        assert ((entered != hit) & skin).float().mean() < 0.01  # the silhouettes agree, but for grazing pixels
        both = entered & hit
        assert both.float().mean() > 0.2
        torch.testing.assert_close(ray["depth"][b][both].double(), first[both], atol=2e-3, rtol=0)


def test_a_face_turned_the_other_way_is_its_mirror_image():
    """The head and its features are left-right symmetric: yaw -a under light from -b is the mirror
    image of yaw a under light from b, to float rounding. (This checks the whole 3-D pipeline: the
    ray cast, the normals, the features and the hair.)"""
    faces = SynthFaces(range(3), size=48, seed=2)
    for label, (yaw, light) in enumerate([(35.0, 50.0), (70.0, -20.0), (-15.0, 30.0)]):
        kw = dict(pitch=12.0, expression=0.6, light_strength=0.8, glasses=float(label == 1), mask=float(label == 2))
        right = faces.render(label, yaw=yaw, light_azimuth=light, **kw)
        left = faces.render(label, yaw=-yaw, light_azimuth=-light, **kw)
        torch.testing.assert_close(left, right.flip(2), atol=2e-5, rtol=0)


def test_roll_turns_the_face_in_the_image():
    """Rolled by 90 degrees, every pixel centre lands on a pixel centre: where the head covers a
    pixel fully (no background shows), the rolled face is the upright one turned by a quarter
    (unlit: the light stays with the camera while the face turns)."""
    from frlab.data import face3d

    faces = SynthFaces(range(2), size=40, seed=3)
    for label in range(2):
        pose = {"yaw": 25.0, "pitch": -10.0, "light_strength": 0.0, "expression": 0.5}
        upright = faces.render(label, **pose)
        rolled = faces.render(label, roll=90.0, **pose)
        cover = face3d.cast(faces.identity_factors(torch.tensor([label])), faces._explicit(pose, "cpu"), 40)[
            "coverage"
        ][0]
        full = torch.rot90(cover > 0.999, -1, (0, 1))  # rolled[i, j] shows upright[S - 1 - j, i]
        assert full.float().mean() > 0.3
        torch.testing.assert_close(rolled[:, full], torch.rot90(upright, -1, (1, 2))[:, full], atol=1e-4, rtol=0)


def test_soft_ellipses_on_the_surface_match_the_formula():
    from frlab.data import face3d

    g = torch.Generator().manual_seed(0)
    qx, qy = (torch.rand(3, 20, 20, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    cx, cy, rx, ry, shear = (
        torch.rand(3, 1, 1, generator=g, dtype=torch.float64) * k + o
        for k, o in ((0.6, -0.3), (0.6, -0.3), (0.4, 0.02), (0.4, 0.02), (2.0, -1.0))
    )
    got = face3d._ellipse(qx, qy, cx, cy, rx, ry, 16.0, shear)
    r = torch.minimum(rx, ry)
    dist2 = ((qx - cx) / rx) ** 2 + ((qy - cy - shear * (qx - cx)) / ry) ** 2  # 1 on the outline
    want = (r * 16.0 * (1 - dist2) / 2 + 0.5).clamp(0, 1) * (r * 16.0).clamp(max=1.0)  # (r - rho) sharp at the outline
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_the_relief_is_the_sum_of_its_bumps():
    """Against the formula written out per bump in float64: cheekbones and sockets in pairs
    (mirrored), the brow ridge, the chin and the muzzle on the midline, each times its factor."""
    from frlab.data import face3d

    faces = SynthFaces(range(4), seed=5)
    f = {k: v.double().view(-1, 1, 1) for k, v in faces.identity_factors(torch.arange(4)).items() if v.dim() == 1}
    g = torch.Generator().manual_seed(1)
    qx, qy = (torch.rand(4, 16, 16, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))

    def bump(cx, cy, sx, sy):
        return torch.exp(-(((qx - cx) / sx) ** 2) - ((qy - cy) / sy) ** 2)

    a = f["face_w"]
    want = (
        f["cheekbones"] * (bump(-0.55 * a, f["nose_y"], 0.18, 0.12) + bump(0.55 * a, f["nose_y"], 0.18, 0.12))
        + f["brow_ridge"] * bump(0, f["eye_y"] + 0.12, 0.5, 0.05)
        + f["chin"] * bump(0, f["mouth_y"] - 0.2, 0.15, 0.1)
        + f["muzzle"] * bump(0, (f["mouth_y"] + f["nose_y"]) / 2, 0.3, 0.1)
        - f["sockets"] * (bump(-f["eye_x"], f["eye_y"], 0.12, 0.08) + bump(f["eye_x"], f["eye_y"], 0.12, 0.08))
    )
    torch.testing.assert_close(face3d.relief(f, qx, qy), want, atol=1e-6, rtol=0)


def test_the_relief_shades_the_face_without_moving_it():
    """A face with its relief flattened (every bump 0) has the same silhouette and landmarks; its
    pixels differ only on the face's front (and the pixels beside it, whose normals the shading
    takes from central differences), under side light."""
    from frlab.data import face3d

    faces = SynthFaces(range(6), seed=7)
    ident, nuis = _factors(faces, torch.arange(0, 60, 10))
    nuis = {**nuis, "light_azimuth": torch.full((6,), 50.0), "light_strength": torch.full((6,), 0.8)}
    flat = {**ident, **{k: torch.zeros(6) for k in ("cheekbones", "brow_ridge", "chin", "muzzle", "sockets")}}
    ray = face3d.cast(ident, nuis, 64)
    torch.testing.assert_close(face3d.cast(flat, nuis, 64)["coverage"], ray["coverage"], atol=0, rtol=0)
    torch.testing.assert_close(face3d.landmarks(flat, nuis), face3d.landmarks(ident, nuis), atol=0, rtol=0)
    changed = (face3d.render(ident, nuis) - face3d.render(flat, nuis)).abs().amax(1) > 1e-4
    front = ray["winner"] <= face3d.PRIMITIVES.index("nose")
    front = torch.nn.functional.max_pool2d(front.float()[:, None], 3, 1, 1)[:, 0] > 0
    assert changed.any(1).any(1).all(), "every face's shading changes"
    assert not (changed & ~front).any(), "and nothing else does"


def test_other_seed_other_faces():
    x, _, _ = SynthFaces(range(4), seed=0).batch(torch.arange(8))
    y, _, _ = SynthFaces(range(4), seed=1).batch(torch.arange(8))
    assert (x - y).abs().mean() > 0.02


def test_identity_is_a_world_property_shared_by_views():
    """Identity 12 has the same factors (so the same frontal face) in any data set of the world."""
    a = SynthFaces(range(10, 20), seed=5)
    b = SynthFaces([3, 12, 40], seed=5)
    torch.testing.assert_close(a.render(2), b.render(1))


def test_changing_one_nuisance_distribution_keeps_every_other_factor():
    a = SynthFaces(range(10), images_per_identity=4, seed=0)
    b = a.with_nuisance(yaw=Const(0.0))
    ma, mb = a.meta, b.meta
    assert torch.equal(mb["yaw"], torch.zeros(40))
    for k in ("pitch", "roll", "resolution", "glasses", "label", "identity", "group"):
        assert torch.equal(ma[k], mb[k]), k


def test_identity_kept_across_nuisance_changes():
    """Identity factors depend on (seed, identity) only; a face under a mild nuisance change is
    still nearer to itself than to any other identity, even in pixel space."""
    a = SynthFaces(range(30), seed=0)
    b = a.with_nuisance(yaw=Normal(60, 5), resolution=Const(4.0))
    for k, v in a._identity.items():
        assert torch.equal(v, b._identity[k]), k
    frontal = torch.stack([a.render(i) for i in range(30)]).flatten(1)
    moved = torch.stack([a.render(i, yaw=10.0, light_azimuth=20.0, expression=0.3) for i in range(30)]).flatten(1)
    d = torch.cdist(moved, frontal)
    assert (d.argmin(1) == torch.arange(30)).float().mean() > 0.9


def test_nuisances_change_the_image():
    faces = SynthFaces(range(1), seed=0)
    base = faces.render(0)
    for kw in (
        {"yaw": 60.0},
        {"pitch": 30.0},
        {"roll": 20.0},
        {"resolution": 6.0},
        {"blur": 1.5},
        {"noise": 0.1},
        {"glasses": 1.0},
        {"mask": 1.0},
        {"expression": 1.0},
        {"light_azimuth": 60.0},
    ):
        assert (faces.render(0, **kw) - base).abs().mean() > 0.003, kw


def test_metadata_and_difficulty():
    faces = SynthFaces(range(50), images_per_identity=4, seed=0)
    m = faces.meta
    assert len(m["label"]) == 200 and m["label"].max() == 49
    easy = SynthFaces(range(50), images_per_identity=4, seed=0, nuisance=faces.nuisance.frontal())
    assert float(easy.meta["difficulty"].max()) == 0.0
    assert float(m["difficulty"].mean()) > 0.1
    hard = faces.with_nuisance(yaw=Normal(70, 5, -90, 90))
    assert hard.meta["difficulty"].mean() > m["difficulty"].mean()


def test_groups_follow_weights_and_differ_in_spread():
    groups = [Group("a", weight=3, spread=1.0), Group("b", weight=1, spread=0.3)]
    faces = SynthFaces(range(2000), seed=0, groups=groups)
    share = float((faces.meta["group"][:: faces.images_per_identity] == 1).float().mean())
    assert 0.2 < share < 0.3
    factors = faces._identity
    g = factors["group"]
    assert factors["eye_x"][g == 1].std() < 0.5 * factors["eye_x"][g == 0].std()
    # skin tone has nothing to do with the group: both span the same light-to-dark range alike
    tone = factors["skin"].mean(1)
    for q in (0.1, 0.5, 0.9):
        assert abs(float(tone[g == 0].quantile(q) - tone[g == 1].quantile(q))) < 0.05, q
    assert float(tone.min()) < 0.3 and float(tone.max()) > 0.75


@pytest.mark.parametrize("size", [32, 64, 112])
def test_sizes_and_range(size):
    x, y, _ = SynthFaces(range(3), images_per_identity=2, size=size).batch(torch.arange(6))
    assert x.shape == (6, 3, size, size) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and torch.isfinite(x).all()


def test_bad_input():
    with pytest.raises(ValueError, match="unknown nuisance"):
        SynthFaces(range(2)).render(0, yaww=3)
    with pytest.raises(IndexError):
        SynthFaces(range(2), images_per_identity=2).batch([4])
    with pytest.raises(ValueError, match="size"):
        SynthFaces(range(2), size=8)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Normal(0.0, -1.0), ValueError, "Normal's std"),
        (lambda: Normal(0.0, 1.0, 2.0, 1.0), ValueError, "Normal's lo must not exceed its hi"),
        (lambda: Normal(0.0, 1.0, "a"), TypeError, "Normal's lo must be a number"),
        (lambda: synth.Uniform(2.0, 1.0), ValueError, "Uniform's lo must not exceed"),
        (lambda: synth.Uniform(0.0, math.inf), ValueError, "Uniform's hi must be finite"),
        (lambda: synth.Bernoulli(1.5), ValueError, "Bernoulli's p"),
        (lambda: Const(math.nan), ValueError, "Const's value must be finite"),
        (lambda: synth.Nuisance(yaw=30.0), TypeError, "Nuisance's yaw must be a Normal, Uniform or Const"),
        (lambda: synth.Nuisance(mask=synth.Uniform()), TypeError, "Nuisance's mask must be a Bernoulli or Const"),
        (lambda: Group("B", spread=-0.5), ValueError, "the spread of group 'B'"),
        (lambda: Group("B", weight=-1.0), ValueError, "the weight of group 'B'"),
        (lambda: SynthFaces(range(3), groups=(Group(weight=0.0),)), ValueError, "weights must not all be 0"),
        (lambda: SynthFaces(range(3), groups=()), TypeError, "groups must be one or more Group"),
        (lambda: SynthFaces(range(3), nuisance={"yaw": 3}), TypeError, "nuisance must be a Nuisance"),
        (lambda: SynthFaces([4, 7, 4]), ValueError, r"distinct \(each id is one face\), got \[4\]"),
        (lambda: SynthFaces([0.0, 1.0]), TypeError, "identities must be integers"),
        (lambda: SynthFaces([]), ValueError, "at least one identity"),
        (lambda: SynthFaces(range(3), images_per_identity=0), ValueError, "images_per_identity"),
        (lambda: SynthFaces(range(3), size=64.0), TypeError, "size"),
        (lambda: SynthFaces(range(3), seed="0"), TypeError, "seed must be an integer"),
        (lambda: SynthFaces(range(3)).render(3), ValueError, r"label must lie in \[0, 2\]"),
        (lambda: SynthFaces(range(3)).render(-1), ValueError, "label must lie in"),
        (lambda: SynthFaces(range(3)).landmarks(5), ValueError, "label must lie in"),
        (lambda: SynthFaces(range(3)).render(0, yaw="30"), TypeError, "yaw must be a number"),
        (lambda: SynthFaces(range(3)).sweep(0, "yawn"), ValueError, "factor must be one of"),
    ],
)
def test_bad_factors_and_worlds_fail_where_they_are_given(make, error, message):
    """A distribution, group, world or face asked for with a value of the wrong type or out of
    range fails at once, with a line that names it (a repeated identity id would be one face
    under two labels; a negative label would wrap round to the last identity)."""
    with pytest.raises(error, match=message):
        make()


def test_good_factors_and_worlds_of_other_types_are_taken():
    import numpy as np

    faces = SynthFaces(np.arange(3), seed=np.int64(2), size=32)
    assert torch.equal(
        faces.render(np.int64(1), yaw=np.float32(20.0)), SynthFaces(range(3), seed=2, size=32).render(1, yaw=20.0)
    )
    assert SynthFaces(torch.arange(3)).num_classes == 3
    assert Normal(0, 25, -90, 90)(torch.tensor([0.5])).item() == 0.0  # ints, as in Normal(0, 25)
    assert synth.Uniform(np.float32(-1.0), np.float64(1.0))(torch.tensor([0.5])).item() == 0.0


def test_hash_uniform_is_uniform_and_key_sensitive():
    u = hash_uniform(0, torch.arange(100_000), 1)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert not torch.equal(u, hash_uniform(0, torch.arange(100_000), 2))


def test_materialized_faces_match_rendered_ones():
    faces = SynthFaces(range(4), images_per_identity=3)
    data = materialize(faces, batch_size=5, progress=False)
    x, y, _ = faces.batch(torch.arange(12))
    xm, ym, _ = data.batch(torch.arange(12))
    assert torch.equal(y, ym) and (x - xm).abs().max() <= 0.5 / 255 + 1e-6


def test_pk_sampler_gives_k_images_of_p_identities():
    labels = torch.arange(20).repeat_interleave(torch.tensor([3, 5] * 10))  # some ids have fewer than K images
    g = torch.Generator().manual_seed(0)
    for batch in pk_batches(labels, batch_size=16, k=4, generator=g):
        ids, counts = torch.unique(labels[batch], return_counts=True)
        assert len(ids) == 4 and bool((counts == 4).all())
        for i in ids:  # distinct images where the identity has at least K
            picked = batch[labels[batch] == i]
            assert len(torch.unique(picked)) == min(4, int((labels == i).sum()))


def test_orl_faces_and_disjoint_split():
    train, test = orl_faces(ORL_TRAIN, size=64), orl_faces(ORL_TEST, size=64)
    assert train.images.shape == (300, 3, 64, 64) and test.images.shape == (100, 3, 64, 64)
    assert set(train.meta["identity"].tolist()).isdisjoint(test.meta["identity"].tolist())
    assert train.images.float().std() > 20  # real grey faces, not a blank array
    assert torch.equal(train.labels[:10], torch.zeros(10, dtype=torch.long))


def test_synth_train_and_test_ranges_are_disjoint():
    a, b = SynthFaces(range(0, 100)), SynthFaces(range(10_000, 10_040))
    assert set(a.meta["identity"].tolist()).isdisjoint(b.meta["identity"].tolist())


def degrade_reference(img, resolution, blur):
    """One image at a time: area down-sample and bilinear up-sample, then a replicate-padded
    separable Gaussian convolution (9 taps), the way the renderer is documented to degrade."""
    import torch.nn.functional as F

    out = []
    _, C, H, W = img.shape
    for x, res, sigma in zip(img, resolution.tolist(), blur.tolist()):
        x = x[None].double()
        s = int(min(max(round(H / res), 4), H))
        if s < H:
            x = F.interpolate(
                F.interpolate(x, size=(s, s), mode="area"), size=(H, W), mode="bilinear", align_corners=False
            )
        if sigma > 0.05:
            k = torch.arange(-4, 5, dtype=torch.float64)
            w = torch.exp(-0.5 * (k / sigma) ** 2)
            w = (w / w.sum()).expand(C, 9)
            x = F.pad(x, (4, 4, 4, 4), mode="replicate")
            x = F.conv2d(F.conv2d(x, w.reshape(C, 1, 1, 9), groups=C), w.reshape(C, 1, 9, 1), groups=C)
        out.append(x[0].float())
    return torch.stack(out)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_degrade_matches_per_image_resample_and_blur(size):
    from frlab.data.synth import _degrade

    g = torch.Generator().manual_seed(size)
    n = 40
    img = torch.rand(n, 3, size, size, generator=g)
    resolution = torch.cat([torch.ones(10), 1 + 7 * torch.rand(n - 10, generator=g)])
    blur = torch.where(torch.rand(n, generator=g) < 0.5, torch.zeros(n), 2 * torch.rand(n, generator=g))
    blur[:5] = 0.0  # some images are neither down-sampled nor blurred: they must not change
    expected = degrade_reference(img, resolution, blur)
    got = _degrade(img.clone(), {"resolution": resolution, "blur": blur})
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    assert torch.equal(got[:5], img[:5])


def test_noise_is_a_circular_shift_of_a_fixed_field():
    from frlab.data.synth import _add_noise, _noise_bank

    H = 32
    identity, image = torch.arange(6), torch.arange(6) * 3
    std = torch.tensor([0.0, 0.1, 0.05, 0.0, 0.2, 0.1])
    base = torch.full((6, 3, H, H), 0.5)
    got = _add_noise(base.clone(), 7, identity, image, std)
    bank = _noise_bank(7, H, "cpu")[:, :, :H, :H]  # the untiled fields
    u = hash_uniform(7, identity[:, None], image[:, None], torch.arange(1000, 1003))
    k, dy, dx = (u * torch.tensor([64, H, H])).long().unbind(1)
    for i in range(6):
        field = torch.roll(bank[k[i]], shifts=(-int(dy[i]), -int(dx[i])), dims=(1, 2))
        torch.testing.assert_close(got[i], (0.5 + std[i] * field).clamp(0, 1))
