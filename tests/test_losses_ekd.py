"""EKD and the distillation baselines against naive references written here (loops, float64)."""

import math

import pytest
import torch

from frlab.losses import EKD, FeatureDistill, SimilarityPreserving
from frlab.train import Batch


class Frozen(torch.nn.Module):
    """A 'teacher' that returns fixed embeddings for image indices (images are 0..B-1 here)."""

    def __init__(self, emb):
        super().__init__()
        self.emb = torch.nn.Parameter(emb.clone())

    def forward(self, images):
        return self.emb[images.long()]


def unit(v):
    return v / v.norm()


def ref_sims(x, labels):
    z = [unit(v) for v in x.double()]
    gen, imp = [], []
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            (gen if labels[i] == labels[j] else imp).append(((i, j), z[i] @ z[j]))
    return gen, imp


def ref_thresholds(imp_values, levels, clamp):
    desc = sorted(imp_values, key=lambda v: -float(v))
    out, ok = [], []
    for f in levels:
        r = len(desc) // round(1 / f)
        ok.append(clamp or r >= 1)
        out.append(float(desc[min(r, len(desc) - 1)]))
    return out, ok


def ref_code(s, thresholds, use, temp):
    total = 0
    for thr, u in zip(thresholds, use):
        if u:
            x = (
                max(-50.0, min(50.0, float((s - thr) / temp)))
                if not torch.is_tensor(s)
                else ((s - thr) / temp).clamp(-50, 50)
            )
            total = total + 1 / (1 + torch.exp(-x) if torch.is_tensor(x) else 1 + math.exp(-x))
    return total


class RefEKD:
    def __init__(self, levels, momentum, temp, top_k, clamp=False, correct=False):
        self.levels, self.m, self.temp, self.k, self.clamp, self.correct = levels, momentum, temp, top_k, clamp, correct
        self.s_thr, self.t_thr, self.seen = [0.0] * len(levels), [0.0] * len(levels), [0] * len(levels)

    def step(self, student, teacher, labels):
        sg, si = ref_sims(student, labels)
        tg, ti = ref_sims(teacher.detach(), labels)
        s_new, ok = ref_thresholds([v.detach() for _, v in si], self.levels, self.clamp)
        t_new, _ = ref_thresholds([v for _, v in ti], self.levels, self.clamp)
        for k in range(len(self.levels)):
            if ok[k]:
                self.s_thr[k] = self.m * s_new[k] + (1 - self.m) * self.s_thr[k]
                self.t_thr[k] = self.m * t_new[k] + (1 - self.m) * self.t_thr[k]
                self.seen[k] += 1
        c = [1 - (1 - self.m) ** n if self.correct else 1.0 for n in self.seen]
        s_thr = [v / max(ci, 1e-12) for v, ci in zip(self.s_thr, c)]
        t_thr = [v / max(ci, 1e-12) for v, ci in zip(self.t_thr, c)]
        pos = [
            (ref_code(s, s_thr, ok, self.temp) - ref_code(t, t_thr, ok, self.temp)) ** 2
            for (_, s), (_, t) in zip(sg, tg)
        ]
        order = sorted(range(len(si)), key=lambda q: -float(si[q][1].detach()))[: self.k]
        neg = [
            (ref_code(si[q][1], s_thr, ok, self.temp) - ref_code(ti[q][1], t_thr, ok, self.temp)) ** 2 for q in order
        ]
        return 0.02 * sum(pos) / len(pos) + 0.01 * sum(neg) / len(neg)


def batch(seed, b=16, d=6, n_id=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_id, (b,), generator=g)
    centres = torch.randn(n_id, d, generator=g, dtype=torch.float64)
    s = centres[labels] + torch.randn(b, d, generator=g, dtype=torch.float64)
    t = centres[labels] + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return s, t, labels


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("correct", [False, True])
def test_ekd_matches_reference_over_steps(clamp, correct):
    s, t, labels = batch(0, b=20)
    levels = (1e-1, 5e-2, 1e-2, 1e-3)
    ekd = EKD(
        Frozen(t), levels=levels, momentum=0.3, temperature=0.05, top_k=7, clamp_levels=clamp, bias_correction=correct
    ).double()
    ref = RefEKD(levels, 0.3, 0.05, 7, clamp, correct)
    for step in range(3):
        a = (s + 0.2 * step).clone().requires_grad_()
        b = (s + 0.2 * step).clone().requires_grad_()
        got = ekd.loss(a, t, labels)
        want = ref.step(b, t, labels)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-12)
        n_imp = int((labels[:, None] != labels[None, :]).sum()) // 2
        assert 100 <= n_imp < 1000  # resolves 1e-1, 5e-2 and 1e-2, not 1e-3 (unless clamped)
        assert ekd.last["levels"] == (4 if clamp else 3)
    assert ekd.student_thresholds.tolist() == pytest.approx(
        ref.s_thr
    ) and ekd.teacher_thresholds.tolist() == pytest.approx(ref.t_thr)


