"""Adversarial attacks on face models: PGD and FGSM under an L-infinity budget, for any loss of the images.

    loss = attacks.identification_loss(model, head, labels)   # closed-set: the head's per-sample loss
    adv = attacks.pgd(loss, images, eps=4 / 255, alpha=1 / 255, steps=10, generator=g)
    adv = attacks.fgsm(loss, images, eps=4 / 255)
    loss = attacks.verification_loss(model, partner_embeddings, same)   # push genuine pairs apart,
                                                                        # impostor pairs together

An attack ascends `loss(images) -> (B,)` (per-sample losses; a scalar also works) by steps of
`alpha` times the sign of the gradient, projected back onto the L-infinity ball of radius `eps`
around the clean images and onto the valid range [lo, hi] after each step (Madry et al. 2018).
`eps` and `alpha` are floats or per-sample tensors (B,), so one batch can hold several attack
strengths. With `random_start` the first point is drawn uniformly from the ball (seeded by
`generator`). The caller chooses the model's mode (train or eval) and its gradients are left alone:
only the images' gradient is taken.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import checks


def _per_sample(value, name: str, images: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor of non-negative values, as (B, 1, 1, 1) in the images' dtype."""
    if isinstance(value, torch.Tensor):
        if value.shape not in ((), (len(images),)):
            raise ValueError(
                f"{name} must be a number or one value per image ({len(images)}), got {tuple(value.shape)}"
            )
        if (value < 0).any():
            raise ValueError(f"{name} must be >= 0")
        v = value.to(images.device, images.dtype)
    else:
        v = torch.full((), checks.number(name, value, lo=0), device=images.device, dtype=images.dtype)
    return v.reshape(-1, *([1] * (images.dim() - 1))) if v.dim() else v


def pgd(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    eps,
    alpha,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    lo: float = 0.0,
    hi: float = 1.0,
) -> torch.Tensor:
    """Projected gradient ascent of `loss_fn` on the images within |x' - x|_inf <= eps (see the
    module docstring). Returns the adversarial images, detached."""
    checks.integer("steps", steps, lo=0)
    checks.flag("random_start", random_start)
    if not lo < hi:
        raise ValueError(f"the valid range needs lo < hi, got [{lo}, {hi}]")
    if not images.is_floating_point():
        raise TypeError(f"images must be floats in [{lo}, {hi}], got {images.dtype}")
    clean = images.detach()
    eps, alpha = _per_sample(eps, "eps", clean), _per_sample(alpha, "alpha", clean)
    x = clean.clone()
    if random_start:
        u = torch.rand(clean.shape, generator=generator, dtype=clean.dtype, device="cpu").to(clean.device)
        x = (x + (2 * u - 1) * eps).clamp_(lo, hi)
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x).sum()
            (grad,) = torch.autograd.grad(loss, x)
        x = x.detach() + alpha * grad.sign()
        x = torch.minimum(torch.maximum(x, clean - eps), clean + eps).clamp_(lo, hi)
    return x.detach()


def fgsm(loss_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, eps, lo: float = 0.0, hi: float = 1.0):
    """The fast gradient sign method (Goodfellow et al. 2015): one step of size eps, no random start."""
    return pgd(loss_fn, images, eps, eps, steps=1, random_start=False, lo=lo, hi=hi)


def identification_loss(model, head, labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Closed-set identification: the head's per-sample loss of the model's embeddings (ascending
    it moves each image away from its own class)."""
    return lambda x: head(model(x), labels, reduction="none")


def verification_loss(model, partners: torch.Tensor, same: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Verification, a feature-space attack: each image against its pair partner's embedding
    (`partners`, (B, D), fixed). Ascending it lowers the cosine of a genuine pair (`same`) and
    raises that of an impostor pair."""
    partners = F.normalize(partners.detach(), dim=1)
    sign = torch.where(torch.as_tensor(same, device=partners.device).bool(), -1.0, 1.0)
    return lambda x: sign * (F.normalize(model(x), dim=1) * partners).sum(1)


@torch.no_grad()
def _embed(model, images):
    return F.normalize(model(images), dim=1)


def robust_accuracy(
    model, head, data, eps: float, steps: int = 10, seed: int = 0, device: str = "cpu", batch_size: int = 256
) -> float:
    """Closed-set accuracy (the head's nearest proxy) on `data` after PGD at `eps` against the
    model and head as they are called (eval mode; `steps` of 2.5 eps / steps, random start,
    seeded); eps = 0 is the clean accuracy."""
    model.eval(), head.eval()
    g = torch.Generator().manual_seed(seed)
    right = 0
    for s in range(0, len(data), batch_size):
        x, y, _ = data.batch(torch.arange(s, min(s + batch_size, len(data))), device)
        if eps > 0:
            x = pgd(identification_loss(model, head, y), x, eps, 2.5 * eps / steps, steps, generator=g)
        with torch.no_grad():
            right += int((head.predict(model(x)) == y).sum())
    return right / len(data)


def genuine_pairs_under_attack(
    model, data, pairs, eps: float, steps: int = 10, fpr: float = 1e-2, seed: int = 0, device: str = "cpu"
) -> dict:
    """Verification under a feature-space attack: the threshold is set at `fpr` on the clean
    impostor pairs; the first image of every genuine pair is then attacked to move away from its
    partner's (clean) embedding, and the TPR at that threshold is measured. {"tpr", "clean_tpr", "threshold"}."""
    from . import eval as ev

    model.eval()
    emb = ev.embed(model, data, device=device)[0].to(device)  # clean, in eval mode
    scores = (emb[pairs.i] * emb[pairs.j]).sum(1)
    t, ok = ev.thresholds_at_fpr(scores[~pairs.same].cpu(), [fpr])
    if not bool(ok[0]):
        raise ValueError(f"{int((~pairs.same).sum())} impostor pairs cannot resolve FPR {fpr:g}")
    gi, gj = pairs.i[pairs.same], pairs.j[pairs.same]
    clean = scores[pairs.same]
    if eps > 0:
        g = torch.Generator().manual_seed(seed)
        adv = pgd(
            verification_loss(model, emb[gj], torch.ones(len(gi), dtype=torch.bool)),
            data.batch(gi, device)[0],  # the images that are attacked, only
            eps,
            2.5 * eps / steps,
            steps,
            generator=g,
        )
        attacked = (_embed(model, adv) * emb[gj]).sum(1)
    else:
        attacked = clean
    return {
        "tpr": float((attacked.cpu() > t[0]).double().mean()),
        "clean_tpr": float((clean.cpu() > t[0]).double().mean()),
        "threshold": float(t[0]),
    }
