"""The auxiliary losses and the trainer on CUDA, against the same computation on the CPU (skipped
without a GPU; the heads' CUDA tests live in test_heads.py).

FRLAB_TEST_DEVICE names the device compared with the CPU (default "cuda"); `FRLAB_TEST_DEVICE=cpu`
rehearses these tests on a machine without a GPU (every comparison is then CPU against CPU: it
checks the tests themselves, not a device)."""

import os

import pytest
import torch

from frlab import heads, models
from frlab.data import SynthFaces, materialize
from frlab.losses import DDL, EKD, CentrePull, FeatureDistill, IntraLoss, SimilarityPreserving
from frlab.train import Batch, TrainConfig, Trainer

DEVICE = os.environ.get("FRLAB_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")


def batch(seed=0, b=32, d=16, n_id=8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_id).repeat_interleave(b // n_id)
    x = torch.randn(n_id, d, generator=g)[labels] + 0.7 * torch.randn(b, d, generator=g)
    easy, hard = torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g) < 0.4
    return x, labels, easy, hard


def same_on_both(make_term, x, labels, images=None, meta=None, rtol=1e-4, atol=1e-6):
    """term(out, batch) built on the CPU and on DEVICE by make_term(device): equal values and gradients."""
    results = []
    for dev in ("cpu", DEVICE):
        term = make_term(dev)
        emb = x.to(dev).requires_grad_()
        imgs = images.to(dev) if images is not None else torch.zeros(len(x), 3, 8, 8, device=dev)
        loss = term({"embedding": emb}, Batch(imgs, labels.to(dev), meta or {}))
        loss.backward()
        results.append((loss.detach().cpu(), emb.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=rtol, atol=atol)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=rtol, atol=atol)


def test_ddl():
    x, labels, easy, hard = batch()
    meta = {
        "yaw": torch.where(easy, 0.0, 60.0),
        "pitch": torch.zeros(len(x)),
        "resolution": torch.ones(len(x)),
        "blur": torch.zeros(len(x)),
        "mask": torch.where(hard, 1.0, 0.0),
    }
    same_on_both(lambda dev: DDL().to(dev), x, labels, meta=meta)


@pytest.mark.parametrize("kind", ["intra", "angle", "centre"])
def test_intra_terms(kind):
    x, labels, _, _ = batch(1)
    torch.manual_seed(0)
    head = heads.ArcFace(16, 8, s=16)

    def make(dev):
        h = heads.ArcFace(16, 8, s=16).to(dev)
        h.load_state_dict(head.state_dict())
        return {"intra": IntraLoss(8, 16), "angle": IntraLoss(8, 16, anisotropic=False), "centre": CentrePull(h)}[
            kind
        ].to(dev)

    same_on_both(make, x, labels)


def test_distillation_terms():
    x, labels, _, _ = batch(2)
    teacher_emb = batch(3)[0]

    class Table(torch.nn.Module):
        """A 'teacher' that returns fixed embeddings for image indices (in the images' first pixel)."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Parameter(teacher_emb.clone())

        def forward(self, images):
            return self.emb[images[:, 0, 0, 0].long()]

    images = torch.arange(len(x)).float().view(-1, 1, 1, 1).expand(-1, 3, 8, 8)
    for cls in (EKD, FeatureDistill, SimilarityPreserving):
        same_on_both(lambda dev, cls=cls: cls(Table()).to(dev), x, labels, images=images)


def test_trainer_step_with_bf16_autocast_moves_every_registered_module():
    data = materialize(SynthFaces(range(6), images_per_identity=8, size=32), progress=False)
    torch.manual_seed(0)
    model = models.MobileFaceNet(8, input_size=32, width=0.25)
    head = heads.CurricularFace(8, 6, s=16)
    teacher = models.iresnet("ir8", width=0.125, input_size=32, embedding_size=8)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, amp=True, device=DEVICE, sampler="mixed", progress=False)
    trainer = Trainer(
        model, head, data, cfg, extra={"intra": IntraLoss(6, 8), "centre": CentrePull(head), "ekd": EKD(teacher)}
    )
    history = trainer.fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert {t.device.type for t in trainer.net.state_dict().values()} == {torch.device(DEVICE).type}


@pytest.mark.parametrize(
    "kw", [{}, {"mode": "log", "eps": 0.1, "iters": 20}, {"mode": "log", "eps": 0.01, "iters": 50, "grad": "plan"}]
)
def test_otface_and_both_sinkhorn_paths(kw):
    """OTFace on feature maps: the released update, the plain-domain log path (eps 0.1) and the
    log-domain path (eps 0.01), the same value and feature-map gradient on DEVICE as on the CPU."""
    from frlab.losses import OTFace

    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(16, 32, 4, 4, generator=g))
    emb = torch.randn(16, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    results = []
    for dev in ("cpu", DEVICE):
        f = features.to(dev).requires_grad_()
        loss = OTFace(**kw).loss(f, emb.to(dev), labels.to(dev))
        loss.backward()
        results.append((loss.detach().cpu(), f.grad.cpu()))
    assert float(results[0][0]) > 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["arcface", "curricularface", "npt", "cifp"])
def test_a_sharded_head_on_one_process_equals_its_head_on_the_device(kind):
    """frlab.distributed's ShardedHead without a process group (W = 1) on DEVICE against the head on
    the CPU: the sharded path's device handling (the NCCL path itself needs two GPUs)."""
    from frlab import distributed

    x, labels, _, _ = batch()
    results = []
    for dev in ("cpu", DEVICE):
        torch.manual_seed(0)
        head = heads.make_head(kind, x.shape[1], 8).to(dev)
        sharded = distributed.ShardedHead(heads.make_head(kind, x.shape[1], 8)).to(dev)
        sharded.weight.data.copy_(head.weight.data)
        emb = x.to(dev).requires_grad_()
        loss = sharded(emb, labels.to(dev))
        loss.backward()
        results.append((loss.detach().cpu(), emb.grad.cpu(), sharded.weight.grad.cpu()))
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    ref = heads.make_head(kind, x.shape[1], 8)
    ref.weight.data.copy_(head.weight.data.cpu())
    torch.testing.assert_close(results[0][0], ref(x, labels).detach(), rtol=1e-5, atol=1e-6)
