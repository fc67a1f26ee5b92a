"""DDL: distribution distillation loss (Huang et al., "Improving Face Recognition from Hard Samples
via Distribution Distillation Loss", ECCV 2020, arXiv 2002.03662).

One network, two kinds of samples. The similarity distributions of *easy* samples (frontal, sharp)
separate genuine from impostor pairs well; those of *hard* samples (large pose, low resolution)
overlap. DDL treats the easy distributions as the teacher and the hard ones as the student:

    L = pos_weight * KL(P+ || Q+) + neg_weight * KL(P- || Q-) + order_weight * sum_{a,b} (E[S-_a] - E[S+_b])

P = teacher (easy), Q = student (hard); + = genuine-pair similarities, - = for each sample its
hardest in-batch impostor similarity; a, b range over {teacher, student}. Each set of similarities
becomes a distribution by a soft histogram: a Gaussian kernel of width `sigma` centred at each
similarity, evaluated at `bins` points k / bins on [0, 1), normalized to sum 1.

    ddl = DDL()                                                   # released defaults
    Trainer(model, head, data, cfg, extra={"ddl": ddl})            # easy/hard from metadata rules
    loss = head(emb, labels) + ddl.loss(emb, labels, easy, hard)  # or directly, from boolean masks

Which pairs belong to which side follows frlab's pair protocol (protocols.pair_subsets): a pair is
easy when both samples are easy, hard when at least one is hard. So the teacher's genuine pairs are
easy-easy, the student's are genuine pairs with a hard sample; the teacher's negative of an easy
sample is its most similar easy impostor, the student's negative of a hard sample its most similar
impostor of any kind. Samples that are neither easy nor hard only take part as partners.

Where frlab and the released code (TFace) differ, as options:
* `detach_teacher=True`. The released code lets the KL gradient flow into the teacher histogram
  too, which pulls the easy distributions toward the hard ones as much as the reverse: the easy
  samples would unlearn what they are meant to teach. Detached, only the hard side moves. Set False
  for the released behaviour. (The order term is never detached: it acts on both, as released.)
* `negatives="hardest"`: the released code takes, for sample i of a batch with one image per
  identity, max_j of triu(S, 1)[i, j], i.e. only partners j > i, with the zeros below the diagonal
  in the max (a negative similarity counts as 0, the last sample's is always 0). frlab takes the
  most similar impostor over all other samples, by label, so P x K batches work. `negatives="released"`
  reproduces the released rule on each side's samples (labels ignored, as there).
* KL as released: sum_k (P_k + eps) (log(P_k + eps) - log(Q_k + eps)), eps = 1e-9.
Genuine pairs with similarity <= `positive_threshold` (0) are dropped, as released. A part whose
similarities are missing from the batch (say, no easy genuine pair) contributes 0, and the parts of
the last call are kept in `self.last` (floats) for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..hparams import HParams
from ..protocols import EasyRule, HardRule

EPS = 1e-9
EASY, HARD = EasyRule(), HardRule()  # the default rules (frozen values)


def centres(bins: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """The bin centres k / bins, k = 0 .. bins - 1, in the dtype and device of `like`."""
    dtype, device = (like.dtype, like.device) if like is not None else (torch.float32, "cpu")
    return torch.arange(bins, dtype=dtype, device=device) / bins


def soft_histogram(s: torch.Tensor, bins: int = 1000, sigma: float = 0.1) -> torch.Tensor:
    """Differentiable histogram of similarities s (n,): a Gaussian of width sigma at each s,
    read at the bin centres and normalized to sum 1 (bins,). Same dtype as s (float32 or float64)."""
    k = torch.exp(-0.5 * ((s[:, None] - centres(bins, s)) / sigma) ** 2).sum(0)
    return k / k.sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of two histograms, with the released code's eps on both sides."""
    p, q = p + EPS, q + EPS
    return (p * (p.log() - q.log())).sum()


def easy_hard_gap(
    scores: torch.Tensor,
    same: torch.Tensor,
    easy: torch.Tensor,
    hard: torch.Tensor,
    bins: int = 1000,
    sigma: float = 0.1,
) -> dict[str, float]:
    """How far the hard pairs' similarity distributions are from the easy pairs' (evaluation, no
    gradient): KL(easy || hard) of the genuine and of the impostor soft histograms, and the gap of
    the mean genuine and mean impostor similarity. easy / hard are masks over the pairs."""
    s = scores.detach().double()
    out = {}
    for name, side in (("pos", same), ("neg", ~same)):
        e, h = s[side & easy], s[side & hard]
        if len(e) and len(h):
            out[f"kl_{name}"] = float(kl(soft_histogram(e, bins, sigma), soft_histogram(h, bins, sigma)))
            out[f"mean_{name}_gap"] = float(e.mean() - h.mean())
    return out


