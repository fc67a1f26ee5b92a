"""Sinkhorn and OTFace against POT (the Python Optimal Transport library) and loop references."""

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from frlab import models, train
from frlab.data import SynthFaces, materialize
from frlab.heads import ArcFace
from frlab.losses import OTFace, sinkhorn
from frlab.losses.otface import PLAIN_SPREAD, hard_triplets, point_clouds, sinkhorn_log_domain, transport_cost


def clouds(n, m, dim=5, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, n, dim, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(batch, m, dim, generator=g, dtype=torch.float64), dim=-1)
    return x, y, 1 - x @ y.transpose(1, 2)


@pytest.mark.parametrize("eps", [0.02, 0.1, 1.0])
@pytest.mark.parametrize("path", ["sinkhorn", "log domain"])
def test_log_sinkhorn_is_pots_sinkhorn_log_iteration_for_iteration(eps, path):
    x, y, cost = clouds(6, 9)
    if path == "sinkhorn":  # the plain-domain path where the spread allows it (not at eps 0.02)
        assert (float((cost.amax((1, 2)) - cost.amin((1, 2))).max()) / eps <= PLAIN_SPREAD) == (eps >= 0.1)
    for iters in (1, 3, 10):
        plan = sinkhorn(cost, eps, iters) if path == "sinkhorn" else sinkhorn_log_domain(cost, eps, iters)
        for c, p in zip(cost, plan):
            a, b = np.full(6, 1 / 6), np.full(9, 1 / 9)
            ref = ot.sinkhorn(a, b, c.numpy(), eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0, warn=False)
            np.testing.assert_allclose(p.numpy(), ref, rtol=1e-9, atol=1e-14)


