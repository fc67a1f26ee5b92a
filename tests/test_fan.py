"""frlab.fan: degradation, the scale transform's batches, FAN's loss terms against references written
here (loops and numpy), its gradients, the split shapes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frlab import fan, heads, train
from frlab.data.synth import FaceTensors


def test_degrade_is_area_down_then_bilinear_up_and_leaves_factor_one_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    out = fan.degrade(x, torch.tensor([1.0, 2.0, 4.0]))
    assert torch.equal(out[0], x[0])
    for k, f in ((1, 2), (2, 4)):
        small = x[k].reshape(3, 16 // f, f, 16 // f, f).mean((2, 4))  # the mean of each f x f block
        up = F.interpolate(small[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out[k], up)
    with pytest.raises(ValueError):
        fan.degrade(x, torch.tensor([1.0, 0.5, 2.0]))
    with pytest.raises(ValueError):
        fan.degrade(x, torch.tensor([1.0, 2.0]))


def test_moments_mmd_and_cross_correlation_against_references():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 3, generator=g, dtype=torch.float64)
    b = torch.randn(9, 3, generator=g, dtype=torch.float64) * 1.5 + 0.3
    A, Bn = a.numpy(), b.numpy()
    ref = ((A.mean(0) - Bn.mean(0)) ** 2).sum() + ((np.cov(A.T, bias=True) - np.cov(Bn.T, bias=True)) ** 2).sum()
    assert fan.moment_gap(a, b).item() == pytest.approx(ref)
    assert fan.moment_gap(a, a).item() == pytest.approx(0, abs=1e-12)
    k = lambda u, v: np.exp(-((u - v) ** 2).sum() / (2 * 0.7**2))  # noqa: E731
    loop = (
        np.mean([k(u, v) for u in A for v in A])
        + np.mean([k(u, v) for u in Bn for v in Bn])
        - 2 * np.mean([k(u, v) for u in A for v in Bn])
    )
    assert fan.mmd(a, b, bandwidth=0.7).item() == pytest.approx(loop)
    u = torch.randn(50, 2, generator=g, dtype=torch.float64)
    v = torch.cat([u[:, :1] * 2 + 1, torch.randn(50, 1, generator=g, dtype=torch.float64)], 1)
    c = np.corrcoef(u.numpy().T, v.numpy().T)[:2, 2:]
    assert fan.cross_correlation(u, v).item() == pytest.approx((c**2).mean())


def data(n=16, size=32):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n) % 4
    return FaceTensors(images, labels, {"label": labels}, 4, "toy")


def trainer_for(transform, extra=None, model=None):
    torch.manual_seed(0)
    model = model or fan.FANNet("ir8", width=0.25, input_size=32, id_dim=8, nonid_dim=4)
    cfg = train.TrainConfig(epochs=1, batch_size=8, progress=False)
    return train.Trainer(model, heads.ArcFace(8, 4, s=8.0), data(), cfg, transforms=[transform], extra=extra or {})


@pytest.mark.parametrize("mode", ["fixed", "random"])
@pytest.mark.parametrize("paired", [True, False])
def test_scale_augment_makes_low_and_high_halves(mode, paired):
    t = fan.ScaleAugment(mode, max_factor=8.0, fixed=(1, 2, 4), fan=True, paired=paired)
    tr = trainer_for(t)
    batch = tr.batch(tr.batches(0)[0])
    out = t(tr, batch)
    low = out.meta["low"]
    assert len(out.images) == 16 and low.sum() == 8 and torch.equal(out.labels[:8], batch.labels)
    f = out.meta["factor"][:8]
    assert ((f >= 1) & (f <= 8)).all() and (out.meta["factor"][8:] == 1).all()
    if mode == "fixed":
        assert set(f.tolist()) <= {1.0, 2.0, 4.0}
    torch.testing.assert_close(out.images[:8], fan.degrade(batch.images, f))
    order = out.meta["pair"][:8] if paired else None
    if paired:
        assert torch.equal(out.images[8:], batch.images) and torch.equal(order, torch.arange(8))
    else:  # the high half is the batch in another order, with its labels
        assert (out.meta["pair"] == -1).all()
        perm = [int((batch.images == img).all((1, 2, 3)).nonzero()) for img in out.images[8:]]
        assert sorted(perm) == list(range(8)) and torch.equal(out.labels[8:], batch.labels[perm])
    plain = fan.ScaleAugment(mode, fan=False)(tr, batch)
    assert len(plain.images) == 8


def test_fannet_splits_its_embedding_and_decodes_a_face():
    model = fan.FANNet("ir8", width=0.25, input_size=32, id_dim=8, nonid_dim=4)
    out = model.outputs(torch.rand(5, 3, 32, 32), {"features"})
    assert out["embedding"].shape == (5, 8) and out["nonid"].shape == (5, 4) and out["features"].dim() == 4
    recon = model.reconstruct(out["embedding"], out["nonid"])
    assert recon.shape == (5, 3, 32, 32) and recon.min() >= 0 and recon.max() <= 1
    with pytest.raises(ValueError):
        fan.FANNet(input_size=36)


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("align", ["moments", "mmd"])
def test_fan_loss_is_its_weighted_parts_and_routes_gradients(paired, align):
    t = fan.ScaleAugment("random", fan=True, paired=paired)
    tr = trainer_for(t)
    model = tr.model
    loss = fan.FANLoss(model, recon_weight=2.0, align_weight=0.5, disentangle_weight=0.3, align=align)
    batch = t(tr, tr.batch(tr.batches(0)[0]))
    out = model.outputs(batch.images, {"nonid"})
    parts = loss.parts(out, batch)
    low = batch.meta["low"]
    recon = (
        model.reconstruct(out["embedding"][low], out["nonid"][low])
        if paired
        else model.reconstruct(out["embedding"][~low], out["nonid"][~low])
    )
    assert parts["reconstruction"].item() == pytest.approx(
        float((recon - batch.images[~low]).abs().mean().detach()), rel=1e-5
    )
    total = loss(out, batch)
    assert total.item() == pytest.approx(
        2.0 * parts["reconstruction"].item() + 0.5 * parts["alignment"].item() + 0.3 * parts["disentanglement"].item(),
        rel=1e-5,
    )
    # the alignment moves the low half toward the high one, never the high half
    z = out["embedding"].detach().requires_grad_(True)
    ali = loss.parts({"embedding": z, "nonid": out["nonid"].detach()}, batch)["alignment"]
    (g,) = torch.autograd.grad(ali, z)
    assert g[~low].abs().sum() == 0 and g[low].abs().sum() > 0
    # a whole training step with the term
    tr2 = trainer_for(t, extra={"fan": fan.FANLoss(model)}, model=model)
    row = tr2.train_step(tr2.batches(0)[1])
    assert np.isfinite(row["loss_fan"]) and np.isfinite(row["loss_head"])


def test_a_batch_without_halves_is_refused():
    tr = trainer_for(fan.ScaleAugment("random"))
    batch = tr.batch(tr.batches(0)[0])
    batch = batch.replace(meta={**batch.meta, "low": torch.ones(8, dtype=torch.bool), "pair": torch.arange(8)})
    out = tr.model.outputs(batch.images, {"nonid"})
    with pytest.raises(ValueError, match="halves"):
        fan.FANLoss(tr.model)(out, batch)
    for kw in ({"align": "gan"}, {"recon_weight": -1}):
        with pytest.raises(ValueError):
            fan.FANLoss(tr.model, **kw)
    with pytest.raises(ValueError):
        fan.ScaleAugment("bicubic")


def test_fit_decoder_trains_the_decoder_alone_and_lowers_its_error():
    torch.manual_seed(0)
    model = fan.FANNet("ir8", width=0.25, input_size=32, id_dim=8, nonid_dim=4)
    faces = data(16)  # flat colours: a face the decoder can learn from the features in a few steps
    colours = (torch.rand(16, 3, 1, 1, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    faces = FaceTensors(colours.expand(16, 3, 32, 32).contiguous(), faces.labels, faces.meta, 4, "flat")
    images = faces.batch(torch.arange(16), "cpu")[0]
    with torch.no_grad():  # the encoder's normalization statistics from these faces, as training leaves them
        for _ in range(30):
            model.outputs(images)
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    def error():
        model.eval()
        with torch.no_grad():
            out = model.outputs(images)
            return float((model.reconstruct(out["embedding"], out["nonid"]) - images).abs().mean())

    before = error()
    losses = fan.fit_decoder(model, faces, steps=60, batch_size=8, max_factor=1.0, repeats=1, progress=False)
    assert len(losses) == 60 and not model.training
    assert error() < 0.9 * before
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, encoder[k]), k
    with pytest.raises(ValueError):
        fan.fit_decoder(model, faces, steps=0)
