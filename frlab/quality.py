"""Face image quality: SDD-FIQA's pseudo-labels, a quality regressor, and error-versus-reject curves.

    q = pseudo_labels(embeddings, labels)              # (N,) in [0, 100], from a trained recognizer
    head = QualityHead(embedding_size)                 # loss = head(model(images), q): Smooth-L1
    curves = error_versus_reject(quality, scores, pairs, fmr_levels=(1e-2, 1e-3))
    area_over_curve(curves["fractions"], curves[1e-3])

SDD-FIQA (Ou et al., CVPR 2021, arXiv 2103.05977; TFace `quality/generate_pseudo_labels`): an
image's quality is the distance between two distributions of its similarities under a trained
recognizer: to other images of its identity (intra-class) and to images of other identities
(inter-class). A good image sits far above its impostors; a bad one overlaps them. The distance is
the 1-D Wasserstein distance W1 between the two sets of cosines, averaged over `repeats` random
draws of the sets, min-max scaled to [0, 100] over the data set. A regressor then learns to predict
it from the image alone, so quality can be read where no identity label exists.

Where frlab departs from the release, it says so by an argument:
* the release crashes on an identity with one image (it has no intra-class set); here that is a
  ValueError naming the identities (drop them, or keep them with `singletons="nan"`: label NaN);
* W1 has no sign: an image whose genuine similarities fall *below* its impostors' gets a high
  quality, as in the release (`signed=False`); `signed=True` gives W1 the sign of
  mean(intra) - mean(inter), so that such an image scores below every good one;
* the release looks up each image's identity in a loop over the data (O(N x C)); here every draw
  is one vectorized sample (`sample_pairs`), chunked over images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .hparams import HParams


# ---------------------------------------------------------------- the pseudo-labels
def _distinct(M: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """min(n, M_i) distinct integers drawn uniformly from [0, M_i), for every row i at once (Robert
    Floyd's algorithm: for j = M - k .. M - 1, draw t in [0, j]; take t, or j if t was taken);
    (N, n) int64, -1 where a row has fewer than n. Where M_i <= n the set is all of [0, M_i)."""
    k = M.clamp(max=n)
    out = torch.full((len(M), n), -1, dtype=torch.int64)
    for step in range(n):
        j = M - k + step
        t = (torch.rand(len(M), generator=g, dtype=torch.float64) * (j + 1)).long().minimum(j)
        taken = (out[:, :step] == t[:, None]).any(1)
        out[:, step] = torch.where(step < k, torch.where(taken, j, t), -1)
    return out


def sample_pairs(labels: torch.Tensor, n_pos: int = 24, n_neg: int = 24, generator: torch.Generator | None = None):
    """For every image, up to `n_pos` other images of its identity and up to `n_neg` images of other
    identities, each set drawn without replacement (all of them where fewer are available: then
    the set is fixed). Returns (pos, neg): (N, n_pos) and (N, n_neg) image indices, -1 where a row
    has fewer. Raises ValueError if an identity has a single image."""
    labels = torch.as_tensor(labels).long().cpu()
    checks.integer("n_pos", n_pos, lo=1)
    checks.integer("n_neg", n_neg, lo=1)
    _, ident = torch.unique(labels, return_inverse=True)
    order = torch.argsort(ident, stable=True)
    counts = torch.bincount(ident)
    if len(counts) < 2:
        raise ValueError("pseudo-labels need at least two identities (the inter-class set is empty)")
    start = torch.cumsum(counts, 0) - counts  # each identity's first position in `order`
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - start[ident[order]]  # an image's position within its identity
    n_c, s_c = counts[ident], start[ident]
    g = generator or torch.Generator().manual_seed(0)
    p = _distinct(n_c - 1, n_pos, g)  # positions among the identity's other images
    member = p + (p >= rank[:, None]).long()  # skip the image itself
    pos = torch.where(p >= 0, order[(s_c[:, None] + member).clamp(max=len(order) - 1)], -1)
    q = _distinct(len(labels) - n_c, n_neg, g)  # positions among the other identities' images
    sorted_pos = q + n_c[:, None] * (q >= s_c[:, None]).long()  # skip the identity's block
    neg = torch.where(q >= 0, order[sorted_pos.clamp(min=0, max=len(order) - 1)], -1)
    return pos, neg


def wasserstein_1d(a: torch.Tensor, a_valid: torch.Tensor, b: torch.Tensor, b_valid: torch.Tensor) -> torch.Tensor:
    """W1 between the empirical distributions of each row's valid entries of `a` and of `b` (equal
    weights within a set), for every row at once: the integral of |F_a - F_b| over the merged,
    sorted values. (N,) in float64."""
    a, b = a.double(), b.double()
    wa = a_valid.double() / a_valid.sum(1, keepdim=True).clamp(min=1)
    wb = b_valid.double() / b_valid.sum(1, keepdim=True).clamp(min=1)
    v = torch.cat([a, b], 1)
    valid = torch.cat([a_valid, b_valid], 1)
    top = v.masked_fill(~valid, -math.inf).amax(1, keepdim=True)
    v = torch.where(valid, v, top)  # invalid entries sort to the end, at the largest value: no width
    v, order = v.sort(1)
    cdf_gap = torch.cat([wa, -wb], 1).gather(1, order).cumsum(1)[:, :-1]
    return (cdf_gap.abs() * v.diff(dim=1)).sum(1)


def distances(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    n_pos: int = 24,
    n_neg: int = 24,
    repeats: int = 12,
    seed: int = 0,
    signed: bool = False,
    singletons: str = "error",
    chunk: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Each image's W1 between its intra- and inter-class cosines (unit `embeddings`), the mean over
    `repeats` draws (`sample_pairs`, seeded): SDD-FIQA's quality before scaling. (N,) float64 on the
    CPU. `singletons`: "error" (the default), or "nan" for images whose identity has no other.
    `chunk` images at a time (by default as many as keep a gathered block near 2^22 numbers)."""
    from tqdm.auto import tqdm

    checks.integer("repeats", repeats, lo=1)
    checks.integer("seed", seed, lo=0)
    checks.flag("signed", signed)
    checks.choice("singletons", singletons, ("error", "nan"))
    labels = torch.as_tensor(labels).long().cpu()
    if embeddings.dim() != 2 or len(embeddings) != len(labels):
        raise ValueError(f"embeddings must be (N, D) with N = {len(labels)} labels, got {tuple(embeddings.shape)}")
    _, ident, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    alone = counts[ident] == 1
    if alone.any():
        if singletons == "error":
            ids = torch.unique(labels[alone])[:5].tolist()
            raise ValueError(
                f"{int(alone.sum())} images are the only one of their identity (e.g. {ids}): they have no "
                "intra-class similarities; drop them, or pass singletons='nan'"
            )
        keep = (~alone).nonzero().squeeze(1)
        out = torch.full((len(labels),), math.nan, dtype=torch.float64)
        out[keep] = distances(embeddings[keep], labels[keep], n_pos, n_neg, repeats, seed, signed, "error", chunk)
        return out
    g = torch.Generator().manual_seed(seed)
    x = embeddings.detach()
    chunk = chunk or max(1, 2**22 // (max(n_pos, n_neg) * x.shape[1]))
    total = torch.zeros(len(labels), dtype=torch.float64)
    for _ in tqdm(range(repeats), desc="pseudo-labels", disable=not progress, leave=False):
        pos, neg = sample_pairs(labels, n_pos, n_neg, g)
        for s in range(0, len(labels), chunk):
            r = slice(s, s + chunk)
            xi = x[r].unsqueeze(1)
            pv, nv = pos[r] >= 0, neg[r] >= 0
            cp = (xi * x[pos[r].clamp(min=0).to(x.device)]).sum(2).cpu()
            cn = (xi * x[neg[r].clamp(min=0).to(x.device)]).sum(2).cpu()
            d = wasserstein_1d(cp, pv, cn, nv)
            if signed:
                mp = (cp.double() * pv).sum(1) / pv.sum(1)
                mn = (cn.double() * nv).sum(1) / nv.sum(1)
                d = d * torch.sign(mp - mn)
            total[r] += d
    return total / repeats


def min_max(values: torch.Tensor, top: float = 100.0) -> torch.Tensor:
    """values scaled linearly onto [0, top] (NaNs stay NaN; all equal: all 0)."""
    lo, hi = values.nan_to_num(math.inf).min(), values.nan_to_num(-math.inf).max()
    return (values - lo) / (hi - lo).clamp(min=1e-12) * top


def pseudo_labels(embeddings: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDD-FIQA's quality labels: `distances` (the mean over draws), min-max scaled to [0, 100]
    over the data set (one scaling, after the mean). Keyword arguments go to `distances`."""
    return min_max(distances(embeddings, labels, **kwargs))


# ---------------------------------------------------------------- the regressor
class QualityHead(HParams, nn.Module):
    """SDD-FIQA's regressor head: one output from the backbone's embedding, Smooth-L1 against the
    quality labels. It follows the heads' contract, loss = head(embeddings, targets), with `weight`
    its single (1, in_features) row, so the Trainer trains it as any head (the targets ride in the
    data's labels: `with_targets`). The release puts its one output on the last feature map; here
    it reads the embedding the recognizer already computes from that map."""

    def __init__(self, in_features: int, beta: float = 1.0):
        super().__init__()
        self.in_features = checks.integer("in_features", in_features, lo=1)
        self.beta = checks.number("beta", beta, above=0)
        self.linear = nn.Linear(in_features, 1)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted quality of each embedding, (B,)."""
        return self.linear(x.to(self.linear.weight.dtype)).squeeze(1)

    def forward(self, x: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        checks.choice("reduction", reduction, ("mean", "sum", "none"))
        if x.dim() != 2 or x.shape[1] != self.in_features or targets.shape != x.shape[:1]:
            raise ValueError(
                f"embeddings must be (B, {self.in_features}) and targets (B,), got {tuple(x.shape)} and "
                f"{tuple(targets.shape)}"
            )
        if not targets.is_floating_point():
            raise TypeError(f"quality targets must be floats, got {targets.dtype} (identity labels?)")
        return F.smooth_l1_loss(
            self.predict(x), targets.to(self.linear.weight.dtype), reduction=reduction, beta=self.beta
        )


def with_targets(data, targets: torch.Tensor):
    """The same faces with `targets` (N,) float in place of the identity labels (identities stay in
    meta["label"] for the samplers), and a fingerprint that includes them (for the model cache)."""
    import hashlib

    from .data.synth import FaceTensors

    targets = torch.as_tensor(targets, dtype=torch.float32).cpu()
    if targets.shape != (len(data),) or not torch.isfinite(targets).all():
        raise ValueError(f"targets must be {len(data)} finite numbers, got shape {tuple(targets.shape)}")
    digest = hashlib.sha256(targets.numpy().tobytes()).hexdigest()[:12]
    return FaceTensors(data.images, targets, data.meta, data.num_classes, f"{data.fingerprint}+targets:{digest}")


@torch.no_grad()
def _per_image(model: nn.Module, data, fn, device: str, batch_size: int) -> torch.Tensor:
    """fn(model(images)) for every image of `data`, batch by batch, in eval mode; (N,) on the CPU."""
    model.eval().to(device)
    out = []
    for s in range(0, len(data), batch_size):
        images, _, _ = data.batch(torch.arange(s, min(s + batch_size, len(data))), device)
        out.append(fn(model(images).float()).cpu())
    return torch.cat(out)


def predict(model: nn.Module, head: QualityHead, data, device: str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """The regressor's quality of every image of `data`, (N,) on the CPU."""
    head.eval().to(device)
    return _per_image(model, data, head.predict, device, batch_size)


def embedding_norm(model: nn.Module, data, device: str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """|f(x)| of every image before normalization: a quality score that needs no training (a plain
    softmax model's norm grows with how confidently it places an image). (N,) on the CPU."""
    return _per_image(model, data, lambda e: torch.linalg.vector_norm(e, dim=1), device, batch_size)


# ---------------------------------------------------------------- error versus reject
def error_versus_reject(
    quality: torch.Tensor,
    scores: torch.Tensor,
    pairs,
    fmr_levels=(1e-2, 1e-3, 1e-4),
    fractions: torch.Tensor | None = None,
) -> dict:
    """FNMR of the genuine pairs that remain as the lowest-quality images are rejected.

    The threshold of each FMR level is set once, on every impostor pair before any rejection
    (`eval.thresholds_at_fpr`: a pair matches when its score exceeds it), as error-versus-reject
    curves are defined (Grother and Tabassi). At a fraction f, the floor(f N) images of lowest
    quality are rejected (ties by index), and with them every pair that has one; FNMR(f) is the
    share of the remaining genuine pairs that do not match (NaN where none remains). A level is
    left out where the impostors cannot resolve it (fewer than one false match).
    Returns {"fractions": (F,), level: (F,) FNMR, ...}, float64."""
    from . import eval as ev

    quality = torch.as_tensor(quality).double().cpu()
    scores = torch.as_tensor(scores).cpu()
    if scores.shape != (len(pairs),):
        raise ValueError(f"scores must have one value per pair ({len(pairs)}), got {tuple(scores.shape)}")
    if torch.isnan(quality).any():
        raise ValueError("quality has NaN values")
    fractions = torch.linspace(0, 0.95, 20, dtype=torch.float64) if fractions is None else torch.as_tensor(fractions)
    fractions = fractions.double()
    if fractions.dim() != 1 or (fractions < 0).any() or (fractions >= 1).any():
        raise ValueError("fractions must be a 1-D tensor of values in [0, 1)")
    n = len(quality)
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.argsort(quality, stable=True)] = torch.arange(n)
    same = pairs.same.bool()
    genuine_rank = torch.minimum(rank[pairs.i[same]], rank[pairs.j[same]]).sort().values
    cut = (fractions * n + 1e-9).floor().long()  # images rejected at each fraction
    kept = len(genuine_rank) - torch.searchsorted(genuine_rank, cut)  # genuine pairs whose images both remain
    out = {"fractions": fractions}
    impostor = scores[~same]
    for level in fmr_levels:
        t, resolved = ev.thresholds_at_fpr(impostor, [level])
        if not bool(resolved[0]):
            continue
        miss = scores[same] <= t[0]
        miss_rank = torch.minimum(rank[pairs.i[same][miss]], rank[pairs.j[same][miss]]).sort().values
        missed = len(miss_rank) - torch.searchsorted(miss_rank, cut)
        out[level] = torch.where(kept > 0, missed.double() / kept.clamp(min=1), math.nan)
    return out


def area_over_curve(fractions: torch.Tensor, fnmr: torch.Tensor, relative: bool = True) -> float:
    """The area over an error-versus-reject curve. The paper writes AOC = 1 - integral of FNMR(f)
    df over [0, 0.95]; its reported values (0.6-0.8) fit FNMR relative to its value without
    rejection, over the span: relative=True (the default) computes
        1 - (1 / (b - a)) integral_a^b FNMR(f) / FNMR(a) df,
    0 for a score that rejects no better than chance, 1 for one whose first rejections remove every
    error; relative=False the formula as written."""
    fractions, fnmr = torch.as_tensor(fractions).double(), torch.as_tensor(fnmr).double()
    ok = ~torch.isnan(fnmr)
    fractions, fnmr = fractions[ok], fnmr[ok]
    if len(fnmr) < 2:
        raise ValueError("an error-versus-reject curve needs at least two points")
    if not relative:
        return float(1 - torch.trapezoid(fnmr, fractions))
    if fnmr[0] <= 0:
        return math.nan  # no error to reject
    return float(1 - torch.trapezoid(fnmr / fnmr[0], fractions) / (fractions[-1] - fractions[0]))
