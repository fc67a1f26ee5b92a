"""DDL against a naive reference written here: loops over pairs and bins, float64."""

import math

import pytest
import torch

from frlab.hparams import describe
from frlab.losses import DDL, easy_hard_gap, kl
from frlab.losses.ddl import centres
from frlab.protocols import EasyRule, HardRule
from frlab.train import Batch


# ------------------------------------------------------------------ naive reference
def ref_histogram(sims, bins, sigma):
    h = []
    for k in range(bins):
        c = k / bins
        h.append(sum(torch.exp(-0.5 * ((s - c) / sigma) ** 2) for s in sims))
    h = torch.stack(h)
    return h / h.sum()


def ref_kl(p, q, eps=1e-9):
    return sum((pk + eps) * (torch.log(pk + eps) - torch.log(qk + eps)) for pk, qk in zip(p, q))


def ref_sets(x, labels, easy, hard, threshold=0.0, released=False):
    z = [xi / xi.norm() for xi in x.double()]
    n = len(z)
    sim = lambda i, j: z[i] @ z[j]  # noqa: E731
    tp, sp, tn, sn = [], [], [], []
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] == labels[j]:
                s = sim(i, j)
                if s > threshold and easy[i] and easy[j]:
                    tp.append(s)
                if s > threshold and (hard[i] or hard[j]):
                    sp.append(s)
    if released:
        for side, out in ((easy, tn), (hard, sn)):
            idx = [i for i in range(n) if side[i]]
            for a, i in enumerate(idx):
                out.append(max([torch.zeros((), dtype=torch.float64)] + [sim(i, j) for j in idx[a + 1 :]]))
        return tp, sp, tn, sn
    for i in range(n):
        if easy[i]:
            cands = [sim(i, j) for j in range(n) if j != i and labels[j] != labels[i] and easy[j]]
            if cands:
                tn.append(max(cands))
        if hard[i]:
            cands = [sim(i, j) for j in range(n) if j != i and labels[j] != labels[i]]
            if cands:
                sn.append(max(cands))
    return tp, sp, tn, sn


def ref_ddl(x, labels, easy, hard, bins=50, sigma=0.1, w=(0.1, 0.02, 0.5), detach=True, released=False):
    tp, sp, tn, sn = ref_sets(x, labels, easy, hard, released=released)
    total = x.sum() * 0
    for (t, s), weight in (((tp, sp), w[0]), ((tn, sn), w[1])):
        if t and s:
            p = ref_histogram(t, bins, sigma)
            total = total + weight * ref_kl(p.detach() if detach else p, ref_histogram(s, bins, sigma))
    for n in (tn, sn):
        for p in (tp, sp):
            if n and p:
                total = total + w[2] * (sum(n) / len(n) - sum(p) / len(p))
    return total


def batch(seed=0, n_id=4, k=4, d=8):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_id, d, generator=g, dtype=torch.float64)
    labels = torch.arange(n_id).repeat_interleave(k)
    x = centres[labels] + 0.8 * torch.randn(n_id * k, d, generator=g, dtype=torch.float64)
    u = torch.rand(n_id * k, generator=g)
    easy, hard = u < 0.45, u > 0.6
    return x, labels, easy, hard


# ------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("released", [False, True])
def test_matches_reference(seed, detach, released):
    x, labels, easy, hard = batch(seed)
    ddl = DDL(bins=50, detach_teacher=detach, negatives="released" if released else "hardest")
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    got = ddl.loss(a, labels, easy, hard)
    want = ref_ddl(b, labels, easy, hard, detach=detach, released=released)
    got.backward()
    want.backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)


def test_parts_match_reference():
    x, labels, easy, hard = batch(3)
    ddl = DDL(bins=40, sigma=0.07)
    sims = ddl.similarities(x, labels, easy, hard)
    tp, sp, tn, sn = ref_sets(x, labels, easy, hard)
    for got, want in zip(sims.values(), (tp, sp, tn, sn)):
        torch.testing.assert_close(torch.sort(got).values, torch.sort(torch.stack(want)).values)
    torch.testing.assert_close(ddl.histogram(sims["teacher_pos"]), ref_histogram(tp, 40, 0.07))
    p, q = ref_histogram(tp, 40, 0.07), ref_histogram(sp, 40, 0.07)
    torch.testing.assert_close(kl(p, q), ref_kl(p, q))
    assert kl(p, p).abs() < 1e-12 and kl(p, q) > 0


def test_default_bins_and_width_are_the_released_ones():
    ddl = DDL()
    assert (
        ddl.bins == 1000 and ddl.sigma == 0.1 and (ddl.pos_weight, ddl.neg_weight, ddl.order_weight) == (0.1, 0.02, 0.5)
    )
    assert centres(1000)[0] == 0 and abs(float(centres(1000)[-1]) - 0.999) < 1e-6
    h = ddl.histogram(torch.tensor([0.5]))
    assert int(h.argmax()) == 500 and abs(float(h.sum()) - 1) < 1e-5


def test_detached_teacher_gets_no_kl_gradient():
    """Identity 0 is all easy and no hard sample's hardest impostor: through the positive KL it
    moves only when the teacher is not detached."""
    x, labels, easy, hard = batch(4)
    easy[labels == 0], hard[labels == 0] = True, False
    for detach, moves in ((True, False), (False, True)):
        ddl = DDL(bins=50, neg_weight=0.0, order_weight=0.0, detach_teacher=detach)
        a = x.clone().requires_grad_()
        ddl.loss(a, labels, easy, hard).backward()
        assert ddl.last["kl_pos"] > 0
        assert bool(a.grad[labels == 0].abs().sum() > 0) == moves


