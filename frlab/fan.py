"""FAN, the feature adaptation network (Yin et al., ACCV 2020, arXiv 1911.11680), as frlab builds it.

Only the abstract is available and no code was found: FAN disentangles identity from non-identity
features, adapts the distribution of low-resolution identity features to the high-resolution
ones (so paired and unpaired data both serve), reconstructs ("normalizes") a high-resolution face,
and trains with random-scale augmentation, which it finds better than fixed scales. Below the
abstract, every choice is frlab's:

* `degrade(images, factors)`: an image at resolution factor f is its area-downsampled copy (1 / f
  of the side) upsampled back bilinearly to the full size: what SynthFaces' camera does.
* `ScaleAugment`, a batch transform: "fixed" draws each image's factor from a few set values,
  "random" log-uniformly from [1, max_factor]. With `fan=True` the batch becomes [low; high]: the
  degraded images and high-resolution ones, labels repeated, meta["low"] telling them apart; the
  high half is the same samples (`paired=True`) or the batch in another order (unpaired).
* `FANNet`: an IR-ResNet whose embedding is split: the first `id_dim` numbers are the identity
  features (what the head and the evaluation see: `forward` returns them), the rest the
  non-identity ones; a decoder maps both back to a face.
* `FANLoss`, the auxiliary term, from the one forward of [low; high]:
  reconstruction, L1 between the decoder's output for each low image and its high-resolution
  face (paired; unpaired, each high image is reconstructed from its own features instead);
  alignment of the identity features of the low half to the high half's distribution by their
  first two moments (mean and covariance; `align="moments"`, deterministic, or `"mmd"`, a
  Gaussian-kernel MMD), the high half detached so that it is the target; and
  disentanglement, the squared cross-correlation between identity and non-identity features
  over the batch (a decorrelation: non-identity features carry no linear trace of identity).
* `fit_decoder`, the normalizer's second stage: the encoder frozen, the decoder alone fit by Adam
  to map the features of degraded training faces to their full-resolution renders (paired data).
  Trained jointly at the backbone's SGD learning rate and a recognition budget of steps, the
  decoder's faces stay blurred toward an average face; this stage gives it the steps it needs
  without changing what the recognizer learned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .hparams import HParams

ALIGNMENTS = ("moments", "mmd")
SCALE_MODES = ("none", "fixed", "random")


def degrade(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image at its resolution factor (B,): area-downsampled to round(side / f) pixels, then
    bilinearly upsampled back; f = 1 leaves an image as it is."""
    factors = torch.as_tensor(factors, dtype=torch.float32).reshape(-1)
    if len(factors) != len(images) or (factors < 1).any():
        raise ValueError(f"one resolution factor >= 1 per image is needed, got {tuple(factors.shape)}")
    out = images.clone()
    H, W = images.shape[-2:]
    for f in torch.unique(factors).tolist():
        if f == 1:
            continue
        rows = (factors == f).nonzero().squeeze(1)
        size = (max(1, round(H / f)), max(1, round(W / f)))
        small = F.interpolate(images[rows], size=size, mode="area")
        out[rows] = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)
    return out


