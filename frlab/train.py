"""Training, plain enough to read top to bottom.

    cfg = TrainConfig(epochs=5, batch_size=128, lr=0.1)
    trainer = Trainer(model, head, data, cfg, extra={"ddl": DDL()})
    history = trainer.fit()                     # resumes from cfg.checkpoint if it exists

One training step, `Trainer.train_step`:

    batch  = self.batch(index)              # images (flipped at random), labels, metadata, paired views
    batch  = transform(self, batch)         # each batch transform in turn: e.g. an attack on model and head
    out    = self.forward(batch)            # ONE forward: {"embedding", + what the terms need}
    losses = self.losses(out, batch)        # {"head": head(embedding, labels), name: term(out, batch), ...}
    sum(losses.values()).backward(), then the optimizer and the schedule step

* Extra loss terms are nn.Modules (or plain callables) `term(out, batch) -> scalar`. A term lists
  what it reads from `out` in its `needs`: the model's last feature map ("features", or anything
  else the model's `outputs` gives), the head's per-sample losses ("head_losses") or its margin
  logits ("logits", without gradient). All of it comes from the one forward.
* Model, head, terms and transforms are registered together in `trainer.net` (an nn.ModuleDict),
  with every module a term holds (a teacher, the head a pull refers to): `.to(device)`, checkpoints
  and the optimizer see each of them once. Frozen parameters (a teacher's) are not optimized.
* Paired views: `views={"high_res": other_data}` adds `batch.views["high_res"]`, the same samples
  of another data set of the same length (e.g. the same faces at full resolution), flipped alike.
* Deterministic: the batch order of epoch e and the RNG used inside it derive from (seed, e), so a
  run resumed from the checkpoint of epoch e ends with the same weights as an uninterrupted one.
* Checkpoints are written atomically after every epoch and loaded with weights_only=True.
* Under `torchrun` (a process group of W > 1 ranks, `frlab.distributed`) the same code trains one
  job: every rank draws the same global batches and takes its share of each, the backbone is
  wrapped in DDP, the head becomes this rank's `ShardedHead` (rows of the proxies; the loss is the
  global batch's), gradients are clipped by their global norm, and a checkpoint is a folder with
  one file per rank (its rows and their optimizer state) and a manifest: it loads at any world
  size. The backbone's BatchNorm statistics are each rank's own, as in every DDP job.
* `fit_cached` trains once per distinct (model, head, terms, data, config, code) and reloads
  afterwards, so notebooks share baselines; `finetune` does the same on copies of a trained model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checks, paths
from .hparams import code_digest, describe

HEAD_OUTPUTS = ("head_losses", "logits")  # what the head adds to a step's outputs, when a term needs it


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
        checks.integer("epochs", self.epochs, lo=1)
        checks.integer("batch_size", self.batch_size, lo=2)
        checks.number("lr", self.lr, above=0)
        checks.number("momentum", self.momentum, lo=0, below=1)
        checks.number("weight_decay", self.weight_decay, lo=0)
        checks.choice("optimizer", self.optimizer, ("sgd", "adamw"))
        checks.choice("schedule", self.schedule, ("cosine", "step", "constant"))
        checks.number("warmup_epochs", self.warmup_epochs, lo=0, hi=self.epochs)
        checks.number("head_lr_mult", self.head_lr_mult, lo=0)
        checks.flag("flip", self.flip)
        checks.choice("sampler", self.sampler, ("random", "pk", "mixed"))
        checks.integer("images_per_identity", self.images_per_identity, lo=1)
        checks.number("grad_clip", self.grad_clip, lo=0)
        checks.flag("amp", self.amp)
        checks.integer("seed", self.seed, lo=0)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must name a torch device ('cpu', 'cuda', 'cuda:1'), got {self.device!r}"
            ) from None

    def training(self) -> dict[str, Any]:
        """The fields that determine the trained weights (not where, how shown or checkpointed)."""
        return {k: v for k, v in asdict(self).items() if k not in ("device", "progress", "checkpoint")}


@dataclass
class Batch:
    """One training batch as the step sees it."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1], augmented
    labels: torch.Tensor  # (B,) int64
    meta: dict[str, torch.Tensor]  # per-sample metadata (on the CPU)
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # paired images of the same samples
    index: torch.Tensor | None = None  # the samples' positions in the data set

    def replace(self, **changes) -> Batch:
        return replace(self, **changes)


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
    for _ in range(n_batches):
        cls = torch.randperm(len(classes), generator=generator)[:p]
        n = counts[cls, None]
        keys = torch.rand(p, max(k, int(n.max())), generator=generator)
        keys[torch.arange(keys.shape[1]) >= n] = 2.0  # positions past a class's images sort last
        within = torch.argsort(keys, 1)[:, :k] % n  # distinct images; repeats only if n < k
        out.append(order[starts[cls, None] + within].reshape(-1))
    return out


