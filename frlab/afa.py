"""AFA, adaptive feature alignment for adversarial training (arXiv 2105.15157), as frlab builds it.

Only the abstract is available and no code was released: it observes that feature statistics
change monotonically and smoothly with the attack strength, and trains a dual-BN network (clean and
adversarial branches) that predicts a fusing weight, so one model serves every attack strength.
Everything below the abstract's three sentences is frlab's design:

* `DualBatchNorm2d`: two BatchNorm2d branches, each with its statistics and affine parameters. A
  sample's weight w in [0, 1] mixes them: its mean, variance, scale and shift are (1 - w) times the
  clean branch's plus w times the adversarial one's (mixing the statistics, not the outputs: the
  observation says the statistics move smoothly between the two). In training a sample with w = 0
  is normalized by the clean branch's batch statistics (which it updates), w = 1 by the
  adversarial branch's, and 0 < w < 1 by the mixed running statistics as the batch found them
  (updating neither). In eval mode every sample uses the mixed running statistics: w = 0 is the
  clean branch exactly.
* `AFANet`: an IR-ResNet whose every 2-D normalization is a DualBatchNorm2d (through the models'
  `norm_layer`), and `StrengthPredictor`, which reads w from the image's high-frequency residual
  (early features of its own, so that w is known before the backbone's first normalization).
  `model(x)` uses the predicted w; `model.fixed(w)` sets it, e.g. for the fixed-weight baseline.
* `AdversarialTraining`: the batch transform. "standard" keeps the batch (w = 0); "madry"
  replaces it by PGD at eps_max (w = 1); "dual" adds PGD at eps_max (w = 1) to the clean batch (w = 0); "afa"
  adds a third group attacked at strengths drawn from [0, eps_max], normalized at the w the
  predictor gives them (`predictor="end_to_end"`: w learned through the classification loss
  alone) or at the true strength eps / eps_max while the predictor regresses it
  (`predictor="strength"`, the default: the observation says the statistics are a smooth function
  of the strength, so the strength is the weight to learn). `StrengthLoss` is that regression;
  `fit_predictor` fits the predictor again after training, alone (Adam, the network frozen): at
  the backbone's SGD rate the joint regression learns slowly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import attacks, checks
from .hparams import HParams

TRAINING_MODES = ("standard", "madry", "dual", "afa")
PREDICTOR_MODES = ("strength", "end_to_end")


class Fusion:
    """The per-sample weight w that every DualBatchNorm2d of one network reads: (B,) or None (0)."""

    def __init__(self):
        self.w: torch.Tensor | None = None

    def norm_layer(self, channels: int) -> DualBatchNorm2d:
        return DualBatchNorm2d(channels, self)


class DualBatchNorm2d(nn.Module):
    """Two BatchNorm2d branches mixed per sample by `fusion.w` (see the module docstring)."""

    def __init__(self, channels: int, fusion: Fusion):
        super().__init__()
        self.clean, self.adv = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.__dict__["fusion"] = fusion  # shared state, not a sub-module

    def mixed(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x normalized by the running statistics and affine parameters mixed at w (B,)."""
        w = w.to(x.dtype)[:, None]
        c, a = self.clean, self.adv
        mean = torch.lerp(c.running_mean.to(x.dtype), a.running_mean.to(x.dtype), w)
        var = torch.lerp(c.running_var.to(x.dtype), a.running_var.to(x.dtype), w)
        scale = torch.lerp(c.weight.to(x.dtype), a.weight.to(x.dtype), w) * torch.rsqrt(var + c.eps)
        shift = torch.lerp(c.bias.to(x.dtype), a.bias.to(x.dtype), w) - mean * scale
        return x * scale[:, :, None, None] + shift[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fusion.w
        w = torch.zeros(len(x), device=x.device) if w is None else w.to(x.device)
        if len(w) != len(x):
            raise ValueError(f"the fusion weight has {len(w)} values for a batch of {len(x)}")
        if not self.training:
            return self.mixed(x, w)
        out = torch.empty_like(x)
        between = (w > 0) & (w < 1)
        if between.any():  # first: at the running statistics as this batch found them
            out[between] = self.mixed(x[between], w[between])
        for rows, branch in ((w == 0, self.clean), (w == 1, self.adv)):
            if rows.any():
                out[rows] = branch(x[rows])
        return out


class StrengthPredictor(HParams, nn.Module):
    """w in [0, 1] from the image: its high-frequency residual (the image minus its 3 x 3 local
    mean, the part a small L-infinity perturbation changes most; without it the predictor sees the
    faces, not the attack, and learns a constant), two convolutions (the second of stride 2), each
    channel's mean and standard deviation, their logarithms (a perturbation scales them: the logs
    move by the same amount whatever the face, which plain SGD learns), a linear layer, a sigmoid."""

    def __init__(self, channels: int = 16, gain: float = 10.0):
        super().__init__()
        self.gain = checks.number("gain", gain, above=0)
        self.convs = nn.Sequential(
            nn.Conv2d(3, channels, 3, 1, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU()
        )
        self.linear = nn.Linear(2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)) * self.gain
        f = self.convs(residual)
        stats = torch.cat([f.mean((2, 3)), f.std((2, 3))], 1)
        return torch.sigmoid(self.linear(torch.log(stats + 1e-3))).squeeze(1)  # logs: scale-free, for SGD


class AFANet(HParams, nn.Module):
    """An IR-ResNet (`models.iresnet(arch, width, **backbone_kwargs)`) whose every 2-D normalization
    is a DualBatchNorm2d, and a predictor of the fusing weight.

        model = AFANet("ir8", width=0.5, input_size=64, embedding_size=64)
        model(x)                      # at the predicted w
        with model.fixed(0.0): ...    # the clean branch; fixed(1.0): the adversarial one
    """

    def __init__(self, arch: str = "ir8", width: float = 0.5, predictor_channels: int = 16, **backbone_kwargs):
        super().__init__()
        from . import models

        self.fusion = Fusion()
        self.backbone = models.iresnet(arch, width, norm_layer=self.fusion.norm_layer, **backbone_kwargs)
        self.predictor = StrengthPredictor(checks.integer("predictor_channels", predictor_channels, lo=1))
        self._fixed: torch.Tensor | float | None = None
        self._next: torch.Tensor | None = None

    def use_next(self, w: torch.Tensor) -> None:
        """The weights (B,) of the next forward only (NaN: the predictor's), then forgotten: how a
        batch transform hands the training step each sample's weight."""
        self._next = w

    @contextlib.contextmanager
    def fixed(self, w):
        """Use weight w (a number or one per sample) instead of the predictor's, inside the block."""
        before, self._fixed = self._fixed, w
        try:
            yield self
        finally:
            self._fixed = before

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The fusing weight of each image: the fixed one (inside `fixed`), else the next forward's
        (`use_next`), else the predictor's."""
        if self._fixed is not None:
            w = torch.as_tensor(self._fixed, dtype=x.dtype, device=x.device)
            if ((w < 0) | (w > 1)).any():
                raise ValueError("a fusing weight lies in [0, 1]")
            return w.expand(len(x)) if w.dim() == 0 else w
        if self._next is not None:
            w, self._next = self._next.to(x.device, x.dtype), None
            if len(w) != len(x):
                raise ValueError(f"use_next was given {len(w)} weights for a batch of {len(x)}")
            return torch.where(torch.isnan(w), self.predictor(x), w) if torch.isnan(w).any() else w
        return self.predictor(x)

    def outputs(self, x: torch.Tensor, want: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The backbone's outputs at each image's weight; "fusion_weight" (B,) if wanted."""
        want = set(want)
        w = self.weight_for(x)
        self.fusion.w = w
        try:
            out = self.backbone.outputs(x, want - {"fusion_weight"})
        finally:
            self.fusion.w = None
        if "fusion_weight" in want:
            out["fusion_weight"] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)["embedding"]


class AdversarialTraining(HParams, nn.Module):
    """The batch transform of the four trainings (see the module docstring). PGD attacks the
    model and head of the trainer, in eval mode (no statistics updated by the attack's steps), at
    each sample's weight; `steps` of size 2.5 eps / steps, random start, seeded by the step."""

    def __init__(
        self,
        mode: str = "afa",
        eps_max: float = 8 / 255,
        steps: int = 5,
        predictor: str = "strength",
        seed: int = 0,
    ):
        super().__init__()
        self.mode = checks.choice("mode", mode, TRAINING_MODES)
        self.eps_max = checks.number("eps_max", eps_max, above=0, below=1)
        self.steps = checks.integer("steps", steps, lo=1)
        self.predictor = checks.choice("predictor", predictor, PREDICTOR_MODES)
        self.seed = checks.integer("seed", seed, lo=0)

    def attack(self, trainer, images, labels, eps: torch.Tensor, w) -> torch.Tensor:
        model, head = trainer.model, trainer.head
        was = model.training, head.training
        model.eval(), head.eval()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.step)
        ctx = model.fixed(w) if isinstance(model, AFANet) else contextlib.nullcontext()
        try:
            with ctx:
                loss = attacks.identification_loss(model, head, labels)
                return attacks.pgd(loss, images, eps, 2.5 * eps / self.steps, self.steps, generator=g)
        finally:
            model.train(was[0]), head.train(was[1])

    def forward(self, trainer, batch):
        x, y, B = batch.images, batch.labels, len(batch.labels)
        if self.mode == "standard":  # the clean branch only
            return _with(trainer, batch, x, y, eps=torch.zeros(B, device=x.device), w=torch.zeros(B, device=x.device))
        full = torch.full((B,), self.eps_max, device=x.device)
        if self.mode == "madry":
            adv = self.attack(trainer, x, y, full, 1.0)
            return _with(trainer, batch, adv, y, eps=full, w=torch.ones(B, device=x.device))
        groups = [(x, torch.zeros(B, device=x.device), torch.zeros(B, device=x.device))]
        groups.append((self.attack(trainer, x, y, full, 1.0), full, torch.ones(B, device=x.device)))
        if self.mode == "afa":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.step + 500_009)
            eps = torch.rand(B, generator=g).to(x.device) * self.eps_max
            w_true = eps / self.eps_max
            adv = self.attack(trainer, x, y, eps, w_true)
            groups.append((adv, eps, w_true if self.predictor == "strength" else torch.full((B,), float("nan"))))
        images = torch.cat([g[0] for g in groups])
        eps = torch.cat([g[1] for g in groups])
        w = torch.cat([g[2].to(x.device) for g in groups])
        return _with(trainer, batch, images, y.repeat(len(groups)), eps=eps, w=w, copies=len(groups))


class StrengthLoss(HParams, nn.Module):
    """The predictor's regression of the strength, w = eps / eps_max, over every sample of the batch
    (clean ones at 0), by mean squared error; `weight` scales it. Needs the batch's meta["eps"]."""

    def __init__(self, predictor: StrengthPredictor, eps_max: float = 8 / 255, weight: float = 1.0):
        super().__init__()
        self.predictor = predictor
        self.eps_max = checks.number("eps_max", eps_max, above=0, below=1)
        self.weight = checks.number("weight", weight, lo=0)

    def forward(self, out, batch) -> torch.Tensor:
        target = (batch.meta["eps"].to(batch.images.device) / self.eps_max).clamp(0, 1)
        return self.weight * F.mse_loss(self.predictor(batch.images), target)


def _with(trainer, batch, images, labels, eps, w, copies: int = 1):
    """The batch with new images and labels, its metadata repeated and the strengths added; the
    weights go to the model's next forward (an AFANet's)."""
    meta = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in batch.meta.items()}
    meta |= {"eps": eps.cpu(), "fusion_w": w.cpu()}
    if isinstance(trainer.model, AFANet):
        trainer.model.use_next(w)
    return batch.replace(images=images, labels=labels, meta=meta, views={}, index=None)