class DDL(HParams, nn.Module):
    """Distribution distillation from easy (teacher) to hard (student) samples of one network; see
    the module docstring for the formula, the pair rules and where frlab differs from the released
    code. As a trainer term it takes easy/hard from the batch's metadata with the `easy` and `hard`
    rules; `ddl.loss(emb, labels, easy, hard)` takes boolean masks."""

    needs = ()  # the embedding is enough

    def __init__(
        self,
        pos_weight: float = 0.1,
        neg_weight: float = 0.02,
        order_weight: float = 0.5,
        bins: int = 1000,
        sigma: float = 0.1,
        positive_threshold: float = 0.0,
        detach_teacher: bool = True,
        negatives: str = "hardest",
        easy: EasyRule = EASY,
        hard: HardRule = HARD,
    ):
        super().__init__()
        self.pos_weight = checks.number("pos_weight", pos_weight, lo=0)
        self.neg_weight = checks.number("neg_weight", neg_weight, lo=0)
        self.order_weight = checks.number("order_weight", order_weight, lo=0)
        self.bins = checks.integer("bins", bins, lo=2)
        self.sigma = checks.number("sigma", sigma, above=0)
        self.positive_threshold = checks.number("positive_threshold", positive_threshold, lo=-1, hi=1)
        self.detach_teacher = checks.flag("detach_teacher", detach_teacher)
        self.negatives = checks.choice("negatives", negatives, ("hardest", "released"))
        self.easy, self.hard = easy, hard
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ pieces, public for figures
    def histogram(self, s: torch.Tensor) -> torch.Tensor:
        """`soft_histogram` with this loss's bins and width."""
        return soft_histogram(s, self.bins, self.sigma)

    def similarities(
        self, embeddings: torch.Tensor, labels: torch.Tensor, easy: torch.Tensor, hard: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The four similarity sets: teacher_pos, student_pos, teacher_neg, student_neg (1-D each)."""
        if (
            embeddings.dim() != 2
            or labels.shape != (len(embeddings),)
            or easy.shape != labels.shape
            or hard.shape != labels.shape
        ):
            raise ValueError(
                f"need embeddings (B, D) and labels, easy, hard of shape (B,); got {tuple(embeddings.shape)}, "
                f"{tuple(labels.shape)}, {tuple(easy.shape)}, {tuple(hard.shape)}"
            )
        z = F.normalize(embeddings if embeddings.dtype == torch.float64 else embeddings.float(), dim=1)
        S = z @ z.T
        same = labels[:, None] == labels[None, :]
        upper = torch.ones_like(same).triu(1)
        easy, hard = easy.bool(), hard.bool()
        genuine = same & upper
        tp = S[genuine & easy[:, None] & easy[None, :]]
        sp = S[genuine & (hard[:, None] | hard[None, :])]
        tp, sp = tp[tp > self.positive_threshold], sp[sp > self.positive_threshold]
        if self.negatives == "released":
            tn = S[easy][:, easy].triu(1).max(1).values if easy.any() else S.new_zeros(0)
            sn = S[hard][:, hard].triu(1).max(1).values if hard.any() else S.new_zeros(0)
        else:
            impostor = ~same
            tn = self._hardest(S, impostor & easy[None, :])[easy]
            sn = self._hardest(S, impostor)[hard]
            tn, sn = tn[torch.isfinite(tn)], sn[torch.isfinite(sn)]
        return {"teacher_pos": tp, "student_pos": sp, "teacher_neg": tn, "student_neg": sn}

    @staticmethod
    def _hardest(S: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Row-wise max of S over allowed entries; -inf for a row with none."""
        return S.masked_fill(~allowed, float("-inf")).max(1).values

    # ------------------------------------------------------------------ the loss
    def loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, easy: torch.Tensor, hard: torch.Tensor
    ) -> torch.Tensor:
        sims = self.similarities(embeddings, labels, easy, hard)
        zero = embeddings.sum() * 0.0  # keeps the graph (and the dtype) when a part is missing
        parts = {}
        for sign in ("pos", "neg"):
            t, s = sims[f"teacher_{sign}"], sims[f"student_{sign}"]
            if len(t) and len(s):
                p = self.histogram(t)
                parts[f"kl_{sign}"] = kl(p.detach() if self.detach_teacher else p, self.histogram(s))
            else:
                parts[f"kl_{sign}"] = zero
        order = [
            n.mean() - p.mean()
            for n in (sims["teacher_neg"], sims["student_neg"])
            for p in (sims["teacher_pos"], sims["student_pos"])
            if len(n) and len(p)
        ]
        parts["order"] = torch.stack(order).sum() if order else zero
        self.last = {k: float(v.detach()) for k, v in parts.items()} | {f"n_{k}": len(v) for k, v in sims.items()}
        return (
            self.pos_weight * parts["kl_pos"] + self.neg_weight * parts["kl_neg"] + self.order_weight * parts["order"]
        )

    def forward(self, out: dict, batch) -> torch.Tensor:
        """The trainer's contract: easy and hard samples from the batch's metadata by this term's rules."""
        emb = out["embedding"]
        return self.loss(emb, batch.labels, self.easy(batch.meta).to(emb.device), self.hard(batch.meta).to(emb.device))
