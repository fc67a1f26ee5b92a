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
    """IntraLoss by the docstring, one class and one sample at a time, in float64."""

    def __init__(self, C, D, momentum, weight=1.0, anisotropic=True, max_weight=10.0):
        self.m, self.weight, self.aniso, self.maxw, self.D = momentum, weight, anisotropic, max_weight, D
        zero = torch.zeros(D, dtype=torch.float64)
        self.centre, self.dir = [zero.clone() for _ in range(C)], [zero.clone() for _ in range(C)]
        self.prin, self.tot, self.seen = [0.0] * C, [0.0] * C, [0] * C

    def bias(self, count):
        return 1 - (1 - self.m) ** count

    def step(self, x, labels):
        labels = labels.tolist()
        us = [unit(xi) for xi in x]
        for c in sorted(set(labels)):  # update, before use
            idx = [i for i, y in enumerate(labels) if y == c]
            mean = sum(us[i].detach() for i in idx) / len(idx)
            self.centre[c] = (1 - self.m) * self.centre[c] + self.m * mean
            self.seen[c] += 1
            if not self.aniso:
                continue
            ctr = unit(self.centre[c])
            rs = [us[i].detach() - ctr for i in idx]
            rs = [
                r if r.norm() > 1e-6 else torch.zeros_like(r) for r in rs
            ]  # rounding (a lone sample is its own centre)
            d = self.dir[c] if self.dir[c].norm() > 0 else rs[0]
            d = d / d.norm() if d.norm() > 0 else d
            Sd = sum(r * (r @ d) for r in rs) / len(rs)
            before = self.prin[c] / self.bias(self.seen[c] - 1) if self.seen[c] > 1 else 0.0
            new = (1 - self.m) * before * d + self.m * Sd
            d = new / new.norm() if new.norm() > 0 else d
            self.dir[c] = d
            self.prin[c] = (1 - self.m) * self.prin[c] + self.m * float(sum((r @ d) ** 2 for r in rs) / len(rs))
            self.tot[c] = (1 - self.m) * self.tot[c] + self.m * float(sum(r @ r for r in rs) / len(rs))
        total = []
        for u, c in zip(us, labels):
            r = u - unit(self.centre[c])
            S = torch.eye(self.D, dtype=torch.float64)  # S' = (D - 1) S / tr S, principal direction + isotropic rest
            if self.aniso and self.D > 2 and self.tot[c] > 0:
                share = self.prin[c] / self.tot[c]
                mu, rho = min((self.D - 1) * share, self.maxw), (self.D - 1) * (1 - share) / (self.D - 2)
                S = rho * S + (mu - rho) * torch.outer(self.dir[c], self.dir[c])
            n = float(r.detach().norm())
            total.append(r @ S @ r / (2 * n) if n > 1e-6 else r.sum() * 0)
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
    term = IntraLoss(
        *head.weight.shape, weight=0.7, anisotropic=anisotropic, momentum=0.3, max_weight=3.0
    ).double()  # float64 state
    ref = RefIntra(head.weight.shape[0], head.weight.shape[1], 0.3, 0.7, anisotropic, 3.0)
    for step in range(4):  # later steps use the running state of the earlier ones
        xs = x + 0.1 * step * torch.randn(x.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        a = xs.clone().requires_grad_()
        b = xs.clone().requires_grad_()
        got = term.loss(a, labels)
        want = ref.step(b, labels)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)
    assert head.weight.grad is None  # the term leaves the proxies to the head
    seen = sorted(set(labels.tolist()))
    torch.testing.assert_close(term.centre[seen], torch.stack([ref.centre[c] for c in seen]))
    if anisotropic:
        torch.testing.assert_close(term.principal[seen], torch.tensor([ref.prin[c] for c in seen], dtype=torch.float64))
        torch.testing.assert_close(term.total[seen], torch.tensor([ref.tot[c] for c in seen], dtype=torch.float64))
        torch.testing.assert_close(term.direction[seen], torch.stack([ref.dir[c] for c in seen]))


