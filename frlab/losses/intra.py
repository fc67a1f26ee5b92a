"""IntraLoss, reconstructed (Jiang et al., "IntraLoss: Further Margin via Gradient-Enhancing Term for
Deep Face Recognition", arXiv 2107.03352), and the plain centre pull a reviewer would compare it with.

What the paper says (abstract only; its equations and code were not available here): margin-based
softmax losses leave each class's features spread *anisotropically*, because a sample's gradient
vanishes once it is classified with margin; a "gradient-enhancing term" that keeps acting in the
anisotropic region makes classes compact and isotropic, which widens the margin between identities.

What frlab implements, and why (a design, not the authors' equations):

    L = weight * mean_i  w_i * theta_i,        theta_i = angle(z_i, W_{y_i})

* theta_i, the angle to the sample's own class proxy: its gradient with respect to the unit
  feature is the unit tangent vector pointing away from the proxy, of size 1 at every angle, so it
  does not vanish for correctly classified samples (cross-entropy's does, and so does the centre
  pull's 1 - cos theta, whose gradient is sin theta -> 0 near the proxy).
* w_i, the anisotropy weight (no gradient): how much of the sample's own class's spread lies
  along this sample's offset direction, relative to an isotropic class:
      w_i = (D - 1) * d_i^T S_y d_i / tr S_y,   d_i = t_i / |t_i|,   t_i = z_i - cos(theta_i) W_y
  (unit vectors), clipped to [0, max_weight]. For a round class w = 1 everywhere; a sample
  displaced along the long axis of an elongated class is pulled harder, one displaced across it
  less, so the class shrinks fastest where it is long and becomes isotropic as it becomes compact.
* S_y, each class's spread in the tangent space at its proxy, is tracked per class as "one
  principal direction + isotropic rest" (C x D memory, the size of the classifier; a full D x D
  covariance per class would not scale, and a batch holds too few images of a class to estimate
  one): a running power iteration on the class's offsets gives its principal direction u and the
  variance lambda along it, and a running mean of |t|^2 its total variance; the rest is spread
  evenly over the other D - 2 tangent directions. Running means are exponential (`momentum`,
  per class, bias-corrected), updated in training mode before use from detached offsets.
* `anisotropic=False` gives the same pull with w = 1 (an ablation: the gradient enhancement
  without the anisotropy weighting). With D <= 2 (a 1-D tangent space) w = 1.

An earlier frlab design pooled S over all classes (the directions that stretch face classes, pose
and light, are partly shared); measured in notebook 05 it made classes *less* isotropic, because
each class's own long axis is not the pooled one. Gradients flow to the embeddings and to the
head's proxies; the buffers are saved with checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COS_LIMIT = 1.0 - 1e-6  # acos has an infinite slope at +-1; clamping there gives 0 gradient instead


class _ProxyTerm(nn.Module):
    """A term on each sample's angle to its class proxy in `head.weight`. The head is referenced,
    not registered: its parameters belong to the head (and the optimizer sees them once)."""

    def __init__(self, head: nn.Module, weight: float = 1.0):
        super().__init__()
        if not hasattr(head, "weight") or head.weight.dim() != 2:
            raise TypeError("needs a head with a (num_classes, in_features) `weight` of class proxies")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        object.__setattr__(self, "head", head)
        self.weight = float(weight)

    def cosines(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit features u, their unit target proxies p and cos(theta) = u . p, in float32 or float64."""
        w = self.head.weight
        if embeddings.dim() != 2 or embeddings.shape[1] != w.shape[1] or labels.shape != (len(embeddings),):
            raise ValueError(f"need embeddings (B, {w.shape[1]}) and labels (B,), got {tuple(embeddings.shape)}, {tuple(labels.shape)}")
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        u = F.normalize(embeddings.to(dtype), dim=1)
        p = F.normalize(w[labels.long()].to(dtype), dim=1)
        return u, p, (u * p).sum(1)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if k in ("weight", "anisotropic", "momentum", "max_weight"))


