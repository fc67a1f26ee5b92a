"""Margin heads: one contract for every classifier of face embeddings.

    head = ArcFace(in_features=512, num_classes=10_000)      # published defaults: s=64, m=0.5
    loss = head(embeddings, labels)                          # mean over the batch
    per_sample = head(embeddings, labels, reduction="none")
    head.weight                                              # (num_classes, in_features) proxies
    head.logits(embeddings)                                  # cosines to every proxy, for inspection

A margin head is a normalized softmax that states its logits, in cosine units, in two methods:

    target(cos_y)            the target logit          ArcFace: cos(theta_y + m)
    negatives(cos, cos_y)    the non-target logits     unchanged, except CurricularFace's hard ones

and the loss is the cross-entropy of s times them. `reference` computes exactly that with autograd
over the whole B x C logits: the readable definition. `forward` computes the same thing with the
fused kernel of `frlab._fused` (the B x C work of the bare classifier, nothing more), and the tests
check that the two agree for every registered head. What you override is what trains: the kernel
uses a closed-form slope (`target_slope`) or a fused form of the negatives (`fused_negatives`)
only where the class that defines `target` or `negatives` also defines it; otherwise it takes the
slope by autograd, or falls back to `reference`.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from ._fused import (
    CosineLinear,
    HardNegatives,
    RowShift,
    accumulation_dtype,
    cosine_cross_entropy,
    inverse_norms,
    top_fraction,
)
from .hparams import HParams

REDUCTIONS = ("mean", "sum", "none")


def _check(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """Validate a batch (one host sync for all value checks); return the labels as int64."""
    C, D = weight.shape
    checks.choice("reduction", reduction, REDUCTIONS)
    if x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"embeddings must have shape (batch, {D}), got {tuple(x.shape)}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if x.shape[0] == 0:
        raise ValueError("empty batch")
    ok = torch.stack([torch.isfinite(x).all(), labels.min() >= 0, labels.max() < C]).cpu()
    if not ok[0]:
        raise ValueError("embeddings contain NaN or inf")
    if not (ok[1] and ok[2]):
        raise ValueError(f"labels must lie in [0, {C}), got range [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    return losses.mean() if reduction == "mean" else (losses.sum() if reduction == "sum" else losses)


def _owner(cls: type, name: str) -> type:
    """The class in cls's MRO that defines attribute `name`."""
    return next(c for c in cls.__mro__ if name in c.__dict__)


