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
* w_i, the anisotropy weight (no gradient): how much of the classes' intra-class spread lies along
  this sample's own offset direction, relative to an isotropic class,
      w_i = (D - 1) * t_i^T S t_i / (|t_i|^2 tr S),   t_i = z_i - cos(theta_i) W_y  (unit vectors),
  clipped to [0, max_weight]. S is a running (EMA, bias-corrected) second moment of the tangent
  offsets t_i, pooled over all classes: with a few images per class in a batch a per-class
  covariance cannot be estimated, and the directions that stretch face classes (pose,
  illumination, resolution) are largely shared between identities. For an isotropic spread w = 1
  everywhere; a sample displaced along a direction that holds most of the spread is pulled up to
  max_weight times harder, one displaced along a thin direction less. So the term shrinks a class
  fastest where it is elongated.
* `anisotropic=False` gives the same pull with w = 1 (an ablation: the gradient enhancement
  without the anisotropy weighting).

S is updated in training mode, before it is used, from the detached offsets; it is a buffer, so it
is saved with checkpoints. Gradients flow to the embeddings and to the head's proxies.
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
    def __init__(self, head: nn.Module, weight: float = 1.0, anisotropic: bool = True, momentum: float = 0.05, max_weight: float = 10.0):
        super().__init__(head, weight)
        if not 0 < momentum <= 1 or max_weight < 1:
            raise ValueError(f"need 0 < momentum <= 1 and max_weight >= 1, got {momentum}, {max_weight}")
        self.anisotropic, self.momentum, self.max_weight = bool(anisotropic), float(momentum), float(max_weight)
        d = head.weight.shape[1]
        self.register_buffer("spread", torch.zeros(d, d))  # EMA of t t^T, not yet bias-corrected
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def tangent(self, u: torch.Tensor, p: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """Offsets t_i = u_i - cos_i p_i, in the tangent space at each sample's proxy (|t_i| = sin theta_i)."""
        return u - cos[:, None] * p

    @torch.no_grad()
    def update(self, t: torch.Tensor) -> None:
        t = t.to(self.spread.dtype)
        self.spread.mul_(1 - self.momentum).add_(t.T @ t, alpha=self.momentum / len(t))
        self.steps += 1

    def covariance(self) -> torch.Tensor:
        """The bias-corrected running second moment S of the tangent offsets (D, D)."""
        if int(self.steps) == 0:
            return torch.eye(len(self.spread), dtype=self.spread.dtype, device=self.spread.device)
        return self.spread / (1 - (1 - self.momentum) ** int(self.steps))

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """The anisotropy weight w_i of each offset (no gradient); 1 where t_i = 0."""
        with torch.no_grad():
            S = self.covariance().to(t.dtype)
            d = t.shape[1]
            norm2 = (t * t).sum(1)
            w = (d - 1) * ((t @ S) * t).sum(1) / (norm2 * S.trace()).clamp(min=torch.finfo(t.dtype).tiny)
            return torch.where(norm2 > 0, w.clamp(0, self.max_weight), torch.ones_like(w))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
        u, p, cos = self.cosines(embeddings, labels)
        theta = torch.acos(cos.clamp(-COS_LIMIT, COS_LIMIT))
        if not self.anisotropic:
            return self.weight * theta.mean()
        t = self.tangent(u, p, cos)
        if self.training:
            self.update(t.detach())
        return self.weight * (self.weights(t.detach()) * theta).mean()