def _labels(data) -> torch.Tensor:
    return data.meta["label"] if hasattr(data, "meta") else data.labels


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        data,
        cfg: TrainConfig | None = None,
        extra: Mapping[str, Callable] | None = None,
        transforms: Sequence[Callable] = (),
        views: Mapping[str, Any] | None = None,
        track: Mapping[str, Callable[[Trainer], float]] | None = None,
    ):
        from . import distributed

        self.cfg = cfg or TrainConfig()
        self.device = torch.device(self.cfg.device)
        self.rank, self.world = distributed.world()
        if self.world > 1:
            if extra or transforms or views:
                raise ValueError(
                    "under torch.distributed the Trainer trains a backbone and a head: extra terms, "
                    "transforms and views are single-process for now"
                )
            if not isinstance(head, distributed.ShardedHead):
                head = distributed.ShardedHead(head, seed=self.cfg.seed)  # grad_scale = W under DDP
        self.model, self.head, self.data = model, head, data
        self.extra, self.transforms = dict(extra or {}), list(transforms)
        self.views = dict(views or {})
        for name, view in self.views.items():
            if len(view) != len(data):
                raise ValueError(
                    f"view {name!r} has {len(view)} samples, the data {len(data)}: a view pairs sample by sample"
                )
        self.track = dict(track or {})
        self.needs = self._needs()
        modules = lambda items: nn.ModuleDict({str(k): v for k, v in items if isinstance(v, nn.Module)})  # noqa: E731
        self.net = nn.ModuleDict(
            {
                "model": model,
                "head": head,
                "extra": modules(self.extra.items()),
                "transforms": modules(enumerate(self.transforms)),
            }
        ).to(self.device)
        torch.manual_seed(self.cfg.seed)
        in_model = {id(p) for p in model.parameters()}
        rest = [p for p in self.net.parameters() if p.requires_grad and id(p) not in in_model]  # head, terms: each once
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad]},
            {"params": rest, "lr": self.cfg.lr * self.cfg.head_lr_mult},
        ]
        if self.cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(
                groups, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay
            )
        else:
            self.opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.steps_per_epoch = max(1, len(data) // self.cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.ddp = nn.parallel.DistributedDataParallel(model) if self.world > 1 else None
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, float]] = []  # one row per step

    def _needs(self) -> set[str]:
        needs = set()
        for term in self.extra.values():
            want = set(getattr(term, "needs", ()))
            if "embedding" in want:
                want.remove("embedding")
            needs |= want
        return needs

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

    # ------------------------------------------------------------------ the step
    def batches(self, epoch: int) -> list[torch.Tensor]:
        """The sample indices of each step of `epoch` (a pure function of seed and epoch)."""
        g = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch))
        b, k, n = self.cfg.batch_size, self.cfg.images_per_identity, self.steps_per_epoch
        labels = _labels(self.data)
        if self.cfg.sampler == "pk":
            return pk_batches(labels, b, k, g)[:n]
        if self.cfg.sampler == "mixed":  # random images first, then P x K (EKD's batches)
            if b < 2 * k:
                raise ValueError(f"a mixed batch of {b} has no room for P x K with K = {k}")
            n_pk = (b // 2) // k * k
            pk = pk_batches(labels, n_pk, k, g)  # at least n batches, as n_pk <= b
            perm = torch.randperm(len(self.data), generator=g)
            r = b - n_pk
            return [torch.cat([perm[i * r : (i + 1) * r], pk[i]]) for i in range(n)]
        perm = torch.randperm(len(self.data), generator=g)
        return [perm[i * b : (i + 1) * b] for i in range(n)]

    def batch(self, index: torch.Tensor) -> Batch:
        """The samples `index` on the device, with their paired views, flipped at random (alike)."""
        n = len(index)  # under torch.distributed: the global batch, of which this rank takes its share
        part = torch.arange(n).tensor_split(self.world)[self.rank] if self.world > 1 else None
        if part is not None:
            index = index[part]
        images, labels, meta = self.data.batch(index, self.device)
        views = {name: view.batch(index, self.device)[0] for name, view in self.views.items()}
        if self.cfg.flip:
            flip = torch.rand(n, device=self.device) < 0.5  # drawn for the global batch: ranks agree
            flip = (flip if part is None else flip[part.to(self.device)])[:, None, None, None]
            images = torch.where(flip, images.flip(3), images)
            views = {name: torch.where(flip, v.flip(3), v) for name, v in views.items()}
        return Batch(images, labels, meta, views, index)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One forward of the model: the embedding and whatever model outputs the terms need."""
        want = self.needs - set(HEAD_OUTPUTS)
        if self.ddp is not None:  # through DDP's forward, so that its backward averages the gradients
            return {"embedding": self.ddp(batch.images)}
        if hasattr(self.model, "outputs"):
            return self.model.outputs(batch.images, want)
        if want:
            who = [n for n, t in self.extra.items() if want & set(getattr(t, "needs", ()))]
            raise ValueError(
                f"terms {who} need {sorted(want)}, but {type(self.model).__name__} has no `outputs(x, want)`"
            )
        return {"embedding": self.model(batch.images)}

    def losses(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """The head's loss and every term's, each a scalar. Adds the head's per-sample losses and
        margin logits to `out` where a term needs them."""
        out["embedding"] = out["embedding"].float()
        reduction = "none" if "head_losses" in self.needs else "mean"
        if "logits" in self.needs:
            head_loss, out["logits"] = self.head(out["embedding"], batch.labels, reduction=reduction, with_logits=True)
        else:
            head_loss = self.head(out["embedding"], batch.labels, reduction=reduction)
        if reduction == "none":
            out["head_losses"], head_loss = head_loss, head_loss.mean()
        losses = {"head": head_loss}
        for name, term in self.extra.items():
            losses[name] = term(out, batch)
        return losses

    def train_step(self, index: torch.Tensor) -> dict[str, float]:
        batch = self.batch(index)
        for transform in self.transforms:
            batch = transform(self, batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            out = self.forward(batch)
        losses = self.losses(out, batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"loss became {total.item()} at step {self.step} (epoch {self.epoch}); lower the learning rate"
            )
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip > 0:
            self._clip_gradients()
        self.opt.step()
        self.sched.step()
        row = {"step": self.step, "epoch": self.epoch, "loss": total.item(), "lr": self.opt.param_groups[0]["lr"]}
        if len(losses) > 1:
            row.update({f"loss_{k}": v.item() for k, v in losses.items()})
        row.update({k: float(fn(self)) for k, fn in self.track.items()})
        return row

    def _clip_gradients(self) -> None:
        """Scale every gradient so that their global norm is at most cfg.grad_clip. Under
        torch.distributed the backbone's (averaged, the same on every rank) count once and the
        head's shards add up over ranks."""
        params = [p for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        if self.world == 1:
            nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            return
        from . import distributed

        shard = {id(p) for p in self.head.parameters()}
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        replicated = sum((p.grad.double().pow(2).sum() for p in params if id(p) not in shard), zero)
        own = sum((p.grad.double().pow(2).sum() for p in params if id(p) in shard), zero)
        total = torch.sqrt(replicated + distributed.all_sum(own))
        scale = (self.cfg.grad_clip / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(scale.to(p.grad.dtype))

    def fit(self) -> list[dict[str, float]]:
        """Train until cfg.epochs, resuming from cfg.checkpoint if it exists. Returns the history."""
        from tqdm.auto import tqdm

        ckpt = Path(self.cfg.checkpoint) if self.cfg.checkpoint else None
        if ckpt and (ckpt / "manifest.json" if ckpt.is_dir() else ckpt).exists():
            self.load(ckpt)
        self.net.train()
        total = self.cfg.epochs * self.steps_per_epoch
        quiet = not self.cfg.progress or self.rank > 0
        bar = tqdm(total=total, initial=self.step, desc="training", disable=quiet, leave=False)
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
        self.net.eval()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "config": asdict(self.cfg),
        }

    def save(self, path: str | Path) -> None:
        """Write a checkpoint atomically (a crash mid-write leaves the previous one intact). Under
        torch.distributed, `path` is a folder of shards (`distributed.save_sharded`)."""
        if self.world > 1 or Path(path).is_dir():
            from . import distributed

            distributed.save_sharded(self, path)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | Path) -> None:
        """Load a checkpoint: a file, or a folder of shards written at any world size."""
        if Path(path).is_dir():
            from . import distributed

            distributed.load_sharded(self, path)
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]


