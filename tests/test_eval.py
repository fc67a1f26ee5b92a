"""Verification and identification metrics against small cases computed by hand."""

import math

import pytest
import torch

from frlab import eval as ev


def test_roc_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    same = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    fpr, tpr, thr = ev.roc(scores, same)
    assert fpr.tolist() == [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1]
    assert tpr.tolist() == [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1]
    assert math.isinf(thr[0]) and thr[1:].tolist() == pytest.approx(scores.tolist())
    m = ev.verification(scores, same, levels=(0.5, 0.1))
    # AUC = P(genuine > impostor) = 8 of 9 pairs
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["eer"] == pytest.approx(1 / 3)
    assert m["tpr@fpr=5e-01"] == pytest.approx(1.0)
    assert "tpr@fpr=1e-01" not in m, "3 impostor pairs cannot support FPR 0.1"


def test_ties_are_one_threshold():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    same = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    fpr, tpr, _ = ev.roc(scores, same)
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1]
    assert ev.verification(scores, same)["auc"] == pytest.approx(0.5)


def test_tpr_at_fpr_and_auc_match_a_pairwise_count():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(300, generator=g) + 1.5, torch.randn(2000, generator=g)
    scores, same = torch.cat([pos, neg]), torch.cat([torch.ones(300), torch.zeros(2000)]).bool()
    m = ev.verification(scores, same)
    assert m["auc"] == pytest.approx(float((pos[:, None] > neg[None]).double().mean()), abs=1e-9)
    for level in (1e-1, 1e-2, 1e-3):
        k = int(level * 2000)  # at most k impostors may pass the threshold
        threshold = neg.sort(descending=True).values[k]  # accept scores strictly above the (k+1)-th impostor
        assert m[f"tpr@fpr={level:.0e}"] == pytest.approx(float((pos > threshold).double().mean()))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_eer_is_where_fnr_and_fpr_meet_on_a_loop_roc(seed):
    """EER against an ROC built threshold by threshold, scores rounded so that many tie."""
    g = torch.Generator().manual_seed(seed)
    n_pos, n_neg = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
    scores = torch.cat([torch.randn(n_pos, generator=g) + 1.0, torch.randn(n_neg, generator=g)]).mul(4).round()
    same = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)]).bool()
    points = [(0.0, 0.0)]
    for threshold in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= threshold
        points.append((float((accepted & ~same).sum()) / n_neg, float((accepted & same).sum()) / n_pos))
    best = min(range(len(points)), key=lambda i: abs((1 - points[i][1]) - points[i][0]))  # first of the closest
    fpr, tpr = points[best]
    assert ev.verification(scores, same)["eer"] == pytest.approx((fpr + 1 - tpr) / 2, abs=1e-12)


def test_verification_needs_both_kinds():
    with pytest.raises(ValueError, match="genuine and impostor"):
        ev.verification(torch.rand(5), torch.ones(5, dtype=torch.bool))


def test_identification_rank_k():
    gallery = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    probe = torch.tensor([[1.0, 0.1, 0, 0], [0.9, 0.5, 0, 0], [0, 0, 0.2, 1.0]])
    out = ev.identification(gallery, labels, probe, torch.tensor([0, 1, 2]), max_rank=3, chunk=2)
    assert out["rank1"] == pytest.approx(1 / 3)
    assert out["cmc"] == pytest.approx([1 / 3, 1.0, 1.0])


def test_all_pairs():
    i, j, same = ev.all_pairs(torch.tensor([0, 0, 1]))
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]
    assert same.tolist() == [True, False, False]


def test_identification_chunked_matches_a_naive_ranking():
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    gl = torch.randint(0, 50, (300,), generator=g)
    probe = torch.nn.functional.normalize(torch.randn(70, 16, generator=g), dim=1)
    pl = torch.randint(0, 50, (70,), generator=g)
    got = ev.identification(gallery, gl, probe, pl, max_rank=5, chunk=16, gallery_chunk=37)
    ranks = []
    for p, y in zip(probe, pl):
        order = torch.argsort(gallery @ p, descending=True)
        hit = (gl[order] == y).nonzero()
        ranks.append(int(hit[0]) if len(hit) else 10**9)
    expected = [sum(r <= k for r in ranks) / 70 for k in range(5)]
    assert got["cmc"] == pytest.approx(expected)


def test_class_spectra_against_a_naive_tangent_projection():
    """An elongated class on the sphere has a low isotropy ratio; a round one a high one."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 0.0, 1.0])
    round_ = torch.nn.functional.normalize(
        mu + 0.1 * torch.randn(400, 3, generator=g) * torch.tensor([1.0, 1.0, 0.0]), dim=1
    )
    long_ = torch.nn.functional.normalize(mu + torch.randn(400, 3, generator=g) * torch.tensor([0.3, 0.03, 0.0]), dim=1)
    emb, labels = torch.cat([round_, long_]), torch.tensor([0] * 400 + [1] * 400)
    out = ev.class_spectra(emb, labels)
    assert out["isotropy"][0] > 0.7 and out["isotropy"][1] < 0.05
    assert 1.7 < out["effective_rank"][0] < 2.0 and out["effective_rank"][1] < 1.2
    # naive reference for class 1, point by point
    z = long_.double()
    m = torch.nn.functional.normalize(z.mean(0), dim=0)
    vs = []
    for zi in z:
        t = torch.acos(torch.clamp(zi @ m, -1, 1))
        vs.append(t / torch.sin(t) * (zi - torch.cos(t) * m))
    v = torch.stack(vs)
    cov = torch.cov(v.T)
    expected = sorted(torch.linalg.eigvalsh(cov).tolist(), reverse=True)
    assert out["spectrum"][1].tolist() == pytest.approx(expected, abs=1e-10)
    assert float(out["mean_angle"][1]) == pytest.approx(
        float(torch.stack([torch.acos(torch.clamp(zi @ m, -1, 1)) for zi in z]).mean())
    )


def test_ks_distance_against_a_loop_over_every_threshold():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, generator=g), torch.randn(23, generator=g) + 0.4
    a[:5] = b[:5]  # ties across the two samples
    cdf = lambda x, t: sum(float(v) <= t for v in x) / len(x)  # noqa: E731
    naive = max(abs(cdf(a, float(t)) - cdf(b, float(t))) for t in torch.cat([a, b]))
    assert ev.ks_distance(a, b) == pytest.approx(naive, abs=1e-12)
    assert ev.ks_distance(a, a) == 0.0
    assert ev.ks_distance(torch.zeros(3), torch.ones(4)) == 1.0
    with pytest.raises(ValueError, match="both sides"):
        ev.ks_distance(a, torch.zeros(0))


def test_group_dependence_finds_a_shift_and_not_a_relabelling():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(300) % 3
    same = torch.rand(300, generator=g)
    d, p = ev.group_dependence(same, groups, permutations=300)
    assert p > 0.05 and d < 0.25
    shifted = same + 0.3 * (groups == 1)
    d_shift, p_shift = ev.group_dependence(shifted, groups, permutations=300)
    assert p_shift < 0.01 and d_shift > d
    with pytest.raises(ValueError, match="two groups"):
        ev.group_dependence(same, torch.zeros(300, dtype=torch.long))
