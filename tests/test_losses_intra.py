"""IntraLoss, CentrePull and the anisotropy/margin measures against naive float64 references."""
import math

import pytest
import torch

from frlab import eval as ev
from frlab import heads
from frlab.losses import CentrePull, IntraLoss


# ------------------------------------------------------------------ naive references
def unit(v):
    return v / v.norm()


def ref_intra(x, w, labels, S, weight=1.0, anisotropic=True, max_weight=10.0):
    d = x.shape[1]
    total = []
    for xi, y in zip(x, labels.tolist()):
        u, p = unit(xi), unit(w[y])
        c = (u @ p).clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(c)
        if anisotropic:
            t = (u - (u @ p) * p).detach()
            wi = (d - 1) * (t @ S @ t) / ((t @ t) * torch.trace(S)) if t.norm() > 0 else torch.tensor(1.0, dtype=x.dtype)
            total.append(min(max(float(wi), 0.0), max_weight) * theta)
        else:
            total.append(theta)
    return weight * torch.stack(total).mean()


def ref_ema(offsets_per_step, momentum):
    S = torch.zeros(offsets_per_step[0].shape[1], offsets_per_step[0].shape[1], dtype=torch.float64)
    for t in offsets_per_step:
        S = (1 - momentum) * S + momentum * sum(torch.outer(ti, ti) for ti in t) / len(t)
    return S / (1 - (1 - momentum) ** len(offsets_per_step))


def setup(seed=0, b=12, d=5, c=4):
    g = torch.Generator().manual_seed(seed)
    head = heads.ArcFace(d, c, s=16).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (b,), generator=g)
    return head, x, labels


# ------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("anisotropic", [True, False])
def test_intraloss_matches_reference(seed, anisotropic):
    head, x, labels = setup(seed)
    term = IntraLoss(head, weight=0.7, anisotropic=anisotropic, momentum=0.3, max_weight=3.0).double()  # float64 spread
    # two training steps: the second uses the running spread of both
    history = []
    for step in range(2):
        a = (x + step * 0.1).clone().requires_grad_()
        got = term(a, labels)
        u = torch.nn.functional.normalize(a.detach(), dim=1)
        p = torch.nn.functional.normalize(head.weight.detach()[labels], dim=1)
        history.append(u - (u * p).sum(1, keepdim=True) * p)
        S = ref_ema(history, 0.3)
        head.weight.grad = None
        b = (x + step * 0.1).clone().requires_grad_()
        w = head.weight.detach().clone().requires_grad_()
        want = ref_intra(b, w, labels, S, 0.7, anisotropic, 3.0)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, w.grad, rtol=1e-8, atol=1e-12)  # proxies are pulled too
    if anisotropic:
        torch.testing.assert_close(term.covariance(), ref_ema(history, 0.3))


def test_centre_pull_matches_reference():
    head, x, labels = setup(3)
    a = x.clone().requires_grad_()
    got = CentrePull(head, weight=2.0)(a, labels)
    want = 2.0 * torch.stack([1 - unit(xi) @ unit(head.weight.detach()[y]) for xi, y in zip(x.clone().requires_grad_(), labels.tolist())]).mean()
    torch.testing.assert_close(got, want)


def test_gradient_does_not_vanish_near_the_proxy():
    """The point of the term: at a small angle the pull keeps its size; the centre pull's fades."""
    head, _, _ = setup(0, c=2)
    p = torch.nn.functional.normalize(head.weight.detach()[0], dim=0)
    r = torch.randn(5, dtype=torch.float64)
    other = torch.nn.functional.normalize(r - (r @ p) * p, dim=0)
    sizes = {}
    for angle in (0.5, 0.05, 0.005):
        x = (math.cos(angle) * p + math.sin(angle) * other)[None].clone().requires_grad_()
        for name, term in (("intra", IntraLoss(head, anisotropic=False)), ("centre", CentrePull(head))):
            term(x, torch.tensor([0])).backward()
            sizes[name, angle] = float(x.grad.norm())
            x.grad = None
    assert sizes["intra", 0.005] == pytest.approx(sizes["intra", 0.5], rel=1e-6)
    assert sizes["centre", 0.005] < 0.02 * sizes["centre", 0.5]