def test_converged_plans_have_uniform_marginals_and_pots_cost():
    x, y, cost = clouds(7, 5, batch=3)
    plan = sinkhorn(cost, 0.1, 500)
    torch.testing.assert_close(plan.sum(-1), torch.full((3, 7), 1 / 7, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(-2), torch.full((3, 5), 1 / 5, dtype=torch.float64))
    value, _ = transport_cost(x, y, 0.1, 500)
    for v, c in zip(value, cost):
        ref = ot.sinkhorn2(np.full(7, 1 / 7), np.full(5, 1 / 5), c.numpy(), 0.1, method="sinkhorn_log", stopThr=1e-12)
        assert float(v) == pytest.approx(float(ref), abs=1e-9)


def test_small_eps_tends_to_the_exact_matching_cost():
    x, y, cost = clouds(8, 8, batch=3, seed=1)
    value, _ = transport_cost(x, y, 0.002, 3000)
    for v, c in zip(value, cost):
        exact = ot.emd2(np.full(8, 1 / 8), np.full(8, 1 / 8), c.numpy())
        assert float(v) == pytest.approx(float(exact), abs=0.01)
    # ... while in many dimensions eps = 1 gives about the uniform coupling's cost, the mean pair
    # cost, far above the exact matching's (the release's problem)
    x, y, cost = clouds(8, 8, dim=64, batch=3, seed=1)
    value, _ = transport_cost(x, y, 1.0, 10)
    torch.testing.assert_close(value, cost.mean((1, 2)), atol=0.02, rtol=0)
    assert bool((value > transport_cost(x, y, 0.002, 3000)[0] + 0.1).all())


def test_released_mode_follows_the_released_update_and_misses_the_column_marginals():
    x, y, cost = clouds(6, 6, batch=2)
    plan = sinkhorn(cost, 1.0, 10, mode="released")
    for c, p in zip(cost.numpy(), plan):
        K = np.exp(-c)
        u, v = np.ones(6), np.ones(6)
        for _ in range(10):
            u = (1 / 6) / (K @ v)
            v = (1 / 6) / (K @ u)  # K where K.T belongs, as released
        np.testing.assert_allclose(p.numpy(), u[:, None] * K * v[None, :], rtol=1e-12)
    columns_off = (plan.sum(-2) - 1 / 6).abs().max()
    assert float(columns_off) > 1e-4  # the mix-up is visible
    assert float((sinkhorn(cost, 1.0, 10).sum(-1) - 1 / 6).abs().max()) < 1e-12  # the log mode's last update is exact
    assert float((sinkhorn(cost, 1.0, 10).sum(-2) - 1 / 6).abs().max()) < float(columns_off) / 10
    with pytest.raises(ValueError, match="n = m"):
        sinkhorn(cost[:, :, :4], mode="released")


@pytest.mark.parametrize("eps", [0.001, 0.01, 10.0, 1000.0])
def test_log_sinkhorn_is_stable_and_differentiable_at_any_eps(eps):
    x, y, _ = clouds(16, 16, dim=8, batch=2)
    x.requires_grad_(True)
    value, plan = transport_cost(x, y, eps, 20)
    value.sum().backward()
    assert torch.isfinite(plan).all() and torch.isfinite(value).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(plan.sum((-2, -1)), torch.ones(2, dtype=torch.float64))


def test_sinkhorn_refuses_bad_arguments():
    cost = torch.rand(3, 3)
    for kw, err in (
        ({"eps": 0}, ValueError),
        ({"eps": "1"}, TypeError),
        ({"iters": 0}, ValueError),
        ({"iters": 2.0}, TypeError),
        ({"mode": "exact"}, ValueError),
    ):
        with pytest.raises(err):
            sinkhorn(cost, **kw)
    with pytest.raises(ValueError, match="cost matrices"):
        sinkhorn(torch.rand(3))


# ---------------------------------------------------------------- the OTFace term
def naive_plan(c, eps, iters, released):
    """Plain-domain Sinkhorn on one problem, written as a loop over entries (float64)."""
    n, m = c.shape
    K = torch.exp(-c / eps)
    u, v = [torch.ones((), dtype=c.dtype)] * n, [torch.ones((), dtype=c.dtype)] * m
    for _ in range(iters):
        if released:  # rows, then columns with K where K^T belongs
            u = [(1 / n) / sum(K[i, j] * v[j] for j in range(m)) for i in range(n)]
            v = [(1 / m) / sum(K[j, i] * u[i] for i in range(n)) for j in range(m)]
        else:  # columns, then rows
            v = [(1 / m) / sum(K[i, j] * u[i] for i in range(n)) for j in range(m)]
            u = [(1 / n) / sum(K[i, j] * v[j] for j in range(m)) for i in range(n)]
    return torch.stack([torch.stack([u[i] * K[i, j] * v[j] for j in range(m)]) for i in range(n)])


def naive_otface(features, emb, labels, weight, alpha, beta, eps, iters, released, cap=None, plan_grad=False):
    """The term by its definition: a loop over every (a, p, n), each pair's OT solved afresh."""
    B = len(labels)
    e = F.normalize(emb, dim=1)
    cells = []
    for b in range(B):
        pts = features[b].flatten(1).T  # (h w, C)
        cells.append(torch.stack([p / p.norm() if p.norm() > 1e-6 else torch.zeros_like(p) for p in pts]))

    def ot_(i, j):
        c = 1 - cells[i] @ cells[j].T
        plan = naive_plan(c.detach() if plan_grad else c, eps, iters, released)
        return (plan * c).sum()

    found = []
    for a in range(B):
        for p in range(B):
            for n in range(B):
                if a != p and labels[a] == labels[p] and labels[n] != labels[a]:
                    h = float(e[a] @ e[n] - e[a] @ e[p])
                    if h > -alpha:
                        found.append((h, a, p, n))
    if cap is not None:
        found = sorted(sorted(found, key=lambda t: -t[0])[:cap], key=lambda t: t[1:])
    values = [torch.clamp(ot_(a, p) - ot_(a, n), min=-beta) for _, a, p, n in found]
    values = [v for v in values if v > 0]
    return weight * torch.stack(values).mean() if values else torch.zeros((), dtype=features.dtype)


def batch(seed=0, B=8, C=4, side=3, classes=3):
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(B, C, side, side, generator=g, dtype=torch.float64))
    emb = torch.randn(B, 6, generator=g, dtype=torch.float64)
    labels = torch.arange(B) % classes
    return features, emb, labels


