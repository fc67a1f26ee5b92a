"""frlab.quality against references written here: scipy's 1-D Wasserstein distance, loops over
images and pairs."""

import math

import pytest
import torch
from scipy.stats import wasserstein_distance

from frlab import protocols, quality, train
from frlab.data.synth import FaceTensors


def toy(n_ids=6, per=(1, 2, 3, 5, 8, 30), D=8, seed=0, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((per[k % len(per)],), 10 * k + 3) for k in range(n_ids)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    centres = torch.randn(int(labels.max()) + 1, D, generator=g, dtype=torch.float64)
    x = centres[labels] + noise * torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1), labels


def test_sampled_sets_are_what_they_claim():
    _, labels = toy(per=(2, 3, 5, 8, 30, 40))
    for n in (1, 4, 24):
        pos, neg = quality.sample_pairs(labels, n, n, torch.Generator().manual_seed(n))
        for i in range(len(labels)):
            p, q = pos[i][pos[i] >= 0].tolist(), neg[i][neg[i] >= 0].tolist()
            same = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
            other = [j for j in range(len(labels)) if labels[j] != labels[i]]
            assert len(p) == min(n, len(same)) and len(set(p)) == len(p) and set(p) <= set(same)
            assert len(q) == min(n, len(other)) and len(set(q)) == len(q) and set(q) <= set(other)
            if len(same) <= n:  # all of them: the same set whatever the draw
                assert sorted(p) == same


