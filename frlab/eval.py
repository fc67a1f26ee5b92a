"""Evaluation: embeddings, verification (ROC, AUC, EER, TPR at FPR), identification.

Everything is vectorized over pairs (one sort for a whole ROC). Results are plain dicts of floats,
ready for `Run.log` and metrics.json.

    emb, labels, meta = embed(model, test_data, flip=True)
    i, j, same = all_pairs(labels)
    scores = (emb[i] * emb[j]).sum(1)
    verification(scores, same)    # {"auc": ..., "eer": ..., "tpr@fpr=1e-03": ..., ...}
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

FPR_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@torch.no_grad()
def embed(
    model, data, batch_size: int = 256, flip: bool = False, device: str | torch.device = "cpu", progress: bool = False
):
    """L2-normalized embeddings of every sample of `data` (with flip: of the image plus its mirror)."""
    from tqdm.auto import tqdm

    model.eval()
    out, labels = [], []
    for start in tqdm(range(0, len(data), batch_size), desc="embedding", disable=not progress, leave=False):
        images, y, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))), device)
        e = model(images)
        if flip:
            e = e + model(images.flip(3))
        out.append(F.normalize(e.float(), dim=1).cpu())
        labels.append(y.cpu())
    return torch.cat(out), torch.cat(labels), data.meta


def all_pairs(labels: torch.Tensor):
    """Every unordered pair (i < j): indices i, j and whether they share a label."""
    i, j = torch.triu_indices(len(labels), len(labels), 1)
    return i, j, labels[i] == labels[j]


def roc(scores: torch.Tensor, same: torch.Tensor):
    """ROC at every distinct threshold: (fpr, tpr, thresholds), fpr ascending, starting at (0, 0).

    One sort of the scores (in their own dtype) and a few linear passes; fpr and tpr are float64.
    """
    scores, same = scores.reshape(-1), same.reshape(-1).bool().contiguous()
    n_pos = int(torch.count_nonzero(same))
    n_neg = len(same) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"verification needs genuine and impostor pairs, got {n_pos} and {n_neg}")
    s, order = torch.sort(scores, descending=True)
    hits = same.view(torch.uint8).index_select(0, order)  # genuine flags in score order (faster than bool indexing)
    tps = torch.cumsum(hits, 0, dtype=torch.int32 if len(s) < 2**31 else torch.int64)
    last = torch.ones_like(s, dtype=torch.bool)  # last position of each distinct score
    last[:-1] = s[1:] != s[:-1]
    idx = last.nonzero().squeeze(1)
    fpr, tpr, thr = (torch.empty(len(idx) + 1, dtype=torch.float64, device=s.device) for _ in range(3))
    fpr[0], tpr[0], thr[0] = 0.0, 0.0, math.inf
    tpr[1:] = tps[idx]
    torch.sub(idx + 1, tpr[1:], out=fpr[1:])  # false positives = position - true positives
    fpr[1:] /= n_neg
    tpr[1:] /= n_pos
    thr[1:] = s[idx]
    return fpr, tpr, thr


def tpr_at_fpr(fpr: torch.Tensor, tpr: torch.Tensor, level: float) -> float:
    """The highest TPR among thresholds whose FPR does not exceed `level`."""
    idx = int(torch.searchsorted(fpr, torch.tensor([level], dtype=fpr.dtype, device=fpr.device), right=True)) - 1
    return float(tpr[idx])


def thresholds_at_fpr(impostor: torch.Tensor, levels=FPR_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """For each FPR level f, the threshold T_f that floor(n f) of the n impostor scores exceed, i.e.
    the score at position floor(n f) of the descending-sorted impostors (accepting scores above T_f
    gives an FPR of at most f), and whether the impostors resolve the level (n f >= 1). An
    unresolved level gets the top impostor. One top-k, not a sort."""
    impostor = impostor.reshape(-1)
    n = len(impostor)
    ranks = torch.tensor(
        [int(n * f + 1e-9) for f in levels], device=impostor.device
    )  # floor, safe for n f = 2.99999...
    if n == 0:
        return impostor.new_zeros(len(levels)), torch.zeros(len(levels), dtype=torch.bool, device=impostor.device)
    ranks = ranks.clamp(max=n - 1)
    top = torch.topk(impostor, int(ranks.max()) + 1).values
    return top[ranks], ranks >= 1


def verification(scores: torch.Tensor, same: torch.Tensor, levels=FPR_LEVELS) -> dict[str, float]:
    """AUC, EER, and TPR at each FPR level the number of impostor pairs supports (>= 1 false accept)."""
    fpr, tpr, _ = roc(scores, same)
    n_pos = int(torch.count_nonzero(same))
    n_neg = same.numel() - n_pos
    # EER: fnr - fpr = 1 - (tpr + fpr) falls along the curve, so the point where it is closest to 0
    # sits either side of where tpr + fpr reaches 1: a binary search, not a pass of abs and argmin
    u = tpr + fpr
    j = int(torch.searchsorted(u, torch.ones(1, dtype=u.dtype, device=u.device)))  # first u >= 1
    k = j if j == 0 or (j < len(u) and u[j] - 1 < 1 - u[j - 1]) else j - 1
    out = {
        "auc": float(torch.trapezoid(tpr, fpr)),
        "eer": float((fpr[k] + 1 - tpr[k]) / 2),
        "pairs_genuine": n_pos,
        "pairs_impostor": n_neg,
    }
    for level in levels:
        if level * n_neg >= 1:
            out[f"tpr@fpr={level:.0e}"] = tpr_at_fpr(fpr, tpr, level)
    return out


def identification(
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    probe: torch.Tensor,
    probe_labels: torch.Tensor,
    max_rank: int = 10,
    chunk: int = 1024,
    gallery_chunk: int = 65536,
) -> dict[str, float]:
    """Rank-k accuracy (CMC) of probes against a gallery of normalized embeddings.

    Memory stays at chunk x gallery_chunk scores whatever the gallery size: each block of probes
    keeps a running top-k over blocks of the gallery. A probe's rank is the position of the first
    gallery entry of its identity among its top max_rank matches.
    """
    k = min(max_rank, gallery.shape[0])
    hits = torch.zeros(max_rank, dtype=torch.float64)
    for start in range(0, len(probe), chunk):
        p, pl = probe[start : start + chunk], probe_labels[start : start + chunk]
        best = torch.full((len(p), k), -math.inf, dtype=p.dtype, device=p.device)
        best_labels = torch.full((len(p), k), -1, dtype=gallery_labels.dtype, device=p.device)
        for g0 in range(0, gallery.shape[0], gallery_chunk):
            scores = p @ gallery[g0 : g0 + gallery_chunk].T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            merged = torch.cat([best, top.values], 1)
            merged_labels = torch.cat([best_labels, gallery_labels[g0 : g0 + gallery_chunk][top.indices]], 1)
            keep = merged.topk(k, dim=1).indices
            best, best_labels = merged.gather(1, keep), merged_labels.gather(1, keep)
        correct = best_labels == pl[:, None]
        first = torch.where(correct.any(1), correct.float().argmax(1), torch.full_like(pl, max_rank))
        hits += torch.bincount(first[first < max_rank].cpu(), minlength=max_rank).double()
    cmc = torch.cumsum(hits, 0) / len(probe)
    return {"rank1": float(cmc[0]), "cmc": cmc.tolist()}


def gradient_share(head, embeddings: torch.Tensor, labels: torch.Tensor, tops=(1,)) -> dict[str, float]:
    """Where a head's gradient goes among the negatives: for each sample, the share of the mass
    |dL/dcos_j| over its non-target classes that falls on its `top` most similar (hardest)
    negatives, averaged over the samples that have any (implicit mining: NPT puts all of it on its
    k nearest, a softmax spreads it by softmax weight). From `head.loss_from_cosines`, no state change."""
    head = copy.deepcopy(head).double().eval()  # float64, and the caller's head left as it is
    cos = head.logits(embeddings.double()).detach().requires_grad_()
    (grad,) = torch.autograd.grad(head.loss_from_cosines(cos, labels, "sum"), cos)
    negatives = cos.detach().scatter(1, labels[:, None], float("-inf"))
    mass = grad.abs().scatter(1, labels[:, None], 0.0)
    total = mass.sum(1)
    some = total > 0
    order = negatives.argsort(1, descending=True)
    out = {"samples_with_gradient": float(some.double().mean())}
    for n in tops:
        top = mass.gather(1, order[:, :n]).sum(1)
        out[f"top{n}"] = float((top[some] / total[some]).mean()) if some.any() else float("nan")
    return out


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of
    the values a and b."""
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("ks_distance needs values on both sides")
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


