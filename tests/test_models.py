"""Backbones: every input size and embedding size the workbook uses, and the feature maps."""

import pytest
import torch

from frlab import models


@pytest.mark.parametrize("size", [32, 64, 112])
@pytest.mark.parametrize("dim", [2, 3, 512])
def test_iresnet_shapes(size, dim):
    net = models.iresnet("ir8", width=0.125, input_size=size, embedding_size=dim).eval()
    out = net(torch.rand(2, 3, size, size))
    assert out.shape == (2, dim) and torch.isfinite(out).all()
    assert net.features(torch.rand(2, 3, size, size)).shape[-1] == size // 16


@pytest.mark.parametrize("size", [32, 64, 112])
def test_mobilefacenet_shapes(size):
    net = models.MobileFaceNet(embedding_size=128, input_size=size, width=0.25).eval()
    out = net(torch.rand(2, 3, size, size))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


def test_named_architectures_have_the_published_depths():
    blocks = lambda name: sum(
        isinstance(m, models.IRBlock) for m in models.iresnet(name, width=0.0625, input_size=32).modules()
    )  # noqa: E731
    assert [blocks(n) for n in ("ir18", "ir34", "ir50", "ir100")] == [8, 16, 24, 49]


def test_student_is_smaller_than_teacher():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(models.MobileFaceNet(input_size=112)) < n(models.iresnet("ir50", input_size=112)) / 10


def test_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 16"):
        models.iresnet("ir8", input_size=40)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.iresnet("ir7")