def test_max_weight_caps_the_pull_along_the_long_axis():
    """A class whose spread lies all along one axis: mu = D - 1 = 4 uncapped, max_weight when capped."""
    head, _, _ = setup(0)
    x = torch.zeros(8, 5, dtype=torch.float64)
    x[:, 0] = 1.0
    x[:, 1] = torch.linspace(-0.05, 0.05, 8, dtype=torch.float64)  # on a great circle: all the spread along axis 1
    labels = torch.zeros(8, dtype=torch.long)
    for cap, want in ((10.0, 4.0), (2.0, 2.0)):
        term = IntraLoss(*head.weight.shape, max_weight=cap, momentum=1.0).double()
        term.loss(x, labels)
        r = torch.tensor([[0.0, 1.0, 0, 0, 0]], dtype=torch.float64)
        assert float(term.weights(r, labels[:1])) == pytest.approx(want, rel=1e-3)


def test_centre_pull_matches_reference():
    head, x, labels = setup(3)
    a = x.clone().requires_grad_()
    got = CentrePull(head, weight=2.0).loss(a, labels)
    want = (
        2.0
        * torch.stack(
            [1 - unit(xi) @ unit(head.weight.detach()[y]) for xi, y in zip(x.clone().requires_grad_(), labels.tolist())]
        ).mean()
    )
    torch.testing.assert_close(got, want)


def test_gradient_does_not_vanish_near_the_centre():
    """The point of the term: close to the class centre the pull keeps its size; the centre pull's
    (1 - cos to the proxy) fades as sin theta."""
    head, _, _ = setup(0, c=2)
    p = torch.nn.functional.normalize(head.weight.detach()[0], dim=0)
    r = torch.randn(5, dtype=torch.float64)
    other = torch.nn.functional.normalize(r - (r @ p) * p, dim=0)
    sizes = {}
    for angle in (0.5, 0.05, 0.005):
        for name in ("intra", "centre"):
            term = (
                IntraLoss(*head.weight.shape, anisotropic=False, momentum=1.0).double()
                if name == "intra"
                else CentrePull(head)
            )
            if name == "intra":  # learn the centre (p) from two samples on either side, then leave it
                term.loss(
                    torch.stack([math.cos(0.1) * p + math.sin(0.1) * other, math.cos(0.1) * p - math.sin(0.1) * other]),
                    torch.tensor([0, 0]),
                )
                term.eval()
            x = (math.cos(angle) * p + math.sin(angle) * other)[None].clone().requires_grad_()
            term.loss(x, torch.tensor([0])).backward()
            sizes[name, angle] = float(x.grad.norm())
    for angle in (0.5, 0.05, 0.005):  # the pull along the chord to the centre, seen on the sphere: cos(angle / 2)
        assert sizes["intra", angle] == pytest.approx(math.cos(angle / 2), rel=1e-6)
    assert sizes["centre", 0.005] < 0.02 * sizes["centre", 0.5]


def test_pull_is_strongest_along_the_long_axis():
    d = 4
    head = heads.CosFace(d, 2, s=16).double()
    g = torch.Generator().manual_seed(0)
    # class 0 stretched along axis 1, thin along 2 and 3; class 1 round
    long = torch.cat(
        [
            torch.ones(400, 1, dtype=torch.float64),
            torch.randn(400, 3, generator=g, dtype=torch.float64) * torch.tensor([0.4, 0.05, 0.05]),
        ],
        1,
    )
    round_ = torch.cat(
        [-torch.ones(400, 1, dtype=torch.float64), torch.randn(400, 3, generator=g, dtype=torch.float64) * 0.1], 1
    )
    term = IntraLoss(*head.weight.shape, momentum=0.5, max_weight=100.0).double()
    y = torch.cat([torch.zeros(400, dtype=torch.long), torch.ones(400, dtype=torch.long)])
    for _ in range(5):  # a few training steps learn each class's spread
        term.loss(torch.cat([long, round_]), y)
    term.eval()
    axes = torch.eye(4, dtype=torch.float64)[1:]
    w_long = term.weights(axes, torch.zeros(3, dtype=torch.long))
    assert (
        w_long[0] > 2.5 and w_long[1] < 0.2 and w_long[2] < 0.2
    )  # (D - 1) x the share of the variance along each axis
    w_round = term.weights(axes, torch.ones(3, dtype=torch.long))  # ~1: the pull of a round class
    assert float((w_round - 1).abs().max()) < 0.5 and float(w_round.sum()) == pytest.approx(3.0, abs=0.5)
    assert abs(float(term.direction[0, 1])) > 0.99  # the principal direction found
    # the gradient of a sample offset diagonally points mostly along the long axis
    x = (torch.tensor([[1.0, 0.2, 0.2, 0.0]], dtype=torch.float64) * 1.0).requires_grad_()
    term.loss(x, torch.zeros(1, dtype=torch.long)).backward()
    assert abs(float(x.grad[0, 1])) > 5 * abs(float(x.grad[0, 2]))