def group_dependence(
    values: torch.Tensor, groups: torch.Tensor, permutations: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Does the distribution of `values` depend on the group? Returns (d, p): d, the largest KS
    distance between one group's values and the other groups' together; p, its permutation
    p-value, the share of random relabellings of the groups (and the observed one) whose d is at
    least as large. A small p says the groups differ; a large one that no difference shows."""
    values, groups = values.flatten(), groups.flatten()
    if values.shape != groups.shape or len(torch.unique(groups)) < 2:
        raise ValueError("group_dependence needs one group per value and at least two groups")
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")

    def largest(g):
        return max(ks_distance(values[g == k], values[g != k]) for k in torch.unique(g))

    d = largest(groups)
    gen = torch.Generator().manual_seed(seed)
    null = [largest(groups[torch.randperm(len(groups), generator=gen)]) for _ in range(permutations)]
    return d, (1 + sum(x >= d - 1e-12 for x in null)) / (1 + permutations)


def tangent_offsets(zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One class's unit features (n, D) in the tangent plane at their normalized mean mu, by the
    sphere's log map v_i = theta_i / sin(theta_i) * (z_i - cos(theta_i) mu); returns v (n, D) and
    theta_i = angle(z_i, mu)."""
    mu = F.normalize(zc.mean(0), dim=0)
    cos = (zc @ mu).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    scale = torch.where(theta > 1e-8, theta / torch.sin(theta).clamp(min=1e-12), torch.ones_like(theta))
    return scale[:, None] * (zc - cos[:, None] * mu), theta


def class_spectra(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Intra-class spread of each class in the tangent space at its normalized centre.

    For class c with unit features z_i and normalized mean mu, each z_i is mapped to the tangent
    plane at mu by the sphere's log map (`tangent_offsets`). Returns, per class (in order of torch.unique(labels)):
      spectrum        eigenvalues of the covariance of the v_i, descending, padded with 0 (C, D)
      isotropy        smallest / largest of the first min(n - 1, D - 1) eigenvalues (1 = isotropic)
      effective_rank  exp of the entropy of the normalized eigenvalues
      mean_angle      mean theta_i in radians (compactness)
    """
    z = F.normalize(embeddings.double(), dim=1)
    classes = torch.unique(labels)
    D = z.shape[1]
    spectrum = torch.zeros(len(classes), D, dtype=torch.float64)
    iso, erank, angle = (torch.zeros(len(classes), dtype=torch.float64) for _ in range(3))
    for k, c in enumerate(classes):
        zc = z[labels == c]
        v, theta = tangent_offsets(zc)
        vc = v - v.mean(0)
        cov = vc.T @ vc / max(1, len(zc) - 1)
        ev = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
        spectrum[k] = ev
        r = max(1, min(len(zc) - 1, D - 1))
        iso[k] = ev[r - 1] / ev[0] if ev[0] > 0 else 1.0
        p = ev / ev.sum() if ev.sum() > 0 else torch.full_like(ev, 1.0 / D)
        p = p[p > 0]
        erank[k] = torch.exp(-(p * p.log()).sum())
        angle[k] = theta.mean()
    return {"classes": classes, "spectrum": spectrum, "isotropy": iso, "effective_rank": erank, "mean_angle": angle}


def intra_angles(embeddings: torch.Tensor, labels: torch.Tensor, return_centres: bool = False):
    """Each sample's angle (radians, float64, on the CPU) to its class's normalized mean feature;
    with return_centres, also the unit centres (C, D) in order of torch.unique(labels)."""
    z = F.normalize(embeddings.detach().double().cpu(), dim=1)
    classes, inverse = torch.unique(labels.cpu(), return_inverse=True)
    mu = F.normalize(torch.zeros(len(classes), z.shape[1], dtype=z.dtype).index_add_(0, inverse, z), dim=1)
    theta = torch.acos((z * mu[inverse]).sum(1).clamp(-1, 1))
    return (theta, mu) if return_centres else theta


def class_margins(embeddings: torch.Tensor, labels: torch.Tensor, quantile: float = 1.0) -> dict[str, torch.Tensor]:
    """Angular room between identities, per class (in order of torch.unique(labels)), in radians.

    Each class is a cap on the sphere around its normalized centre mu_c, of radius r_c = the angle
    of its farthest sample from mu_c (or the given quantile of its samples' angles, to ignore
    outliers). The margin of class c is the gap between its cap and the nearest other cap:
        margin_c = min over c' != c of  angle(mu_c, mu_c') - r_c - r_c'
    (negative where caps overlap). Returns radius, nearest (angle to the nearest other centre) and
    margin, each (C,).
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    classes, inverse = torch.unique(labels.cpu(), return_inverse=True)
    if len(classes) < 2:
        raise ValueError("class margins need at least two classes")
    theta, mu = intra_angles(embeddings, labels, return_centres=True)
    radius = torch.stack([torch.quantile(theta[inverse == k], quantile) for k in range(len(classes))])
    between = torch.acos((mu @ mu.T).clamp(-1, 1))
    gap = between - radius[:, None] - radius[None, :]
    gap.fill_diagonal_(float("inf"))
    between.fill_diagonal_(float("inf"))
    return {"classes": classes, "radius": radius, "nearest": between.min(1).values, "margin": gap.min(1).values}