def test_anisotropic_weight_pulls_hardest_along_the_long_axis():
    d = 4
    head = heads.CosFace(d, 2, s=16).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    # a class stretched along axis 1, thin along 2 and 3
    x = torch.cat([torch.ones(256, 1, dtype=torch.float64), torch.randn(256, 3, generator=g, dtype=torch.float64) * torch.tensor([0.4, 0.05, 0.05])], 1)
    term = IntraLoss(head, momentum=1.0, max_weight=100.0).double()
    term(x, torch.zeros(256, dtype=torch.long))  # training step: learns the spread
    term.eval()
    w = term.weights(torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64))
    assert w[0] > 2.5 and w[1] < 0.1  # (D - 1) * share of the variance along each axis
    iso = IntraLoss(head, momentum=1.0).double()
    iso(torch.cat([torch.ones(2000, 1, dtype=torch.float64), torch.randn(2000, 3, generator=g, dtype=torch.float64) * 0.1], 1),
        torch.zeros(2000, dtype=torch.long))
    torch.testing.assert_close(iso.weights(torch.eye(4, dtype=torch.float64)[1:]), torch.ones(3, dtype=torch.float64), atol=0.15, rtol=0)


def test_edge_cases():
    head, x, labels = setup(4)
    term = IntraLoss(head)
    # on the proxy (cos = +1) and opposite it (cos = -1): finite loss and gradients
    p = head.weight.detach()[labels]
    for sign in (1.0, -1.0):
        a = (sign * p * 3).clone().requires_grad_()
        loss = term(a, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    # fp16 embeddings, one sample per class
    h16 = heads.ArcFace(8, 6, s=16)
    out = IntraLoss(h16)(torch.randn(6, 8).half(), torch.arange(6))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError, match="embeddings"):
        term(torch.randn(3, 7, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="proxies"):
        IntraLoss(torch.nn.Identity())
    # the head is referenced, not registered: the trainer's optimizer sees its proxies once
    assert list(term.parameters()) == [] and "spread" in term.state_dict() and "head" not in dict(term.named_modules())


def test_eval_mode_does_not_update_the_spread():
    head, x, labels = setup(5)
    term = IntraLoss(head)
    term(x, labels)
    before = term.spread.clone()
    term.eval()
    term(x * 2 + 1, labels)
    assert torch.equal(term.spread, before) and int(term.steps) == 1


# ------------------------------------------------------------------ class margins
def test_class_margins_match_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(30) % 5
    out = ev.class_margins(x, labels)
    z = [unit(v) for v in x]
    mus = [unit(sum(z[i] for i in range(30) if labels[i] == c)) for c in range(5)]
    ang = lambda a, b: math.acos(max(-1.0, min(1.0, float(a @ b))))  # noqa: E731
    radius = [max(ang(z[i], mus[c]) for i in range(30) if labels[i] == c) for c in range(5)]
    for c in range(5):
        want = min(ang(mus[c], mus[o]) - radius[c] - radius[o] for o in range(5) if o != c)
        assert out["margin"][c].item() == pytest.approx(want, abs=1e-9)
        assert out["radius"][c].item() == pytest.approx(radius[c], abs=1e-9)
        assert out["nearest"][c].item() == pytest.approx(min(ang(mus[c], mus[o]) for o in range(5) if o != c), abs=1e-9)


def test_class_margins_geometry_and_errors():
    # two tight clusters 90 degrees apart, radius ~0 -> margin ~ pi / 2
    x = torch.tensor([[1.0, 0.0], [1.0, 1e-4], [0.0, 1.0], [1e-4, 1.0]])
    out = ev.class_margins(x, torch.tensor([0, 0, 1, 1]))
    assert out["margin"].min().item() == pytest.approx(math.pi / 2, abs=1e-3)
    with pytest.raises(ValueError, match="two classes"):
        ev.class_margins(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="quantile"):
        ev.class_margins(x, torch.tensor([0, 0, 1, 1]), quantile=0)