def fit_predictor(
    model: AFANet,
    head: nn.Module,
    data,
    eps_max: float = 8 / 255,
    epochs: int = 15,
    steps: int = 3,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> list[float]:
    """Fit the predictor alone (Adam, the network frozen in eval mode) to the strength of PGD
    attacks drawn from [0, eps_max] on `data`: w = eps / eps_max. The network's training fits it
    too (`StrengthLoss`), but at the backbone's SGD rate this tiny regression learns slowly, so
    frlab fits it again after training, as a calibration. Returns the loss of each epoch."""
    checks.integer("epochs", epochs, lo=1)
    checks.number("lr", lr, above=0)
    model.eval(), head.eval()
    model.to(device), head.to(device)
    opt = torch.optim.Adam(model.predictor.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        total, n = 0.0, 0
        for idx in torch.randperm(len(data), generator=g).split(batch_size):
            x, y, _ = data.batch(idx, device)
            w = torch.rand(len(idx), generator=g).to(device)
            eps = w * eps_max
            with model.fixed(w):
                adv = attacks.pgd(
                    attacks.identification_loss(model, head, y), x, eps, 2.5 * eps / steps, steps, generator=g
                )
            loss = F.mse_loss(model.predictor(adv), w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(idx), n + len(idx)
        history.append(total / n)
    return history
