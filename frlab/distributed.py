"""Scale out on torch.distributed: a sharded classifier, data-parallel backbones, checkpoints that
reshard, and a launcher. gloo on the CPU, NCCL on GPUs; only all_reduce, equal-shape all_gather and
broadcast, which both support. Without a process group (or with one rank) every collective here is
the identity, so the same code runs in one process.

The classifier is what outgrows one machine first (a million identities x 512 floats is 2 GB of
proxies, as much again in gradients and optimizer state, and a B x C block of logits per step), so
it is split by rows, model-parallel, while the backbone is replicated (DDP):

* rank r of W holds the proxies' rows [lo_r, hi_r): C // W of them, the first C % W ranks one more
  (`shard_range`);
* the batch's embeddings and labels are all-gathered (`gather_rows`: its backward sums the ranks'
  partial gradients and keeps this rank's rows, times `grad_scale`);
* every rank then computes the same scalar, the global batch's loss, from its own columns: the
  target cosine from the rank that owns each target, the softmax's sum of exponentials from per
  shard sums (`sum_partials`: an all-reduce whose backward is the identity, exact because its result
  is used only in the part of the loss every rank computes alike) and a max all-reduce (a
  stabilizer, without gradient);
* under DDP the backbone's gradients are averaged over the W ranks, but the loss is the global
  batch's: its gradient is the sum of the ranks' parts, hence `grad_scale = W`, the one subtle
  constant (the tests check both values).

`ShardedHead` does this for every frlab head, with the same loss and gradients as the single-process
head: NormFace, CosFace, ArcFace and CurricularFace (its t updated from the global batch, identical
on every rank), NPT (the k nearest negatives across shards) and CIFP (a global threshold). The
readable single-process heads (`frlab.heads`) are the reference it is tested against.

Partial FC (An et al., insightface's `partial_fc_v2.py`): with `sample_rate` < 1 a margin head keeps,
per step, the rows of the batch's targets and random other rows, `ceil(sample_rate * rows)` in all
on each rank; the loss is the head's over the kept classes only. As in Partial FC v2, unsampled rows
get a zero gradient, not none: SGD's momentum and weight decay keep moving them (v1 froze them, a
different optimizer).
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checks, heads
from .hparams import HParams

TIMEOUT_S = 120.0  # a collective that waits longer ends the job with an error, never a silent hang


# ---------------------------------------------------------------- the process group
def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return world()[1] > 1


def init(backend: str | None = None, timeout_s: float = TIMEOUT_S) -> tuple[int, int]:
    """Join the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); gloo on the CPU, NCCL where CUDA is available. A single process
    (no RANK) joins nothing. Returns (rank, world size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return world()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return world()


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank `rank`: C // W rows each, the first C % W ranks one more."""
    checks.integer("world_size", world_size, lo=1)
    checks.integer("rank", rank, lo=0, hi=world_size - 1)
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be split over {world_size} ranks")
    base, extra = divmod(num_classes, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


# ---------------------------------------------------------------- collectives with gradients
def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    if not active():  # one process: every collective is the identity
        return [t]
    out = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(out, t.contiguous())
    return out


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local batch size."""
    return [int(s) for s in _all_gather(torch.tensor([n], device=device))]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows (rank r has sizes[r] of them), concatenated in rank order, without
    gradient: padded to the largest for the equal-shape all_gather."""
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: len(t)] = t
    return torch.cat([part[:n] for part, n in zip(_all_gather(padded), sizes)])


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order (local batches may differ in size: padded to the
    largest for the equal-shape all_gather). Backward: the ranks' partial gradients summed, this
    rank's rows kept, times grad_scale."""

    @staticmethod
    def forward(ctx, x, sizes, grad_scale):
        rank, _ = world()
        ctx.lo, ctx.n, ctx.grad_scale = sum(sizes[:rank]), len(x), grad_scale
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        if active():
            dist.all_reduce(grad)
        return grad[ctx.lo : ctx.lo + ctx.n] * ctx.grad_scale, None, None


def gather_rows(x: torch.Tensor, grad_scale: float = 1.0, sizes: list[int] | None = None) -> torch.Tensor:
    """The global batch from every rank's rows, differentiable (see `_GatherRows`); `sizes`, every
    rank's row count, where the caller has them already."""
    sizes = gather_sizes(len(x), x.device) if sizes is None else sizes
    return _GatherRows.apply(x, sizes, grad_scale)


class _SumPartials(torch.autograd.Function):
    """An all-reduce sum whose backward is the identity: exact where the sum is used only in the
    part of the loss that every rank computes alike (each rank then differentiates its own part)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        if active():
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def sum_partials(x: torch.Tensor) -> torch.Tensor:
    return _SumPartials.apply(x)


def all_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise max over ranks, without gradient."""
    x = x.detach().clone()
    if active():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks, without gradient."""
    x = x.detach().clone()
    if active():
        dist.all_reduce(x)
    return x


def global_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of every rank's `values` (rows of any length), row by row, without gradient:
    each rank's own top-k (padded with -inf) all-gathered, then the top-k of those. (B, k)."""
    local = values.new_full((len(values), k), float("-inf"))
    n = min(k, values.shape[1])
    local[:, :n] = values.detach().topk(n, dim=1).values
    return torch.cat(_all_gather(local), 1).topk(k, dim=1).values


# ---------------------------------------------------------------- the sharded head
class ShardedHead(HParams, nn.Module):
    """This rank's shard of `head` (an frlab head built alike on every rank, e.g. from one seed):
    `weight` holds its rows [lo, hi) and `head` keeps the hyper-parameters and state (CurricularFace's
    t). `loss = sharded(embeddings, labels)` takes this rank's samples and returns the global
    batch's loss, the same on every rank and equal to `head(all embeddings, all labels)`."""

    def __init__(self, head: heads.Head, grad_scale: float | None = None, sample_rate: float = 1.0, seed: int = 0):
        super().__init__()
        if not isinstance(head, (heads.MarginHead, heads.NPT, heads.CIFP)):
            raise TypeError(f"no sharded form of {type(head).__name__} (margin heads, NPT and CIFP have one)")
        rank, size = world()
        self.num_classes, self.in_features = head.num_classes, head.in_features
        self.lo, self.hi = shard_range(head.num_classes, size, rank)
        self.grad_scale = float(size if grad_scale is None else checks.number("grad_scale", grad_scale, above=0))
        self.sample_rate = checks.number("sample_rate", sample_rate, above=0, hi=1)
        if sample_rate < 1 and not isinstance(head, heads.MarginHead):
            raise ValueError(f"Partial FC sampling is for the margin heads, not {type(head).__name__}")
        self.seed, self.step = checks.integer("seed", seed, lo=0), 0
        self.head = head
        head.weight = nn.Parameter(head.weight.detach()[self.lo : self.hi].clone())

    @property
    def weight(self) -> nn.Parameter:
        return self.head.weight

    def forward(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The global batch's loss ("mean", "sum") or its per-sample losses ("none": every rank's
        samples in rank order), from this rank's samples x (b, D) and labels (b,)."""
        checks.choice("reduction", reduction, heads.REDUCTIONS)
        bad = x.dim() != 2 or x.shape[-1] != self.in_features or labels.shape != x.shape[:1]
        bad = bad or bool(((labels < 0) | (labels >= self.num_classes)).any())
        if all_sum(torch.tensor([float(bad)], device=x.device)) > 0:  # every rank decides alike: no hang
            raise ValueError(
                f"every rank needs embeddings (batch, {self.in_features}) and as many labels in "
                f"[0, {self.num_classes}); rank {world()[0]}: {tuple(x.shape)}, {tuple(labels.shape)}"
            )
        x = self.head._input(x)
        sizes = gather_sizes(len(x), x.device)
        X = gather_rows(x, self.grad_scale, sizes)
        y = _gather_padded(labels.to(torch.int64), sizes)
        acc = heads.accumulation_dtype(self.weight.dtype)
        xn = F.normalize(X, dim=1)
        rows = self._rows(y)
        cos = F.linear(xn, F.normalize(self.weight[rows], dim=1)).to(acc)
        own = (y >= self.lo) & (y < self.hi)
        col = torch.searchsorted(rows, (y - self.lo).clamp(0, self.hi - self.lo - 1))
        col = col.clamp(max=len(rows) - 1)
        target_col = F.one_hot(col, len(rows)).bool() & own[:, None]
        c_part = torch.where(own, cos.gather(1, col[:, None]).squeeze(1), torch.zeros((), dtype=acc))
        c = sum_partials(c_part)  # the target cosine, its gradient on the owner
        h = self.head
        if isinstance(h, heads.NPT):
            losses = self._npt(cos, c, target_col)
        elif isinstance(h, heads.CIFP):
            losses = self._cifp(xn, rows, cos, c, own, col, target_col)
        else:
            if self.training:
                h.update(c.detach().clamp(-1, 1))
            T = h.s * h.target(c)
            losses = self._softmax(h.s * h.negatives(cos, c), T, target_col)
        self.step += self.training
        return heads._reduce(losses, reduction)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        """The local rows this step uses: all of them, or (Partial FC) the targets' and random others."""
        n = self.hi - self.lo
        if self.sample_rate >= 1:
            return torch.arange(n, device=y.device)
        keep = max(1, math.ceil(self.sample_rate * n))
        own = y[(y >= self.lo) & (y < self.hi)] - self.lo
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 7919 + world()[0])
        score = torch.rand(n, generator=g).to(y.device)
        score[own] = 2.0  # positives first, always kept
        return score.topk(max(keep, len(torch.unique(own)))).indices.sort().values

    @staticmethod
    def _softmax(logits: torch.Tensor, T: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy of the target logits T (B,), the same on every rank, against
        this rank's other logits (B, local): m + log(e^(T - m) + sum over ranks of
        sum_j e^(logit_j - m)) - T, m a max over every rank (a stabilizer, without gradient)."""
        logits = logits.masked_fill(target_col, float("-inf"))
        m = torch.maximum(all_max(logits.max(1).values), T.detach())
        S = sum_partials(torch.exp(logits - m[:, None]).sum(1))
        return m + torch.log(torch.exp(T - m) + S) - T

    def _npt(self, cos, c, target_col) -> torch.Tensor:
        """NPT: the k nearest negatives across shards. The selection and the hinge's active set come
        from values every rank has (no gradient); the loss is then linear in the selected cosines
        (summed over ranks) and in c, whose gradient reaches the target's owner."""
        h = self.head
        neg = cos.masked_fill(target_col, float("-inf"))
        kth = global_top(neg, h.k)[:, -1:]  # the k-th nearest negative, every rank
        # ties at the k-th value are measure-zero for real inputs; the test's random inputs have none
        chosen = neg >= kth
        active = chosen & (neg.detach() - c.detach()[:, None] + h.inner_margin > 0)
        n_active = all_sum(active.sum(1).to(cos.dtype))
        near = sum_partials(torch.where(active, neg, torch.zeros((), dtype=cos.dtype)).sum(1))
        return 2 * h.r**2 * (near - n_active * (c.clamp(-1, 1) - h.inner_margin))

    def _cifp(self, xn, rows, cos, c, own, col, target_col) -> torch.Tensor:
        """CIFP: the unified threshold over every rank's candidates, then the code form's penalty
        from partial sums, or the paper form's shift from all-reduced counts."""
        h = self.head
        c_det = c.detach()
        pool = ~target_col & (cos.detach() <= c_det[:, None]) if h.form == "code" else ~target_col
        n_pool = int(all_sum(pool.sum().to(torch.float64)))
        k = math.ceil(h.far * n_pool - 1e-9)
        if k > 0:
            t_u = global_top(torch.where(pool, cos.detach(), float("-inf")).view(1, -1), k)[0, -1]
            fp = pool & (cos.detach() > t_u)
        else:
            fp = torch.zeros_like(pool)
        count = all_sum(fp.sum(1).to(cos.dtype))
        if h.form == "paper":
            shift = h._shift(count)  # from the global counts
            return self._softmax(h.s * cos + shift[:, None], h.s * (c - h.m), target_col)
        # the code form's routing: a false positive's cosine at or above cos_y - m, and (1 + cos_y),
        # reach the embedding only (their proxies detached); both from the rows they need only
        xn = xn.to(cos.dtype)
        unit = lambda cols: F.normalize(self.weight.detach()[rows[cols]], dim=1).to(cos.dtype)  # noqa: E731
        i, j = fp.nonzero(as_tuple=True)
        cos_fp = cos[i, j]
        v = torch.where(cos_fp.detach() < c_det[i] - h.m, cos_fp, (xn[i] * unit(j)).sum(1))
        mean_sq = sum_partials(torch.zeros_like(c).index_add(0, i, v * v)) / count.clamp(min=1)
        c_x = sum_partials(torch.where(own, (xn * unit(col)).sum(1), torch.zeros_like(c)))
        p = (1 + c_x.clamp(-1, 1)) * mean_sq
        return self._softmax(h.s * cos, h.s * (c - h.m - p), target_col)


