"""frlab: a research workbook for deep face recognition losses.

Modules, one idea each:
    frlab.data        SynthFaces renderer, ORL faces
    frlab.models      IR-ResNet and MobileFaceNet-style backbones
    frlab.heads       margin heads: Softmax, NormFace, CosFace, ArcFace, CurricularFace, NPT, CIFP
    frlab.losses      auxiliary terms that compose with a head: DDL, IntraLoss, EKD, OTFace (and baselines)
    frlab.train       the trainer (one forward, a dict of outputs, losses that say what they need),
                      samplers, the model cache
    frlab.eval        embeddings, verification (ROC, EER, TPR at FPR), identification, class shapes
    frlab.quality     face image quality: SDD-FIQA labels, the quality regressor, error-versus-reject curves
    frlab.attacks     PGD and FGSM for any loss of the images; accuracy and verification under attack
    frlab.afa         AFA (reconstructed): dual-branch normalization, its fusing weight, adversarial training
    frlab.fan         FAN (reconstructed): scale augmentation, identity / non-identity split, its losses
    frlab.protocols   which pairs, which subsets, which folds
    frlab.experiment  recipes the notebooks share: the data split, the evaluation, the baseline
    frlab.viz         figures with one look across the workbook
    frlab.record      Run: where a notebook writes its metrics, tables, claims and figures
    frlab.report      the results section of the README, generated from runs
    frlab.runner      `python -m frlab run`: notebooks headless with papermill
    frlab.sweep       `python -m frlab sweep`: a grid of runs, reused when done, one table
    frlab.hparams, frlab.checks, frlab.paths, frlab._fused   what the others stand on
"""

__version__ = "0.1.0"

from .record import Run, seed_everything  # noqa: E402

__all__ = ["Run", "seed_everything", "__version__"]
