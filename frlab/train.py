"""A small trainer any notebook can drive.

    cfg = TrainConfig(epochs=5, batch_size=128, lr=0.1)
    trainer = Trainer(model, head, data, cfg, extra={"ddl": ddl_term})
    history = trainer.fit()                     # resumes from cfg.checkpoint if it exists

* One optimizer over the model, the head and any extra term that has parameters.
* Extra loss terms are callables `term(embeddings, labels, meta) -> scalar`, added to the head's
  loss; each is logged under its name. `meta` holds the batch's metadata and, under "images", the
  augmented images the model saw (a distillation term runs its teacher on them).
* Deterministic: the batch order of epoch e and the RNG used inside it derive from (seed, e), so a
  run resumed from the checkpoint of epoch e ends with the same weights as an uninterrupted one.
* Checkpoints are written atomically after every epoch and loaded with weights_only=True.
* `fit_cached` trains once per distinct (model, head, data, config) and reloads afterwards, so that
  notebooks share baselines instead of retraining them; `finetune` does the same on copies of a
  trained model (keyed by its weights), for the notebooks that fine-tune one baseline two ways.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

CACHE = Path(__file__).resolve().parents[1] / "data" / "cache" / "models"


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" or "adamw"
    schedule: str = "cosine"  # "cosine", "step" (x0.1 at 60% and 85%) or "constant"
    warmup_epochs: float = 0.0
    head_lr_mult: float = 1.0  # learning rate of head and extra terms, relative to lr
    flip: bool = True  # random horizontal flips
    sampler: str = "random"  # "random", "pk" (P identities x K images) or "mixed" (half random, half P x K)
    images_per_identity: int = 4  # K of the P x K sampler
    grad_clip: float = 0.0  # 0 disables
    amp: bool = False  # bf16 autocast (on CUDA, and on CPU where supported)
    seed: int = 0
    device: str = "cpu"
    checkpoint: str = ""  # path; "" disables checkpoints
    progress: bool = True

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if self.sampler not in ("random", "pk", "mixed"):
            raise ValueError(f"sampler must be 'random', 'pk' or 'mixed', got {self.sampler!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("need epochs >= 1 and batch_size >= 2")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def pk_batches(labels: torch.Tensor, batch_size: int, k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Batches of P = batch_size // k distinct identities x k distinct images each (an identity
    with fewer than k images repeats some). Identities are drawn uniformly for each batch."""
    if batch_size % k:
        raise ValueError(f"batch_size {batch_size} must be a multiple of images_per_identity {k}")
    p = batch_size // k
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) < p:
        raise ValueError(f"P x K sampling needs at least {p} identities, the data has {len(classes)}")
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    n_batches = max(1, len(labels) // batch_size)
    out = []
    for b in range(n_batches):
        cls = torch.randperm(len(classes), generator=generator)[:p]
        n = counts[cls, None]
        keys = torch.rand(p, max(k, int(n.max())), generator=generator)
        keys[torch.arange(keys.shape[1]) >= n] = 2.0  # positions past a class's images sort last
        within = torch.argsort(keys, 1)[:, :k] % n  # distinct images; repeats only if n < k
        out.append(order[starts[cls, None] + within].reshape(-1))
    return out


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        data,
        cfg: TrainConfig | None = None,
        extra: Mapping[str, Callable] | None = None,
        track: Mapping[str, Callable[["Trainer"], float]] | None = None,
    ):
        self.cfg = cfg or TrainConfig()
        self.device = torch.device(self.cfg.device)
        self.model, self.head, self.data = model.to(self.device), head.to(self.device), data
        self.extra = dict(extra or {})
        for term in self.extra.values():
            if isinstance(term, nn.Module):
                term.to(self.device)
        self.track = dict(track or {})
        torch.manual_seed(self.cfg.seed)
        head_params = list(head.parameters()) + [p for t in self.extra.values() if isinstance(t, nn.Module) for p in t.parameters()]
        groups = [
            {"params": list(model.parameters())},
            {"params": head_params, "lr": self.cfg.lr * self.cfg.head_lr_mult},
        ]
        if self.cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.steps_per_epoch = max(1, len(data) // self.cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, float]] = []  # one row per step

    def _lr_factor(self, step: int) -> float:
        total = self.cfg.epochs * self.steps_per_epoch
        warm = self.cfg.warmup_epochs * self.steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1.0, total - warm)
        if self.cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        if self.cfg.schedule == "step":
            return 0.1 ** ((frac >= 0.6) + (frac >= 0.85))
        return 1.0

    # ------------------------------------------------------------------ batches
    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch))
        b, k, n = self.cfg.batch_size, self.cfg.images_per_identity, self.steps_per_epoch
        labels = self.data.meta["label"] if hasattr(self.data, "meta") else self.data.labels
        if self.cfg.sampler == "pk":
            return pk_batches(labels, b, k, g)[:n]
        if self.cfg.sampler == "mixed":  # random images first, then P x K (EKD's batches)
            if b < 2 * k:
                raise ValueError(f"a mixed batch of {b} has no room for P x K with K = {k}")
            n_pk = (b // 2) // k * k
            pk = pk_batches(labels, n_pk, k, g)  # at least n batches, as n_pk <= b
            perm = torch.randperm(len(self.data), generator=g)
            r = b - n_pk
            return [torch.cat([perm[i * r:(i + 1) * r], pk[i]]) for i in range(n)]
        perm = torch.randperm(len(self.data), generator=g)
        return [perm[i * b:(i + 1) * b] for i in range(n)]

    def train_step(self, index: torch.Tensor) -> dict[str, float]:
        images, labels, meta = self.data.batch(index, self.device)
        if self.cfg.flip:
            flip = torch.rand(len(images), device=self.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            emb = self.model(images)
        emb = emb.float()
        losses = {"head": self.head(emb, labels)}
        meta = {**meta, "images": images}  # the augmented batch, for terms that need it (distillation)
        for name, term in self.extra.items():
            losses[name] = term(emb, labels, meta)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} at step {self.step} (epoch {self.epoch}); lower the learning rate")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        row = {"step": self.step, "epoch": self.epoch, "loss": total.item(), "lr": self.opt.param_groups[0]["lr"]}
        if len(losses) > 1:
            row.update({f"loss_{k}": v.item() for k, v in losses.items()})
        row.update({k: float(fn(self)) for k, fn in self.track.items()})
        return row

    def fit(self) -> list[dict[str, float]]:
        """Train until cfg.epochs, resuming from cfg.checkpoint if it exists. Returns the history."""
        from tqdm.auto import tqdm

        ckpt = Path(self.cfg.checkpoint) if self.cfg.checkpoint else None
        if ckpt and ckpt.exists():
            self.load(ckpt)
        self.model.train()
        self.head.train()
        total = self.cfg.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=self.step, desc="training", disable=not self.cfg.progress, leave=False)
        while self.epoch < self.cfg.epochs:
            torch.manual_seed(_epoch_seed(self.cfg.seed, self.epoch) + 1)  # flips, dropout
            for index in self.batches(self.epoch):
                row = self.train_step(index)
                self.history.append(row)
                self.step += 1
                bar.update(1)
                bar.set_postfix(epoch=self.epoch, loss=f"{row['loss']:.3f}", refresh=False)
            self.epoch += 1
            if ckpt:
                self.save(ckpt)
        bar.close()
        self.model.eval()
        self.head.eval()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "extra": {k: t.state_dict() for k, t in self.extra.items() if isinstance(t, nn.Module)},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "config": asdict(self.cfg),
        }

    def save(self, path: str | Path) -> None:
        """Write a checkpoint atomically (a crash mid-write leaves the previous one intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        for k, sd in state["extra"].items():
            self.extra[k].load_state_dict(sd)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]


def _source_digest() -> str:
    """A digest of frlab's own code: cached models are retrained when the code that made them changes."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def weights_digest(*modules: nn.Module) -> str:
    """A digest of the modules' parameters and buffers (names and bytes)."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(name: str, model: nn.Module, head: nn.Module, data, cfg: TrainConfig, extra: Mapping | None = None) -> str:
    """A digest of everything that determines the trained weights (not device or progress bars):
    frlab's source code, the architectures and their starting weights (so a fine-tuning run is
    keyed by the model it starts from), the data, the config and the extra terms."""
    c = {k: v for k, v in asdict(cfg).items() if k not in ("device", "progress", "checkpoint")}
    extra = dict(extra or {})
    text = json.dumps(
        [name, _source_digest(), repr(model), repr(head), weights_digest(model, head, *[t for t in extra.values() if isinstance(t, nn.Module)]),
         getattr(data, "fingerprint", repr(data)), c, sorted(extra.items(), key=str)],
        default=repr,
    )
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def fit_cached(name: str, model: nn.Module, head: nn.Module, data, cfg: TrainConfig, cache_dir: str | Path = CACHE, **kw) -> Trainer:
    """Train (or reload) model and head. The cache file is keyed by `cache_key`; it is a finished
    checkpoint, so an interrupted training resumes where it stopped."""
    path = Path(cache_dir) / f"{cache_key(name, model, head, data, cfg, kw.get('extra'))}.pt"
    cfg = TrainConfig(**{**asdict(cfg), "checkpoint": str(path)})
    trainer = Trainer(model, head, data, cfg, **kw)
    trainer.fit()
    return trainer


def finetune(name: str, model: nn.Module, head: nn.Module, data, cfg: TrainConfig, cache_dir: str | Path = CACHE, **kw) -> Trainer:
    """`fit_cached` on copies of a trained model and head (the originals stay as they are); the
    cache key includes the starting weights, so each starting model gets its own fine-tuned copy."""
    return fit_cached(name, copy.deepcopy(model), copy.deepcopy(head), data, cfg, cache_dir, **kw)