# ---------------------------------------------------------------- checkpoints that reshard
def _inner(head: nn.Module) -> tuple[nn.Module, int, int]:
    """(the frlab head, lo, hi): a ShardedHead's rows, or a whole head's."""
    if isinstance(head, ShardedHead):
        return head.head, head.lo, head.hi
    return head, 0, head.num_classes


def _weight_index(trainer) -> int:
    """The head weight's position in the optimizer's state (after the backbone's parameters)."""
    flat = [p for g in trainer.opt.param_groups for p in g["params"]]
    return next(i for i, p in enumerate(flat) if p is _inner(trainer.head)[0].weight)


def _barrier(device) -> None:
    all_sum(torch.zeros(1, device=device))


def save_sharded(trainer, path: str | Path) -> None:
    """A Trainer's checkpoint as a folder: one file per rank (its rows [lo, hi) of the proxies and
    their optimizer state), one of what every rank shares (backbone, head state such as t,
    optimizer and schedule, epoch, history; written by rank 0), and `manifest.json`, which names
    them and is replaced last, atomically: a crash mid-save leaves the previous checkpoint whole.
    Every rank must see the folder (one machine, or a shared file system)."""
    import json

    rank, size = world()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    inner, lo, hi = _inner(trainer.head)
    opt = trainer.opt.state_dict()
    shard_state = opt["state"].pop(_weight_index(trainer), {})
    tag = f"step{trainer.step}"
    files = [f"{tag}-shard{r}-of-{size}.pt" for r in range(size)]
    shard = {"range": (lo, hi), "num_classes": inner.num_classes, "weight": inner.weight.detach(), "state": shard_state}
    torch.save(shard, path / files[rank])
    if rank == 0:
        common = {
            "model": trainer.model.state_dict(),
            "head": {k: v for k, v in inner.state_dict().items() if k != "weight"},
            "optimizer": opt,
            "scheduler": trainer.sched.state_dict(),
            "epoch": trainer.epoch,
            "step": trainer.step,
            "history": trainer.history,
        }
        torch.save(common, path / f"{tag}-common.pt")
    ranges = _all_gather(torch.tensor([lo, hi], device=trainer.device))  # also every rank's file is written

    if rank == 0:
        manifest = {"world_size": size, "num_classes": inner.num_classes, "step": trainer.step}
        manifest |= {"ranges": [r.tolist() for r in ranges], "shards": files, "common": f"{tag}-common.pt"}
        tmp = path / f"manifest.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path / "manifest.json")
        for old in path.glob("step*.pt"):  # the previous checkpoint's files
            if old.name not in files and old.name != manifest["common"]:
                old.unlink()
    _barrier(trainer.device)


