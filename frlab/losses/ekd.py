"""EKD: evaluation-oriented knowledge distillation (Huang et al., "Evaluation-oriented Knowledge
Distillation for Deep Face Recognition", CVPR 2022, arXiv 2206.02325), and the two baselines it is
compared with: plain feature distillation and similarity-preserving distillation.

A small student cannot copy a large teacher's features one to one. EKD distils only the pair
relations that decide TPR and FPR at the operating points. On every batch, teacher and student
both embed the images; over all pairs of the batch:

* thresholds: for each FPR level f (1e-1 ... 1e-6), T_f = the impostor similarity that
  floor(n_impostors * f) impostors exceed (`eval.thresholds_at_fpr`; the released code's index
  n_impostors // round(1 / f) of the descending-sorted impostors), separately for teacher and
  student, each smoothed over batches, T <- momentum * T_batch + (1 - momentum) * T;
* the soft rank code of a similarity s: c(s) = sum_f sigmoid((s - T_f) / temperature), i.e. at
  how many operating points the pair would be accepted;
* L = pos_weight * MSE(c_student, c_teacher) over all genuine pairs
    + neg_weight * MSE(c_student, c_teacher) over the top_k impostor pairs the student finds most
      similar (its false-positive candidates).

Defaults as in the released code (TFace): levels 1e-1 ... 1e-6, momentum 0.01, temperature 0.01,
top_k 2000, pos_weight 0.02, neg_weight 0.01; thresholds are buffers without gradient, the
teacher runs without gradient in eval mode. Where frlab differs, as options:
* `clamp_levels=False`: a level the batch cannot resolve (n_impostors < 1 / f) is left out, of
  both codes, for that batch ("as far as the batch allows"). The released code indexes it at 0,
  the single most similar impostor, so several levels collapse onto one threshold. True: released.
* `bias_correction=False`: the released thresholds start at 0 and reach their level only after a
  few hundred steps (momentum 0.01); True divides by 1 - (1 - momentum)^steps (as Adam does), for
  short runs.
The released code also computes the classification loss on the random part of each batch only
and EKD on random + P x K images; frlab's trainer gives the head the whole batch.

All three distillation terms run the teacher on the batch's (augmented) images, the ones the
student saw. Each term keeps its own frozen copy of the teacher, registered (so `.to(device)`,
checkpoints and cache keys see it) but without gradient, in eval mode, and out of the optimizer;
the model passed in is left as it is.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..eval import FPR_LEVELS, thresholds_at_fpr
from ..hparams import HParams


def _pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper-triangle pair indices (i < j) and whether each pair is genuine."""
    i, j = torch.triu_indices(len(labels), len(labels), 1, device=labels.device)
    return i, j, labels[i] == labels[j]


class _Distill(HParams, nn.Module):
    """A term comparing the student's embeddings with a frozen teacher's on the same images."""

    needs = ()  # the embedding, and the batch's images for the teacher

    def __init__(self, teacher: nn.Module, weight: float = 1.0):
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"the teacher must be an nn.Module, got {type(teacher).__name__}")
        self.teacher = copy.deepcopy(teacher).requires_grad_(False).eval()
        self.weight = checks.number("weight", weight, lo=0)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # always: its BatchNorm statistics stay the teacher's
        return self

    @torch.no_grad()
    def teacher_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).float()

    def forward(self, out: dict, batch) -> torch.Tensor:
        return self.loss(out["embedding"], self.teacher_embeddings(batch.images), batch.labels)


class FeatureDistill(_Distill):
    """Plain feature distillation: weight * mean_i |s_i - t_i|^2 on L2-normalized embeddings (the
    student copies the teacher's features one to one; needs equal embedding sizes)."""

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if student.shape != teacher.shape:
            shapes = f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
            raise ValueError(f"feature distillation needs equal shapes, got {shapes}")
        return (
            self.weight
            * (F.normalize(student.float(), dim=1) - F.normalize(teacher.float(), dim=1)).pow(2).sum(1).mean()
        )


class SimilarityPreserving(_Distill):
    """Similarity-preserving distillation (Tung & Mori, ICCV 2019), on normalized embeddings as in
    TFace: weight * |S_student - S_teacher|_F^2 / B^2, S = the batch's cosine-similarity matrix. It
    copies every pair relation equally; the embedding sizes may differ."""

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
        return self.weight * (s @ s.T - t @ t.T).pow(2).sum() / len(s) ** 2