@pytest.mark.parametrize(
    "kw",
    [
        {},  # the released term
        {"mode": "log", "eps": 0.1, "iters": 15},
        {"alpha": 0.3, "beta": 0.05, "weight": 2.0, "mode": "log", "eps": 0.5},
        {"max_triplets": 5, "mode": "log"},
        {"grad": "plan", "mode": "log", "eps": 0.2, "iters": 20},
    ],
)
def test_otface_against_a_loop_over_triplets(kw):
    features, emb, labels = batch()
    features[0, :, 1, 1] = 0  # a dead cell: the release would divide by zero here
    term = OTFace(**kw)
    f1 = features.clone().requires_grad_(True)
    value = term.loss(f1, emb, labels)
    value.backward()
    f2 = features.clone().requires_grad_(True)
    args = dict(weight=term.weight, alpha=term.alpha, beta=term.beta, eps=term.eps, iters=term.iters)
    ref = naive_otface(
        f2, emb, labels, **args, released=term.mode == "released", cap=term.max_triplets, plan_grad=term.grad == "plan"
    )
    ref.backward()
    assert ref.item() > 0  # the case is not trivial
    assert value.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-8, atol=1e-12)
    assert torch.isfinite(f1.grad).all()


def test_no_hard_triplet_gives_exactly_zero_and_a_zero_gradient():
    features, _, labels = batch()
    emb = F.one_hot(labels, 6).double()  # every positive at cosine 1, every negative at 0: nothing is hard
    assert len(hard_triplets(emb, labels)) == 0
    f = features.clone().requires_grad_(True)
    value = OTFace().loss(f, emb, labels)
    value.backward()
    assert value.item() == 0.0 and bool((f.grad == 0).all())
    distinct = torch.arange(8)  # no two images of one identity: no triplet at all
    assert OTFace().loss(f, emb, distinct).item() == 0.0


def test_hard_triplets_follow_the_definition():
    _, emb, labels = batch(seed=2)
    e = F.normalize(emb, dim=1)
    for alpha in (0.0, 0.4):
        want = [
            (a, p, n)
            for a in range(8)
            for p in range(8)
            for n in range(8)
            if a != p and labels[a] == labels[p] != labels[n] and float(e[a] @ e[n] - e[a] @ e[p]) > -alpha
        ]
        assert [tuple(t) for t in hard_triplets(emb, labels, alpha).tolist()] == want


def test_point_clouds_are_unit_and_keep_dead_cells_at_zero():
    f = torch.rand(2, 5, 3, 4)
    f[1, :, 0, 0] = 0
    pc = point_clouds(f)
    assert pc.shape == (2, 12, 5)
    torch.testing.assert_close(pc[0].norm(dim=1), torch.ones(12))
    assert bool((pc[1, 0] == 0).all())
    f.requires_grad_(True)
    point_clouds(f).sum().backward()
    assert bool((f.grad[1, :, 0, 0] == 0).all()) and torch.isfinite(f.grad).all()


def test_otface_refuses_bad_arguments():
    for kw, err in (
        ({"weight": -1}, ValueError),
        ({"eps": 0}, ValueError),
        ({"iters": 0}, ValueError),
        ({"mode": "exact"}, ValueError),
        ({"max_triplets": 0}, ValueError),
        ({"beta": "0"}, TypeError),
        ({"grad": "envelope"}, ValueError),
    ):
        with pytest.raises(err):
            OTFace(**kw)
    head = OTFace.released_head(8, 3)
    assert (head.s, head.m) == (64.0, 0.45)


def test_otface_trains_from_the_one_forward():
    """In the trainer the term reads the feature map of the step's single forward: BatchNorm
    counts one batch per step, and the term's loss is logged."""
    data = materialize(SynthFaces(range(4), images_per_identity=4, size=32), progress=False)
    model = models.iresnet("ir8", width=0.25, input_size=32, embedding_size=8)
    cfg = train.TrainConfig(epochs=1, batch_size=8, sampler="pk", images_per_identity=4, progress=False)
    trainer = train.Trainer(model, ArcFace(8, 4, s=16.0), data, cfg, extra={"ot": OTFace()})
    assert trainer.needs == {"features"}
    bn = model.stem[1]
    before = int(bn.num_batches_tracked)
    history = trainer.fit()
    assert int(bn.num_batches_tracked) - before == len(history) == 2
    assert all("loss_ot" in row and row["loss_ot"] >= 0 for row in history)
