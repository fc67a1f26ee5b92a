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


class RefIntra:
    """IntraLoss by the docstring, one class and one sample at a time."""

    def __init__(self, C, D, momentum, weight=1.0, anisotropic=True, max_weight=10.0):
        self.m, self.weight, self.aniso, self.maxw, self.D = momentum, weight, anisotropic, max_weight, D
        self.dir = [torch.zeros(D, dtype=torch.float64) for _ in range(C)]
        self.prin, self.tot, self.seen = [0.0] * C, [0.0] * C, [0] * C

    def corrected(self, v, c):
        return v / (1 - (1 - self.m) ** self.seen[c]) if self.seen[c] else 0.0

    def step(self, x, w, labels):
        labels = labels.tolist()
        us = [unit(xi) for xi in x]
        ps = [unit(w[y]) for y in labels]
        thetas = [torch.acos((u @ p).clamp(-1 + 1e-6, 1 - 1e-6)) for u, p in zip(us, ps)]
        if not self.aniso:
            return self.weight * torch.stack(thetas).mean()
        ts = [(u - (u @ p) * p).detach() for u, p in zip(us, ps)]
        for c in sorted(set(labels)):
            idx = [i for i, y in enumerate(labels) if y == c]
            pc = ps[idx[0]].detach()
            uc = self.dir[c] - (self.dir[c] @ pc) * pc
            if uc.norm() < 1e-6:
                uc = ts[idx[0]]
            uc = uc / uc.norm() if uc.norm() > 0 else uc
            Su = sum(ts[i] * (ts[i] @ uc) for i in idx) / len(idx)
            new = (1 - self.m) * self.corrected(self.prin[c], c) * uc + self.m * Su
            uc = new / new.norm() if new.norm() > 0 else self.dir[c]
            lam = float(sum((ts[i] @ uc) ** 2 for i in idx) / len(idx))
            tt = float(sum(ts[i] @ ts[i] for i in idx) / len(idx))
            self.dir[c] = uc
            self.prin[c] = (1 - self.m) * self.prin[c] + self.m * lam
            self.tot[c] = (1 - self.m) * self.tot[c] + self.m * tt
            self.seen[c] += 1
        total = []
        for t, theta, c in zip(ts, thetas, labels):
            lam, tot = self.corrected(self.prin[c], c), self.corrected(self.tot[c], c)
            if float(t @ t) > 0 and tot > 0:
                cos2 = float((t @ self.dir[c]) ** 2 / (t @ t))
                rest = max(tot - lam, 0.0) / (self.D - 2)
                wi = min(max((self.D - 1) * (lam * cos2 + rest * (1 - cos2)) / tot, 0.0), self.maxw)
            else:
                wi = 1.0
            total.append(wi * theta)
        return self.weight * torch.stack(total).mean()


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
    term = IntraLoss(head, weight=0.7, anisotropic=anisotropic, momentum=0.3, max_weight=3.0).double()  # float64 state
    ref = RefIntra(head.weight.shape[0], head.weight.shape[1], 0.3, 0.7, anisotropic, 3.0)
    for step in range(3):  # later steps use the running state of the earlier ones
        xs = x + 0.1 * step * torch.randn(x.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        a = xs.clone().requires_grad_()
        b = xs.clone().requires_grad_()
        w = head.weight.detach().clone().requires_grad_()
        head.weight.grad = None
        got = term(a, labels)
        want = ref.step(b, w, labels)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, w.grad, rtol=1e-8, atol=1e-12)  # proxies are pulled too
    if anisotropic:
        seen = sorted(set(labels.tolist()))
        torch.testing.assert_close(term.principal[seen], torch.tensor([ref.prin[c] for c in seen], dtype=torch.float64))
        torch.testing.assert_close(term.direction[seen], torch.stack([ref.dir[c] for c in seen]))


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
    # class 0 stretched along axis 1, thin along 2 and 3; class 1 round
    long = torch.cat([torch.ones(400, 1, dtype=torch.float64), torch.randn(400, 3, generator=g, dtype=torch.float64) * torch.tensor([0.4, 0.05, 0.05])], 1)
    round_ = torch.cat([-torch.ones(400, 1, dtype=torch.float64), torch.randn(400, 3, generator=g, dtype=torch.float64) * 0.1], 1)
    term = IntraLoss(head, momentum=0.5, max_weight=100.0).double()
    y = torch.cat([torch.zeros(400, dtype=torch.long), torch.ones(400, dtype=torch.long)])
    for _ in range(5):  # a few training steps learn each class's spread
        term(torch.cat([long, round_]), y)
    term.eval()
    axes = torch.eye(4, dtype=torch.float64)[1:]
    w_long = term.weights(axes, torch.zeros(3, dtype=torch.long))
    assert w_long[0] > 2.5 and w_long[1] < 0.1 and w_long[2] < 0.1  # (D - 1) x the share of the variance along each axis
    torch.testing.assert_close(term.weights(axes, torch.ones(3, dtype=torch.long)), torch.ones(3, dtype=torch.float64), atol=0.35, rtol=0)
    assert abs(float(term.direction[0, 1])) > 0.99  # the principal direction found


def test_pull_makes_an_elongated_class_rounder():
    """The mechanism, end to end: gradient steps on a stretched class's features make it rounder
    with the anisotropy weight, and longer with the plain angle pull."""
    d = 6
    head = heads.CosFace(d, 2, s=16).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(d, dtype=torch.float64)[:2])
    head.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x0 = torch.cat([torch.ones(200, 1, dtype=torch.float64),
                    torch.randn(200, d - 1, generator=g, dtype=torch.float64) * torch.tensor([0.0, 0.5, 0.1, 0.1, 0.1])], 1)
    y = torch.zeros(200, dtype=torch.long)
    ratios = {}
    for aniso in (False, True):
        term = IntraLoss(head, weight=1.0, anisotropic=aniso, momentum=0.5).double()
        x = x0.clone()
        for _ in range(40):
            x.requires_grad_(True)
            term(x, y).backward()
            with torch.no_grad():
                x = x - 2.0 * x.grad  # 0.01 per step per unit of weight: no overshoot of the proxy
        z = torch.nn.functional.normalize(x.detach(), dim=1)
        sd = z[:, 2:].std(0)
        ratios[aniso] = float(sd[0] / sd[1:].mean())  # long axis over the thin ones (5 at the start)
    # the plain pull moves every sample at the same speed: the thin directions collapse first and
    # the class gets longer (5 -> ~8.6); weighted, the long axis shrinks fastest (5 -> ~3.1)
    assert ratios[True] < 4.0 < 5.0 < ratios[False], ratios


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
    assert list(term.parameters()) == [] and "direction" in term.state_dict() and "head" not in dict(term.named_modules())


def test_eval_mode_does_not_update_the_spread():
    head, x, labels = setup(5)
    term = IntraLoss(head)
    term(x, labels)
    before = term.principal.clone()
    term.eval()
    term(x * 2 + 1, labels)
    assert torch.equal(term.principal, before) and int(term.seen.max()) == 1


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
