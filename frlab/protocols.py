"""Evaluation protocols shared by every notebook: which pairs, which subsets, which folds.

    pairs = verification_pairs(meta["label"], max_impostors=200_000, seed=0)
    subsets = pair_subsets(pairs, easy=is_easy(meta), hard=is_hard(meta))   # {"all", "easy", "hard"}
    report = verification_report(scores, pairs, subsets)                    # {"easy": {...}, ...}
    kfold_accuracy(scores[keep], pairs.select(keep))  # LFW-style 10 folds, keep = balanced(pairs)

Pairs are always between test identities, which never overlap training identities (SynthFaces id
ranges, ORL's fixed split). Easy and hard are rules on sample metadata that notebooks can change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import eval as ev


@dataclass
class Pairs:
    i: torch.Tensor  # first sample of each pair
    j: torch.Tensor  # second sample
    same: torch.Tensor  # genuine (True) or impostor
    fold: torch.Tensor  # 0 .. folds - 1, by the identity of the first sample

    def __len__(self) -> int:
        return len(self.i)

    def scores(self, embeddings: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
        """Cosine similarity of each pair, from L2-normalized embeddings, in chunks."""
        return torch.cat(
            [
                (embeddings[self.i[k : k + chunk]] * embeddings[self.j[k : k + chunk]]).sum(1)
                for k in range(0, len(self), chunk)
            ]
        )

    def select(self, mask: torch.Tensor) -> Pairs:
        return Pairs(self.i[mask], self.j[mask], self.same[mask], self.fold[mask])


def verification_pairs(labels: torch.Tensor, max_impostors: int | None = None, folds: int = 10, seed: int = 0) -> Pairs:
    """Every genuine pair and every impostor pair, or `max_impostors` impostor pairs drawn without
    replacement (uniformly over unordered pairs). Fold of a pair = fold of its first identity,
    identities being dealt round-robin into `folds` folds in ascending label order."""
    labels = torch.as_tensor(labels).long()
    n = len(labels)
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels - sorted_labels.min())
    # genuine pairs: within each identity, all unordered pairs
    gi, gj = [], []
    start = 0
    for c in counts.tolist():
        if c > 1:
            a, b = torch.triu_indices(c, c, 1)
            gi.append(order[start + a])
            gj.append(order[start + b])
        start += c
    gi = torch.cat(gi) if gi else torch.zeros(0, dtype=torch.long)
    gj = torch.cat(gj) if gj else torch.zeros(0, dtype=torch.long)
    n_imp = n * (n - 1) // 2 - len(gi)
    if max_impostors is None or max_impostors >= n_imp:
        ii, jj, same_all = ev.all_pairs(labels)
        ii, jj = ii[~same_all], jj[~same_all]
    else:
        g = torch.Generator().manual_seed(seed)
        ii, jj = _sample_impostors(labels, max_impostors, g)
    i, j = torch.cat([gi, ii]), torch.cat([gj, jj])
    same = torch.cat([torch.ones(len(gi), dtype=torch.bool), torch.zeros(len(ii), dtype=torch.bool)])
    uniq, first = torch.unique(labels, return_inverse=True)
    fold_of_identity = torch.arange(len(uniq)) % folds
    return Pairs(i, j, same, fold_of_identity[first[i]])


def _sample_impostors(labels: torch.Tensor, k: int, g: torch.Generator):
    """k distinct unordered impostor pairs, by rejection from random index pairs."""
    n = len(labels)
    seen: set[int] = set()
    out_i, out_j = [], []
    while len(seen) < k:
        a = torch.randint(0, n, (2 * k,), generator=g)
        b = torch.randint(0, n, (2 * k,), generator=g)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        ok = labels[lo] != labels[hi]
        for x, y in zip(lo[ok].tolist(), hi[ok].tolist()):
            key = x * n + y
            if key not in seen:
                seen.add(key)
                out_i.append(x)
                out_j.append(y)
                if len(seen) == k:
                    break
    return torch.tensor(out_i), torch.tensor(out_j)


# ---------------------------------------------------------------- easy and hard samples
def is_easy(
    meta: dict, max_yaw: float = 20.0, max_pitch: float = 15.0, max_resolution: float = 1.5, max_blur: float = 0.5
) -> torch.Tensor:
    """Frontal, sharp and unoccluded SynthFaces samples (the DDL paper's 'easy')."""
    return (
        (meta["yaw"].abs() <= max_yaw)
        & (meta["pitch"].abs() <= max_pitch)
        & (meta["resolution"] <= max_resolution)
        & (meta["blur"] <= max_blur)
        & (meta["mask"] < 0.5)
    )


def is_hard(meta: dict, min_yaw: float = 45.0, min_resolution: float = 3.0) -> torch.Tensor:
    """Large pose, low resolution or a mask: the hard samples of the papers."""
    return (meta["yaw"].abs() >= min_yaw) | (meta["resolution"] >= min_resolution) | (meta["mask"] >= 0.5)


@dataclass(frozen=True)
class EasyRule:
    """`is_easy` with fixed thresholds, as a value: callable on metadata, printable, comparable
    (losses keep their rule as an argument, and cached models are keyed by its repr)."""

    max_yaw: float = 20.0
    max_pitch: float = 15.0
    max_resolution: float = 1.5
    max_blur: float = 0.5

    def __call__(self, meta: dict) -> torch.Tensor:
        return is_easy(meta, self.max_yaw, self.max_pitch, self.max_resolution, self.max_blur)


@dataclass(frozen=True)
class HardRule:
    """`is_hard` with fixed thresholds, as a value (see EasyRule)."""

    min_yaw: float = 45.0
    min_resolution: float = 3.0

    def __call__(self, meta: dict) -> torch.Tensor:
        return is_hard(meta, self.min_yaw, self.min_resolution)


# one nuisance at a time: which samples carry it (for "which factor hurts" breakdowns)
HARD_FACTORS = {
    "yaw >= 45": lambda m: m["yaw"].abs() >= 45,
    "pitch >= 25": lambda m: m["pitch"].abs() >= 25,
    "resolution >= 3": lambda m: m["resolution"] >= 3,
    "blur >= 1": lambda m: m["blur"] >= 1,
    "noise >= 0.06": lambda m: m["noise"] >= 0.06,
    "mask": lambda m: m["mask"] >= 0.5,
    "glasses": lambda m: m["glasses"] >= 0.5,
}


def factor_subsets(pairs: Pairs, meta: dict, factors: dict | None = None) -> dict[str, torch.Tensor]:
    """Masks over pairs: "easy" (both samples easy) and, per factor, pairs in which at least one
    sample carries that factor."""
    out = {"easy": is_easy(meta)[pairs.i] & is_easy(meta)[pairs.j]}
    for name, rule in (factors or HARD_FACTORS).items():
        has = rule(meta)
        out[name] = has[pairs.i] | has[pairs.j]
    return out


def pair_subsets(
    pairs: Pairs, easy: torch.Tensor, hard: torch.Tensor, groups: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Masks over pairs: all; easy (both samples easy); hard (at least one sample hard); and, with
    per-sample groups, group_<g> for pairs whose two samples are both in group g."""
    out = {
        "all": torch.ones(len(pairs), dtype=torch.bool),
        "easy": easy[pairs.i] & easy[pairs.j],
        "hard": hard[pairs.i] | hard[pairs.j],
    }
    if groups is not None:
        for gid in torch.unique(groups).tolist():
            out[f"group_{gid}"] = (groups[pairs.i] == gid) & (groups[pairs.j] == gid)
    return out


def verification_report(
    scores: torch.Tensor, pairs: Pairs, subsets: dict[str, torch.Tensor], levels=ev.FPR_LEVELS
) -> dict[str, dict]:
    """`eval.verification` on each subset of pairs that has both genuine and impostor pairs."""
    out = {}
    for name, mask in subsets.items():
        same = pairs.same[mask]
        if same.any() and (~same).any():
            out[name] = ev.verification(scores[mask], same, levels)
            sub = pairs.select(mask)
            keep = balanced(sub)
            out[name]["accuracy_10fold"] = kfold_accuracy(scores[mask][keep], sub.select(keep))["mean"]
    return out


# ---------------------------------------------------------------- LFW-style 10-fold accuracy
def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> float:
    """The threshold t maximizing the accuracy of `score > t`, midway between neighbouring scores."""
    s, order = torch.sort(scores.double())
    y = same[order].double()
    n_pos = y.sum()
    # predicting "same" for everything above position k: correct = negatives at or below + positives above
    neg_below = torch.cumsum(1 - y, 0)
    pos_above = n_pos - torch.cumsum(y, 0)
    correct = torch.cat([n_pos[None], neg_below + pos_above])
    # ties: only a cut between different scores is a real threshold
    valid = torch.ones_like(correct, dtype=torch.bool)
    valid[1:-1] = s[1:] != s[:-1]
    k = int(torch.argmax(torch.where(valid, correct, torch.full_like(correct, -1))))
    if k == 0:
        return float(s[0]) - 1e-6
    if k == len(s):
        return float(s[-1]) + 1e-6
    return float((s[k - 1] + s[k]) / 2)


def balanced(pairs: Pairs, seed: int = 0) -> torch.Tensor:
    """Mask keeping, in each fold, every genuine pair and as many impostor pairs (drawn at random),
    as LFW's folds do; accuracy on all pairs would reward answering "impostor" to everything."""
    g = torch.Generator().manual_seed(seed)
    keep = pairs.same.clone()
    for f in torch.unique(pairs.fold).tolist():
        imp = ((pairs.fold == f) & ~pairs.same).nonzero().squeeze(1)
        n = int(((pairs.fold == f) & pairs.same).sum())
        keep[imp[torch.randperm(len(imp), generator=g)[:n]]] = True
    return keep


def kfold_accuracy(scores: torch.Tensor, pairs: Pairs) -> dict[str, float]:
    """Accuracy on each fold with the threshold chosen on the other folds; mean and std."""
    accs = []
    for f in torch.unique(pairs.fold).tolist():
        test = pairs.fold == f
        if test.all():  # a single fold: nothing to choose the threshold on
            continue
        t = best_threshold(scores[~test], pairs.same[~test])
        accs.append(float(((scores[test] > t) == pairs.same[test]).double().mean()))
    acc = torch.tensor(accs, dtype=torch.float64)
    return {
        "mean": float(acc.mean()) if len(accs) else float("nan"),
        "std": float(acc.std()) if len(accs) > 1 else 0.0,
        "folds": len(accs),
    }


# ---------------------------------------------------------------- identification
def gallery_probe_split(meta: dict, per_identity: int = 1, by: str = "difficulty") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of gallery and probe samples: for each identity, the `per_identity` easiest samples
    (by="difficulty", like an enrolment photo; ORL has no difficulty, so by="first") go to the
    gallery and the rest are probes."""
    labels = meta["label"]
    key = meta["difficulty"].double() if by == "difficulty" else torch.arange(len(labels), dtype=torch.float64)
    # sort by (label, key): rank of each sample within its identity
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(order)), torch.zeros_like(order)), 0).values
    rank = torch.arange(len(order)) - start
    gallery = rank < per_identity
    return order[gallery], order[~gallery]


# ---------------------------------------------------------------- fairness across groups
def fairness_report(scores: torch.Tensor, pairs: Pairs, subsets: dict[str, torch.Tensor], level: float = 1e-3) -> dict:
    """One global threshold T, the one at which all impostor pairs have the FPR `level` (as a
    deployed system has one threshold for everyone), and for each subset of pairs (a group) its
    FPR and TPR at T and its 10-fold accuracy; with their spread across the subsets, as RFW
    reports it: the std of the FPRs, their max / min ratio (inf where a group has none), the mean
    and std of the accuracies."""
    t, resolved = ev.thresholds_at_fpr(scores[~pairs.same], (level,))
    T = float(t[0])
    groups = {}
    for name, mask in subsets.items():
        s, same = scores[mask], pairs.same[mask]
        if not same.any() or same.all():
            raise ValueError(f"subset {name!r} needs genuine and impostor pairs")
        sub = pairs.select(mask)
        keep = balanced(sub)
        groups[name] = {
            "fpr": float((s[~same] > T).double().mean()),
            "tpr": float((s[same] > T).double().mean()),
            "accuracy": kfold_accuracy(s[keep], sub.select(keep))["mean"],
        }
    fpr = torch.tensor([g["fpr"] for g in groups.values()], dtype=torch.float64)
    acc = torch.tensor([g["accuracy"] for g in groups.values()], dtype=torch.float64)
    return {
        "threshold": T,
        "resolved": bool(resolved[0]),
        "groups": groups,
        "fpr_std": float(fpr.std()) if len(fpr) > 1 else 0.0,
        "fpr_ratio": float(fpr.max() / fpr.min()) if float(fpr.min()) > 0 else float("inf"),
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std()) if len(acc) > 1 else 0.0,
    }
