"""`python -m frlab train`: one training job from a config, on one process or many.

    python -m frlab train --head arcface --identities 200 --epochs 4
    torchrun --standalone --nproc_per_node 2 -m frlab train --config job.json

The same command and config run single-process or under `torchrun` (`frlab.distributed`: the
backbone data-parallel, the head's proxies sharded over the ranks). A config is a JSON file of
`JobConfig`'s fields; flags override it. Rank 0 writes the run folder (runs/train/<time>/:
params.json with the config, world size and versions; metrics.json with the loss and the held-out
verification), and the checkpoint folder, given with --checkpoint, resumes the job at any world
size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checks

HELP = {
    "backbone": "IR-ResNet architecture (ir8, ir18, ...)",
    "width": "channel width factor of the backbone",
    "embedding_size": "embedding dimension",
    "head": "head name (normface, cosface, arcface, curricularface, npt, cifp)",
    "head_args": 'head hyper-parameters as JSON, e.g. \'{"s": 32, "m": 0.4}\'',
    "sample_rate": "Partial FC: fraction of each rank's proxies a step uses (margin heads, under torchrun)",
    "identities": "SynthFaces training identities",
    "test_identities": "held-out identities for the verification at the end",
    "images_per_identity": "images per identity",
    "size": "image side in pixels (a multiple of 8)",
    "epochs": "epochs",
    "batch_size": "global batch size (split over the ranks)",
    "lr": "learning rate (SGD)",
    "grad_clip": "clip gradients to this global norm (0: off)",
    "seed": "seed of data, weights and batches",
    "checkpoint": "checkpoint folder: written every epoch, resumed from when it exists",
    "out": "run folder (default runs/train/<time>)",
}


@dataclass
class JobConfig:
    backbone: str = "ir8"
    width: float = 0.5
    embedding_size: int = 64
    head: str = "arcface"
    head_args: dict = field(default_factory=lambda: {"s": 16.0})
    sample_rate: float = 1.0
    identities: int = 100
    test_identities: int = 20
    images_per_identity: int = 6
    size: int = 32
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.1
    grad_clip: float = 0.0
    seed: int = 0
    checkpoint: str = ""
    out: str = ""

    def __post_init__(self):
        checks.integer("embedding_size", self.embedding_size, lo=1)
        checks.number("sample_rate", self.sample_rate, above=0, hi=1)
        checks.integer("identities", self.identities, lo=2)
        checks.integer("test_identities", self.test_identities, lo=2)
        checks.integer("images_per_identity", self.images_per_identity, lo=2)
        checks.integer("size", self.size, lo=16)
        if not isinstance(self.head_args, dict):
            raise ValueError(f"head_args must be a JSON object, got {self.head_args!r}")
        self.train_config(progress=False)  # its checks and the head's, before any data is rendered
        from . import heads

        heads.make_head(self.head, self.embedding_size, self.identities, **self.head_args)

    def train_config(self, progress: bool):
        from . import train

        return train.TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            grad_clip=self.grad_clip,
            warmup_epochs=min(1, self.epochs),
            seed=self.seed,
            checkpoint=self.checkpoint,
            progress=progress,
        )


def parse(argv: list[str]) -> JobConfig:
    ap = argparse.ArgumentParser(prog="python -m frlab train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, help="a JSON file of the fields below")
    for f in dataclasses.fields(JobConfig):
        kind = json.loads if f.name == "head_args" else type(f.default)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = json.dumps(default) if isinstance(default, dict) else default
        ap.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None, help=f"{HELP[f.name]} ({shown!r})"
        )
    args = ap.parse_args(argv)
    values = json.loads(args.config.read_text()) if args.config else {}
    unknown = set(values) - {f.name for f in dataclasses.fields(JobConfig)}
    if unknown:
        raise ValueError(f"unknown fields in {args.config}: {', '.join(sorted(unknown))}")
    values |= {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return JobConfig(**values)


def run(cfg: JobConfig) -> dict:
    """Train and evaluate; the metrics (on every rank; rank 0 writes them)."""
    import pandas
    import torch

    from . import distributed, experiment, heads, models, paths, record, runner, train

    rank, world = distributed.init()
    record.seed_everything(cfg.seed)
    split = experiment.synth_split(
        cfg.identities, cfg.test_identities, cfg.images_per_identity, cfg.seed, size=cfg.size, progress=rank == 0
    )
    torch.manual_seed(cfg.seed)  # the same starting weights on every rank
    model = models.iresnet(cfg.backbone, cfg.width, input_size=cfg.size, embedding_size=cfg.embedding_size)
    head = heads.make_head(cfg.head, cfg.embedding_size, split.train.num_classes, **cfg.head_args)
    if world > 1:
        head = distributed.ShardedHead(head, sample_rate=cfg.sample_rate, seed=cfg.seed)
    elif cfg.sample_rate < 1:
        raise ValueError("sample_rate < 1 (Partial FC) samples each rank's proxies: run under torchrun")
    tcfg = cfg.train_config(progress=rank == 0)
    start = time.time()
    trainer = train.Trainer(model, head, split.train, tcfg)
    trainer.fit()
    metrics = {"world_size": world, "train_s": time.time() - start, "final_loss": trainer.history[-1]["loss"]}
    if rank == 0:
        report, _ = experiment.Evaluation(split.test, orl=False).evaluate(trainer.model)
        metrics |= {f"{k}_{m}": v for k, r in report.items() for m, v in r.items() if m in ("auc", "tpr@fpr=1e-02")}
        out = Path(cfg.out) if cfg.out else paths.runs() / "train" / time.strftime("%Y%m%d-%H%M%S")
        run_ = record.Run(out, "train")
        (out / "params.json").write_text(
            json.dumps({**dataclasses.asdict(cfg), **runner.versions(), "world_size": world}, indent=1)
        )
        run_.log(headline=True, **metrics)
        run_.table("history", pandas.DataFrame(trainer.history), "the loss of every step", ".4f")
        print(json.dumps(metrics, indent=1))
        print(f"run folder: {out}")
    return metrics


def main(argv: list[str]) -> int:
    try:
        cfg = parse(argv)
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(cfg)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
