"""frlab.afa: the dual-branch normalization against BatchNorm's own arithmetic, one sample at a time,
and the training transform's batches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frlab import afa, heads, train
from frlab.data.synth import FaceTensors


def layer(seed=0, C=3):
    torch.manual_seed(seed)
    fusion = afa.Fusion()
    bn = fusion.norm_layer(C).double()
    with torch.no_grad():  # distinct statistics and affine parameters in each branch
        for branch, shift in ((bn.clean, 0.0), (bn.adv, 1.0)):
            branch.running_mean.copy_(torch.randn(C) + shift)
            branch.running_var.copy_(torch.rand(C) + 0.5 + shift)
            branch.weight.copy_(torch.rand(C) + 0.5)
            branch.bias.copy_(torch.randn(C))
    return fusion, bn


def loop_mixed(bn, x, w):
    """Each sample by F.batch_norm with the statistics and affine parameters lerped at its own w."""
    out = []
    for xi, wi in zip(x, w.tolist()):
        c, a = bn.clean, bn.adv
        mix = lambda u, v, wi=wi: (1 - wi) * u + wi * v  # noqa: E731
        out.append(
            F.batch_norm(
                xi[None],
                mix(c.running_mean, a.running_mean),
                mix(c.running_var, a.running_var),
                mix(c.weight, a.weight),
                mix(c.bias, a.bias),
                training=False,
                eps=c.eps,
            )
        )
    return torch.cat(out)


def test_eval_mode_mixes_the_branches_statistics_per_sample():
    fusion, bn = layer()
    bn.eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    fusion.w = torch.tensor([0.0, 1.0, 0.3, 0.5, 0.9], dtype=torch.float64)
    out = bn(x)
    torch.testing.assert_close(out, loop_mixed(bn, x, fusion.w))
    torch.testing.assert_close(out[:1], bn.clean(x[:1]))
    torch.testing.assert_close(out[1:2], bn.adv(x[1:2]))
    fusion.w = None  # no weight: the clean branch
    torch.testing.assert_close(bn(x), bn.clean(x))


def test_training_routes_each_sample_to_its_branch_and_updates_only_that_branch():
    fusion, bn = layer(1)
    ref_clean, ref_adv = [torch.nn.BatchNorm2d(3).double() for _ in range(2)]
    ref_clean.load_state_dict(bn.clean.state_dict())
    ref_adv.load_state_dict(bn.adv.state_dict())
    mixed_before = loop_mixed(bn, *[torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.tensor([0.4])])
    bn.train()
    x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    w = torch.tensor([0, 0, 1, 0.4, 1, 0, 0.7], dtype=torch.float64)
    fusion.w = w
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    between = (w > 0) & (w < 1)
    expected_between = loop_mixed(bn, x[between], w[between])
    out = bn(x)
    torch.testing.assert_close(out[w == 0], ref_clean.train()(x[w == 0]))
    torch.testing.assert_close(out[w == 1], ref_adv.train()(x[w == 1]))
    torch.testing.assert_close(out[between], expected_between)  # the running statistics, as they were
    for name, branch in (("clean", ref_clean), ("adv", ref_adv)):
        torch.testing.assert_close(getattr(bn, name).running_mean, branch.running_mean)
        torch.testing.assert_close(getattr(bn, name).running_var, branch.running_var)
    fusion.w = torch.full((3,), 0.5, dtype=torch.float64)
    bn(x[:3])  # between only: nothing is updated
    assert torch.equal(bn.clean.running_mean, ref_clean.running_mean) and torch.equal(
        bn.adv.running_var, ref_adv.running_var
    )
    assert mixed_before is not None and stats


def model(**kw):
    torch.manual_seed(0)
    return afa.AFANet("ir8", width=0.25, input_size=32, embedding_size=8, **kw)


def differing(net):
    with torch.no_grad():  # a fresh model's two branches are equal: make them differ
        for m in net.modules():
            if isinstance(m, afa.DualBatchNorm2d):
                m.adv.bias.fill_(0.3)
    return net


def test_afanet_weights_fixed_next_and_predicted():
    net = differing(model()).eval()
    x = torch.rand(4, 3, 32, 32)
    with net.fixed(0.0):
        clean = net(x)
    with net.fixed(torch.tensor([0.0, 0.0, 1.0, 1.0])):
        mixed = net(x)
    torch.testing.assert_close(mixed[:2], clean[:2])
    assert not torch.allclose(mixed[2:], clean[2:])
    predicted = net.predictor(x)
    net.use_next(torch.tensor([float("nan"), 0.0, 1.0, 0.5]))
    out = net.outputs(x, {"fusion_weight"})
    torch.testing.assert_close(out["fusion_weight"], torch.stack([predicted[0], *torch.tensor([0.0, 1.0, 0.5])]))
    torch.testing.assert_close(net.outputs(x, {"fusion_weight"})["fusion_weight"], predicted)  # forgotten
    with pytest.raises(ValueError), net.fixed(1.5):
        net(x)


def test_the_predictor_learns_through_the_mixed_normalization_end_to_end():
    net = differing(model()).train()
    x = torch.rand(4, 3, 32, 32)
    net.use_next(torch.full((4,), float("nan")))
    net(x).pow(2).sum().backward()
    assert net.predictor.linear.weight.grad.abs().sum() > 0


def data(n=24, classes=4):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n) % classes
    return FaceTensors(images, labels, {"label": labels}, classes, "toy")


@pytest.mark.parametrize("mode,copies", [("standard", 1), ("madry", 1), ("dual", 2), ("afa", 3)])
def test_transform_builds_the_batches_of_each_training(mode, copies):
    net, head = model(), heads.ArcFace(8, 4, s=8.0)
    cfg = train.TrainConfig(epochs=1, batch_size=8, progress=False)
    t = afa.AdversarialTraining(mode, eps_max=0.05, steps=2)
    trainer = train.Trainer(
        net,
        head,
        data(),
        cfg,
        transforms=[t],
        extra={"w": afa.StrengthLoss(net.predictor, 0.05)} if mode == "afa" else {},
    )
    batch = trainer.batch(trainer.batches(0)[0])
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    out = t(trainer, batch)
    assert len(out.images) == copies * 8 and torch.equal(out.labels, batch.labels.repeat(copies))
    assert net.training and all(
        torch.equal(v, net.state_dict()[k]) for k, v in stats.items()
    )  # the attack changed no statistic
    if mode != "standard":
        eps = out.meta["eps"].view(-1, 1, 1, 1)
        delta = (out.images - batch.images.repeat(copies, 1, 1, 1)).abs()
        assert (delta <= eps + 1e-6).all() and (delta.amax((1, 2, 3)) > 0).any()
        assert out.images.min() >= 0 and out.images.max() <= 1
    if mode == "afa":
        assert (out.meta["eps"][16:] < 0.05).all() and torch.equal(
            out.meta["fusion_w"][:16], torch.tensor([0.0] * 8 + [1.0] * 8)
        )
    row = trainer.train_step(trainer.batches(0)[1])  # a whole step runs, finite
    assert torch.isfinite(torch.tensor(row["loss"]))


def test_arguments_are_checked():
    for kw in ({"mode": "trades"}, {"eps_max": 0}, {"steps": 0}, {"predictor": "oracle"}):
        with pytest.raises(ValueError):
            afa.AdversarialTraining(**kw)


def test_the_predictor_can_tell_the_strength_of_a_sign_perturbation():
    """What AFA rests on: w is readable from the image. Trained briefly on faces perturbed by
    eps * sign(noise) at strengths in [0, eps_max], its mean output rises with eps (without the
    high-pass residual it stays at the targets' mean whatever the image)."""
    from frlab.data import SynthFaces, materialize

    torch.manual_seed(0)
    faces = materialize(SynthFaces(range(20), images_per_identity=6, size=32), progress=False)
    x_all = faces.images.float() / 255
    p = afa.StrengthPredictor()
    opt = torch.optim.Adam(p.parameters(), 1e-3)
    for _ in range(150):
        x = x_all[torch.randint(0, len(x_all), (48,))]
        w = torch.rand(48)
        adv = (x + (w * 8 / 255).view(-1, 1, 1, 1) * torch.randn_like(x).sign()).clamp(0, 1)
        loss = F.mse_loss(p(adv), w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        means = [float(p((x_all + e / 255 * torch.randn_like(x_all).sign()).clamp(0, 1)).mean()) for e in (0, 4, 8)]
    assert means[0] < means[1] < means[2] and means[2] - means[0] > 0.15


def test_fit_predictor_trains_the_predictor_alone():
    net, head = model(), heads.CosFace(8, 4, s=8.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    losses = afa.fit_predictor(net, head, data(), eps_max=0.05, epochs=2, steps=2, batch_size=8)
    after = net.state_dict()
    assert len(losses) == 2 and all(np.isfinite(losses))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("predictor.") for k in changed)  # the network stays as it was
