"""MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks", IEEE SPL 2016): face boxes and five landmarks (eye centres, nose tip, mouth corners).

frlab uses it once, offline, to find the five landmarks of the ORL faces that align them for the
pretrained network (`frlab.pretrained`); the result is committed as frlab/data/orl_landmarks.csv,
and this module regenerates it:

    python -m frlab.mtcnn                        # downloads the facenet-pytorch wheel to read its weights
    python -m frlab.mtcnn --wheel facenet_pytorch-2.6.0-py3-none-any.whl

The three networks' weights (P-, R- and O-Net, 2 MB, MIT licence) are read out of the PyPI wheel
`facenet-pytorch==2.6.0` as plain state dicts; the package itself is never installed (it pins old
torch and numpy releases). The cascade: P-Net scans an image pyramid for 12 x 12 face candidates,
R-Net rejects and refines them on 24 x 24 crops, O-Net on 48 x 48 crops gives the final boxes
and the landmarks. Thresholds, pyramid factor and non-maximum suppression follow the paper's
released settings (0.6 / 0.7 / 0.7, 0.709, IoU 0.5 / 0.7 / 0.7).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WHEEL = "facenet-pytorch==2.6.0"
LANDMARKS = Path(__file__).resolve().parent / "data" / "orl_landmarks.csv"


def _conv(cin, cout, k):
    return nn.Conv2d(cin, cout, k)


class PNet(nn.Module):
    """12 x 12 windows -> face probability and box offsets, fully convolutional (stride 2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = _conv(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = _conv(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = _conv(32, 2, 1), _conv(32, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), 1)[:, 1], self.conv4_2(x)


def _flatten(x):
    """The weights were trained in a (W, H, C) layout: flatten in that order."""
    return x.permute(0, 3, 2, 1).reshape(len(x), -1)


class RNet(nn.Module):
    """24 x 24 crops -> face probability and box offsets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = _conv(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = _conv(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten(self.prelu3(self.conv3(x)))))
        return F.softmax(self.dense5_1(x), 1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """48 x 48 crops -> face probability, box offsets and five landmarks (x1..x5, y1..y5, in units
    of the crop)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = _conv(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = _conv(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = _conv(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten(self.prelu4(self.conv4(x)))))
        return F.softmax(self.dense6_1(x), 1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def download_wheel(folder: str | Path) -> Path:
    """pip download the facenet-pytorch wheel (no dependencies, nothing installed) into folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), WHEEL], check=True)
    return next(Path(folder).glob("facenet_pytorch-*.whl"))


def load_nets(wheel: str | Path) -> tuple[PNet, RNet, ONet]:
    """The three networks with the weights read out of the facenet-pytorch wheel (a zip file)."""
    nets = PNet(), RNet(), ONet()
    with zipfile.ZipFile(wheel) as z:
        for net, name in zip(nets, ("pnet", "rnet", "onet")):
            state = torch.load(io.BytesIO(z.read(f"facenet_pytorch/data/{name}.pt")), weights_only=True)
            net.load_state_dict(state)
    return tuple(net.eval() for net in nets)


# ---------------------------------------------------------------- the cascade
def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, by_min: bool = False) -> torch.Tensor:
    """Indices of the boxes (N, 4: x1, y1, x2, y2, inclusive pixels) kept by greedy non-maximum
    suppression: overlap as intersection over union (or over the smaller box, `by_min`)."""
    order = torch.argsort(scores, descending=True)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(int(i))
        lo, hi = torch.maximum(boxes[i, :2], boxes[rest, :2]), torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (hi - lo + 1).clamp(min=0).prod(1)
        union = torch.minimum(area[i], area[rest]) if by_min else area[i] + area[rest] - inter
        order = rest[inter / union <= threshold]
    return torch.tensor(keep, dtype=torch.long)


def _refine(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply the networks' box regression (offsets in units of the box's size)."""
    size = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)
    return boxes + offsets * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box grown to a square around its centre."""
    wh = boxes[:, 2:] - boxes[:, :2]
    side = wh.max(1).values[:, None]
    lo = boxes[:, :2] + wh / 2 - side / 2
    return torch.cat([lo, lo + side], 1)


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each box of image (3, H, W) resampled to size x size (bilinear; zeros outside the image)."""
    H, W = image.shape[1:]
    t = torch.linspace(0, 1, size)
    x = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * t  # (N, size) pixel coordinates
    y = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * t
    grid = torch.stack(
        torch.broadcast_tensors(((x + 0.5) * 2 / W - 1)[:, None, :], ((y + 0.5) * 2 / H - 1)[:, :, None]), -1
    )
    return F.grid_sample(image.expand(len(boxes), -1, -1, -1), grid, align_corners=False)


@torch.no_grad()
def detect(image: torch.Tensor, nets, min_face: int = 20, factor: float = 0.709, thresholds=(0.6, 0.7, 0.7)):
    """Faces in one image (3, H, W), RGB in [0, 1]: boxes (N, 4), probabilities (N,) and landmarks
    (N, 5, 2) (x, y in pixels, pixel centres at integers), most probable first."""
    pnet, rnet, onet = nets
    x = (image * 255 - 127.5) / 128  # the networks' input scaling
    H, W = image.shape[1:]
    boxes, scores = [], []
    scale = 12 / min_face
    while min(H, W) * scale >= 12:  # P-Net over the pyramid: a 12 x 12 window every 2 pixels
        h, w = int(H * scale + 1), int(W * scale + 1)
        prob, offset = pnet(F.interpolate(x[None], size=(h, w), mode="area"))
        iy, ix = torch.nonzero(prob[0] > thresholds[0], as_tuple=True)
        if len(iy):
            cells = torch.stack([ix, iy], 1).float()
            b = torch.cat([(2 * cells + 1) / scale, (2 * cells + 12) / scale], 1)
            s = prob[0, iy, ix]
            b = _refine(b, offset[0, :, iy, ix].T)
            keep = nms(b, s, 0.5)
            boxes.append(b[keep])
            scores.append(s[keep])
        scale *= factor
    if not boxes:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2)
    boxes, scores = torch.cat(boxes), torch.cat(scores)
    keep = nms(boxes, scores, 0.7)
    boxes = _square(boxes[keep])
    for stage, (net, size, threshold) in enumerate(((rnet, 24, thresholds[1]), (onet, 48, thresholds[2]))):
        out = net(_crops(x, boxes, size))
        keep = out[0] > threshold
        if not keep.any():
            return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2)
        crop, scores = boxes[keep], out[0][keep]
        if stage == 1:  # O-Net's landmarks, in units of the crop it saw
            wh = (crop[:, 2:] - crop[:, :2] + 1)[:, None, :]
            marks = crop[:, None, :2] + wh * out[2][keep].view(-1, 2, 5).transpose(1, 2)
        boxes = _refine(crop, out[1][keep])
        kept = nms(boxes, scores, 0.7, by_min=stage == 1)
        boxes, scores = boxes[kept], scores[kept]
        if stage == 0:
            boxes = _square(boxes)
        else:
            marks = marks[kept]
    order = torch.argsort(scores, descending=True)
    return boxes[order], scores[order], marks[order]


def orl_landmarks(nets) -> list[list[float]]:
    """For every ORL image (identity, image): the most probable face's five landmarks and its probability."""
    from .data.orl import orl_photos

    photos = orl_photos(landmarks=False)  # what this finds
    rows = []
    for k in range(len(photos)):
        image = photos.images[k].float().div(255).expand(3, -1, -1)
        _, scores, marks = detect(image, nets)
        if not len(scores):
            raise RuntimeError(
                f"no face found in ORL identity {int(photos.meta['identity'][k])}, image {int(photos.meta['image'][k])}"
            )
        rows.append(
            [
                int(photos.meta["identity"][k]),
                int(photos.meta["image"][k]),
                *marks[0].reshape(-1).tolist(),
                float(scores[0]),
            ]
        )
    return rows


def write_csv(rows: list[list[float]], path: Path) -> None:
    columns = (
        ["identity", "image"]
        + [f"{p}_{c}" for p in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right") for c in ("x", "y")]
        + ["probability"]
    )
    lines = [",".join(columns)] + [
        ",".join([str(r[0]), str(r[1])] + [f"{v:.3f}" for v in r[2:-1]] + [f"{r[-1]:.5f}"]) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m frlab.mtcnn", description="Regenerate the ORL faces' five landmarks.")
    ap.add_argument("--wheel", type=Path, help=f"the {WHEEL} wheel (default: pip download it to a temporary folder)")
    ap.add_argument("--out", type=Path, default=LANDMARKS)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        nets = load_nets(args.wheel or download_wheel(tmp))
        rows = orl_landmarks(nets)
    write_csv(rows, args.out)
    print(f"wrote {len(rows)} faces' landmarks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
