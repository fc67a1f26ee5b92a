"""CIFP against a loop reference written here (float64, one sample and one class at a time)."""

import math

import pytest
import torch

from frlab import _fused, heads


def loop_cifp(x, w, labels, s, m, form, far, penalty_weight=1.0):
    """CIFP by its definition, entry by entry (the heads' docstring), with the released routing:
    cosines whose gradient reaches the embedding only are computed with the proxy detached."""
    B, C = len(labels), w.shape[0]
    xn = [xi / xi.norm() for xi in x]
    wn = [wj / wj.norm() for wj in w]
    cos = [[xn[i] @ wn[j] for j in range(C)] for i in range(B)]
    val = [[c.item() for c in row] for row in cos]
    y = [int(v) for v in labels]
    pool = [(i, j) for i in range(B) for j in range(C) if j != y[i] and (form == "paper" or val[i][j] <= val[i][y[i]])]
    k = math.ceil(far * len(pool) - 1e-9)
    t_u = sorted((val[i][j] for i, j in pool), reverse=True)[k - 1] if k > 0 else math.inf
    fp = [[j for j in range(C) if (i, j) in set(pool) and val[i][j] > t_u] for i in range(B)]
    losses = []
    if form == "code":
        for i in range(B):
            if fp[i]:
                v = [
                    cos[i][j] if val[i][j] < val[i][y[i]] - m else xn[i] @ wn[j].detach()
                    for j in fp[i]  # noqa: B023
                ]
                p = (1 + xn[i] @ wn[y[i]].detach()) * sum(vj * vj for vj in v) / len(v)
            else:
                p = torch.zeros((), dtype=x.dtype)
            target = s * (cos[i][y[i]] - m - p)
            others = [s * cos[i][j] for j in range(C) if j != y[i]]
            losses.append(torch.logsumexp(torch.stack([target, *others]), 0) - target)
    else:
        fpr = [len(fp[i]) / (C - 1) for i in range(B)]
        overall = sum(fpr) / B
        for i in range(B):
            r = fpr[i] / overall if overall > 0 else 0.0
            target = s * (cos[i][y[i]] - m)
            others = [s * cos[i][j] + math.log1p(penalty_weight * r) for j in range(C) if j != y[i]]
            losses.append(torch.logsumexp(torch.stack([target, *others]), 0) - target)
    return torch.stack(losses).mean(), t_u, fp


def batch(B=10, D=6, C=7, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    labels = torch.arange(B) % C
    x = w[labels] * spread + torch.randn(B, D, generator=g, dtype=torch.float64)
    return x, w, labels


def compare(head, x, w, labels, **kw):
    with torch.no_grad():
        head.weight.copy_(w)
    xa = x.clone().requires_grad_(True)
    loss = head(xa, labels)
    loss.backward()
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref, t_u, fp = loop_cifp(xb, wb, labels, head.s, head.m, head.form, head.far, **kw)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, wb.grad, rtol=1e-8, atol=1e-12)
    return t_u, fp


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("far", [None, 0.1, 0.3])
def test_cifp_against_a_loop_over_samples_and_classes(form, far):
    x, w, labels = batch()
    head = heads.CIFP(6, 7, s=16.0, form=form, far=far).double()
    t_u, fp = compare(head, x, w, labels)
    if far is not None:
        assert sum(map(len, fp)) > 0  # the penalty is active


def test_code_form_routes_gradients_as_released():
    """A false positive at least cos_y - m reaches the proxy through the cross-entropy only;
    one below it also through the penalty; at far 0.3 this batch has both."""
    x, w, labels = batch(seed=3, spread=0.5)
    head = heads.CIFP(6, 7, s=16.0, far=0.3).double()
    with torch.no_grad():
        head.weight.copy_(w)
    cos = head.logits(x)
    fp, _ = head.false_positives(cos, labels)
    cos_y = cos.gather(1, labels[:, None])
    below = fp & (cos < cos_y - head.m)
    assert bool(below.any()) and bool((fp & ~below).any())
    compare(head, x, w, labels)