def test_kl_step_raises_hard_genuine_similarity():
    """The mechanism: a gradient step on KL(P+ || Q+) moves hard genuine similarities toward the
    (higher) easy ones."""
    torch.manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    centres = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    hard = torch.tensor([False, False, True, True] * 8)
    easy = ~hard
    noise = torch.where(hard[:, None], 0.9, 0.2)
    x = (centres[labels] + noise * torch.randn(32, 16) / 4).requires_grad_()
    ddl = DDL(neg_weight=0.0, order_weight=0.0)
    before = ddl.similarities(x, labels, easy, hard)
    assert before["student_pos"].mean() < before["teacher_pos"].mean() - 0.1
    ddl.loss(x, labels, easy, hard).backward()
    with torch.no_grad():
        after = ddl.similarities(x - 0.5 * x.grad / x.grad.norm(), labels, easy, hard)
    assert after["student_pos"].mean() > before["student_pos"].mean()


# ------------------------------------------------------------------ edge cases and contract
def test_missing_parts_contribute_zero_and_keep_the_graph():
    x, labels, _, _ = batch(0)
    none = torch.zeros(len(x), dtype=torch.bool)
    a = x.clone().requires_grad_()
    loss = DDL(bins=50).loss(a, labels, none, none)
    loss.backward()
    assert loss.item() == 0 and a.grad is not None and a.grad.abs().sum() == 0
    # one sample per class: no genuine pairs, the negatives alone still count
    y = torch.arange(len(x))
    b = x.clone().requires_grad_()
    ddl = DDL(bins=50)
    loss = ddl.loss(b, y, torch.arange(len(x)) % 2 == 0, torch.arange(len(x)) % 2 == 1)
    assert ddl.last["n_teacher_pos"] == 0 and ddl.last["kl_pos"] == 0 and ddl.last["kl_neg"] > 0
    loss.backward()
    assert torch.isfinite(b.grad).all()


def test_identical_embeddings_and_fp16():
    labels = torch.tensor([0, 0, 1, 1])
    x = torch.ones(4, 6)  # cos = +1 everywhere
    easy, hard = torch.tensor([True, True, False, False]), torch.tensor([False, False, True, True])
    loss = DDL().loss(x.requires_grad_(), labels, easy, hard)
    assert torch.isfinite(loss)
    x16, y, e, h = batch(1)
    ref = DDL(bins=50).loss(x16.float(), y, e, h)
    got = DDL(bins=50).loss(x16.half(), y, e, h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3)


def test_easy_hard_gap_on_pairs():
    g = torch.Generator().manual_seed(0)
    same = torch.rand(4000, generator=g) < 0.3
    hard = torch.rand(4000, generator=g) < 0.5
    easy = ~hard
    scores = torch.where(same, 0.7, 0.1) + 0.05 * torch.randn(4000, generator=g)
    assert easy_hard_gap(scores, same, easy, hard)["kl_pos"] < 0.01  # same distributions
    shifted = scores - 0.3 * (same & hard)
    gap = easy_hard_gap(shifted, same, easy, hard, bins=200)
    assert abs(gap["mean_pos_gap"] - 0.3) < 0.01 and gap["kl_pos"] > 1 and abs(gap["mean_neg_gap"]) < 0.01
    want = ref_kl(
        ref_histogram(shifted[same & easy][:50].double(), 20, 0.1),
        ref_histogram(shifted[same & hard][:50].double(), 20, 0.1),
    )
    sub = torch.zeros(4000, dtype=torch.bool)
    sub[(same & easy).nonzero()[:50, 0]] = True
    sub[(same & hard).nonzero()[:50, 0]] = True
    assert abs(easy_hard_gap(shifted[sub], same[sub], easy[sub], hard[sub], bins=20)["kl_pos"] - float(want)) < 1e-9


def test_meta_rules_and_bad_input():
    meta = {
        "yaw": torch.tensor([0.0, 60.0, 5.0, 50.0]),
        "pitch": torch.zeros(4),
        "resolution": torch.ones(4),
        "blur": torch.zeros(4),
        "mask": torch.zeros(4),
    }
    x, labels = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 0, 1, 1])
    ddl = DDL(bins=50)
    torch.testing.assert_close(
        ddl({"embedding": x}, Batch(torch.zeros(4, 3, 8, 8), labels, meta)),
        ddl.loss(x, labels, EasyRule()(meta), HardRule()(meta)),
    )
    assert EasyRule()(meta).tolist() == [True, False, True, False] and HardRule(min_yaw=55)(meta).tolist() == [
        False,
        True,
        False,
        False,
    ]
    assert describe(ddl)["hparams"]["easy"] == {
        "type": "frlab.protocols.EasyRule",
        "max_yaw": 20.0,
        "max_pitch": 15.0,
        "max_resolution": 1.5,
        "max_blur": 0.5,
    }  # the rules are part of the cache key
    with pytest.raises(ValueError, match="negatives"):
        DDL(negatives="all")
    with pytest.raises(ValueError, match="sigma"):
        DDL(sigma=0)
    with pytest.raises(ValueError, match="pos_weight"):
        DDL(pos_weight=-0.1)
    with pytest.raises(ValueError, match="shape"):
        ddl.loss(x, labels[:3], EasyRule()(meta), HardRule()(meta))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, labels, easy, hard = batch(2)
    ddl = DDL(bins=50)
    want = ddl.loss(x, labels, easy, hard)
    got = DDL(bins=50).cuda().loss(x.cuda(), labels.cuda(), easy.cuda(), hard.cuda())
    assert math.isclose(got.item(), want.item(), rel_tol=1e-9, abs_tol=1e-12)
