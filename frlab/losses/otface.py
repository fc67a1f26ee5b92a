"""OTFace (Qian et al., arXiv 2203.14461): optimal transport between the local descriptors of hard
triplets, added to a margin head. Built from the released code (no paper body was available here).

For each image, the last convolutional feature map (C x h x w) is a cloud of h * w points in R^C,
each L2-normalized over the channels. Between two clouds the cost of matching cell i of one face
with cell j of the other is 1 - cos(x_i, y_j), the marginals are uniform, and

    OT(a, b) = <P, cost>,   P the entropic transport plan (Sinkhorn, `eps`, `iters` iterations).

Hard triplets (a, p, n) of the batch are mined on the normalized embeddings: y_a = y_p != y_n,
a != p, and cos(a, n) - cos(a, p) > -alpha. Each gives max(OT(a, p) - OT(a, n), -beta); the term
is `weight` times the mean over the triplets whose value is positive, 0 if there are none.
Released defaults: ArcFace s = 64, m = 0.45 as the head (`released_head`), weight 10,
alpha = beta = 0, eps = 1, 10 iterations.

Where frlab differs from the release, and why (each an argument where it changes a number):
* `sinkhorn(mode="log")` (the function's default) runs the correct updates, POT's, stable at any
  eps; the released update, `mode="released"`, is plain-domain and multiplies the column update by
  K where K^T belongs (the cost is not symmetric), so its column marginals are off. The term takes
  `mode`, default "released" (the released numbers); the notebook compares both.
* Each pair (a, p) or (a, n) that occurs in a selected triplet is transported once, all of them in
  one batched call (the release loops per triplet in Python, solving each pair again per triplet).
* A cell whose features are all zero (after a ReLU) is a zero vector without gradient, not NaN
  (the release divides by its norm without an epsilon): its cosine with every cell is 0, its cost 1.
* `max_triplets` caps the triplets a step averages: the hardest (largest cos(a, n) - cos(a, p))
  are kept, ties broken by position (anchor, then positive, then negative). None (the release)
  keeps all; with pair deduplication the cost is bounded by the distinct pairs anyway.
* `grad="unrolled"` (the release) differentiates through every Sinkhorn iteration;
  `grad="plan"` holds the plan constant, so the gradient of OT with respect to the cost is the
  plan itself: at convergence the exact gradient of the entropic OT objective (the envelope
  theorem), a few times cheaper, and the natural choice for a small eps with many iterations.
* The release samples batches at random, so same-identity pairs, hence triplets, rarely share a
  batch: train it with `TrainConfig(sampler="pk")` (notebook 08 counts both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..hparams import HParams

SINKHORN_MODES = ("log", "released")
GRADS = ("unrolled", "plan")
PLAIN_SPREAD = 30.0  # mode "log" runs in the plain domain where every (max C - min C) / eps is at most this


def sinkhorn(cost: torch.Tensor, eps: float = 1.0, iters: int = 10, mode: str = "log") -> torch.Tensor:
    """The entropic transport plan (..., n, m) between uniform marginals 1/n and 1/m for a batch of
    cost matrices (..., n, m): `iters` Sinkhorn iterations from zero potentials. The transport cost
    is `(plan * cost).sum((-2, -1))`. Differentiable (the iterations are unrolled), device- and
    dtype-agnostic.

    mode="log": potentials f, g updated, columns first as in POT's `sinkhorn_log` (whose plans
        it reproduces iteration for iteration), as g = eps (log b - LSE_i((f_i - C_ij) / eps)),
        then f = eps (log a - LSE_j((g_j - C_ij) / eps)); plan exp((f_i + g_j - C_ij) / eps), so
        its row sums are exact. Stable from eps = 1e-3 to eps = 1e3 (no overflow, no NaN). Where
        every problem's cost spread (max C - min C) / eps is at most PLAIN_SPREAD, the same
        iterations run in the plain domain (scalings u = e^(f / eps), v = e^(g / eps) of
        K = e^(-(C - min C) / eps), nothing near under- or overflow), several times faster;
        `sinkhorn_log_domain` is the log-domain path alone.
    mode="released": OTFace's update, as released: K = exp(-C / eps), u = v = 1, then
        u = a / (K v), v = b / (K u) (K^T belongs in the second), plan diag(u) K diag(v). Kept for
        comparison only: its column marginals are wrong, and it underflows at small eps."""
    eps, iters = checks.number("eps", eps, above=0), checks.integer("iters", iters, lo=1)
    checks.choice("mode", mode, SINKHORN_MODES)
    if cost.dim() < 2 or 0 in cost.shape[-2:]:
        raise ValueError(f"sinkhorn needs cost matrices (..., n, m) with n, m >= 1, got {tuple(cost.shape)}")
    n, m = cost.shape[-2:]
    if mode == "released":
        if n != m:
            raise ValueError(f"the released update multiplies K by a length-{n} vector: it needs n = m, got {n} x {m}")
        K = torch.exp(-cost / eps)
        u = torch.ones(cost.shape[:-1], dtype=cost.dtype, device=cost.device)
        v = torch.ones_like(u)
        for _ in range(iters):  # products with K as broadcast sums: faster than bmm on many small matrices
            u = (1.0 / n) / (K * v[..., None, :]).sum(-1)
            v = (1.0 / m) / (K * u[..., None, :]).sum(-1)  # K u, where K^T u belongs
        return u[..., :, None] * K * v[..., None, :]
    low = cost.detach().amin((-2, -1), keepdim=True)
    if float((cost.detach().amax((-2, -1), keepdim=True) - low).max()) / eps > PLAIN_SPREAD:
        return sinkhorn_log_domain(cost, eps, iters)
    K = torch.exp(-(cost - low) / eps)  # a constant shift per problem leaves every iterate's plan unchanged
    u = cost.new_ones(cost.shape[:-1])
    for _ in range(iters):
        v = (1.0 / m) / (K * u[..., :, None]).sum(-2)
        u = (1.0 / n) / (K * v[..., None, :]).sum(-1)
    return u[..., :, None] * K * v[..., None, :]


def sinkhorn_log_domain(cost: torch.Tensor, eps: float = 1.0, iters: int = 10) -> torch.Tensor:
    """`sinkhorn(mode="log")` computed in the log domain at any eps (the path it takes where the
    plain domain could under- or overflow)."""
    n, m = cost.shape[-2:]
    log_a, log_b = -math.log(n), -math.log(m)
    f = cost.new_zeros(cost.shape[:-1])
    g = cost.new_zeros(cost.shape[:-2] + (m,))
    for _ in range(iters):
        g = eps * (log_b - torch.logsumexp((f[..., :, None] - cost) / eps, -2))
        f = eps * (log_a - torch.logsumexp((g[..., None, :] - cost) / eps, -1))
    return torch.exp((f[..., :, None] + g[..., None, :] - cost) / eps)


DEAD_CELL = 1e-6  # a cell whose descriptor is shorter has no direction (all zero after a ReLU)


def point_clouds(features: torch.Tensor) -> torch.Tensor:
    """Feature maps (B, C, h, w) as clouds (B, h * w, C) of unit descriptors. A dead cell (norm
    below DEAD_CELL) is the zero vector, without gradient: normalizing it would give NaN (the
    release) or, with a clamped norm, a gradient of 1 / clamp."""
    if features.dim() != 4:
        raise ValueError(f"need feature maps (B, C, h, w), got {tuple(features.shape)}")
    x = features.flatten(2).transpose(1, 2)
    norm = x.norm(dim=2, keepdim=True)
    alive = norm > DEAD_CELL
    return torch.where(alive, x / torch.where(alive, norm, torch.ones_like(norm)), torch.zeros_like(x))


def transport_cost(
    x: torch.Tensor, y: torch.Tensor, eps: float = 1.0, iters: int = 10, mode: str = "log"
) -> tuple[torch.Tensor, torch.Tensor]:
    """OT between clouds of unit descriptors x (..., n, C) and y (..., m, C) at the cost 1 - cos:
    returns (the transport cost (...), the plan (..., n, m))."""
    cost = 1.0 - x @ y.transpose(-1, -2)
    plan = sinkhorn(cost, eps, iters, mode)
    return (plan * cost).sum((-2, -1)), plan


def pair_transport(
    clouds: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    eps: float = 1.0,
    iters: int = 10,
    mode: str = "log",
    chunk: int = 2048,
) -> torch.Tensor:
    """OT(i_k, j_k) for each pair of clouds (N, n, C) listed by the indices i, j, in chunks."""
    out = [
        transport_cost(clouds[i[s : s + chunk]], clouds[j[s : s + chunk]], eps, iters, mode)[0]
        for s in range(0, len(i), chunk)
    ]
    return torch.cat(out) if out else clouds.new_zeros(0)


@torch.no_grad()
def feature_clouds(model, data, device: str | torch.device = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Every sample's last feature map as a cloud of unit descriptors (N, h * w, C), on the CPU
    (the model in eval mode; it needs `outputs(x, want)`, as frlab's backbones have)."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        images, _, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))), device)
        out.append(point_clouds(model.outputs(images, ("features",))["features"].float()).cpu())
    return torch.cat(out)


def hard_triplets(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Every hard triplet of a batch, as rows (a, p, n) of indices in order: y_a = y_p != y_n,
    a != p, and cos(a, n) - cos(a, p) > -alpha (on the normalized embeddings, without gradient)."""
    with torch.no_grad():
        e = F.normalize(embeddings.float(), dim=1)
        sim = e @ e.T
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        mask = pos[:, :, None] & ~same[:, None, :] & (sim[:, None, :] - sim[:, :, None] > -alpha)
        return mask.nonzero()