def test_edges_no_false_positive_everything_excluded_negative_threshold_one_per_class():
    # far so small that k = 1: the largest candidate is T_u and nothing lies above it
    x, w, labels = batch()
    head = heads.CIFP(6, 7, s=16.0, far=1e-6).double()
    _, fp = compare(head, x, w, labels)
    assert sum(map(len, fp)) == 0
    cosface = heads.CosFace(6, 7, s=16.0).double()
    with torch.no_grad():
        cosface.weight.copy_(w)
    assert head(x, labels).item() == pytest.approx(cosface(x, labels).item(), rel=1e-10)
    # every negative above its target: none is a candidate, k = 0, no threshold
    x = -w[labels]
    head = heads.CIFP(6, 7, s=16.0, far=0.5).double()
    t_u, fp = compare(head, x, w, labels)
    assert t_u == math.inf and sum(map(len, fp)) == 0
    # a negative threshold (early training), one sample per class
    g = torch.Generator().manual_seed(5)
    w = torch.randn(7, 6, generator=g, dtype=torch.float64)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    head = heads.CIFP(6, 7, s=16.0, far=0.9).double()
    t_u, fp = compare(head, x, w, torch.arange(7))
    assert t_u < 0 and sum(map(len, fp)) > 0
    for form in ("code", "paper"):
        compare(heads.CIFP(6, 7, s=16.0, far=0.9, form=form).double(), x, w, torch.arange(7))


def test_fp16_inputs_give_the_float32_loss():
    x, w, labels = batch()
    head = heads.CIFP(6, 7, s=16.0, far=0.2)
    with torch.no_grad():
        head.weight.copy_(w.float())
    loss16 = head(x.half(), labels)
    loss32 = head(x.half().float(), labels)
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=1e-6)


def test_cifp_refuses_bad_arguments():
    for kw, err in (
        ({"form": "released"}, ValueError),
        ({"far": 0.0}, ValueError),
        ({"far": 1.5}, ValueError),
        ({"m": -0.1}, ValueError),
        ({"penalty_weight": -1}, ValueError),
        ({"s": "64"}, TypeError),
    ):
        with pytest.raises(err):
            heads.CIFP(6, 7, **kw)
    assert heads.CIFP(6, 11).far == pytest.approx(0.1) and heads.CIFP(6, 11, form="paper").far == 1e-4
    assert isinstance(heads.make_head("cifp", 6, 7, form="paper"), heads.CIFP)


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("far", [None, 0.05, 0.3, 0.9, 1e-6])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_computes_the_reference(form, far, reduction):
    g = torch.Generator().manual_seed(1)
    for spread in (0.3, 1.5):
        x, w, labels = batch(B=24, C=11, seed=int(spread * 10), spread=spread)
        a = heads.CIFP(6, 11, s=32.0, form=form, far=far).double()
        with torch.no_grad():
            a.weight.copy_(w)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la, lb = a(xa, labels, reduction=reduction), a.reference(xb, labels, reduction=reduction)
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
        weights = torch.rand(la.shape, generator=g, dtype=torch.float64)
        grad_w = torch.autograd.grad((la * weights).sum(), [xa, a.weight])
        ref_w = torch.autograd.grad((lb * weights).sum(), [xb, a.weight])
        for u, v in zip(grad_w, ref_w):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("block", [None, 600])
@pytest.mark.parametrize("C", [200, 256, 40])  # whole chunks of 64 and a tail, whole chunks only, a tail only
def test_the_fast_threshold_finds_the_same_false_positives_even_when_its_bound_fails(form, block, C, monkeypatch):
    if block:  # blocks of a few rows: the search runs over several
        monkeypatch.setattr(_fused, "SEARCH_BLOCK", block)
    g = torch.Generator().manual_seed(2)
    B = 64
    labels = torch.randint(0, C, (B,), generator=g)
    head = heads.CIFP(4, C, form=form, far=0.05)
    random = torch.rand(B, C, generator=g) * 2 - 1
    adversarial = random.clone()
    adversarial[:, :: head.SUBSAMPLE] += 2.0  # the strided classes hold the largest values: t0 is too high
    for cos in (random, adversarial):
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)
        fp, _ = head.false_positives(cos, labels)
        limit = cos_y if form == "code" else None
        fast, others = _fused.top_fraction(cos, torch.ones(C), labels, head.far, limit, head.SUBSAMPLE)
        assert sorted(fast.tolist()) == fp.view(-1).nonzero().squeeze(1).tolist()
        assert len(fast) > 0
        # and each row's logsumexp of its non-target logits, from the same pass: a loop in float64
        for i in range(B):
            rest = [float(cos[i, j]) for j in range(C) if j != labels[i]]
            assert others[i].item() == pytest.approx(math.log(sum(math.exp(v) for v in rest)), rel=1e-6)
