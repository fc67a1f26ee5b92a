"""Protocols: pairs, subsets, folds and gallery/probe splits against naive loops."""

import itertools

import pytest
import torch

from frlab import protocols as pr
from frlab.data import SynthFaces


def naive_best_accuracy(scores, same):
    best = 0.0
    for t in [float(scores.min()) - 1] + scores.tolist():
        best = max(best, float(((scores > t) == same).double().mean()))
    return best


def test_all_pairs_are_there_once():
    labels = torch.tensor([3, 1, 3, 2, 1, 3])
    p = pr.verification_pairs(labels)
    got = sorted(zip(p.i.tolist(), p.j.tolist(), p.same.tolist()))
    expected = sorted((i, j, labels[i] == labels[j]) for i, j in itertools.combinations(range(6), 2))
    assert got == [(i, j, bool(s)) for i, j, s in expected]


def test_sampled_impostors_are_distinct_impostors():
    labels = torch.arange(50).repeat_interleave(4)
    p = pr.verification_pairs(labels, max_impostors=3000, seed=1)
    imp = p.select(~p.same)
    assert len(imp) == 3000 and bool((labels[imp.i] != labels[imp.j]).all()) and bool((imp.i < imp.j).all())
    assert len(set(zip(imp.i.tolist(), imp.j.tolist()))) == 3000
    assert int(p.same.sum()) == 50 * 6
    again = pr.verification_pairs(labels, max_impostors=3000, seed=1)
    assert torch.equal(again.i, p.i) and torch.equal(again.j, p.j)


def test_folds_split_identities():
    labels = torch.arange(20).repeat_interleave(3)
    p = pr.verification_pairs(labels)
    assert set(p.fold.tolist()) == set(range(10))
    genuine = p.select(p.same)
    for f in range(10):  # a genuine pair's identity belongs to exactly one fold
        ids = set(labels[genuine.i[genuine.fold == f]].tolist())
        assert len(ids) == 2


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_matches_a_naive_search(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.round(torch.randn(60, generator=g), decimals=1)  # ties on purpose
    same = torch.rand(60, generator=g) < 0.4
    t = pr.best_threshold(scores, same)
    assert float(((scores > t) == same).double().mean()) == pytest.approx(naive_best_accuracy(scores, same))


def test_kfold_accuracy_is_perfect_when_separable_and_chance_when_not():
    labels = torch.arange(20).repeat_interleave(3)
    p = pr.verification_pairs(labels)
    perfect = pr.kfold_accuracy(p.same.double() + 0.01 * torch.rand(len(p)), p)
    assert perfect["mean"] == 1.0 and perfect["folds"] == 10
    g = torch.Generator().manual_seed(0)
    random = pr.kfold_accuracy(torch.rand(len(p), generator=g), p)
    assert random["mean"] < 0.99  # no better than always answering "impostor"


def test_subsets_and_report():
    faces = SynthFaces(range(30), images_per_identity=6, seed=0)
    meta = faces.meta
    p = pr.verification_pairs(meta["label"])
    easy, hard = pr.is_easy(meta), pr.is_hard(meta)
    assert easy.any() and hard.any() and not (easy & hard).any()
    sub = pr.pair_subsets(p, easy, hard, groups=meta["group"])
    assert bool((easy[p.i[sub["easy"]]] & easy[p.j[sub["easy"]]]).all())
    assert bool((hard[p.i[sub["hard"]]] | hard[p.j[sub["hard"]]]).all())
    noise = torch.where(sub["hard"], 2.0, 0.1) * torch.rand(len(p))  # hard pairs overlap, easy ones do not
    scores = p.same.double() + noise
    rep = pr.verification_report(scores, p, sub)
    assert rep["easy"]["auc"] == 1.0 and rep["hard"]["auc"] < rep["easy"]["auc"]
    assert "group_0" in rep


def test_gallery_probe_split_takes_the_easiest_per_identity():
    meta = {"label": torch.tensor([0, 0, 0, 1, 1, 2]), "difficulty": torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.0])}
    gallery, probe = pr.gallery_probe_split(meta)
    assert sorted(gallery.tolist()) == [1, 4, 5]
    assert sorted(probe.tolist()) == [0, 2, 3]
    g2, p2 = pr.gallery_probe_split(meta, per_identity=2)
    assert sorted(g2.tolist()) == [0, 1, 3, 4, 5] and p2.tolist() == [2]


def test_balanced_keeps_every_genuine_pair_and_as_many_impostors_per_fold():
    labels = torch.arange(30).repeat_interleave(3)
    p = pr.verification_pairs(labels)
    keep = pr.balanced(p)
    assert bool(keep[p.same].all())
    for f in range(10):
        in_fold = keep & (p.fold == f)
        assert int((in_fold & p.same).sum()) == int((in_fold & ~p.same).sum()) > 0
    # balanced accuracy of a useless score is near chance, not near the impostor share
    g = torch.Generator().manual_seed(0)
    sub = p.select(keep)
    assert pr.kfold_accuracy(torch.rand(len(sub), generator=g), sub)["mean"] < 0.7


def test_fairness_report_counts_each_groups_false_accepts_at_one_threshold():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40).repeat_interleave(4)
    groups = (torch.arange(160) // 4) % 2
    pairs = pr.verification_pairs(labels)
    scores = torch.rand(len(pairs), generator=g) + pairs.same.float() * 0.5
    scores[(groups[pairs.i] == 1) & (groups[pairs.j] == 1) & ~pairs.same] += 0.1  # group 1's impostors look alike
    subsets = {
        k: v for k, v in pr.pair_subsets(pairs, groups == 0, groups == 0, groups).items() if k.startswith("group")
    }
    out = pr.fairness_report(scores, pairs, subsets, level=0.05)
    imp = sorted(scores[~pairs.same].tolist(), reverse=True)
    T = imp[int(len(imp) * 0.05)]  # floor(n f) impostors lie above it
    assert out["threshold"] == pytest.approx(T)
    for name, mask in subsets.items():
        fa = [float(s) > T for s, same in zip(scores[mask], pairs.same[mask]) if not same]
        ta = [float(s) > T for s, same in zip(scores[mask], pairs.same[mask]) if same]
        assert out["groups"][name]["fpr"] == pytest.approx(sum(fa) / len(fa))
        assert out["groups"][name]["tpr"] == pytest.approx(sum(ta) / len(ta))
    f0, f1 = out["groups"]["group_0"]["fpr"], out["groups"]["group_1"]["fpr"]
    assert f1 > f0 and out["fpr_ratio"] == pytest.approx(f1 / f0)
    assert out["fpr_std"] == pytest.approx(float(torch.tensor([f0, f1], dtype=torch.float64).std()))
    with pytest.raises(ValueError, match="genuine and impostor"):
        pr.fairness_report(scores, pairs, {"none": pairs.same})
