"""Margin heads: one contract for every classifier of face embeddings.

    head = ArcFace(in_features=512, num_classes=10_000)      # published defaults: s=64, m=0.5
    loss = head(embeddings, labels)                          # mean over the batch
    head.weight                                              # (num_classes, in_features) proxies
    head.logits(embeddings)                                  # cosines to every proxy, for inspection

How the margin heads stay cheap: the only B x C work is the classifier's own (one matrix product
of normalized embeddings and raw proxies, cross-entropy). `_CosineCrossEntropy` fuses the rest
into the cross-entropy's pass over blocks of rows: the column scales 1 / |W_j| (the proxies are
never normalized as a C x D copy), the margin on the target column and CurricularFace's hard
negatives; its hand-written backward folds the proxies' normalization into dL/dW. The target
cosine is recomputed in float32 from the B target proxies (B x D work, exact even under bf16/fp16
autocast). `CosineLinear` (cosines without a normalized copy of W) serves NPT and inspection.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn


def _check(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Validate a batch (one host sync for all value checks); return the labels as int64."""
    C, D = weight.shape
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


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype a head accumulates in: float64 for float64 weights (gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class CosineLinear(torch.autograd.Function):
    """(s x_hat) @ (W / |W|).T without a normalized copy of W.

    forward: out = xs @ W.T, then each column j is scaled by inv_j = 1 / |W_j| (in place).
    backward, with g = dL/dout:
        dL/dW_j = inv_j h_j - inv_j^3 (W_j . h_j) W_j,   h = g.T @ xs   (one product, into the
                  gradient's own C x D buffer, then scaled row by row: no C x D temporary)
        dL/dxs  = sum over blocks k of classes of g[:, k] @ (inv_k W_k)
    (the derivative of W_j / |W_j|, folded in). Only a block of scaled proxies is ever a temporary,
    never a B x C one: CHUNK classes at a time on the CPU, CUDA_CHUNK on a GPU (where fewer, larger
    products are faster). Under autocast the products run in the autocast dtype, the column scales
    and dL/dW in float32.
    """

    CHUNK = 8192  # classes per block of scaled proxies in backward, on the CPU
    CUDA_CHUNK = 65536  # on CUDA: 65536 x D float32 is 128 MiB at D = 512

    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        inv = torch.linalg.vector_norm(w.detach().to(_acc(w.dtype)), dim=1).clamp_(min=1e-12).reciprocal_()
        out = xs @ w.t()
        out.mul_(inv.to(out.dtype))
        ctx.save_for_backward(xs, w, inv)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xs, w, inv = ctx.saved_tensors
        dt = g.dtype
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        if need_w:
            grad_w = (g.t() @ xs.to(dt)).to(w.dtype)  # h, then dL/dW in place
            grad_w.mul_(inv.to(w.dtype)[:, None])
            coef = torch.einsum("cd,cd->c", w, grad_w) * (inv * inv).to(w.dtype)
            grad_w.addcmul_(w, coef[:, None], value=-1.0)
        if need_x:
            chunk = CosineLinear.CUDA_CHUNK if g.is_cuda else CosineLinear.CHUNK
            grad_x = torch.zeros(xs.shape, dtype=_acc(xs.dtype), device=xs.device)
            for j in range(0, w.shape[0], chunk):
                k = slice(j, j + chunk)
                grad_x += g[:, k] @ (w[k] * inv[k, None].to(w.dtype)).to(dt)
            grad_x = grad_x.to(xs.dtype)
        return grad_x, grad_w


class _CosineCrossEntropy(torch.autograd.Function):
    """Cross-entropy of a normalized softmax, fused with the proxies' normalization and the margin,
    so that it keeps no more than the bare classifier's `linear + cross_entropy` does: the B x C
    product and one B x C gradient.

    Inputs: the unit embeddings x_hat (B x D), the raw proxies W (C x D), the labels, the target
    cosines c_y = x_hat . W_y / |W_y| (B,), the target logits T = s target(c_y) and their slopes
    dT/dc_y (B,), and for CurricularFace the per-row hardness thresholds (B, 1, on the scale of L)
    and t. With xs = s x_hat, P = xs @ W.T and inv_j = 1 / |W_j|, the logits are
    L_j = P_j inv_j = s cos(theta_j) and
        O_j = L_j (t + L_j / s)  on hard negatives (L_j > threshold; CurricularFace only),
        O_j = L_j                elsewhere,           O_y = T_y at the target,
    and the loss is the batch mean of logsumexp(O) - T. Forward and backward walk over blocks of
    rows (about BLOCK logits each, so that a block's temporaries stay in cache), recomputing O from
    P; with p = softmax(O):
        dloss/dT_y = (p_y - 1) / B,
        G_j = dloss/dP_j = p_j inv_j (2 L_j / s + t on hard negatives, 1 elsewhere) / B, 0 at y,
        dloss/dxs = G @ W,   dloss/dW_j = H_j - inv_j^2 (W_j . H_j) W_j  with H = G.T @ xs
    (the second term is the derivative of inv_j, folded in: no normalized C x D copy of W, and no
    B x C pass for the column scales, which happen inside the blocks). The target column's own
    gradient, g_y = dloss/dT_y dT/dc_y, is added here too: g_y W_y / |W_y| to x_hat's and
    g_y (x_hat - c_y W_y / |W_y|) / |W_y| to row y of dL/dW, in place (handed to autograd as a
    second, sparse gradient of W it would cost a C x D copy to sum). Under autocast P and G are in
    the autocast dtype, as the bare classifier's are; everything else is float32 (float64 for a
    float64 head).
    """

    BLOCK = 2**18  # logits per block of rows on the CPU (1 MiB of float32: cache-sized)
    CUDA_BLOCK = 2**25  # on CUDA, where each block costs kernel launches: 128 MiB of float32
    PROXY_ROWS = 2048  # rows of W per block of dL/dW's normalization term on the CPU
    CUDA_PROXY_ROWS = 65536  # on CUDA: a 128 MiB temporary at D = 512

    @staticmethod
    def _blocks(P: torch.Tensor):
        B, C = P.shape
        if P.is_cuda:
            rows = max(1, _CosineCrossEntropy.CUDA_BLOCK // C)
        else:  # at least a row per thread: the CPU's (log_)softmax kernels share out whole rows
            rows = max(_CosineCrossEntropy.BLOCK // C, torch.get_num_threads())
        return [slice(i, i + rows) for i in range(0, B, rows)]

    @staticmethod
    def _logits(P, inv, T, labels, threshold, t, s):
        """(O, L, hard) for a block of rows, O in a new buffer in float32 (float64 for a float64
        head); with a curriculum also L and the hard negatives as a 0/1 mask in L's dtype."""
        L = torch.mul(P, inv)  # float32 (float64 for a float64 head) by type promotion: no copy of a bf16 P
        if threshold is None:
            return L.scatter_(1, labels[:, None], T[:, None]), None, None
        # O = L + hard L (t - 1 + L / s), in float arithmetic only: on the CPU a boolean mask costs
        # two float passes and torch.where eight (the curriculum's block work at C = 10k, forward
        # and backward: 41 -> 12 ms per step)
        hard = torch.gt(L, threshold, out=torch.empty_like(L))
        O = torch.add(t - 1, L, alpha=1 / s).mul_(L)
        O = torch.addcmul(L, hard, O, out=O)
        return O.scatter_(1, labels[:, None], T[:, None]), L, hard

    @staticmethod
    def forward(ctx, xn, w, labels, c_y, T, dT, threshold, t, s):
        acc = _acc(w.dtype)
        inv = torch.linalg.vector_norm(w.detach().to(acc), dim=1).clamp_(min=1e-12).reciprocal_()
        xs = xn * s
        P = xs @ w.t()  # the classifier's product (in the autocast dtype under autocast)
        with torch.autocast(P.device.type, enabled=False):
            nll = torch.empty(len(T), dtype=acc, device=T.device)  # -log p_y = logsumexp(O) - T
            for r in _CosineCrossEntropy._blocks(P):
                th = None if threshold is None else threshold[r]
                O = _CosineCrossEntropy._logits(P[r], inv, T[r], labels[r], th, t, s)[0]
                # log_softmax's fused kernel is faster here than logsumexp's four passes
                nll[r] = torch.log_softmax(O, 1).gather(1, labels[r, None]).squeeze(1).neg_()
        ctx.save_for_backward(xn, w, inv, P, T, dT, c_y, labels, threshold, t)
        ctx.s = s
        return nll.mean()

    @staticmethod
    def backward(ctx, g):
        xn, w, inv, P, T, dT, c_y, labels, threshold, t = ctx.saved_tensors
        s, B = ctx.s, P.shape[0]
        G, gT = torch.empty_like(P), torch.empty_like(T)
        scale = g.to(inv.dtype) / B
        inv_scale = inv * scale  # dloss/dO_j = p_j scale, and dL_j/dP_j = inv_j
        for r in _CosineCrossEntropy._blocks(P):
            y = labels[r, None]
            th = None if threshold is None else threshold[r]
            p, L, hard = _CosineCrossEntropy._logits(P[r], inv, T[r], labels[r], th, t, s)
            p = torch.softmax(p, 1)
            gT[r] = ((p.gather(1, y).squeeze(1) - 1) * scale).to(gT.dtype)
            if hard is not None:  # dO/dL = 1 + hard (t - 1 + 2 L / s), into L's buffer
                p.addcmul_(p, torch.add(t - 1, L, alpha=2 / s, out=L).mul_(hard))
            torch.mul(p, inv_scale, out=G[r]).scatter_(1, y, 0.0)  # straight into G: no block copy
        need_x, need_w = ctx.needs_input_grad[:2]
        g_y = gT * dT  # dloss/dc_y, through the target logit
        inv_y = inv[labels]
        w_y = w[labels].to(inv.dtype) * inv_y[:, None]  # the unit target proxies (B x D)
        grad_x = grad_w = None
        if need_x:
            grad_x = (G @ w.to(G.dtype)).to(inv.dtype).mul_(s).addcmul_(w_y, g_y[:, None]).to(xn.dtype)
        if need_w:
            grad_w = (G.t() @ (xn * s).to(G.dtype)).to(w.dtype)  # H, then dL/dW in place, a cache-sized block of rows at a time
            inv2 = (inv * inv).to(w.dtype)
            rows = _CosineCrossEntropy.CUDA_PROXY_ROWS if w.is_cuda else _CosineCrossEntropy.PROXY_ROWS
            for j in range(0, w.shape[0], rows):
                k = slice(j, j + rows)
                coef = (w[k] * grad_w[k]).sum(1).mul_(inv2[k])
                grad_w[k].addcmul_(w[k], coef[:, None], value=-1.0)
            rows_y = (xn.to(inv.dtype) - c_y[:, None] * w_y).mul_((g_y * inv_y)[:, None])
            grad_w.index_add_(0, labels, rows_y.to(w.dtype))  # the target column's own gradient
        return grad_x, grad_w, None, None, None, None, None, None, None


class Head(nn.Module):
    """Base class: a (num_classes, in_features) weight of class proxies, normalized cosines."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(f"need in_features >= 1 and num_classes >= 2, got {in_features}, {num_classes}")
        self.in_features, self.num_classes = in_features, num_classes
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

    def target_cosine(self, xn: torch.Tensor, labels: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """cos(theta_y) in float32, from the B target proxies only (clamped to [-1, 1] against
        rounding unless clamp=False). Their gradient is sparse (B rows): indexing's would be a
        C x D zero tensor filled and summed, two passes over the classifier."""
        wy = F.embedding(labels, self.weight, sparse=True)
        acc = _acc(self.weight.dtype)
        c = (xn.to(acc) * F.normalize(wy.to(acc), dim=1)).sum(1)
        return c.clamp(-1.0, 1.0) if clamp else c

    def extra_repr(self) -> str:
        hp = {k: v for k, v in vars(self).items() if k in ("s", "m", "k", "r", "delta", "t_momentum")}
        return f"in_features={self.in_features}, num_classes={self.num_classes}, " + ", ".join(
            f"{k}={v}" for k, v in hp.items()
        )


class _MarginSoftmax(Head):
    """Normalized softmax whose target logit is s * target(cos_y); subclasses define target."""

    def __init__(self, in_features: int, num_classes: int, s: float, m: float = 0.0):
        super().__init__(in_features, num_classes)
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        self.s, self.m = float(s), float(m)

    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        """The target logit in cosine units, from cos(theta_y) (elementwise)."""
        return cos_y

    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        """d target / d cos(theta_y), elementwise. By autograd here; the built-in heads give it in
        closed form (the check is a test), which spares training steps an autograd call."""
        with torch.enable_grad():
            c = cos_y.detach().requires_grad_()
            return torch.autograd.grad(self.target(c), c, torch.ones_like(c))[0]

    def negatives(self, cos: torch.Tensor, cos_y: torch.Tensor) -> torch.Tensor:
        """The non-target logits in cosine units (CurricularFace re-weights the hard ones)."""
        return cos

    def update(self, cos_y: torch.Tensor) -> None:
        """Per-step state (CurricularFace's t), updated in training mode before the logits."""

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What training compares, in cosine units (before the scale s), for given cosines (B, C):
        a sample is classified *with margin* where its target entry is the largest. Pure: no state
        changes. Used for geometry figures; `forward` computes the same thing faster."""
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)
        return self.negatives(cos, cos_y).scatter(1, labels[:, None], self.target(cos_y)[:, None])

    def scaled_cosines(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s * cos (B, C) in float32, cos(theta_y) (B,)), after the per-step state update."""
        xn = F.normalize(self._input(x), dim=1)
        logits = CosineLinear.apply(xn * self.s, self.weight).to(_acc(self.weight.dtype))  # s folded into the B x D side
        cos_y = self.target_cosine(xn, labels)
        if self.training:
            self.update(cos_y)
        return logits, cos_y

    def scaled_logits(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """s * cos with the margin applied to the target column: the input of cross-entropy."""
        logits, cos_y = self.scaled_cosines(x, labels)
        logits = self.scaled_negatives(logits, cos_y)
        return logits.scatter_(1, labels[:, None], (self.s * self.target(cos_y))[:, None])

    def scaled_negatives(self, logits: torch.Tensor, cos_y: torch.Tensor) -> torch.Tensor:
        """`negatives` on s * cos, as training computes it (identity unless a head re-weights)."""
        return logits

    def curriculum(self, cos_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hardness thresholds (B, 1) on the scale of s * cos, t) for heads that re-weight hard
        negatives in training (CurricularFace); (None, None) for the others."""
        return None, None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """cross_entropy(scaled_logits(x, labels), labels), fused (see `_CosineCrossEntropy`)."""
        labels = _check(x, labels, self.weight)
        xn = F.normalize(self._input(x), dim=1)
        grad = torch.is_grad_enabled()
        with torch.no_grad():  # the fused function differentiates the target column itself
            c_y = self.target_cosine(xn, labels, clamp=False)
            cos_y = c_y.clamp(-1.0, 1.0)  # (the clamp only guards against rounding)
            if self.training:
                self.update(cos_y)
            threshold, t = self.curriculum(cos_y)
            T = self.s * self.target(cos_y)
            dT = self.s * self.target_slope(cos_y) if grad else torch.zeros_like(T)
        return _CosineCrossEntropy.apply(xn, self.weight, labels, c_y, T, dT, threshold, t, self.s)


class Softmax(Head):
    """Plain linear classifier (no bias) + cross-entropy: the unnormalized baseline.

    `logits` still returns cosines, so every head can be inspected the same way.
    """

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cos

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The largest raw logit (proxy norms matter here, unlike for the normalized heads)."""
        return F.linear(self._input(x), self.weight).argmax(1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = _check(x, labels, self.weight)
        return F.cross_entropy(F.linear(self._input(x), self.weight).to(_acc(self.weight.dtype)), labels)


class NormFace(_MarginSoftmax):
    """NormFace (Wang et al. 2017): logits s * cos(theta_j), no margin."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0):
        super().__init__(in_features, num_classes, s)

    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(cos_y)


class CosFace(_MarginSoftmax):
    """CosFace / AM-Softmax (Wang et al. 2018): target logit s * (cos(theta_y) - m)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35):
        super().__init__(in_features, num_classes, s, m)

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


class ArcFace(_MarginSoftmax):
    """ArcFace (Deng et al. 2019): target logit s * cos(theta_y + m), with the usual fallback
    s * (cos(theta_y) - m sin(m)) where theta_y + m > pi (see `arc_target`)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5):
        super().__init__(in_features, num_classes, s, m)

    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arc_target(cos_y, self.m)

    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arc_slope(cos_y, self.m)


class CurricularFace(_MarginSoftmax):
    """CurricularFace (Huang et al. 2020): ArcFace's target; a hard negative j, one with
    cos(theta_j) > cos(theta_y + m), gets the logit s * cos(theta_j) * (t + cos(theta_j)).

    `t` (a buffer, starting at 0) follows the batch-mean target cosine and is updated in training
    mode before it is used: t <- t_momentum * mean(cos(theta_y)) + (1 - t_momentum) * t. The paper
    writes the momentum as alpha = 0.99 on the old value; the official code puts 0.01 on the new
    batch mean, and frlab follows the code (TFace uses 0.1: pass t_momentum=0.1). The hardness
    mask compares with cos(theta_y + m) before the fallback, as the official code does.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5, t_momentum: float = 0.01):
        super().__init__(in_features, num_classes, s, m)
        if not 0.0 <= t_momentum <= 1.0:
            raise ValueError(f"t_momentum must lie in [0, 1], got {t_momentum}")
        self.t_momentum = float(t_momentum)
        self.register_buffer("t", torch.zeros(()))

    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arc_target(cos_y, self.m)

    def target_slope(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arc_slope(cos_y, self.m)

    def update(self, cos_y: torch.Tensor) -> None:
        with torch.no_grad():
            self.t.mul_(1 - self.t_momentum).add_(self.t_momentum * cos_y.mean())

    def hardness_threshold(self, cos_y: torch.Tensor) -> torch.Tensor:
        """cos(theta_y + m) before the fallback, (B, 1): negatives above it are hard."""
        sin_y = torch.sqrt((1.0 - cos_y * cos_y).clamp(min=1e-12))
        return (cos_y * math.cos(self.m) - sin_y * math.sin(self.m))[:, None]

    def negatives(self, cos: torch.Tensor, cos_y: torch.Tensor) -> torch.Tensor:
        t = self.t.to(cos.dtype)
        return torch.where(cos > self.hardness_threshold(cos_y), cos * (t + cos), cos)

    def scaled_negatives(self, logits: torch.Tensor, cos_y: torch.Tensor) -> torch.Tensor:
        threshold = (self.s * self.hardness_threshold(cos_y)).to(logits.dtype)
        return torch.where(logits > threshold, logits * (self.t.to(logits.dtype) + logits / self.s), logits)

    def curriculum(self, cos_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.s * self.hardness_threshold(cos_y)).detach(), self.t.to(cos_y.dtype)


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
        if not 1 <= k < num_classes:
            raise ValueError(f"k must lie in [1, num_classes - 1] = [1, {num_classes - 1}], got {k}")
        if r <= 0:
            raise ValueError(f"radius r must be positive, got {r}")
        self.k, self.r = int(k), float(r)
        self.delta = float(r * r if delta is None else delta)

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """cos with the target lowered by delta / (2 r^2): the hinge is zero where it stays largest."""
        cos_y = cos.gather(1, labels[:, None])
        return cos.scatter(1, labels[:, None], cos_y - self.delta / (2 * self.r**2))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = _check(x, labels, self.weight)
        xn = F.normalize(self._input(x), dim=1)
        cos = CosineLinear.apply(xn, self.weight).to(_acc(self.weight.dtype))
        cos_y = self.target_cosine(xn, labels)
        cos = cos.scatter_(1, labels[:, None], float("-inf"))  # never a negative
        nearest = cos.topk(self.k, dim=1).values
        hinge = (nearest - cos_y[:, None] + self.delta / (2 * self.r**2)).clamp(min=0)
        return 2 * self.r**2 * hinge.sum(1).mean()


HEADS = {cls.__name__.lower(): cls for cls in (Softmax, NormFace, CosFace, ArcFace, CurricularFace, NPT)}


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
        raise ValueError(f"{cls.__name__} has no hyper-parameter {sorted(unknown)}; it takes {sorted(accepted) or 'none'}")
    return cls(in_features, num_classes, **{k: v for k, v in kwargs.items() if k in accepted})