def test_draws_are_uniform_over_the_others():
    labels = torch.tensor([0] * 9 + [1] * 3)  # image 0 has 8 others of its identity and 3 impostors
    counts_pos, counts_neg = torch.zeros(12), torch.zeros(12)
    g = torch.Generator().manual_seed(0)
    draws = 4000
    for _ in range(draws // 100):
        for _ in range(100):
            pos, neg = quality.sample_pairs(labels, 3, 2, g)
            counts_pos.index_add_(0, pos[0], torch.ones(3))
            counts_neg.index_add_(0, neg[0], torch.ones(2))
    assert counts_pos[0] == 0 and counts_pos[9:].sum() == 0
    # each of the 8 others with probability 3 / 8, each impostor 2 / 3: within 5 standard errors
    for counts, idx, p in ((counts_pos, range(1, 9), 3 / 8), (counts_neg, range(9, 12), 2 / 3)):
        se = math.sqrt(draws * p * (1 - p))
        for j in idx:
            assert abs(counts[j] - draws * p) < 5 * se


@pytest.mark.parametrize("seed", range(5))
def test_wasserstein_matches_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    N, A, B = 40, 9, 7
    a = torch.randn(N, A, generator=g).round(decimals=1)  # rounded: ties within and across the sets
    b = torch.randn(N, B, generator=g).round(decimals=1) + 0.5
    a_valid = torch.rand(N, A, generator=g) < 0.7
    b_valid = torch.rand(N, B, generator=g) < 0.7
    a_valid[:, 0] = b_valid[:, 0] = True
    ours = quality.wasserstein_1d(a, a_valid, b, b_valid)
    for i in range(N):
        ref = wasserstein_distance(a[i][a_valid[i]].double().numpy(), b[i][b_valid[i]].double().numpy())
        assert ours[i].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
        assert ours[i] >= abs(a[i][a_valid[i]].double().mean() - b[i][b_valid[i]].double().mean()) - 1e-12


def test_wasserstein_of_separated_sets_is_the_gap_of_their_means():
    a = torch.tensor([[0.9, 0.8, 0.7]])
    b = torch.tensor([[0.1, -0.2]])
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    assert quality.wasserstein_1d(a, ones(a), b, ones(b)).item() == pytest.approx(0.8 - (-0.05))


def loop_distances(x, labels, n_pos, n_neg, repeats, seed, signed=False):
    """The same draws as `distances` (the generator seeded alike), then one image at a time with scipy."""
    g = torch.Generator().manual_seed(seed)
    total = [0.0] * len(labels)
    for _ in range(repeats):
        pos, neg = quality.sample_pairs(labels, n_pos, n_neg, g)
        for i in range(len(labels)):
            cp = [float(x[i] @ x[j]) for j in pos[i].tolist() if j >= 0]
            cn = [float(x[i] @ x[j]) for j in neg[i].tolist() if j >= 0]
            d = wasserstein_distance(cp, cn)
            if signed:
                d *= math.copysign(1.0, sum(cp) / len(cp) - sum(cn) / len(cn))
            total[i] += d
    return torch.tensor(total, dtype=torch.float64) / repeats


@pytest.mark.parametrize("signed", [False, True])
def test_distances_and_labels_against_a_loop_over_images(signed):
    x, labels = toy(per=(2, 3, 5, 8, 30), noise=2.0)
    ref = loop_distances(x, labels, 4, 6, 3, seed=7, signed=signed)
    ours = quality.distances(x, labels, n_pos=4, n_neg=6, repeats=3, seed=7, signed=signed, chunk=5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    q = quality.pseudo_labels(x, labels, n_pos=4, n_neg=6, repeats=3, seed=7, signed=signed)
    torch.testing.assert_close(q, (ref - ref.min()) / (ref.max() - ref.min()) * 100, rtol=1e-10, atol=1e-10)
    assert q.min() == 0 and q.max() == pytest.approx(100)
    if signed:
        assert (ours < 0).any()  # images of this noisy toy whose impostors are nearer than their own
        one = [quality.distances(x, labels, n_pos=4, n_neg=6, repeats=1, seed=7, signed=v) for v in (True, False)]
        torch.testing.assert_close(one[0].abs(), one[1])  # one draw: the same distance, with a sign


def test_all_available_means_deterministic_labels_and_seeds_matter_otherwise():
    x, labels = toy(per=(3, 4, 5))  # 2-4 others, 7-10 impostors
    a = quality.distances(x, labels, n_pos=24, n_neg=24, repeats=1, seed=0)
    b = quality.distances(x, labels, n_pos=24, n_neg=24, repeats=1, seed=1)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    c = quality.distances(x, labels, n_pos=2, n_neg=3, repeats=1, seed=0)
    d = quality.distances(x, labels, n_pos=2, n_neg=3, repeats=1, seed=1)
    assert not torch.allclose(c, d)


def test_singletons_are_refused_or_labelled_nan():
    x, labels = toy()  # one identity has a single image
    with pytest.raises(ValueError, match="only one of their identity"):
        quality.distances(x, labels)
    d = quality.distances(x, labels, singletons="nan", repeats=2)
    alone = torch.isnan(d)
    assert int(alone.sum()) == 1 and not torch.isnan(quality.min_max(d)[~alone]).any()
    with pytest.raises(ValueError):
        quality.distances(x, torch.zeros(len(x), dtype=torch.long))
    with pytest.raises(ValueError):
        quality.distances(x, labels, singletons="drop")
    with pytest.raises(ValueError):
        quality.distances(x, labels, repeats=0)


def loop_evr(quality_, scores, pairs, level, fractions):
    """Error versus reject by the definition, pair by pair."""
    imp = sorted((float(s) for s, same in zip(scores, pairs.same) if not same), reverse=True)
    t = imp[int(len(imp) * level + 1e-9)]
    order = sorted(range(len(quality_)), key=lambda k: (float(quality_[k]), k))
    out = []
    for f in fractions.tolist():
        rejected = set(order[: int(f * len(quality_) + 1e-9)])
        kept = [
            float(s)
            for s, i, j, same in zip(scores, pairs.i.tolist(), pairs.j.tolist(), pairs.same)
            if same and i not in rejected and j not in rejected
        ]
        out.append(sum(s <= t for s in kept) / len(kept) if kept else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def test_error_versus_reject_against_a_loop_over_pairs():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(30).repeat_interleave(4)
    pairs = protocols.verification_pairs(labels)
    q = torch.randint(0, 20, (len(labels),), generator=g).double()  # ties in quality
    good = torch.minimum(q[pairs.i], q[pairs.j]) / 20
    scores = torch.where(
        pairs.same, good + 0.3 * torch.randn(len(pairs), generator=g), torch.randn(len(pairs), generator=g) * 0.3
    )
    fractions = torch.linspace(0, 0.95, 11, dtype=torch.float64)
    curves = quality.error_versus_reject(q, scores, pairs, (1e-1, 1e-2, 1e-3, 1e-5), fractions)
    assert 1e-5 not in curves  # 7080 impostor pairs cannot resolve it
    for level in (1e-1, 1e-2, 1e-3):
        torch.testing.assert_close(curves[level], loop_evr(q, scores, pairs, level, fractions), equal_nan=True)
    # here quality predicts the genuine scores: rejecting the worst lowers FNMR, and beats random
    random = quality.error_versus_reject(torch.rand(len(q), generator=g), scores, pairs, (1e-2,), fractions)
    assert quality.area_over_curve(fractions, curves[1e-2]) > quality.area_over_curve(fractions, random[1e-2]) + 0.1


def test_area_over_curve_by_hand():
    f = torch.tensor([0.0, 0.5, 1.0 - 1e-9])
    assert quality.area_over_curve(f, torch.tensor([0.2, 0.2, 0.2])) == pytest.approx(0.0)
    assert quality.area_over_curve(f, torch.tensor([0.2, 0.1, 0.0])) == pytest.approx(0.5)
    assert quality.area_over_curve(f, torch.tensor([0.2, 0.1, 0.0]), relative=False) == pytest.approx(0.9)
    assert quality.area_over_curve(f, torch.tensor([0.2, math.nan, 0.2])) == pytest.approx(0.0)
    assert math.isnan(quality.area_over_curve(f, torch.zeros(3)))
    with pytest.raises(ValueError):
        quality.area_over_curve(f[:1], torch.tensor([0.1]))


def test_quality_head_is_smooth_l1_and_refuses_identity_labels():
    head = quality.QualityHead(5, beta=2.0).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    t = torch.randn(7, dtype=torch.float64) * 3
    pred = x @ head.weight[0] + head.linear.bias
    d = (pred - t).abs()
    ref = torch.where(d < 2.0, 0.5 * d * d / 2.0, d - 1.0).mean()
    assert head(x, t).item() == pytest.approx(ref.item(), rel=1e-12)
    with pytest.raises(TypeError, match="floats"):
        head(x, torch.arange(7))
    with pytest.raises(ValueError):
        head(x[:, :4], t)
    with pytest.raises(ValueError):
        quality.QualityHead(5, beta=0)


def test_the_trainer_trains_a_quality_head_on_targets_in_the_labels():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(32, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(32) % 4
    data = FaceTensors(images, labels, {"label": labels}, 4, "toy")
    target = images.float().mean((1, 2, 3)) / 255 * 100  # brightness: learnable from the image
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 16))
    head = quality.QualityHead(16)
    before = torch.nn.functional.smooth_l1_loss(quality.predict(model, head, data), target)
    cfg = train.TrainConfig(epochs=30, batch_size=8, lr=1e-2, optimizer="adamw", weight_decay=0.0, progress=False)
    train.Trainer(model, head, quality.with_targets(data, target), cfg).fit()
    after = torch.nn.functional.smooth_l1_loss(quality.predict(model, head, data), target)
    assert after < 0.5 * before
    with pytest.raises(ValueError):
        quality.with_targets(data, target[:5])
