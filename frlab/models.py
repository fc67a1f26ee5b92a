"""Backbones: an IR-ResNet of the ArcFace family and a MobileFaceNet-style student.

Both map (B, 3, S, S) images, S in {32, 64, 112} (any multiple of 16), to (B, embedding_size)
embeddings; embedding_size may be as small as 2 or 3 for geometry notebooks.

    model = IResNet(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), input_size=112)  # IR-18
    model = iresnet("ir50", input_size=112)
    student = MobileFaceNet(input_size=112)
"""
from __future__ import annotations

from torch import nn


def _check_size(input_size: int, factor: int) -> int:
    if input_size % factor or input_size < factor:
        raise ValueError(f"input_size must be a positive multiple of {factor}, got {input_size}")
    return input_size // factor


class IRBlock(nn.Module):
    """BN - Conv3x3 - BN - PReLU - Conv3x3(stride) - BN, plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """IR-ResNet (ArcFace's `iresnet`): a stem, four stages that each halve the resolution, and the
    output block BN - dropout - flatten - linear - BN to the embedding."""

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(depths) != len(widths) or not depths:
            raise ValueError("depths and widths need one entry per stage")
        side = _check_size(input_size, 2 ** len(depths))
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        blocks, cin = [], widths[0]
        for depth, width in zip(depths, widths):
            for i in range(depth):
                blocks.append(IRBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.output = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(cin * side * side, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        self.embedding_size = embedding_size

    def forward(self, x):
        return self.output(self.stages(self.stem(x)))

    def features(self, x):
        """The last feature map (B, C, h, w), before the output block (OTFace uses it)."""
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
    depths, widths = ARCHS[name]
    return IResNet(depths, tuple(max(4, int(w * width)) for w in widths), **kwargs)


class _ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=1, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([nn.PReLU(cout)] if act else []))


class _Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand - 3x3 depthwise - 1x1 linear project."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        mid = cin * expansion
        self.body = nn.Sequential(
            _ConvBN(cin, mid), _ConvBN(mid, mid, 3, stride, groups=mid), _ConvBN(mid, cout, act=False)
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet-style student (Chen et al. 2018): inverted bottlenecks, a global depthwise
    convolution (GDC) instead of pooling, and a linear embedding. `width` scales the channels."""

    SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))  # t, c, n, s

    def __init__(self, embedding_size: int = 512, input_size: int = 112, width: float = 1.0):
        super().__init__()
        side = _check_size(input_size, 16)
        c = lambda n: max(8, int(n * width))  # noqa: E731
        layers = [_ConvBN(3, c(64), 3, 2), _ConvBN(c(64), c(64), 3, 1, groups=c(64))]
        cin = c(64)
        for t, ch, n, s in self.SETTING:
            for i in range(n):
                layers.append(_Bottleneck(cin, c(ch), s if i == 0 else 1, t))
                cin = c(ch)
        layers.append(_ConvBN(cin, c(512)))
        self.features_ = nn.Sequential(*layers)
        self.output = nn.Sequential(
            _ConvBN(c(512), c(512), side, 1, groups=c(512), act=False),  # GDC: side x side depthwise
            nn.Conv2d(c(512), embedding_size, 1, bias=False),
            nn.Flatten(),
            nn.BatchNorm1d(embedding_size),
        )
        # the GDC kernel covers the whole map, so it must see no padding
        self.output[0][0].padding = (0, 0)
        self.embedding_size = embedding_size

    def forward(self, x):
        return self.output(self.features_(x))

    def features(self, x):
        return self.features_(x)