def load_sharded(trainer, path: str | Path) -> None:
    """Load a folder written by `save_sharded` at any world size (this one's included, or a single
    process): each rank assembles its rows, and their optimizer state, from the shards that
    overlap them."""
    import json

    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    inner, lo, hi = _inner(trainer.head)
    if manifest["num_classes"] != inner.num_classes:
        raise ValueError(f"the checkpoint has {manifest['num_classes']} classes, the head {inner.num_classes}")
    load = lambda name: torch.load(path / name, map_location=trainer.device, weights_only=True)  # noqa: E731
    rows, state = [], {}
    for (a, b), name in zip(manifest["ranges"], manifest["shards"]):
        if b <= lo or a >= hi:
            continue
        shard = load(name)
        cut = slice(max(a, lo) - a, min(b, hi) - a)
        rows.append(shard["weight"][cut])
        for k, v in shard["state"].items():
            if torch.is_tensor(v) and v.shape == shard["weight"].shape:  # per row: momentum, Adam's moments
                state.setdefault(k, []).append(v[cut])
            else:  # shared: Adam's step count
                state.setdefault(k, v)
    common = load(manifest["common"])
    trainer.model.load_state_dict(common["model"])
    inner.load_state_dict({**common["head"], "weight": torch.cat(rows)})
    opt = common["optimizer"]
    if state:
        opt["state"][_weight_index(trainer)] = {k: torch.cat(v) if isinstance(v, list) else v for k, v in state.items()}
    trainer.opt.load_state_dict(opt)
    trainer.sched.load_state_dict(common["scheduler"])
    trainer.epoch, trainer.step, trainer.history = common["epoch"], common["step"], common["history"]
    if isinstance(trainer.head, ShardedHead):
        trainer.head.step = trainer.step