class OTFace(HParams, nn.Module):
    """weight * mean over hard triplets of max(OT(a, p) - OT(a, n), -beta), counting only positive
    values; 0 if none. Reads the model's last feature map from the step's one forward
    (`needs = ("features",)`); composes with any head. See the module docstring."""

    needs = ("features",)

    def __init__(
        self,
        weight: float = 10.0,
        alpha: float = 0.0,
        beta: float = 0.0,
        eps: float = 1.0,
        iters: int = 10,
        mode: str = "released",
        max_triplets: int | None = None,
        grad: str = "unrolled",
    ):
        super().__init__()
        self.weight = checks.number("weight", weight, lo=0)
        self.alpha = checks.number("alpha", alpha, lo=-2, hi=2)
        self.beta = checks.number("beta", beta, lo=0, hi=2)
        self.eps = checks.number("eps", eps, above=0)
        self.iters = checks.integer("iters", iters, lo=1)
        self.mode = checks.choice("mode", mode, SINKHORN_MODES)
        self.max_triplets = None if max_triplets is None else checks.integer("max_triplets", max_triplets, lo=1)
        self.grad = checks.choice("grad", grad, GRADS)

    @staticmethod
    def released_head(in_features: int, num_classes: int):
        """The head OTFace's release trains with: ArcFace, s = 64, m = 0.45."""
        from ..heads import ArcFace

        return ArcFace(in_features, num_classes, s=64.0, m=0.45)

    def triplets(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The hard triplets this step averages (at most `max_triplets`, the hardest)."""
        t = hard_triplets(embeddings, labels, self.alpha)
        if self.max_triplets is not None and len(t) > self.max_triplets:
            with torch.no_grad():
                e = F.normalize(embeddings.float(), dim=1)
                hardness = (e[t[:, 0]] * (e[t[:, 2]] - e[t[:, 1]])).sum(1)
            keep = torch.sort(torch.argsort(hardness, descending=True, stable=True)[: self.max_triplets]).values
            t = t[keep]
        return t

    def loss(self, features: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The term on a batch's feature maps (B, C, h, w), embeddings (B, D) and labels (B,)."""
        if len(features) != len(labels) or len(embeddings) != len(labels) or labels.dim() != 1:
            raise ValueError(
                f"need one feature map and embedding per label, got {len(features)}, {len(embeddings)}"
                f" and labels {tuple(labels.shape)}"
            )
        t = self.triplets(embeddings, labels)
        if len(t) == 0:
            return features.sum() * 0.0  # exactly 0, with a (zero) gradient path
        B = len(labels)
        codes = torch.cat([t[:, 0] * B + t[:, 1], t[:, 0] * B + t[:, 2]])
        pairs, where = torch.unique(codes, return_inverse=True)  # each pair transported once
        clouds = point_clouds(features if features.dtype == torch.float64 else features.float())  # bf16 under amp
        n = clouds.shape[1]
        # every cell against every cell of the batch in one product, then the pairs' blocks
        cos = (clouds.reshape(B * n, -1) @ clouds.reshape(B * n, -1).T).view(B, n, B, n).transpose(1, 2)
        cost = 1.0 - cos.reshape(B * B, n, n).index_select(0, pairs)
        if self.grad == "plan":  # the plan a constant: the gradient is the plan itself
            with torch.no_grad():
                plan = sinkhorn(cost, self.eps, self.iters, self.mode)
        else:
            plan = sinkhorn(cost, self.eps, self.iters, self.mode)
        ot = (plan * cost).sum((-2, -1))
        value = torch.clamp(ot[where[: len(t)]] - ot[where[len(t) :]], min=-self.beta)
        active = value > 0
        if not bool(active.any()):
            return value.sum() * 0.0
        return self.weight * value[active].mean()

    def forward(self, out: dict, batch) -> torch.Tensor:
        return self.loss(out["features"], out["embedding"], batch.labels)