def test_released_defaults():
    ekd = EKD(Frozen(torch.randn(3, 2)))
    assert ekd.levels == (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    assert (ekd.pos_weight, ekd.neg_weight, ekd.temperature, ekd.momentum, ekd.top_k) == (0.02, 0.01, 0.01, 0.01, 2000)
    assert not ekd.clamp_levels and not ekd.bias_correction


def test_thresholds_and_codes_mean_what_they_say():
    ekd = EKD(Frozen(torch.randn(3, 2)), levels=(0.1, 0.01))
    imp = torch.linspace(0, 1, 1000)  # 1000 impostors: FPR 0.1 -> 100th largest, 0.01 -> 10th
    thr, ok = ekd.batch_thresholds(imp)
    assert ok.all() and thr.tolist() == pytest.approx([float(imp.flip(0)[100]), float(imp.flip(0)[10])])
    # a pair far above both thresholds scores 2 (accepted at both levels), far below 0, between 1
    codes = ekd.codes(torch.tensor([2.0, -1.0, float(thr.mean())]), thr, torch.tensor([0, 1]))
    assert (
        codes[0] == pytest.approx(2)
        and codes[1] == pytest.approx(0, abs=1e-6)
        and codes[2] == pytest.approx(1, abs=1e-3)
    )


def test_student_copying_the_teacher_has_zero_loss_and_teacher_gets_no_gradient():
    s, t, labels = batch(1)
    teacher = Frozen(s)
    ekd = EKD(teacher, levels=(1e-1,), momentum=1.0).double()
    x = s.clone().requires_grad_()
    loss = ekd({"embedding": x}, Batch(torch.arange(len(s)), labels, {}))  # the trainer's contract
    assert loss.item() == pytest.approx(0, abs=1e-12)
    loss.backward()
    # the term's own frozen copy of the teacher: no gradient, not optimized, in eval mode even when
    # the term is put in training mode; the caller's model is left as it was
    assert all(not p.requires_grad and p.grad is None for p in ekd.teacher.parameters())
    assert teacher.emb.requires_grad and ekd.teacher is not teacher
    assert not ekd.train().teacher.training and teacher.training
    assert "teacher.emb" in ekd.state_dict()  # so a model cache keyed by the term's weights sees the teacher


def test_edge_cases():
    s, t, labels = batch(2)
    ekd = EKD(Frozen(t))
    # one sample per class: no genuine pairs, the impostor part still counts
    y = torch.arange(len(s))
    out = ekd.loss(s.float().requires_grad_(), t.float(), y)
    assert torch.isfinite(out)
    # all one class: no impostors, nothing resolved, zero loss with a graph
    a = s.float().requires_grad_()
    out = EKD(Frozen(t)).loss(a, t.float(), torch.zeros(len(s), dtype=torch.long))
    out.backward()
    assert out.item() == 0 and a.grad is not None
    # fp16 student
    assert torch.isfinite(EKD(Frozen(t)).loss(s.half(), t.float(), labels))
    with pytest.raises(ValueError, match="levels"):
        EKD(Frozen(t), levels=(0.0,))
    with pytest.raises(ValueError, match="labels"):
        ekd.loss(s, t, labels[:3])


def test_baselines_match_reference():
    s, t, labels = batch(3)
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    got = FeatureDistill(Frozen(t), weight=2.0).loss(a, t)
    want = 2.0 * sum(((unit(x) - unit(y)) ** 2).sum() for x, y in zip(b, t)) / len(s)
    got.backward()
    want.backward()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    got = SimilarityPreserving(Frozen(t), weight=3.0).loss(s, t[:, :4])  # teacher of another width
    zs, zt = [unit(x) for x in s], [unit(y) for y in t[:, :4]]
    want = 3.0 * sum((zs[i] @ zs[j] - zt[i] @ zt[j]) ** 2 for i in range(len(s)) for j in range(len(s))) / len(s) ** 2
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="equal shapes"):
        FeatureDistill(Frozen(t)).loss(s, t[:, :4])
