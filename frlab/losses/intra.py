"""IntraLoss, reconstructed (Jiang et al., "IntraLoss: Further Margin via Gradient-Enhancing Term for
Deep Face Recognition", arXiv 2107.03352), and the plain centre pull a reviewer would compare it with.

What the paper says (abstract only; its equations and code were not available here): margin-based
softmax losses leave each class's features spread *anisotropically*, because a sample's gradient
vanishes once it is classified with margin; a "gradient-enhancing term" that keeps acting in the
anisotropic region makes classes compact and isotropic, which widens the margin between identities.

What frlab implements, and why (a design, not the authors' equations). For each sample i of class y,
with unit feature u_i, its offset r_i = u_i - c_y from the class's running centre c_y (a unit
vector: the class's mean direction; |r_i| = 2 sin(theta_i / 2), the chord of the sample's angle
theta_i to it), and the class's spread S_y normalized to trace D - 1 (S'_y = (D - 1) S_y / tr S_y,
the identity for a round class):

    L = weight * mean_i  r_i^T S'_y r_i / (2 |r_i|),     |r_i| without gradient,

    dL/du_i = weight / B * S'_y r_i / |r_i|,     value = weight * mean_i w_i |r_i| / 2,

    w_i = r_i^T S'_y r_i / |r_i|^2   (how much of the class's spread lies along this sample's offset).

* Gradient-enhancing: for a round class the pull has size 1 at every distance from the centre; it
  does not vanish for correctly classified samples (cross-entropy's does, and so does the plain
  pull 1 - cos theta, whose gradient is sin theta -> 0).
* Acting where the class is anisotropic: the pull points along S'_y r_i, so each direction of the
  class is pulled in proportion to its share of the spread: a direction holding mu times the
  average variance shrinks mu times faster (relatively) than an average one, so long axes shrink
  first. The pull's direction matters, not only its size: an earlier frlab design scaled a pull
  along r_i by w_i, and every direction of the offset still shrank by the same step.
* Toward the class's running centre, not its proxy: in notebook 05's setting the centre of an
  ArcFace class lies from its proxy at an angle comparable with its samples' spread around the
  centre (the notebook prints both), so offsets taken from the proxy measure mostly that
  displacement, and their "principal direction" is the direction to the centre, not the class's
  long axis. The term leaves the proxies to the head.
* S_y is tracked per class as "one principal direction + isotropic rest" (C x D memory, the size of
  the classifier; a D x D covariance per class would not scale, and a batch holds too few images of
  a class to estimate one): a running power iteration on the class's offsets gives its principal
  direction d and the variance lambda along it, a running mean of |r|^2 its total t, and the rest
  is spread evenly over the other D - 2 directions. S'_y = rho I + (mu - rho) d d^T with
  mu = min((D - 1) lambda / t, max_weight), rho = (D - 1) (t - lambda) / ((D - 2) t).
  With D <= 2, or before a class's spread is known, S' = I.
* Running means are exponential (`momentum`, per class; lambda bias-corrected where it enters the
  power step), updated in training mode, before use, from the batch's detached features; the
  centre is the direction of the running mean of unit features (the mean itself lies inside the
  ball: offsets from it would turn radial, and the pull fade, near the centre). Buffers are saved
  with checkpoints. Offsets shorter than 1e-6 are rounding (a class's only sample is its own
  centre) and get no pull.
* `anisotropic=False` is the ablation: S' = I, a plain non-vanishing pull of size 1 toward the
  running centre (the gradient enhancement without the anisotropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..hparams import HParams

# shorter offsets are rounding (a lone sample is its own centre): no pull, not a unit pull in a random direction
MIN_OFFSET = 1e-6


def unit_features(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, in_features: int) -> torch.Tensor:
    """The unit features, in float32 or float64, after checking the shapes and labels."""
    C, D = num_classes, in_features
    if embeddings.dim() != 2 or embeddings.shape[1] != D or labels.shape != (len(embeddings),):
        raise ValueError(
            f"need embeddings (B, {D}) and labels (B,), got {tuple(embeddings.shape)}, {tuple(labels.shape)}"
        )
    if len(labels) and not bool(torch.stack([labels.min() >= 0, labels.max() < C]).all().cpu()):  # one sync
        raise ValueError(f"labels must lie in [0, {C}), got [{int(labels.min())}, {int(labels.max())}]")
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    return F.normalize(embeddings.to(dtype), dim=1)


class CentrePull(HParams, nn.Module):
    """The plain alternative: L = weight * mean_i (1 - cos theta_i) = weight * mean_i |u_i - p_i|^2 / 2,
    centre loss with the class proxies p of `head` as centres, on the unit sphere. Its pull fades as
    sin theta near the proxy and does not look at the shape of the class. The head is registered
    here (the trainer optimizes its proxies once, and a copy of head and term pulls toward the
    copied head's proxies)."""

    needs = ()

    def __init__(self, head: nn.Module, weight: float = 1.0):
        super().__init__()
        if (
            not isinstance(head, nn.Module)
            or not isinstance(getattr(head, "weight", None), torch.Tensor)
            or head.weight.dim() != 2
        ):
            raise TypeError("CentrePull needs a head with a (num_classes, in_features) `weight` of class proxies")
        self.head = head
        self.weight = checks.number("weight", weight, lo=0)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        u = unit_features(embeddings, labels, *self.head.weight.shape)
        # index_select's backward adds rows in order; indexing's accumulates with atomic adds across threads
        p = F.normalize(self.head.weight.index_select(0, labels.long()).to(u.dtype), dim=1)
        return self.weight * (1.0 - (u * p).sum(1)).mean()

    def forward(self, out: dict, batch) -> torch.Tensor:
        return self.loss(out["embedding"], batch.labels)


class IntraLoss(HParams, nn.Module):
    """weight * mean_i r_i^T S'_y r_i / (2 |r_i|): a non-vanishing pull toward each class's running
    centre, along the class's own long axes (reconstructed; see the module docstring). It keeps
    running statistics of each of `num_classes` classes of `in_features`-dimensional features (the
    head's size), not a reference to the head: it never reads the proxies."""

    needs = ()

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        weight: float = 1.0,
        anisotropic: bool = True,
        momentum: float = 0.1,
        max_weight: float = 10.0,
    ):
        super().__init__()
        C = self.num_classes = checks.integer("num_classes", num_classes, lo=1)
        D = self.in_features = checks.integer("in_features", in_features, lo=1)
        self.weight = checks.number("weight", weight, lo=0)
        self.anisotropic = checks.flag("anisotropic", anisotropic)
        self.momentum = checks.number("momentum", momentum, above=0, hi=1)
        self.max_weight = checks.number("max_weight", max_weight, lo=1)
        self.register_buffer(
            "centre", torch.zeros(C, D)
        )  # running mean of the class's unit features (its direction is the centre)
        self.register_buffer("direction", torch.zeros(C, D))  # the class's principal direction (unit; 0 = none yet)
        self.register_buffer("principal", torch.zeros(C))  # running variance along it (not bias-corrected)
        self.register_buffer("total", torch.zeros(C))  # running mean of |r|^2 (not bias-corrected)
        self.register_buffer("seen", torch.zeros(C, dtype=torch.long))  # updates per class

    def centres(self, labels: torch.Tensor) -> torch.Tensor:
        """The unit mean direction of each label's class (0 for classes never seen)."""
        return F.normalize(self.centre[labels], dim=1)

    @torch.no_grad()
    def update(self, u: torch.Tensor, labels: torch.Tensor) -> None:
        """One step of each present class's running centre and spread, from its unit features u (B, D)."""
        dt, m = self.centre.dtype, self.momentum
        u = u.to(dt)
        classes, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        K, n = len(classes), counts.to(dt)
        mean = torch.zeros(K, u.shape[1], dtype=dt, device=u.device).index_add_(0, inv, u) / n[:, None]
        self.centre[classes] = (1 - m) * self.centre[classes] + m * mean
        self.seen[classes] += 1
        if not self.anisotropic:
            return
        r = u - self.centres(labels)
        r = torch.where(r.norm(dim=1, keepdim=True) > MIN_OFFSET, r, torch.zeros_like(r))
        d = self.direction[classes]
        first = torch.full((K,), len(u), device=u.device).scatter_reduce(
            0, inv, torch.arange(len(u), device=u.device), "amin"
        )
        d = F.normalize(
            torch.where(d.norm(dim=1, keepdim=True) > 0, d, r[first]), dim=1
        )  # start from one of the class's offsets
        proj = (r * d[inv]).sum(1)
        Sd = torch.zeros_like(d).index_add_(0, inv, r * proj[:, None]) / n[:, None]  # this batch's S d
        bias = 1 - (1 - m) ** (self.seen[classes] - 1).to(dt)  # of the running lambda so far (0 before any)
        before = torch.where(bias > 0, self.principal[classes] / bias.clamp(min=1e-12), torch.zeros_like(bias))
        step = F.normalize((1 - m) * before[:, None] * d + m * Sd, dim=1)  # a power-iteration step on the running S
        d = torch.where(step.norm(dim=1, keepdim=True) > 0, step, d)
        proj = (r * d[inv]).sum(1)
        lam = torch.zeros(K, dtype=dt, device=u.device).index_add_(0, inv, proj * proj) / n
        tot = torch.zeros(K, dtype=dt, device=u.device).index_add_(0, inv, (r * r).sum(1)) / n
        self.direction[classes] = d
        self.principal[classes] = (1 - m) * self.principal[classes] + m * lam
        self.total[classes] = (1 - m) * self.total[classes] + m * tot

    def shape(self, labels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mu, rho (B,) and d (B, D) of S' = rho I + (mu - rho) d d^T for each label's class."""
        D = self.centre.shape[1]
        one = torch.ones(len(labels), dtype=dtype, device=labels.device)
        d = self.direction[labels].to(dtype)
        if not self.anisotropic or D <= 2:
            return one, one, d
        lam, tot = (
            self.principal[labels].to(dtype),
            self.total[labels].to(dtype),
        )  # the same bias in both: their ratio is exact
        known = tot > 0
        share = torch.where(known, lam / tot.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(tot)).clamp(0, 1)
        mu = ((D - 1) * share).clamp(max=self.max_weight)
        rho = (D - 1) * (1 - share) / (D - 2)
        return torch.where(known, mu, one), torch.where(known, rho, one), d

    def weights(self, r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """w_i = r_i^T S' r_i / |r_i|^2 for offsets r (B, D) of classes labels (1 where r_i = 0): the
        pull's strength along the sample's own offset, relative to a round class."""
        mu, rho, d = self.shape(labels.long(), r.dtype)
        n2 = (r * r).sum(1)
        a2 = (r * d).sum(1) ** 2
        w = rho + (mu - rho) * a2 / n2.clamp(min=torch.finfo(r.dtype).tiny)
        return torch.where(n2 > 0, w, torch.ones_like(w))

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The term on a batch (updating the running statistics first, in training mode)."""
        u = unit_features(embeddings, labels, self.num_classes, self.in_features)
        labels = labels.long()
        if self.training:
            self.update(u.detach(), labels)
        r = u - self.centres(labels).to(u.dtype)
        norm = r.detach().norm(dim=1)
        pulled = (self.seen[labels] > 0) & (norm > MIN_OFFSET)  # no centre yet (eval mode), or on it: no pull
        r = torch.where(pulled[:, None], r, torch.zeros_like(r))
        norm = torch.where(pulled, norm, torch.ones_like(norm))
        mu, rho, d = self.shape(labels, u.dtype)
        quad = rho * (r * r).sum(1) + (mu - rho) * (r * d).sum(1) ** 2  # r^T S' r
        return self.weight * (quad / (2 * norm)).mean()

    def forward(self, out: dict, batch) -> torch.Tensor:
        return self.loss(out["embedding"], batch.labels)
