"""The performance work behind `frlab.heads`: what the heads compute, in fewer passes and less memory.

Nothing here is needed to understand a loss: `heads.MarginHead.reference` is the plain definition,
and tests check every head's `forward` against it. This file keeps the margin heads close to
the bare classifier (`linear + cross_entropy`) in time and memory (benchmarks/run.py: how close).
On the CPU, the kernel's blocks run on every thread, or on one where the machine is busy
(`serial_blocks`).

* `cosine_cross_entropy`: cross-entropy of a normalized softmax, fused with the proxies'
  normalization, the target logit and an optional element-wise map of the other logits.
* `CosineLinear`: (s x_hat) @ (W / |W|).T without a normalized copy of W.
* `HardNegatives`: the element-wise map "L (t + L / s) above a per-row threshold", in the form the
  kernel applies block by block. A head hands the kernel such a map for its negatives; a head whose
  negatives have no fused form is computed by its reference path instead. `RowShift`: a constant
  added to a row's negatives (CIFP's paper form).
* `top_fraction`: the entries of the logits above the k-th largest among the candidates, found
  block by block without sorting (or copying) B x C: CIFP's false positives.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a head accumulates in: float64 for float64 weights (gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_norms(w: torch.Tensor) -> torch.Tensor:
    """1 / |W_j| for every proxy, in the accumulation dtype, without gradient."""
    return torch.linalg.vector_norm(w.detach().to(accumulation_dtype(w.dtype)), dim=1).clamp_(min=1e-12).reciprocal_()


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
        inv = inverse_norms(w)
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
            grad_x = torch.zeros(xs.shape, dtype=accumulation_dtype(xs.dtype), device=xs.device)
            for j in range(0, w.shape[0], chunk):
                k = slice(j, j + chunk)
                grad_x += g[:, k] @ (w[k] * inv[k, None].to(w.dtype)).to(dt)
            grad_x = grad_x.to(xs.dtype)
        return grad_x, grad_w


class HardNegatives:
    """The element-wise map of non-target logits L = s cos_j
        O_j = L_j (t + L_j / s)   where L_j > threshold_i (the row's own threshold),
        O_j = L_j                 elsewhere,
    with dO/dL = 1 + hard (t - 1 + 2 L / s), in float arithmetic only: on the CPU a boolean mask
    costs two float passes and `torch.where` about eight. `threshold` is (B, 1), `t` a 0-d tensor."""

    def __init__(self, threshold: torch.Tensor, t: torch.Tensor, s: float):
        self.threshold, self.t, self.s = threshold, t, s

    def logits(self, L: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """O for a block of rows (in a new buffer) and what `scale_grad_` needs (the 0/1 mask)."""
        hard = torch.gt(L, self.threshold[rows], out=torch.empty_like(L))
        O = torch.add(self.t - 1, L, alpha=1 / self.s).mul_(L)
        return torch.addcmul(L, hard, O, out=O), hard

    def scale_grad_(self, p: torch.Tensor, L: torch.Tensor, hard: torch.Tensor, rows: slice) -> None:
        """p <- p dO/dL, in place (L's buffer is reused)."""
        p.addcmul_(p, torch.add(self.t - 1, L, alpha=2 / self.s, out=L).mul_(hard))


class RowShift:
    """The element-wise map O_j = L_j + shift_i of non-target logits (a constant per row, without
    gradient: dO/dL = 1), in the form `_CosineCrossEntropy` applies block by block. `shift` is (B,)."""

    def __init__(self, shift: torch.Tensor):
        self.shift = shift[:, None]

    def logits(self, L: torch.Tensor, rows: slice) -> tuple[torch.Tensor, None]:
        return L.add_(self.shift[rows]), None

    def scale_grad_(self, p: torch.Tensor, L: torch.Tensor, saved: None, rows: slice) -> None:
        pass


SEARCH_BLOCK = 2**20  # logits per block of `top_fraction`'s pass on the CPU (4 MiB of float32)
SEARCH_CHUNK = 64  # logits of a row per chunk: a chunk is looked into only if its maximum reaches the bound


def top_fraction(
    P: torch.Tensor, inv: torch.Tensor, labels: torch.Tensor, fraction: float, limit: torch.Tensor | None, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, others): the flat indices (into B x C) of the candidates ranked strictly above the
    k-th largest, k = ceil(fraction * number of candidates), among the non-target logits L = P inv
    (and, with `limit` (B,), only those with L_ij <= limit_i), empty when k = 0; and each row's
    logsumexp of its non-target logits (B,), from the same pass over L. A row's cross-entropy with
    target logit T is then logaddexp(others, T) - T, whatever T: the kernel's forward, done here
    while each block of L is in cache (`cosine_cross_entropy`'s `nll`).

    One pass over the rows, block by block, nothing B x C made: a lower bound t0 of the k-th
    largest from every `stride`-th class; then per block the entries at or above t0 (about 2k of
    them), among which the exact top-k is taken, and (with `limit`) the count of candidates.
    The bound is the k'-th largest maximum of the subsample's chunks of SEARCH_CHUNK (k' about
    twice the subsample's share of k): k' entries lie at or above it, so it is at most the
    subsample's k'-th largest, and a top-k' of the few maxima is cheaper than of the subsample.
    The entries at or above t0 are found in two steps: the maximum of every chunk of SEARCH_CHUNK
    logits of a row (a reduction, cheap), then a compare only inside the few chunks whose maximum
    reaches t0 (of rows whose limit does: a row whose limit is below t0 holds no candidate).
    The count is a float 0/1 mask written over the block and summed by rows (exact below 2^24
    classes; on the CPU faster than a boolean mask and its count). Where the bound was
    too high (fewer than k candidates above it), a second pass takes every candidate. Its blocks
    are larger than the kernel's (SEARCH_BLOCK logits) and use every thread: a few passes per
    block, fewer parallel regions than the kernel's; on a busy machine (`machine_busy`) they run on
    one thread, as the kernel's do."""
    B, C = P.shape
    sub = P[:, ::stride] * inv[::stride]  # the same products as the blocks' L = P inv
    at = (labels % stride == 0).nonzero().squeeze(1)  # the rows whose target is in the subsample
    sub[at, labels[at] // stride] = float("-inf")
    n_sub = sub.numel() - len(at)  # the subsample's candidates
    if limit is not None:
        above = sub > limit[:, None]  # no target among them: they are -inf by now
        n_sub -= int(above.sum())
        sub.masked_fill_(above, float("-inf"))
    k_guess = math.ceil(fraction * C / sub.shape[1] * n_sub)
    flat = sub.view(-1)
    whole = len(flat) - len(flat) % SEARCH_CHUNK
    maxima = torch.cat([flat[:whole].view(-1, SEARCH_CHUNK).amax(1), flat[whole:]])  # the tail: chunks of one
    t0 = maxima.topk(min(len(maxima), 2 * (k_guess // stride) + 16)).values[-1]  # ~2k + 16 stride above it
    with serial_on_cpu(P, serial_blocks()):
        return _search(P, inv, labels, fraction, limit, t0)


def _search(P, inv, labels, fraction, limit, t0):
    """`top_fraction`'s passes over the blocks, from its bound t0."""
    B, C = P.shape
    rows = max(1, (_CosineCrossEntropy.CUDA_BLOCK if P.is_cuda else SEARCH_BLOCK) // C)
    whole = C - C % SEARCH_CHUNK  # the columns in whole chunks; the rest is compared directly
    offsets = torch.arange(SEARCH_CHUNK, device=P.device)
    buffer = torch.empty((2, min(rows, B), C), dtype=torch.promote_types(P.dtype, inv.dtype), device=P.device)
    others = torch.empty(B, dtype=buffer.dtype, device=P.device)
    for bound in (t0, float("-inf")):
        idx, n_pool = [], 0
        for start in range(0, B, rows):
            r = slice(start, start + rows)
            L = torch.mul(P[r], inv, out=buffer[0, : len(P[r])])  # one buffer for every block: fresh pages once
            L.scatter_(1, labels[r, None], float("-inf"))  # the target: no candidate, and out of `others`
            if bound is t0:  # logsumexp = L_j - log_softmax(L)_j at any non-target j: one fused pass, not four
                j = ((labels[r] + 1) % C)[:, None]  # (a head has C >= 2)
                others[r] = (L.gather(1, j) - torch.log_softmax(L, 1, out=buffer[1, : len(L)]).gather(1, j)).squeeze(1)
            may = (limit[r] >= bound)[:, None] if limit is not None else True  # rows that may hold a candidate
            ri, ci = ((L[:, :whole].unflatten(1, (-1, SEARCH_CHUNK)).amax(2) >= bound) & may).nonzero(as_tuple=True)
            cols = (ci * SEARCH_CHUNK)[:, None] + offsets  # the columns of those chunks
            hit, at = (L[ri[:, None], cols] >= bound).nonzero(as_tuple=True)
            idx.append((ri[hit] + start) * C + cols[hit, at])
            tail_i, tail_j = ((L[:, whole:] >= bound) & may).nonzero(as_tuple=True)
            idx.append((tail_i + start) * C + whole + tail_j)
            if limit is not None:  # L's buffer becomes the mask; the target (-inf) is counted, so - 1 a row
                n_pool += int(torch.le(L, limit[r, None], out=L).sum(1).sum(dtype=torch.int64)) - L.shape[0]
        idx = torch.cat(idx)
        i, j = idx // C, idx % C
        val = P.view(-1)[idx] * inv[j]
        keep = j != labels[i]
        if limit is not None:
            keep &= val <= limit[i]
        else:
            n_pool = B * (C - 1)
        idx, val = idx[keep], val[keep]
        k = math.ceil(fraction * n_pool - 1e-9)
        if k <= 0:
            return labels.new_zeros(0), others
        if len(idx) >= k:
            break
    values, order = val.topk(k)
    return idx[order[values > values[-1]]], others


SERIAL_BLOCKS: bool | None = None  # the CPU blocks on one thread: always (True), never (False), when busy (None)


def machine_busy() -> bool:
    """Whether more work wants this machine's cores than it has: the one-minute load average (which
    counts this process's own running threads too) above the number of cores. False where the
    system reports no load average."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return False


def serial_blocks() -> bool:
    """Whether the CPU blocks run on one thread now: `SERIAL_BLOCKS`, or where it is None, whether
    the machine is busy."""
    return machine_busy() if SERIAL_BLOCKS is None else SERIAL_BLOCKS


@contextlib.contextmanager
def serial_on_cpu(t: torch.Tensor, enabled: bool = True):
    """Run the enclosed CPU ops on one thread (the products outside keep every thread). The kernel's
    blocks are many short element-wise ops, each its own parallel region: on a machine whose cores
    are also busy with other work, every region waits for its slowest (descheduled) thread, so
    these blocks slow down far more than the few long products do. On one thread they cost the
    same loaded or not; on an idle machine every thread is faster."""
    n = torch.get_num_threads()
    if not enabled or t.is_cuda or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _CosineCrossEntropy(torch.autograd.Function):
    """Cross-entropy of a normalized softmax, fused with the proxies' normalization and the margin,
    so that it keeps less than the bare classifier's `linear + cross_entropy` does: one B x C array,
    the product, over which the backward writes the gradient (the bare classifier keeps its
    log-softmax and makes the gradient beside it).

    Inputs: the unit embeddings x_hat (B x D), the raw proxies W (C x D), the labels, the target
    cosines c_y = x_hat . W_y / |W_y| (B,), the target logits T (B,) and their slopes dT/dc_y, the
    scale s, an optional map of the other logits (`negatives`, e.g. `HardNegatives`) and the
    reduction. With xs = s x_hat, P = xs @ W.T and inv_j = 1 / |W_j|, the logits are
    L_j = P_j inv_j = s cos(theta_j), O_j = negatives(L)_j (L_j without a map), O_y = T_y, and the
    loss of row i is logsumexp(O) - T. Forward and backward walk over blocks of rows (about BLOCK
    logits each, so that a block's temporaries stay in cache), recomputing O from P; with
    p = softmax(O) and g_i the gradient of row i's loss:
        dloss/dT_i = (p_y - 1) g_i,
        G_j = dloss/dP_j = p_j (dO_j/dL_j) inv_j g_i, 0 at y,
        dloss/dxs = G @ W,   dloss/dW_j = H_j - inv_j^2 (W_j . H_j) W_j  with H = G.T @ xs
    (the second term is the derivative of inv_j, folded in: no normalized C x D copy of W, and no
    B x C pass for the column scales, which happen inside the blocks). W_j . H_j = sum_i G_ij P_ij
    is summed by the blocks while they are in cache, and dL/dW starts as -inv_j^2 (W_j . H_j) W_j,
    to which the product adds H (a gemm with beta = 1): no pass of its own over W and H (under
    autocast, where G is not in W's dtype, that pass follows the product). A per-row g (reduction
    "none") scales G's rows through the B x D operands of the two products, not by a pass over G.
    The backward's softmax is exp(O - logsumexp(O)) with each row's logsumexp from the forward
    (nll + T): no reduction over the block. It writes G's block over the block of P it came from,
    while that block is in cache (a separate B x C gradient is one more array through memory); a
    second backward through a retained graph makes P again.
    The target column's own gradient, g_y = dloss/dT_y dT/dc_y, is added here too: g_y W_y / |W_y|
    to x_hat's and g_y (x_hat - c_y W_y / |W_y|) / |W_y| to row y of dL/dW, in place (handed to
    autograd as a second, sparse gradient of W it would cost a C x D copy to sum). Under autocast
    P and G are in the autocast dtype, as the bare classifier's are; everything else is float32
    (float64 for a float64 head). With `with_logits`, the margin logits O (B x C, no gradient) are
    kept as the blocks make them: no second product.
    """

    BLOCK = 2**18  # logits per block of rows on the CPU (1 MiB of float32: cache-sized)
    CUDA_BLOCK = 2**25  # on CUDA, where each block costs kernel launches: 128 MiB of float32
    PROXY_ROWS = 2048  # rows of W per block of dL/dW's normalization term on the CPU
    CUDA_PROXY_ROWS = 65536  # on CUDA: a 128 MiB temporary at D = 512

    @staticmethod
    def _blocks(P: torch.Tensor, serial: bool):
        B, C = P.shape
        if P.is_cuda:
            rows = max(1, _CosineCrossEntropy.CUDA_BLOCK // C)
        else:  # at least a row per thread: the CPU's (log_)softmax kernels share out whole rows
            rows = max(_CosineCrossEntropy.BLOCK // C, 1 if serial else torch.get_num_threads())
        return [slice(i, i + rows) for i in range(0, B, rows)]

    @staticmethod
    def _logits(P, inv, T, labels, negatives, r):
        """(O, L, saved) for the block of rows r: O in a new buffer in float32 (float64 for a float64
        head); with a map of the negatives also L and what the map keeps for its slope."""
        L = torch.mul(P[r], inv)  # float32 by type promotion: no copy of a bf16 P
        if negatives is None:
            return L.scatter_(1, labels[r, None], T[r, None]), None, None
        O, saved = negatives.logits(L, r)
        return O.scatter_(1, labels[r, None], T[r, None]), L, saved

    @staticmethod
    def forward(ctx, xn, w, labels, c_y, T, dT, s, negatives, reduction, with_logits, P, inv, nll):
        if inv is None:
            inv = inverse_norms(w)
        if P is None:  # the classifier's product (in the autocast dtype under autocast)
            P = (xn * s) @ w.t()
        logits = torch.empty(P.shape, dtype=inv.dtype, device=P.device) if with_logits else None
        serial = serial_blocks()  # decided once a step: forward and backward walk the same blocks
        if nll is not None:  # the head computed the rows' losses from the same logits: no blocks to walk
            nll = nll.to(inv.dtype, copy=True)
        else:
            nll = torch.empty(len(T), dtype=inv.dtype, device=T.device)  # -log p_y = logsumexp(O) - T
            with torch.autocast(P.device.type, enabled=False), serial_on_cpu(P, serial):
                for r in _CosineCrossEntropy._blocks(P, serial):
                    O = _CosineCrossEntropy._logits(P, inv, T, labels, negatives, r)[0]
                    if logits is not None:
                        logits[r] = O
                    # log_softmax's fused kernel is faster here than logsumexp's four passes
                    nll[r] = torch.log_softmax(O, 1).gather(1, labels[r, None]).squeeze(1).neg_()
        ctx.save_for_backward(xn, w, inv, T, dT, c_y, labels, nll)
        # P is kept outside save_for_backward: the backward writes G over it (see `backward`)
        ctx.P, ctx.P_dtype = P, P.dtype
        ctx.s, ctx.negatives, ctx.reduction, ctx.serial = s, negatives, reduction, serial
        loss = nll.clone() if reduction == "none" else (nll.sum() if reduction == "sum" else nll.mean())  # nll: saved
        if logits is None:
            return loss, None
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, g, _g_logits=None):
        xn, w, inv, T, dT, c_y, labels, nll = ctx.saved_tensors
        s, negatives, P = ctx.s, ctx.negatives, ctx.P
        if P is None:  # a second backward through this graph (retain_graph): G took P's place, so P again
            with torch.autocast(xn.device.type, enabled=False):
                P = (xn * s).to(ctx.P_dtype) @ w.to(ctx.P_dtype).t()
        ctx.P = None  # G is written over P, a block of rows at a time, once the block has read it
        B = P.shape[0]
        per_row = ctx.reduction == "none"
        g = g.to(inv.dtype) / (B if ctx.reduction == "mean" else 1)  # dloss/d(row loss): a scalar, or (B,)
        gT = (torch.exp(-nll) - 1).mul_(g)  # dloss/dT = (p_y - 1) g, with p_y = exp(-nll) from the forward
        neg_lse = -(nll + T)  # minus each row's logsumexp(O), from the forward: no reduction in the blocks
        inv_scale = inv if per_row else inv * g  # a scalar g in the column scales; a per-row g ...
        row_scale = g[:, None] if per_row else 1.0  # ... in the B x D operands of G's products
        need_x, need_w = ctx.needs_input_grad[:2]
        fold = need_w and P.dtype == w.dtype  # W_j . H_j from the blocks: inv_scale_j sum_i p_ij P_ij (g_i)
        blocks = _CosineCrossEntropy._blocks(P, ctx.serial)
        # the blocks' p P, summed element-wise in a block-sized buffer (in cache), by rows at the end
        pP = torch.zeros((min(blocks[0].stop, len(P)), P.shape[1]), dtype=inv.dtype, device=P.device) if fold else None
        with serial_on_cpu(P, ctx.serial):
            for r in blocks:
                # softmax(O) = exp(O - lse) off the target; the target column (whatever exp made of
                # it, inf included) is set to 0 below
                if negatives is None:
                    p = torch.addcmul(neg_lse[r, None], P[r], inv).exp_()
                else:  # O as the forward made it
                    O, L, saved = _CosineCrossEntropy._logits(P, inv, T, labels, negatives, r)
                    p = O.add_(neg_lse[r, None]).exp_()
                    negatives.scale_grad_(p, L, saved, r)
                p.scatter_(1, labels[r, None], 0.0)
                if fold and per_row:
                    pP[: len(p)].addcmul_(torch.mul(p, P[r]), g[r, None])
                elif fold:
                    pP[: len(p)].addcmul_(p, P[r])
                torch.mul(p, inv_scale, out=P[r])  # G's block, over the block of P it was made from
        G = P
        g_y = gT * dT  # dloss/dc_y, through the target logit
        inv_y = inv[labels]
        w_y = w[labels].to(inv.dtype) * inv_y[:, None]  # the unit target proxies (B x D)
        grad_x = grad_w = None
        if need_x:
            grad_x = (G @ w.to(G.dtype)).to(inv.dtype).mul_(s * row_scale).addcmul_(w_y, g_y[:, None]).to(xn.dtype)
        if need_w:
            xs = (xn.to(inv.dtype) * (s * row_scale)).to(G.dtype)
            inv2 = (inv * inv).to(w.dtype)
            if fold:  # -inv^2 (W . H) W, then + H by the product itself
                WH = pP.sum(0).mul_(inv_scale)  # W_j . H_j
                grad_w = torch.mul(w, WH.to(w.dtype).mul_(inv2).neg_()[:, None]).addmm_(G.t(), xs)
            else:  # H, then dL/dW in place, a cache-sized block of rows at a time
                grad_w = (G.t() @ xs).to(w.dtype)
                rows = _CosineCrossEntropy.CUDA_PROXY_ROWS if w.is_cuda else _CosineCrossEntropy.PROXY_ROWS
                with serial_on_cpu(w, ctx.serial):
                    for j in range(0, w.shape[0], rows):
                        k = slice(j, j + rows)
                        coef = (w[k] * grad_w[k]).sum(1).mul_(inv2[k])
                        grad_w[k].addcmul_(w[k], coef[:, None], value=-1.0)
            rows_y = (xn.to(inv.dtype) - c_y[:, None] * w_y).mul_((g_y * inv_y)[:, None])
            grad_w.index_add_(0, labels, rows_y.to(w.dtype))  # the target column's own gradient
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None, None


def cosine_cross_entropy(
    xn, w, labels, c_y, T, dT, s, negatives=None, reduction="mean", with_logits=False, P=None, inv=None, nll=None
):
    """See `_CosineCrossEntropy`: the loss (mean, sum or per row), and the margin logits s * O
    (no gradient) when `with_logits`, else None. A head that needed the classifier's product
    before its target logits were known (CIFP) passes it as P = (s xn) @ w.T (no gradient), and
    the proxies' inverse norms as inv = `inverse_norms(w)`, and the kernel uses them instead of
    computing them again (the kernel takes P over: its backward writes the gradient over it); a
    head that has also computed each row's loss logsumexp(O) - T from them (CIFP, in the pass of
    its search: `top_fraction`) passes it as nll (B,), and the forward walks no blocks (the
    backward is the same)."""
    if nll is not None and with_logits:
        raise ValueError("with_logits needs the forward's blocks: pass nll=None")
    return _CosineCrossEntropy.apply(xn, w, labels, c_y, T, dT, s, negatives, reduction, with_logits, P, inv, nll)