class EKD(_Distill):
    """Evaluation-oriented distillation: the student's soft rank codes at the FPR thresholds match
    the teacher's on genuine pairs and on its own hardest impostors (see the module docstring)."""

    def __init__(
        self,
        teacher: nn.Module,
        pos_weight: float = 0.02,
        neg_weight: float = 0.01,
        levels: tuple[float, ...] = FPR_LEVELS,
        temperature: float = 0.01,
        momentum: float = 0.01,
        top_k: int = 2000,
        clamp_levels: bool = False,
        bias_correction: bool = False,
    ):
        super().__init__(teacher)
        del self.weight
        if not levels or any(not 0 < f < 1 for f in levels):
            raise ValueError(f"levels must be FPRs in (0, 1), got {levels}")
        self.pos_weight = checks.number("pos_weight", pos_weight, lo=0)
        self.neg_weight = checks.number("neg_weight", neg_weight, lo=0)
        self.levels = tuple(float(f) for f in levels)
        self.temperature = checks.number("temperature", temperature, above=0)
        self.momentum = checks.number("momentum", momentum, above=0, hi=1)
        self.top_k = checks.integer("top_k", top_k, lo=1)
        self.clamp_levels = checks.flag("clamp_levels", clamp_levels)
        self.bias_correction = checks.flag("bias_correction", bias_correction)
        self.register_buffer("student_thresholds", torch.zeros(len(levels)))
        self.register_buffer("teacher_thresholds", torch.zeros(len(levels)))
        self.register_buffer("seen", torch.zeros(len(levels), dtype=torch.long))  # updates per level
        self.last: dict[str, float] = {}

    def batch_thresholds(self, impostor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's threshold at each level from impostor similarities, and which levels it
        resolves (with clamp_levels, all: an unresolved level takes the top impostor, as released)."""
        thr, ok = thresholds_at_fpr(impostor, self.levels)
        return thr, (torch.ones_like(ok) & (len(impostor) > 0)) if self.clamp_levels else ok

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smoothed (student, teacher) thresholds, bias-corrected when asked."""
        if not self.bias_correction:
            return self.student_thresholds, self.teacher_thresholds
        c = (1 - (1 - self.momentum) ** self.seen.to(self.student_thresholds.dtype)).clamp(min=1e-12)
        return self.student_thresholds / c, self.teacher_thresholds / c

    def codes(self, s: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Soft rank code of each similarity over the selected levels (n,)."""
        x = ((s[:, None] - thresholds[levels].to(s.dtype)[None, :]) / self.temperature).clamp(-50, 50)
        return torch.sigmoid(x).sum(1)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if student.dim() != 2 or teacher.dim() != 2 or len(student) != len(teacher) or labels.shape != (len(student),):
            raise ValueError(
                f"need student (B, D), teacher (B, D') and labels (B,), got {tuple(student.shape)}, "
                f"{tuple(teacher.shape)}, {tuple(labels.shape)}"
            )
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        s, t = F.normalize(student.to(dtype), dim=1), F.normalize(teacher.to(dtype).detach(), dim=1)
        i, j, genuine = _pairs(labels)
        # each pair's similarity read off the Gram matrix: the backward is a matrix product. Gathering
        # rows (s[i] * s[j]) would accumulate every row's gradient by index, which torch splits over
        # threads with atomic adds: another summation order, and other weights, in every process
        ss, ts = (s @ s.T)[i, j], (t @ t.T)[i, j]
        s_imp, t_imp = ss[~genuine], ts[~genuine]
        with torch.no_grad():
            s_batch, ok = self.batch_thresholds(s_imp.detach())
            t_batch, _ = self.batch_thresholds(t_imp)
            if self.training:
                m = self.momentum
                self.student_thresholds.copy_(
                    torch.where(
                        ok,
                        m * s_batch.to(self.student_thresholds.dtype) + (1 - m) * self.student_thresholds,
                        self.student_thresholds,
                    )
                )
                self.teacher_thresholds.copy_(
                    torch.where(
                        ok,
                        m * t_batch.to(self.teacher_thresholds.dtype) + (1 - m) * self.teacher_thresholds,
                        self.teacher_thresholds,
                    )
                )
                self.seen += ok.long()
        levels = ok.nonzero().squeeze(1)
        s_thr, t_thr = self.thresholds()
        mse = lambda a, b: (a - b).pow(2).mean() if len(a) else student.sum() * 0.0  # noqa: E731
        pos = mse(self.codes(ss[genuine], s_thr, levels), self.codes(ts[genuine], t_thr, levels))
        hardest = torch.topk(s_imp.detach(), min(self.top_k, len(s_imp))).indices
        neg = mse(self.codes(s_imp[hardest], s_thr, levels), self.codes(t_imp[hardest], t_thr, levels))
        self.last = (
            {"pos": float(pos.detach()), "neg": float(neg.detach()), "levels": len(levels)}
            | {f"threshold_student@{f:.0e}": float(v) for f, v in zip(self.levels, s_thr)}
            | {f"threshold_teacher@{f:.0e}": float(v) for f, v in zip(self.levels, t_thr)}
        )
        return self.pos_weight * pos + self.neg_weight * neg