class Head(HParams, nn.Module):
    """Base class: a (num_classes, in_features) weight of class proxies, normalized cosines."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features = checks.integer("in_features", in_features, lo=1)
        self.num_classes = checks.integer("num_classes", num_classes, lo=2)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        # unit-scale proxies: with the official codes' std=0.01 a proxy's norm is ~0.01 sqrt(D), so
        # the gradient through its normalization is ~1 / norm times larger, and small models diverge
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        # fp16/bf16 inputs outside autocast are promoted to the weight's dtype
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine of each embedding to each class proxy, (B, C)."""
        x = self._input(x)
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The class each embedding is assigned to at inference: the nearest proxy."""
        return self.logits(x).argmax(1)

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What training compares, in cosine units, for given cosines (B, C): a sample is classified
        *with margin* where its target entry is the largest. Pure: no state changes."""
        return cos

    def loss_from_cosines(self, cos: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss as a function of the cosines (B, C) to every proxy, differentiable in them: for
        figures of the loss and its gradient over the logits. Pure: no state changes."""
        raise NotImplementedError(f"{type(self).__name__}'s loss is not a function of the cosines alone")

    def target_cosine(self, xn: torch.Tensor, labels: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """cos(theta_y) in float32, from the B target proxies only (clamped to [-1, 1] against
        rounding unless clamp=False). Their gradient is sparse (B rows): indexing's would be a
        C x D zero tensor filled and summed, two passes over the classifier."""
        wy = F.embedding(labels, self.weight, sparse=True)
        acc = accumulation_dtype(self.weight.dtype)
        c = (xn.to(acc) * F.normalize(wy.to(acc), dim=1)).sum(1)
        return c.clamp(-1.0, 1.0) if clamp else c


class Softmax(Head):
    """Plain linear classifier (no bias) + cross-entropy: the unnormalized baseline.

    `logits` still returns cosines, so every head can be inspected the same way.
    """

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The largest raw logit (proxy norms matter here, unlike for the normalized heads)."""
        return F.linear(self._input(x), self.weight).argmax(1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        labels = _check(x, labels, self.weight, reduction)
        logits = F.linear(self._input(x), self.weight).to(accumulation_dtype(self.weight.dtype))
        return F.cross_entropy(logits, labels, reduction=reduction)


class MarginHead(Head):
    """A normalized softmax whose logits are s * target(cos_y) at the target and s * negatives(cos,
    cos_y) elsewhere (see the module docstring). Subclasses state `target` and, if they change
    them, `negatives`; `update` holds per-step state (CurricularFace's t)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0):
        super().__init__(in_features, num_classes)
        self.s = checks.number("s", s, above=0)

    # ---------------------------------------------------------------- what a head states
    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        """The target logit in cosine units, from cos(theta_y) (elementwise)."""
        return cos_y

    def negatives(self, cos: torch.Tensor, cos_y: torch.Tensor) -> torch.Tensor:
        """The non-target logits in cosine units, from all cosines (B, C) and the target ones (B,)."""
        return cos

    def update(self, cos_y: torch.Tensor) -> None:
        """Per-step state, updated in training mode from the batch's target cosines (detached),
        before the logits are formed."""

    # ---------------------------------------------------------------- what makes it fast (optional)
    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        """d target / d cos(theta_y), elementwise, by autograd; heads that know it in closed form
        say so (a test checks each against this)."""
        with torch.enable_grad():
            c = cos_y.detach().requires_grad_()
            return torch.autograd.grad(self.target(c), c, torch.ones_like(c))[0]

    def fused_negatives(self, cos_y: torch.Tensor):
        """The negatives as a map the fused kernel applies to s * cos block by block (None: the
        identity). Only used when the class that defines `negatives` defines this too."""
        return None

    # ---------------------------------------------------------------- the loss
    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)
        return self.negatives(cos, cos_y).scatter(1, labels[:, None], self.target(cos_y)[:, None])

    def loss_from_cosines(self, cos: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.s * self.margin_logits(cos, labels), labels, reduction=reduction)

    def reference(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", with_logits: bool = False):
        """The definition, with plain autograd over the full B x C logits:
        cross_entropy(s * margin_logits(cos, labels), labels), after the state update."""
        labels = _check(x, labels, self.weight, reduction)
        acc = accumulation_dtype(self.weight.dtype)
        cos = self.logits(x).to(acc)
        if self.training:
            self.update(cos.detach().gather(1, labels[:, None]).squeeze(1).clamp(-1, 1))
        loss = self.loss_from_cosines(cos, labels, reduction)
        return (loss, self.s * self.margin_logits(cos.detach(), labels)) if with_logits else loss

    def fusable(self) -> bool:
        """Whether the fused kernel computes this head's logits: its negatives are the identity, or
        have a fused form written beside them."""
        cls = type(self)
        return _owner(cls, "negatives") is MarginHead or _owner(cls, "negatives") is _owner(cls, "fused_negatives")

    def forward(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", with_logits: bool = False):
        """`reference`, computed by the fused kernel where it can be. With `with_logits`, returns
        (loss, s * margin logits (B, C) without gradient), for terms that read them."""
        if not self.fusable():
            return self.reference(x, labels, reduction, with_logits)
        labels = _check(x, labels, self.weight, reduction)
        xn = F.normalize(self._input(x), dim=1)
        cls, grad = type(self), torch.is_grad_enabled()
        with torch.no_grad():  # the fused function differentiates the target column itself
            c_y = self.target_cosine(xn, labels, clamp=False)
            cos_y = c_y.clamp(-1.0, 1.0)  # (the clamp only guards against rounding)
            if self.training:
                self.update(cos_y)
            negatives = self.fused_negatives(cos_y) if _owner(cls, "negatives") is not MarginHead else None
            T = self.s * self.target(cos_y)
            if not grad:
                dT = torch.zeros_like(T)
            elif _owner(cls, "target_slope") is _owner(cls, "target"):
                dT = self.s * self.target_slope(cos_y)
            else:  # a subclass changed the target but not its slope: autograd's
                dT = self.s * MarginHead.target_slope(self, cos_y)
        loss, logits = cosine_cross_entropy(
            xn, self.weight, labels, c_y, T, dT, self.s, negatives, reduction, with_logits
        )
        return (loss, logits) if with_logits else loss


class NormFace(MarginHead):
    """NormFace (Wang et al. 2017): logits s * cos(theta_j), no margin."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0):
        super().__init__(in_features, num_classes, s)

    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        return cos_y

    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(cos_y)


class CosFace(MarginHead):
    """CosFace / AM-Softmax (Wang et al. 2018): target logit s * (cos(theta_y) - m), m in [0, 2)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35):
        super().__init__(in_features, num_classes, s)
        self.m = checks.number("m", m, lo=0, below=2)

    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        return cos_y - self.m

    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(cos_y)


def arc_target(cos_y: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta_y + m), falling back to cos(theta_y) - m sin(m) where theta_y + m > pi.

    The fallback (from the official ArcFace code) keeps the target logit decreasing in theta_y;
    sin(theta) is computed from a clamped 1 - cos^2 so that the gradient stays finite at cos = +-1.
    """
    sin_y = torch.sqrt((1.0 - cos_y * cos_y).clamp(min=1e-12))
    phi = cos_y * math.cos(m) - sin_y * math.sin(m)
    return torch.where(cos_y > math.cos(math.pi - m), phi, cos_y - m * math.sin(m))


def arc_slope(cos_y: torch.Tensor, m: float) -> torch.Tensor:
    """d arc_target / d cos(theta_y): cos(m) + sin(m) cos / sin (sin clamped as there), 1 on the fallback."""
    sin2 = 1.0 - cos_y * cos_y
    dsin = torch.where(sin2 > 1e-12, -cos_y / torch.sqrt(sin2.clamp(min=1e-12)), torch.zeros_like(cos_y))
    return torch.where(cos_y > math.cos(math.pi - m), math.cos(m) - math.sin(m) * dsin, torch.ones_like(cos_y))


class ArcFace(MarginHead):
    """ArcFace (Deng et al. 2019): target logit s * cos(theta_y + m), m in [0, pi/2], with the
    usual fallback s * (cos(theta_y) - m sin(m)) where theta_y + m > pi (see `arc_target`)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5):
        super().__init__(in_features, num_classes, s)
        self.m = checks.number("m", m, lo=0, hi=math.pi / 2)

    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arc_target(cos_y, self.m)

    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arc_slope(cos_y, self.m)


class CurricularFace(ArcFace):
    """CurricularFace (Huang et al. 2020): ArcFace's target; a hard negative j, one with
    cos(theta_j) > cos(theta_y + m), gets the logit cos(theta_j) * (t + cos(theta_j)).

    `t` (a buffer, starting at 0) follows the batch-mean target cosine and is updated in training
    mode before it is used: t <- t_momentum * mean(cos(theta_y)) + (1 - t_momentum) * t. The paper
    writes the momentum as alpha = 0.99 on the old value; the official code puts 0.01 on the new
    batch mean, and frlab follows the code (TFace uses 0.1: pass t_momentum=0.1). The hardness
    mask compares with cos(theta_y + m) before the fallback, as the official code does.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5, t_momentum: float = 0.01):
        super().__init__(in_features, num_classes, s, m)
        self.t_momentum = checks.number("t_momentum", t_momentum, lo=0, hi=1)
        self.register_buffer("t", torch.zeros(()))

    def update(self, cos_y: torch.Tensor) -> None:
        with torch.no_grad():
            self.t.mul_(1 - self.t_momentum).add_(self.t_momentum * cos_y.mean())

    def hardness_threshold(self, cos_y: torch.Tensor) -> torch.Tensor:
        """cos(theta_y + m) before the fallback, (B, 1), without gradient: negatives above it are hard."""
        cos_y = cos_y.detach()
        sin_y = torch.sqrt((1.0 - cos_y * cos_y).clamp(min=1e-12))
        return (cos_y * math.cos(self.m) - sin_y * math.sin(self.m))[:, None]

    def negatives(self, cos: torch.Tensor, cos_y: torch.Tensor) -> torch.Tensor:
        t = self.t.to(cos.dtype)
        return torch.where(cos > self.hardness_threshold(cos_y), cos * (t + cos), cos)

    def fused_negatives(self, cos_y: torch.Tensor) -> HardNegatives:
        # on s * cos: s c (t + c) = L (t + L / s) above s * threshold
        return HardNegatives(self.s * self.hardness_threshold(cos_y), self.t.to(cos_y.dtype), self.s)


class NPT(Head):
    """NPT, nearest-proxies triplet loss (Khalid et al., arXiv 2103.03503).

    With embeddings and proxies on a sphere of radius r,
        L = 2 r^2 * sum over the k nearest negative proxies of max(0, cos_k - cos_y + delta / (2 r^2)),
    averaged over the batch; delta = r^2 by default (an inner margin of 0.5). The target proxy is
    masked out before the top-k, so it is never taken as a negative (the released code fills the
    target slot with 0, which selects it when every negative cosine is below 0; frlab does not).
    """

    def __init__(self, in_features: int, num_classes: int, k: int = 1, r: float = 1.0, delta: float | None = None):
        super().__init__(in_features, num_classes)
        self.k = checks.integer("k", k, lo=1, hi=num_classes - 1)
        self.r = checks.number("r", r, above=0)
        self.delta = r * r if delta is None else checks.number("delta", delta, lo=0)

    @property
    def inner_margin(self) -> float:
        """delta / (2 r^2): the margin in cosine units."""
        return self.delta / (2 * self.r**2)

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """cos with the target lowered by delta / (2 r^2): the hinge is zero where it stays largest."""
        cos_y = cos.gather(1, labels[:, None])
        return cos.scatter(1, labels[:, None], cos_y - self.inner_margin)

    def _hinge(self, cos: torch.Tensor, cos_y: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        negatives = cos.scatter(1, labels[:, None], float("-inf"))  # the target is never a negative
        nearest = negatives.topk(self.k, dim=1).values
        hinge = (nearest - cos_y[:, None] + self.inner_margin).clamp(min=0)
        return _reduce(2 * self.r**2 * hinge.sum(1), reduction)

    def loss_from_cosines(self, cos: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self._hinge(cos, cos.gather(1, labels[:, None]).squeeze(1), labels, reduction)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        labels = _check(x, labels, self.weight, reduction)
        xn = F.normalize(self._input(x), dim=1)
        cos = CosineLinear.apply(xn, self.weight).to(accumulation_dtype(self.weight.dtype))
        return self._hinge(cos, self.target_cosine(xn, labels), labels, reduction)


CIFP_FORMS = ("code", "paper")


class CIFP(Head):
    """CIFP, consistent instance false positive (Xu et al., CVPR 2021, arXiv 2106.05519): a CosFace
    head whose samples with many false positives are penalized more, so that false positives
    spread evenly over samples (and over groups the training never sees).

    One unified threshold T_u over the batch makes the overall false-positive rate `far` among the
    batch's non-target cosines; a sample's false positives are its non-target cosines above T_u.
    Two forms (`form`), both with CosFace's target s (cos_y - m):

    form="code", Tencent's release (TFace `cifp.py`), the default. Non-target cosines above their
    own sample's target are left out of the threshold (and are no false positives);
    k = ceil(far * (number of the others)), far = 1 / (C - 1) unless given; T_u = the k-th largest
    of the others; false positives: the others above T_u. Penalty
        p_i = (1 + cos'_y) * mean over i's false positives of v_ij^2   (0 without any),
    v_ij = cos_ij where cos_ij < cos_y - m, else cos'_ij; a primed cosine is computed with the
    proxies detached (its gradient reaches the embedding only), as released. The target logit is
    s (cos_y - m - p_i). Where T_u < 0 (early training), squaring loses the sign: a negative false
    positive's penalty pulls it up toward 0; the release does this, so frlab does.

    form="paper", frlab's reading of the abstract (no paper body was available here): "a penalty
    in proportion to the ratio of instance FPR to overall FPR in the denominator of the softmax".
    T_u from every non-target cosine of the batch (k = ceil(far * B (C - 1)), far = 1e-4 unless
    given); FPR_i = #(non-target cos_ij > T_u) / (C - 1), r_i = FPR_i / mean_i FPR_i (a count,
    without gradient); the denominator's non-target sum is scaled by 1 + w r_i (w = penalty_weight):
        L_i = -log( e^{s(cos_y - m)} / (e^{s(cos_y - m)} + (1 + w r_i) sum_j e^{s cos_j}) ),
    i.e. log(1 + w r_i) added to each of i's non-target logits.

    Single process: the threshold is over the batch this head sees (the release needs a process
    group even on one GPU). `reference` is the readable definition; `forward` computes the same
    by the margin heads' fused kernel (tested equal).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.35,
        form: str = "code",
        far: float | None = None,
        penalty_weight: float = 1.0,
    ):
        super().__init__(in_features, num_classes)
        self.s = checks.number("s", s, above=0)
        self.m = checks.number("m", m, lo=0, below=2)
        self.form = checks.choice("form", form, CIFP_FORMS)
        default_far = 1.0 / (num_classes - 1) if form == "code" else 1e-4
        self.far = default_far if far is None else checks.number("far", far, above=0, hi=1)
        self.penalty_weight = checks.number("penalty_weight", penalty_weight, lo=0)

    @staticmethod
    def threshold(values: torch.Tensor, far: float) -> torch.Tensor:
        """T_u: the k-th largest of `values` (1-D), k = ceil(far * len(values)); +inf when k = 0."""
        k = math.ceil(far * len(values) - 1e-9)
        if k <= 0:
            return values.new_tensor(float("inf"))
        return values.topk(min(k, len(values))).values[-1]

    def false_positives(self, cos: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the false-positive mask (B, C), T_u), without gradient."""
        with torch.no_grad():
            target = F.one_hot(labels, self.num_classes).bool()
            cos_y = cos.gather(1, labels[:, None])
            pool = ~target & (cos <= cos_y) if self.form == "code" else ~target
            t_u = self.threshold(cos[pool], self.far)
            return pool & (cos > t_u), t_u

    def penalty(self, x: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """The code form's p_i (B,) for embeddings x and their cosines (B, C), with the released routing."""
        fp, _ = self.false_positives(cos, labels)
        i, j = fp.nonzero(as_tuple=True)
        return self._penalty(F.normalize(x, dim=1), labels, cos.gather(1, labels[:, None]).squeeze(1), i, j)

    def _penalty(self, xn, labels, cos_y, i, j) -> torch.Tensor:
        """p_i from the false positives (i, j), about B of them, by their gathered rows."""
        dt = cos_y.dtype
        xn = xn.to(dt)
        w = F.normalize(F.embedding(j, self.weight, sparse=True), dim=1).to(dt)  # sparse: see target_cosine
        wy = F.normalize(self.weight.detach().index_select(0, labels), dim=1).to(dt)
        xi = xn.index_select(0, i)
        cos_fp = (xi * w).sum(1)
        below = cos_fp.detach() < cos_y.detach().index_select(0, i) - self.m
        v = torch.where(below, cos_fp, (xi * w.detach()).sum(1))  # at or above cos_y - m: embedding only
        return (1 + (xn * wy).sum(1).clamp(-1, 1)) * self._mean_square(v, i, cos_y)

    @torch.no_grad()
    def _penalty_value(self, xn, cos_y, i, j) -> torch.Tensor:
        """`_penalty`'s value alone (the routing changes gradients only), from the clamped target
        cosines cos_y."""
        w = F.normalize(self.weight.detach().index_select(0, j), dim=1).to(cos_y.dtype)
        cos_fp = (xn.to(cos_y.dtype).index_select(0, i) * w).sum(1)
        return (1 + cos_y) * self._mean_square(cos_fp, i, cos_y)

    @staticmethod
    def _mean_square(v, i, cos_y) -> torch.Tensor:
        """The mean of v^2 over each row's false positives (rows i), 0 for a row without any."""
        count = torch.bincount(i, minlength=len(cos_y)).clamp(min=1).to(cos_y.dtype)
        return torch.zeros_like(cos_y).index_add(0, i, v * v) / count

    def _shift(self, count: torch.Tensor) -> torch.Tensor:
        """The paper form's log(1 + w r_i) (B,), r_i = FPR_i / mean FPR, from each sample's count of
        false positives (B,, floating)."""
        fpr = count / (self.num_classes - 1)
        ratio = fpr / fpr.mean() if count.sum() > 0 else torch.zeros_like(fpr)
        return torch.log1p(self.penalty_weight * ratio)

    def _loss(self, xn, labels, cos, cos_y, i, j, reduction: str) -> torch.Tensor:
        """The loss, both forms, from the cosines and the false positives (i, j)."""
        if self.form == "code":
            target = cos_y - self.m - self._penalty(xn, labels, cos_y, i, j)
            logits = cos.scatter(1, labels[:, None], target[:, None])
            return F.cross_entropy(self.s * logits, labels, reduction=reduction)
        shift = self._shift(torch.bincount(i, minlength=len(labels)).to(cos.dtype))[:, None]
        logits = (self.s * cos + shift).scatter(1, labels[:, None], (self.s * (cos_y - self.m))[:, None])
        return F.cross_entropy(logits, labels, reduction=reduction)

    def reference(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The definition, with plain autograd over the B x C cosines and the false positives as a mask."""
        labels = _check(x, labels, self.weight, reduction)
        x = self._input(x)
        cos = self.logits(x).to(accumulation_dtype(self.weight.dtype))
        fp, _ = self.false_positives(cos, labels)
        i, j = fp.nonzero(as_tuple=True)
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)
        return self._loss(F.normalize(x, dim=1), labels, cos, cos_y, i, j, reduction)

    SUBSAMPLE = 32  # every 32nd class bounds the threshold from below before the exact top-k

    def forward(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """`reference`, by the fused kernel of the margin heads (`_fused.cosine_cross_entropy`):
        the classifier's product once, the false positives found from it block by block
        (`_fused.top_fraction`: about B entries, nothing B x C), their penalty from their gathered
        rows. The same pass gives each row's logsumexp of its non-target logits, and with it the
        row's loss for any target logit, so the kernel runs its backward only. The code form's
        penalty enters the kernel as a constant of the target logit, and its gradient through a
        surrogate of the same value: d loss_i / d p_i = s (1 - p_y,i), with p_y,i = exp(-loss_i)
        the softmax at the target. The paper form's log(1 + w r_i) is a per-row shift of the
        non-target logits (`_fused.RowShift`)."""
        labels = _check(x, labels, self.weight, reduction)
        xn = F.normalize(self._input(x), dim=1)
        w, s, grad = self.weight, self.s, torch.is_grad_enabled()
        with torch.no_grad():
            inv = inverse_norms(w)
            P = (xn * s) @ w.t()  # the product the kernel would make: made here, and handed to it
            limit = P.gather(1, labels[:, None]).squeeze(1) * inv[labels] if self.form == "code" else None
            flat, others = top_fraction(P, inv, labels, self.far, limit, self.SUBSAMPLE)
            c_y = self.target_cosine(xn, labels, clamp=False)
            cos_y = c_y.clamp(-1.0, 1.0)
            dT = torch.full_like(cos_y, s if grad else 0.0)  # d T / d cos_y
        i, j = flat // w.shape[0], flat % w.shape[0]
        if self.form == "paper":
            shift = self._shift(torch.bincount(i, minlength=len(labels)).to(cos_y.dtype))
            T = s * (cos_y - self.m)
            nll = torch.logaddexp(others + shift, T) - T
            loss, _ = cosine_cross_entropy(
                xn, w, labels, c_y, T, dT, s, RowShift(shift), reduction, P=P, inv=inv, nll=nll
            )
            return loss
        T = s * (cos_y - self.m - self._penalty_value(xn, cos_y, i, j))
        nll = torch.logaddexp(others, T) - T
        loss, _ = cosine_cross_entropy(xn, w, labels, c_y, T, dT, s, None, reduction, P=P, inv=inv, nll=nll)
        # The penalty's graph, built after the kernel's: autograd then runs it first, and the
        # kernel's dense gradient of W is added to its sparse one in place (the other order adds
        # a sparse gradient to a dense one out of place: a C x D copy). Its surrogate is 0 in value.
        p = self._penalty(xn, labels, cos_y, i, j)
        return loss + _reduce(s * (1 - torch.exp(-nll)) * (p - p.detach()), reduction)


HEADS: dict[str, type[Head]] = {}


def register(cls: type[Head]) -> type[Head]:
    """Make a head class known to `make_head` (and to the tests that check every registered head
    against its reference): `@heads.register class MyFace(heads.MarginHead): ...`."""
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise TypeError(f"only Head subclasses can be registered, got {cls!r}")
    HEADS[cls.__name__.lower()] = cls
    return cls


for _cls in (Softmax, NormFace, CosFace, ArcFace, CurricularFace, NPT, CIFP):
    register(_cls)


def make_head(name: str, in_features: int, num_classes: int, ignore_unknown: bool = False, **kwargs) -> Head:
    """A head by (case-insensitive) name, e.g. make_head("arcface", 512, 1000, m=0.4).

    With ignore_unknown=True, hyper-parameters the head does not have are dropped, so one call can
    build every head of a comparison: make_head(name, D, C, ignore_unknown=True, s=16, m=0.2)
    gives Softmax no s and NPT no m.
    """
    try:
        cls = HEADS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEADS)}") from None
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_features", "num_classes"}
    unknown = set(kwargs) - accepted
    if unknown and not ignore_unknown:
        raise ValueError(
            f"{cls.__name__} has no hyper-parameter {sorted(unknown)}; it takes {sorted(accepted) or 'none'}"
        )
    return cls(in_features, num_classes, **{k: v for k, v in kwargs.items() if k in accepted})
