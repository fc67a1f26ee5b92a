"""frlab.attacks against torchattacks and against the definition, step by step, one image at a time."""

import pytest
import torch
import torch.nn.functional as F

from frlab import attacks, heads

torchattacks = pytest.importorskip("torchattacks")


def tiny(seed=0, classes=5):
    """A small float64 CNN without normalization layers (so train and eval mode agree)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, classes),
    ).double()


def batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (B,), generator=g)


def ce(model, y):
    return lambda x: F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("eps,alpha,steps", [(8 / 255, 2 / 255, 10), (0.03, 0.01, 3), (0.1, 0.05, 1)])
def test_pgd_matches_torchattacks_without_random_start(eps, alpha, steps):
    model, (x, y) = tiny(), batch()
    ours = attacks.pgd(ce(model, y), x, eps, alpha, steps, random_start=False)
    ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_fgsm_matches_torchattacks():
    model, (x, y) = tiny(1), batch(seed=1)
    torch.testing.assert_close(
        attacks.fgsm(ce(model, y), x, 0.05), torchattacks.FGSM(model, eps=0.05)(x, y), rtol=0, atol=1e-12
    )


def loop_pgd(model, x, y, eps, alpha, steps, start):
    """The definition, one image at a time: x_{t+1} = clip_[0,1](clip_{x +- eps}(x_t + alpha sign(grad)))."""
    out = []
    for i in range(len(x)):
        xi = start[i : i + 1].clone()
        for _ in range(steps):
            xi.requires_grad_(True)
            loss = F.cross_entropy(model(xi), y[i : i + 1])
            (g,) = torch.autograd.grad(loss, xi)
            xi = xi.detach() + float(alpha[i]) * g.sign()
            xi = torch.max(torch.min(xi, x[i : i + 1] + float(eps[i])), x[i : i + 1] - float(eps[i])).clamp(0, 1)
        out.append(xi)
    return torch.cat(out)


def test_pgd_with_random_start_and_per_image_strengths_against_the_definition():
    model, (x, y) = tiny(2), batch(seed=2)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.2], dtype=torch.float64)
    alpha = eps / 4
    ours = attacks.pgd(ce(model, y), x, eps, alpha, 5, generator=torch.Generator().manual_seed(7))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    start = (x + (2 * u - 1) * eps.view(-1, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(ours, loop_pgd(model, x, y, eps, alpha, 5, start), rtol=0, atol=1e-12)
    assert ((ours - x).abs().amax((1, 2, 3)) <= eps + 1e-12).all() and ours.min() >= 0 and ours.max() <= 1
    assert torch.equal(ours[0], x[0])  # eps 0: the clean image
    loss = ce(model, y)
    assert (loss(ours)[3:] > loss(x)[3:]).all()  # a real budget raises every image's loss


def test_identification_and_verification_losses_do_what_they_say():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 8)).double()
    head = heads.ArcFace(8, 5, s=8.0).double()
    x, y = batch()
    adv = attacks.pgd(attacks.identification_loss(model, head, y), x, 0.05, 0.01, 5, random_start=False)
    assert (head(model(adv), y, reduction="none") > head(model(x), y, reduction="none")).all()
    partners = model(batch(seed=9)[0]).detach()
    same = torch.tensor([True, False, True, False, True, False])
    adv = attacks.pgd(attacks.verification_loss(model, partners, same), x, 0.05, 0.01, 5, random_start=False)
    cos = lambda z: F.cosine_similarity(model(z), partners)  # noqa: E731
    moved = cos(adv) - cos(x)
    assert (moved[same] < 0).all() and (moved[~same] > 0).all()


def test_attacks_refuse_bad_arguments():
    model, (x, y) = tiny(), batch()
    for kw, err in (
        ({"eps": -0.1, "alpha": 0.01}, ValueError),
        ({"eps": torch.ones(4), "alpha": 0.01}, ValueError),
        ({"eps": 0.1, "alpha": 0.01, "steps": -1}, ValueError),
        ({"eps": "0.1", "alpha": 0.01}, TypeError),
        ({"eps": 0.1, "alpha": 0.01, "lo": 1.0, "hi": 0.0}, ValueError),
    ):
        with pytest.raises(err):
            attacks.pgd(ce(model, y), x, **kw)
    with pytest.raises(TypeError):
        attacks.pgd(ce(model, y), (x * 255).to(torch.uint8), 0.1, 0.01)


def test_robust_accuracy_and_verification_under_attack_by_hand():
    from frlab import protocols
    from frlab.data.synth import FaceTensors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 8))
    head = heads.CosFace(8, 5, s=8.0)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(20, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(20) % 5
    data = FaceTensors(images, labels, {"label": labels}, 5, "toy")
    x = images.float() / 255  # what data.batch gives
    with torch.no_grad():
        clean = float((head.predict(model(x)) == labels).float().mean())
    assert attacks.robust_accuracy(model, head, data, 0.0) == pytest.approx(clean)
    adv = attacks.pgd(
        attacks.identification_loss(model, head, labels), x, 0.1, 0.025, 10, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        ref = float((head.predict(model(adv)) == labels).float().mean())
    assert attacks.robust_accuracy(model, head, data, 0.1, steps=10, seed=3) == pytest.approx(ref)
    pairs = protocols.verification_pairs(labels)
    none = attacks.genuine_pairs_under_attack(model, data, pairs, 0.0, fpr=0.1)
    emb = F.normalize(model(x), dim=1).detach()
    s = (emb[pairs.i] * emb[pairs.j]).sum(1)
    imp = s[~pairs.same].sort(descending=True).values
    t = imp[int(len(imp) * 0.1)]
    assert none["threshold"] == pytest.approx(float(t)) and none["tpr"] == none["clean_tpr"]
    assert none["tpr"] == pytest.approx(float((s[pairs.same] > t).float().mean()))
    hit = attacks.genuine_pairs_under_attack(model, data, pairs, 0.2, steps=10, fpr=0.1)
    assert hit["clean_tpr"] == none["tpr"] and hit["tpr"] < hit["clean_tpr"]
