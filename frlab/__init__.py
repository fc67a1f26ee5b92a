"""frlab: a research workbook for deep face recognition losses.

Modules, one idea each:
    frlab.data     SynthFaces renderer, ORL faces, P x K sampler
    frlab.models   IR-ResNet and MobileFaceNet-style backbones
    frlab.heads    margin heads: Softmax, NormFace, CosFace, ArcFace, CurricularFace, NPT
    frlab.losses   auxiliary terms that compose with a head: DDL, IntraLoss, EKD (and their baselines)
    frlab.train    a small trainer with seeds, progress, checkpoints and exact resume
    frlab.eval     embeddings, verification (ROC, EER, TPR at FPR), identification
    frlab.viz      figures with one look across the workbook
    frlab.record   Run: where a notebook writes its metrics and figures
    frlab.runner   `python -m frlab run`: notebooks headless with papermill
"""
__version__ = "0.1.0"

from .record import Run, seed_everything  # noqa: E402

__all__ = ["Run", "seed_everything", "__version__"]