def test_pull_makes_an_elongated_class_rounder():
    """The mechanism, end to end: gradient steps on a stretched class's features make it rounder
    with the anisotropic pull, and longer with the plain one."""
    d = 6
    head = heads.CosFace(d, 2, s=16).double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.cat(
        [
            torch.ones(200, 1, dtype=torch.float64),
            torch.randn(200, d - 1, generator=g, dtype=torch.float64) * torch.tensor([0.0, 0.5, 0.1, 0.1, 0.1]),
        ],
        1,
    )
    y = torch.zeros(200, dtype=torch.long)
    ratios = {}
    for aniso in (False, True):
        term = IntraLoss(*head.weight.shape, weight=1.0, anisotropic=aniso, momentum=0.5).double()
        x = x0.clone()
        for _ in range(40):
            x.requires_grad_(True)
            term.loss(x, y).backward()
            with torch.no_grad():
                x = x - 2.0 * x.grad  # 0.01 per step per unit of pull: no overshoot of the centre
        z = torch.nn.functional.normalize(x.detach(), dim=1)
        sd = z[:, 2:].std(0)
        ratios[aniso] = float(sd[0] / sd[1:].mean())  # long axis over the thin ones (5 at the start)
    # the plain pull moves every sample at the same speed: the thin directions collapse first and
    # the class gets longer; along S' r, the long axis shrinks fastest and the class gets rounder
    assert ratios[True] < 4.0 < 5.0 < ratios[False], ratios


def test_edge_cases():
    head, x, labels = setup(4)
    term = IntraLoss(*head.weight.shape).double()
    # every sample on its class centre (one per class, or all the same): zero loss, finite zero gradients
    a = head.weight.detach()[labels].clone().requires_grad_()
    loss = term.loss(a, labels)
    loss.backward()
    assert torch.isfinite(a.grad).all() and float(loss.detach()) == 0.0
    # opposite features within a class: finite
    a = torch.cat([x[:1], -x[:1]]).clone().requires_grad_()
    loss = term.loss(a, torch.tensor([3, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    # fp16 embeddings, one sample per class
    h16 = heads.ArcFace(8, 6, s=16)
    out = IntraLoss(*h16.weight.shape).loss(torch.randn(6, 8).half(), torch.arange(6))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError, match="embeddings"):
        term.loss(torch.randn(3, 7, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        term.loss(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 9]))
    with pytest.raises(TypeError, match="proxies"):
        CentrePull(torch.nn.Identity())
    with pytest.raises(ValueError, match="num_classes"):
        IntraLoss(0, 5)
    # IntraLoss keeps class statistics of the head's size, not the head; CentrePull registers the
    # head it pulls toward (the trainer's optimizer, which dedups parameters, still sees them once)
    assert list(term.parameters()) == [] and "centre" in term.state_dict()
    pull = CentrePull(head)
    assert dict(pull.named_modules())["head"] is head and list(pull.parameters()) == [head.weight]


def test_eval_mode_does_not_update_and_unseen_classes_are_not_pulled():
    head, x, labels = setup(5)
    term = IntraLoss(*head.weight.shape)
    term.eval()
    assert float(term.loss(x, labels)) == 0.0  # no centre known yet
    term.train()
    term.loss(x, labels)
    before = term.state_dict()
    term.eval()
    term.loss(x * 2 + 1, labels)
    assert all(torch.equal(before[k], v) for k, v in term.state_dict().items()) and int(term.seen.max()) == 1


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