class CentrePull(_ProxyTerm):
    """The plain alternative: L = weight * mean_i (1 - cos theta_i) = weight * mean_i |u_i - p_i|^2 / 2,
    centre loss with the class proxies as centres, on the unit sphere. Its pull fades as sin theta
    near the proxy and does not look at the shape of the class."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
        _, _, cos = self.cosines(embeddings, labels)
        return self.weight * (1.0 - cos).mean()


class IntraLoss(_ProxyTerm):
    """weight * mean_i w_i theta_i: a non-vanishing pull to each sample's proxy, weighted by how
    elongated its class is along the sample's offset (reconstructed; see the module docstring)."""

    def __init__(self, head: nn.Module, weight: float = 1.0, anisotropic: bool = True, momentum: float = 0.1, max_weight: float = 10.0):
        super().__init__(head, weight)
        if not 0 < momentum <= 1 or max_weight < 1:
            raise ValueError(f"need 0 < momentum <= 1 and max_weight >= 1, got {momentum}, {max_weight}")
        self.anisotropic, self.momentum, self.max_weight = bool(anisotropic), float(momentum), float(max_weight)
        C, D = head.weight.shape
        self.register_buffer("direction", torch.zeros(C, D))  # each class's principal direction (unit; 0 = none yet)
        self.register_buffer("principal", torch.zeros(C))  # running variance along it (not bias-corrected)
        self.register_buffer("total", torch.zeros(C))  # running mean of |t|^2 (not bias-corrected)
        self.register_buffer("seen", torch.zeros(C, dtype=torch.long))  # updates per class

    @staticmethod
    def tangent(u: torch.Tensor, p: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """Offsets t_i = u_i - cos_i p_i, in the tangent space at each sample's proxy (|t_i| = sin theta_i)."""
        return u - cos[:, None] * p

    @torch.no_grad()
    def update(self, t: torch.Tensor, labels: torch.Tensor, p: torch.Tensor) -> None:
        """One step of each present class's running spread, from its offsets t (B, D) and unit proxies p."""
        dt = self.direction.dtype
        t, p = t.to(dt), p.to(dt)
        classes, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        K, n = len(classes), counts.to(dt)[:, None]
        first = torch.full((K,), len(t), device=t.device).scatter_reduce(0, inv, torch.arange(len(t), device=t.device), "amin")
        pc = p[first]  # the proxy of each class
        u = self.direction[classes]
        u = u - (u * pc).sum(1, keepdim=True) * pc  # back into the tangent plane (the proxy moves)
        fresh = u.norm(dim=1) < 1e-6
        u = torch.where(fresh[:, None], t[first], u)  # start from one of the class's offsets
        u = F.normalize(u, dim=1)
        proj = (t * u[inv]).sum(1)
        Su = torch.zeros_like(u).index_add_(0, inv, t * proj[:, None]) / n  # this batch's S u
        m = self.momentum
        lam_old = self.corrected(self.principal, classes)
        u = F.normalize((1 - m) * lam_old[:, None] * u + m * Su, dim=1)  # a power-iteration step on the running S
        u = torch.where(u.norm(dim=1, keepdim=True) > 0, u, self.direction[classes])
        proj = (t * u[inv]).sum(1)
        lam = torch.zeros(K, dtype=dt, device=t.device).index_add_(0, inv, proj * proj) / n[:, 0]
        tot = torch.zeros(K, dtype=dt, device=t.device).index_add_(0, inv, (t * t).sum(1)) / n[:, 0]
        self.direction[classes] = u
        self.principal[classes] = (1 - m) * self.principal[classes] + m * lam
        self.total[classes] = (1 - m) * self.total[classes] + m * tot
        self.seen[classes] += 1

    def corrected(self, ema: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """A running mean of the given classes divided by its bias 1 - (1 - momentum)^seen (0 where unseen)."""
        c = 1 - (1 - self.momentum) ** self.seen[classes].to(ema.dtype)
        return torch.where(c > 0, ema[classes] / c.clamp(min=1e-12), torch.zeros_like(c))

    def weights(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The anisotropy weight w_i of each offset t_i (B, D) of class labels_i (no gradient)."""
        with torch.no_grad():
            D = t.shape[1]
            if D <= 2:
                return torch.ones(len(t), dtype=t.dtype, device=t.device)
            lam = self.corrected(self.principal, labels).to(t.dtype)
            tot = self.corrected(self.total, labels).to(t.dtype)
            norm2 = (t * t).sum(1)
            cos2 = (t * self.direction[labels].to(t.dtype)).sum(1) ** 2 / norm2.clamp(min=torch.finfo(t.dtype).tiny)
            rest = (tot - lam).clamp(min=0) / (D - 2)
            w = (D - 1) * (lam * cos2 + rest * (1 - cos2)) / tot.clamp(min=torch.finfo(t.dtype).tiny)
            known = (norm2 > 0) & (tot > 0)
            return torch.where(known, w.clamp(0, self.max_weight), torch.ones_like(w))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
        u, p, cos = self.cosines(embeddings, labels)
        theta = torch.acos(cos.clamp(-COS_LIMIT, COS_LIMIT))
        if not self.anisotropic:
            return self.weight * theta.mean()
        t = self.tangent(u, p, cos).detach()
        labels = labels.long()
        if self.training:
            self.update(t, labels, p.detach())
        return self.weight * (self.weights(t, labels) * theta).mean()