# ------------------------------------------------------------------ the model cache
def weights_digest(*modules: nn.Module) -> str:
    """A digest of the modules' parameters and buffers (names and bytes)."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(data) -> str:
    """What identifies a data set's samples: its `fingerprint` (frlab's data sets have one), else its repr."""
    return getattr(data, "fingerprint", "") or repr(data)


def cache_key(
    name: str,
    model: nn.Module,
    head: nn.Module,
    data,
    cfg: TrainConfig,
    extra: Mapping | None = None,
    transforms: Sequence = (),
    views: Mapping | None = None,
) -> str:
    """A digest of everything that determines the trained weights: every constructor argument of
    model, head, terms and transforms (`hparams.describe`), their starting weights (so a fine-tuning
    run is keyed by the model it starts from), the data, the training fields of the config, and the
    source of the code the training runs (`hparams.code_digest`: the trainer, the classes involved
    and the frlab modules they import; not figures or notebooks)."""
    extra, views = dict(extra or {}), dict(views or {})
    parts = [model, head, *extra.values(), *transforms]
    text = json.dumps(
        {
            "name": name,
            "code": code_digest(Trainer, data, *views.values(), *parts),
            "model": describe(model),
            "head": describe(head),
            "extra": {k: describe(t) for k, t in extra.items()},
            "transforms": [describe(t) for t in transforms],
            "weights": weights_digest(*[p for p in parts if isinstance(p, nn.Module)]),
            "data": fingerprint(data),
            "views": {k: fingerprint(v) for k, v in views.items()},
            "config": cfg.training(),
        },
        sort_keys=True,
        default=repr,
    )
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def fit_cached(
    name: str, model: nn.Module, head: nn.Module, data, cfg: TrainConfig, cache_dir: str | Path | None = None, **kw
) -> Trainer:
    """Train (or reload) model, head and terms. The cache file (under `paths.cache("models")` unless
    `cache_dir` is given) is keyed by `cache_key`; it is a finished checkpoint, so an interrupted
    training resumes where it stopped. `track` is not in the key (it changes no weight), but a
    cached run whose history lacks a tracked quantity is trained again, so the history has it.
    Keyword arguments go to `Trainer`."""
    key = cache_key(name, model, head, data, cfg, kw.get("extra"), kw.get("transforms", ()), kw.get("views"))
    path = Path(cache_dir if cache_dir is not None else paths.cache("models")) / f"{key}.pt"
    trainer = Trainer(model, head, data, replace(cfg, checkpoint=str(path)), **kw)
    if trainer.track and path.exists():
        history = torch.load(path, map_location="cpu", weights_only=True)["history"]
        if not all(k in row for row in history for k in trainer.track):
            path.unlink()
    trainer.fit()
    return trainer


def finetune(
    name: str, model: nn.Module, head: nn.Module, data, cfg: TrainConfig, cache_dir: str | Path | None = None, **kw
) -> Trainer:
    """`fit_cached` on copies of a trained model, its head and the terms (the originals stay as they
    are). They are copied together, so a term that refers to the head (`CentrePull(head)`) refers to
    the copy. The cache key includes the starting weights: each starting model gets its own copy."""
    extra, transforms = dict(kw.pop("extra", None) or {}), list(kw.pop("transforms", ()))
    model, head, extra, transforms = copy.deepcopy((model, head, extra, transforms))
    return fit_cached(name, model, head, data, cfg, cache_dir, extra=extra, transforms=transforms, **kw)
