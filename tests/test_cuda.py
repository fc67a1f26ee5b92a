"""The auxiliary losses and the trainer on CUDA, against the same computation on the CPU (skipped
without a GPU; the heads' CUDA tests live in test_heads.py)."""
import pytest
import torch

from frlab import heads, models
from frlab.data import SynthFaces, materialize
from frlab.losses import DDL, EKD, CentrePull, FeatureDistill, IntraLoss, SimilarityPreserving
from frlab.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def batch(seed=0, b=32, d=16, n_id=8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_id).repeat_interleave(b // n_id)
    x = torch.randn(n_id, d, generator=g)[labels] + 0.7 * torch.randn(b, d, generator=g)
    easy, hard = torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g) < 0.4
    return x, labels, easy, hard


def same_on_both(make_term, x, labels, *args, rtol=1e-4, atol=1e-6):
    cpu_term, gpu_term = make_term("cpu"), make_term("cuda")
    a, b = x.clone().requires_grad_(), x.cuda().requires_grad_()
    want = cpu_term(a, labels, *args)
    got = gpu_term(b, labels.cuda(), *[t.cuda() if torch.is_tensor(t) else t for t in args])
    want.backward()
    got.backward()
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=rtol, atol=atol)


def test_ddl():
    x, labels, easy, hard = batch()
    same_on_both(lambda dev: DDL().to(dev).loss, x, labels, easy, hard)


@pytest.mark.parametrize("kind", ["intra", "angle", "centre"])
def test_intra_terms(kind):
    x, labels, _, _ = batch(1)
    torch.manual_seed(0)
    head = heads.ArcFace(16, 8, s=16)

    def make(dev):
        h = heads.ArcFace(16, 8, s=16).to(dev)
        h.load_state_dict(head.state_dict())
        return {"intra": IntraLoss(h), "angle": IntraLoss(h, anisotropic=False), "centre": CentrePull(h)}[kind].to(dev)

    same_on_both(make, x, labels)


def test_distillation_terms():
    x, labels, _, _ = batch(2)
    teacher_emb = batch(3)[0]

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Parameter(teacher_emb.clone())

        def forward(self, idx):
            return self.emb[idx.long()]

    for cls in (EKD, FeatureDistill, SimilarityPreserving):
        def make(dev, cls=cls):
            term = cls(Table().to(dev)).to(dev)
            return lambda emb, y, meta: term(emb, y, meta)

        idx = torch.arange(len(x))
        same_on_both(lambda dev, make=make: (lambda e, y, i: make(dev)(e, y, {"images": i})), x, labels, idx)


def test_trainer_step_on_cuda_with_bf16_autocast():
    data = materialize(SynthFaces(range(6), images_per_identity=8, size=32), progress=False)
    torch.manual_seed(0)
    model = models.MobileFaceNet(8, input_size=32, width=0.25)
    head = heads.CurricularFace(8, 6, s=16)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, amp=True, device="cuda", sampler="mixed", progress=False)
    history = Trainer(model, head, data, cfg, extra={"intra": IntraLoss(head)}).fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert next(model.parameters()).device.type == "cuda"
