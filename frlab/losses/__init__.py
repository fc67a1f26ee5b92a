"""Auxiliary losses that compose with a margin head instead of forking it.

Each is an `nn.Module` the trainer calls as `term(out, batch) -> scalar` and adds to the head's
loss (`Trainer(model, head, data, cfg, extra={"ddl": DDL()})`); `out` holds the step's outputs
(the embedding, and what the term lists in `needs`), `batch` its images, labels and metadata.
Each also has a plain `loss(...)` on tensors, for tests and figures.

    DDL         distribution distillation from easy to hard samples (Huang et al., ECCV 2020)
                (with soft_histogram, kl and easy_hard_gap, its measures)
    IntraLoss   a non-vanishing pull to each class's running centre along the class's own long axes
                (reconstructed from the abstract of Jiang et al., arXiv 2107.03352)
    CentrePull  the plain centre-loss-style pull IntraLoss is compared with
    EKD         evaluation-oriented distillation of the pair ranks that decide TPR/FPR (Huang et al., CVPR 2022)
    FeatureDistill, SimilarityPreserving   the distillation baselines EKD is compared with
    OTFace      optimal transport between the feature maps of hard triplets (Qian et al., arXiv 2203.14461)
                (with sinkhorn, batched entropic OT in the log domain, and the released update)
"""

from .ddl import DDL, easy_hard_gap, kl, soft_histogram
from .ekd import EKD, FeatureDistill, SimilarityPreserving
from .intra import CentrePull, IntraLoss
from .otface import OTFace, sinkhorn

__all__ = [
    "DDL",
    "EKD",
    "CentrePull",
    "FeatureDistill",
    "IntraLoss",
    "OTFace",
    "SimilarityPreserving",
    "easy_hard_gap",
    "kl",
    "sinkhorn",
    "soft_histogram",
]
