"""Backbones: an IR-ResNet of the ArcFace family and a MobileFaceNet-style student.

Both map (B, 3, S, S) images, S in {32, 64, 112} (any multiple of 16), to (B, embedding_size)
embeddings; embedding_size may be as small as 2 or 3 for geometry notebooks.

    model = IResNet(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), input_size=112)  # IR-18
    model = iresnet("ir50", input_size=112)
    student = MobileFaceNet(input_size=112)

    emb = model(images)                                  # (B, embedding_size)
    out = model.outputs(images, want=("features",))      # one forward: {"embedding", "features"}

`outputs` is what the trainer calls: the embedding always, the last feature map (B, C, h, w) when a
loss asks for it, from the same forward (a term that ran the backbone again would double the
compute and update BatchNorm's statistics twice). `norm_layer` builds every 2-D normalization
layer (default `nn.BatchNorm2d`), so a network with another normalization, e.g. two BatchNorm
branches, is a constructor argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import checks
from .hparams import HParams

NormLayer = Callable[[int], nn.Module]

OUTPUTS = ("embedding", "features")


def _want(want: Iterable[str]) -> set[str]:
    want = set(want)
    unknown = want - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown model outputs {sorted(unknown)}; a backbone gives {', '.join(OUTPUTS)}")
    return want


class Backbone(HParams, nn.Module):
    """What every frlab backbone shares: `features` (the last feature map), `output` (the block
    from it to the embedding), and the trainer's `outputs`."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, x: torch.Tensor, want: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The embedding, and the feature map if wanted, from one forward."""
        want = _want(want)
        features = self.features(x)
        out = {"embedding": self.output(features)}
        if "features" in want:
            out["features"] = features
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


def _check_size(input_size: int, factor: int) -> int:
    checks.integer("input_size", input_size, lo=1)
    if input_size % factor or input_size < factor:
        raise ValueError(f"input_size must be a positive multiple of {factor}, got {input_size}")
    return input_size // factor


class IRBlock(nn.Module):
    """BN - Conv3x3 - BN - PReLU - Conv3x3(stride) - BN, plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.body = nn.Sequential(
            norm_layer(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            norm_layer(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            norm_layer(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))
        )

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet(Backbone):
    """IR-ResNet (ArcFace's `iresnet`): a stem, four stages that each halve the resolution, and the
    output block BN - dropout - flatten - linear - BN to the embedding."""

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        if len(depths) != len(widths) or not depths:
            raise ValueError("depths and widths need one entry per stage")
        for depth, width in zip(depths, widths):
            checks.integer("a stage's depth", depth, lo=1)
            checks.integer("a stage's width", width, lo=1)
        embedding_size = checks.integer("embedding_size", embedding_size, lo=1)
        dropout = checks.number("dropout", dropout, lo=0, below=1)
        side = _check_size(input_size, 2 ** len(depths))
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), norm_layer(widths[0]), nn.PReLU(widths[0])
        )
        blocks, cin = [], widths[0]
        for depth, width in zip(depths, widths):
            for i in range(depth):
                blocks.append(IRBlock(cin, width, 2 if i == 0 else 1, norm_layer))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.output = nn.Sequential(
            norm_layer(cin),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(cin * side * side, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        self.embedding_size = embedding_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, C, h, w), before the output block."""
        return self.stages(self.stem(x))


ARCHS = {
    "ir8": ((1, 1, 1, 1), (32, 64, 128, 256)),  # a CPU-sized network for notebooks
    "ir18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "ir34": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "ir50": ((3, 4, 14, 3), (64, 128, 256, 512)),
    "ir100": ((3, 13, 30, 3), (64, 128, 256, 512)),
}


def iresnet(name: str = "ir18", width: float = 1.0, **kwargs) -> IResNet:
    """A named IR-ResNet; `width` scales every stage's channels (0.25 for a quick CPU model)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    width = checks.number("width", width, above=0)
    depths, widths = ARCHS[name]
    return IResNet(depths, tuple(max(4, int(w * width)) for w in widths), **kwargs)


class _ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=1, stride=1, groups=1, act=True, norm_layer: NormLayer = nn.BatchNorm2d):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), norm_layer(cout)]
        super().__init__(*layers, *([nn.PReLU(cout)] if act else []))


class _Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand - 3x3 depthwise - 1x1 linear project."""

    def __init__(self, cin, cout, stride, expansion, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        mid = cin * expansion
        self.body = nn.Sequential(
            _ConvBN(cin, mid, norm_layer=norm_layer),
            _ConvBN(mid, mid, 3, stride, groups=mid, norm_layer=norm_layer),
            _ConvBN(mid, cout, act=False, norm_layer=norm_layer),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(Backbone):
    """MobileFaceNet-style student (Chen et al. 2018): inverted bottlenecks, a global depthwise
    convolution (GDC) instead of pooling, and a linear embedding. `width` scales the channels."""

    SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))  # t, c, n, s

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        side = _check_size(input_size, 16)
        embedding_size = checks.integer("embedding_size", embedding_size, lo=1)
        width = checks.number("width", width, above=0)
        c = lambda n: max(8, int(n * width))  # noqa: E731
        layers = [
            _ConvBN(3, c(64), 3, 2, norm_layer=norm_layer),
            _ConvBN(c(64), c(64), 3, 1, groups=c(64), norm_layer=norm_layer),
        ]
        cin = c(64)
        for t, ch, n, s in self.SETTING:
            for i in range(n):
                layers.append(_Bottleneck(cin, c(ch), s if i == 0 else 1, t, norm_layer))
                cin = c(ch)
        layers.append(_ConvBN(cin, c(512), norm_layer=norm_layer))
        self.body = nn.Sequential(*layers)
        self.output = nn.Sequential(
            _ConvBN(
                c(512), c(512), side, 1, groups=c(512), act=False, norm_layer=norm_layer
            ),  # GDC: side x side depthwise
            nn.Conv2d(c(512), embedding_size, 1, bias=False),
            nn.Flatten(),
            nn.BatchNorm1d(embedding_size),
        )
        # the GDC kernel covers the whole map, so it must see no padding
        self.output[0][0].padding = (0, 0)
        self.embedding_size = embedding_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, C, h, w), before the global depthwise convolution."""
        return self.body(x)