class ScaleAugment(HParams, nn.Module):
    """The batch transform of the scale experiments (see the module docstring)."""

    def __init__(
        self,
        mode: str = "random",
        max_factor: float = 8.0,
        fixed: Iterable[float] = (1.0, 2.0, 4.0, 8.0),
        fan: bool = False,
        paired: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.mode = checks.choice("mode", mode, SCALE_MODES)
        self.max_factor = checks.number("max_factor", max_factor, lo=1)
        self.fixed = tuple(checks.number("fixed factor", f, lo=1) for f in fixed)
        if not self.fixed:
            raise ValueError("fixed needs at least one factor")
        self.fan, self.paired = checks.flag("fan", fan), checks.flag("paired", paired)
        self.seed = checks.integer("seed", seed, lo=0)

    def factors(self, n: int, g: torch.Generator) -> torch.Tensor:
        if self.mode == "none":
            return torch.ones(n)
        if self.mode == "fixed":
            return torch.tensor(self.fixed)[torch.randint(len(self.fixed), (n,), generator=g)]
        return torch.exp(torch.rand(n, generator=g) * math.log(self.max_factor))

    def forward(self, trainer, batch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.step)
        B = len(batch.labels)
        f = self.factors(B, g)
        low = degrade(batch.images, f.to(batch.images.device))
        meta = {**batch.meta, "factor": f}
        if not self.fan:
            return batch.replace(images=low, meta=meta)
        order = torch.arange(B) if self.paired else torch.randperm(B, generator=g)
        high = batch.images[order.to(batch.images.device)]
        meta = {k: torch.cat([v, v[order]]) for k, v in meta.items()}
        meta["factor"][B:] = 1.0
        meta["low"] = torch.arange(2 * B) < B
        meta["pair"] = torch.cat([order, torch.arange(B)]) if self.paired else torch.full((2 * B,), -1)
        labels = torch.cat([batch.labels, batch.labels[order.to(batch.labels.device)]])
        return batch.replace(images=torch.cat([low, high]), labels=labels, meta=meta, views={}, index=None)


class FANNet(HParams, nn.Module):
    """An IR-ResNet (`models.iresnet(arch, width, input_size=..., embedding_size=id_dim + nonid_dim)`)
    whose embedding splits into identity and non-identity features, and a decoder back to a face."""

    def __init__(
        self, arch: str = "ir8", width: float = 0.5, input_size: int = 64, id_dim: int = 64, nonid_dim: int = 32
    ):
        super().__init__()
        from . import models

        self.id_dim = checks.integer("id_dim", id_dim, lo=1)
        self.nonid_dim = checks.integer("nonid_dim", nonid_dim, lo=1)
        self.input_size = checks.integer("input_size", input_size, lo=16)
        if input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, got {input_size}")
        self.encoder = models.iresnet(arch, width, input_size=input_size, embedding_size=id_dim + nonid_dim)
        side = input_size // 8
        self.decoder = nn.Sequential(  # normalized throughout: it trains at the backbone's learning rate
            nn.Linear(id_dim + nonid_dim, 64 * side * side),
            nn.Unflatten(1, (64, side, side)),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 48, 4, 2, 1),
            nn.BatchNorm2d(48),
            nn.ReLU(),
            nn.ConvTranspose2d(48, 32, 4, 2, 1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 4, 2, 1),
            nn.Sigmoid(),
        )

    def outputs(self, x: torch.Tensor, want: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """{"embedding": the identity features, "nonid": the rest, "features" if wanted}."""
        want = set(want)
        out = self.encoder.outputs(x, want & {"features"})
        z = out.pop("embedding")
        return {**out, "embedding": z[:, : self.id_dim], "nonid": z[:, self.id_dim :]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)["embedding"]

    def reconstruct(self, identity: torch.Tensor, nonid: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([identity, nonid], 1))


def moment_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|mean(a) - mean(b)|^2 + |cov(a) - cov(b)|_F^2 over the rows of a and b (D columns each)."""
    ca, cb = torch.cov(a.T, correction=0).reshape(a.shape[1], -1), torch.cov(b.T, correction=0).reshape(b.shape[1], -1)
    return (a.mean(0) - b.mean(0)).pow(2).sum() + (ca - cb).pow(2).sum()


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """The (biased) squared MMD between the rows of a and b with a Gaussian kernel; the bandwidth
    defaults to the median distance between all the rows (without gradient)."""
    both = torch.cat([a, b])
    d2 = torch.cdist(both, both).pow(2)
    if bandwidth is None:
        bandwidth = float(d2.detach()[d2.detach() > 0].median().sqrt()) if (d2 > 0).any() else 1.0
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def cross_correlation(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The mean squared correlation between every column of u and every column of v over the rows."""
    u = (u - u.mean(0)) / u.std(0, correction=0).clamp(min=1e-6)
    v = (v - v.mean(0)) / v.std(0, correction=0).clamp(min=1e-6)
    return ((u.T @ v) / len(u)).pow(2).mean()


class FANLoss(HParams, nn.Module):
    """FAN's auxiliary terms (see the module docstring), for a batch made by ScaleAugment(fan=True):
    recon_weight * reconstruction + align_weight * alignment + disentangle_weight * decorrelation.
    Registers the model it decodes with (its decoder trains with this term)."""

    needs = ("nonid",)

    def __init__(
        self,
        model: FANNet,
        recon_weight: float = 1.0,
        align_weight: float = 1.0,
        disentangle_weight: float = 0.1,
        align: str = "moments",
    ):
        super().__init__()
        self.model = model
        self.recon_weight = checks.number("recon_weight", recon_weight, lo=0)
        self.align_weight = checks.number("align_weight", align_weight, lo=0)
        self.disentangle_weight = checks.number("disentangle_weight", disentangle_weight, lo=0)
        self.align = checks.choice("align", align, ALIGNMENTS)
        self.last: dict[str, float] = {}

    def parts(self, out, batch) -> dict[str, torch.Tensor]:
        low = batch.meta["low"].to(batch.images.device)
        if low.sum() != (~low).sum():
            raise ValueError("FANLoss needs a batch of [low; high] halves (ScaleAugment with fan=True)")
        z, nonid = out["embedding"], out["nonid"]
        paired = bool((batch.meta["pair"] >= 0).all())
        high_images = batch.images[~low]
        if paired:
            recon = self.model.reconstruct(z[low], nonid[low])
        else:  # no pairs: each high image from its own features
            recon = self.model.reconstruct(z[~low], nonid[~low])
        rec = F.l1_loss(recon, high_images)
        zl, zh = F.normalize(z[low], dim=1), F.normalize(z[~low], dim=1).detach()
        ali = moment_gap(zl, zh) if self.align == "moments" else mmd(zl, zh)
        dis = cross_correlation(z, nonid)
        return {"reconstruction": rec, "alignment": ali, "disentanglement": dis}

    def forward(self, out, batch) -> torch.Tensor:
        p = self.parts(out, batch)
        self.last = {k: float(v.detach()) for k, v in p.items()}
        return (
            self.recon_weight * p["reconstruction"]
            + self.align_weight * p["alignment"]
            + self.disentangle_weight * p["disentanglement"]
        )


def fit_decoder(
    model: FANNet,
    data,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 64,
    max_factor: float = 8.0,
    repeats: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[float]:
    """Fit `model.decoder` alone (the encoder frozen, in eval mode) by Adam: each training face of
    `data` degraded `repeats` times at random factors (log-uniform in [1, max_factor]), its
    features computed once, and the decoder trained for `steps` batches to reconstruct the
    full-resolution face from them (L1). Returns the loss of every step; the model ends in eval mode."""
    from tqdm.auto import tqdm

    checks.integer("steps", steps, lo=1)
    checks.number("lr", lr, above=0)
    checks.integer("batch_size", batch_size, lo=1)
    checks.number("max_factor", max_factor, lo=1)
    checks.integer("repeats", repeats, lo=1)
    g = torch.Generator().manual_seed(checks.integer("seed", seed, lo=0))
    model.eval()
    features, index = [], []
    with torch.no_grad():
        for _ in range(repeats):
            for start in range(0, len(data), 256):
                rows = torch.arange(start, min(start + 256, len(data)))
                images = data.batch(rows, device)[0]
                f = torch.exp(torch.rand(len(rows), generator=g) * math.log(max_factor))
                low = degrade(images, f.to(images.device))
                out = model.outputs(low)
                features.append(torch.cat([out["embedding"], out["nonid"]], 1))
                index.append(rows)
    features, index = torch.cat(features), torch.cat(index)
    opt = torch.optim.Adam(model.decoder.parameters(), lr=lr)
    model.decoder.train()
    losses = []
    for _ in tqdm(range(steps), desc="decoder", disable=not progress, leave=False):
        pick = torch.randint(len(features), (batch_size,), generator=g)
        f = features[pick.to(features.device)]
        target = data.batch(index[pick], device)[0]
        recon = model.reconstruct(f[:, : model.id_dim], f[:, model.id_dim :])
        loss = F.l1_loss(recon, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