# ---------------------------------------------------------------- running W processes
def _worker(rank: int, world_size: int, init_file: str, timeout_s: float, fn: Callable, args: tuple, out: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(*args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # what fn left holding the process group (a DistributedDataParallel sits in a reference
        # cycle) goes now, not at exit after the group is gone: gloo aborted the process there
        gc.collect()
    except BaseException:  # written before this process exits, so before its peers see it gone
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args, timeout_s: float = TIMEOUT_S) -> list:
    """Run `fn(*args)` on `world_size` CPU processes joined by gloo (spawned; a file rendezvous, no
    port) and return each rank's result, in rank order. `fn` must be importable (defined in a
    module, not a notebook cell). A rank that raises ends the job: the others are stopped, and its
    error is raised here; a collective that waits longer than `timeout_s` fails."""
    import torch.multiprocessing as mp

    checks.integer("world_size", world_size, lo=1)
    with tempfile.TemporaryDirectory(prefix="frlab-launch-") as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        try:
            mp.spawn(_worker, (world_size, init_file, timeout_s, fn, args, tmp), nprocs=world_size, join=True)
        except Exception:
            errors = {int(p.stem[4:]): p.read_text().strip() for p in Path(tmp).glob("rank*.err")}
            if not errors:
                raise
            # the cause first: a rank whose own code failed, not one that lost its peer in a collective
            lost = ("Connection reset", "Connection closed", "gloo", "NCCL", "DistBackendError")
            cause = min(errors, key=lambda r: (any(w in errors[r] for w in lost), r))
            every = "; ".join(f"rank {r}: {text.splitlines()[-1]}" for r, text in sorted(errors.items()))
            raise RuntimeError(f"rank {cause} failed:\n{errors[cause]}\n(every failing rank: {every})") from None
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
