"""frlab.distributed on gloo, spawned from pytest: every sharded head against the single-process head
(float64, uneven shards and uneven local batches), the backbone's gradient factor under DDP,
checkpoints resharded to another world size, and a failing rank."""

import copy

import pytest
import torch

from frlab import distributed, heads

B, D, C = 7, 5, 7  # C = 7 over 2 or 3 ranks: shards of 4 + 3 or 3 + 2 + 2; local batches alike


def make_heads():
    """name -> a float64 head, the same on every rank (one seed)."""
    torch.manual_seed(0)
    out = {
        "normface": heads.NormFace(D, C, s=8.0),
        "cosface": heads.CosFace(D, C, s=8.0, m=0.35),
        "arcface": heads.ArcFace(D, C, s=8.0, m=0.5),
        "curricularface": heads.CurricularFace(D, C, s=8.0, m=0.5, t_momentum=0.5),
        "npt_k1": heads.NPT(D, C, k=1),
        "npt_k3": heads.NPT(D, C, k=3),  # more than a 2-row shard holds
        "cifp_code": heads.CIFP(D, C, s=8.0, far=0.15),
        "cifp_paper": heads.CIFP(D, C, s=8.0, form="paper", far=0.15),
    }
    out["curricularface"].t.fill_(0.3)  # hard negatives matter
    return {k: h.double() for k, h in out.items()}


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 6, 1, 5, 4])  # one sample per class for some, targets on every shard
    return x, labels


def head_battery():
    """On each rank: every head's sharded loss and gradients for this rank's samples and rows, with
    every proxy (sample rate 1) and with Partial FC's sampling (0.5, the margin heads)."""
    rank, size = distributed.world()
    x, labels = inputs()
    part = torch.arange(B).tensor_split(size)[rank]
    out = {1.0: {}, 0.5: {}}
    for rate, found in out.items():
        for name, head in make_heads().items():
            if rate < 1 and not name.startswith(("cosface", "arcface")):
                continue
            sharded = distributed.ShardedHead(head, grad_scale=1.0, sample_rate=rate, seed=3).train()
            kept = sharded._rows(labels) + sharded.lo
            xl = x[part].clone().requires_grad_(True)
            loss = sharded(xl, labels[part])
            loss.backward()
            t = sharded.head.t.item() if hasattr(sharded.head, "t") else None
            found[name] = dict(loss=loss.item(), x_grad=xl.grad, w_grad=sharded.weight.grad, kept=kept, t=t)
    return out


def single_process(name, head, keep=None):
    """The single-process head's loss and gradients (over the classes `keep` only, if given)."""
    x, labels = inputs()
    head = copy.deepcopy(head).train()
    if keep is not None:
        head.weight = torch.nn.Parameter(head.weight.detach()[keep].clone())
        head.num_classes = len(keep)
        labels = torch.searchsorted(keep, labels)
    x = x.clone().requires_grad_(True)
    loss = head.reference(x, labels) if hasattr(head, "reference") else head(x, labels)
    loss.backward()
    return loss.item(), x.grad, head.weight.grad, getattr(head, "t", None)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W={w}")
def battery(request):
    return distributed.launch(head_battery, request.param)


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_every_sharded_head_equals_the_single_process_one(battery, sample_rate):
    ranks = [r[sample_rate] for r in battery]
    for name, head in make_heads().items():
        if name not in ranks[0]:
            continue
        keep = torch.cat([r[name]["kept"] for r in ranks]) if sample_rate < 1 else None
        loss, x_grad, w_grad, t = single_process(name, head, keep)
        for r in ranks:  # every rank computes the global loss
            assert r[name]["loss"] == pytest.approx(loss, rel=1e-12, abs=1e-12), name
        torch.testing.assert_close(torch.cat([r[name]["x_grad"] for r in ranks]), x_grad, rtol=1e-10, atol=1e-12)
        if keep is None:
            torch.testing.assert_close(torch.cat([r[name]["w_grad"] for r in ranks]), w_grad, rtol=1e-10, atol=1e-12)
        else:  # the kept rows' gradients; the others' are zero
            full = torch.cat([r[name]["w_grad"] for r in ranks])
            torch.testing.assert_close(full[keep], w_grad, rtol=1e-10, atol=1e-12)
            others = torch.ones(C, dtype=torch.bool)
            others[keep] = False
            assert others.any() and (full[others] == 0).all()
        if t is not None:
            assert all(r[name]["t"] == pytest.approx(t.item(), rel=1e-12) for r in ranks)
    if sample_rate < 1:  # the batch's targets are always kept
        kept = torch.cat([r["cosface"]["kept"] for r in ranks])
        assert set(inputs()[1].tolist()) <= set(kept.tolist())


def test_shards_cover_the_classes_once_the_first_ranks_one_more():
    for C_, W in [(7, 2), (7, 3), (10, 4), (5, 5)]:
        ranges = [distributed.shard_range(C_, W, r) for r in range(W)]
        assert ranges[0][0] == 0 and ranges[-1][1] == C_
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [hi - lo for lo, hi in ranges]
        assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        distributed.shard_range(2, 3, 0)
    with pytest.raises(ValueError):
        distributed.shard_range(7, 2, 2)


# ---------------------------------------------------------------- training under DDP
def toy_data(n=40, size=8, classes=C):
    from frlab.data.synth import FaceTensors

    g = torch.Generator().manual_seed(5)
    images = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n) % classes
    return FaceTensors(images, labels, {"label": labels}, classes, "toy")


class Interrupted(Exception):
    pass


def interrupt_at(step):
    def track(trainer):
        if trainer.step == step:
            raise Interrupted(f"stopped at step {step}")
        return 0.0

    return track


def train_job(epochs, checkpoint="", stop_at=None):
    """A small job: a linear backbone (no BatchNorm, whose statistics are per rank), CosFace, batches
    of 10 (uneven over 3 ranks), global gradient clipping, checkpoints; interrupted at `stop_at`."""
    from frlab import train

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, D))
    head = heads.CosFace(D, C, s=8.0, m=0.2)
    cfg = train.TrainConfig(epochs=epochs, batch_size=10, lr=0.2, grad_clip=0.5, checkpoint=checkpoint, progress=False)
    track = {"stop": interrupt_at(stop_at)} if stop_at is not None else {}
    trainer = train.Trainer(model, head, toy_data(), cfg, track=track)
    trainer.fit()
    _, lo, hi = distributed._inner(trainer.head)
    return dict(
        model=trainer.model.state_dict(),
        weight=distributed._inner(trainer.head)[0].weight.detach().clone(),
        losses=[row["loss"] for row in trainer.history],
        range=(lo, hi),
    )


def assert_same_run(ranks, single):
    assert [r["range"] for r in ranks][0][0] == 0 and ranks[-1]["range"][1] == C
    torch.testing.assert_close(torch.cat([r["weight"] for r in ranks]), single["weight"], rtol=1e-4, atol=1e-5)
    for r in ranks:
        for k, v in single["model"].items():
            torch.testing.assert_close(r["model"][k], v, rtol=1e-4, atol=1e-5)
        assert r["losses"] == pytest.approx(single["losses"], rel=1e-4)


def test_ddp_training_equals_the_single_process_run_and_resumes_at_another_world_size(tmp_path):
    single = train_job(2)
    assert_same_run(distributed.launch(train_job, 2, 2), single)
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Exception, match="stopped at step 5"):  # 2 ranks, stopped in epoch 2 ...
        distributed.launch(train_job, 2, 2, ckpt, 5)
    assert len(list((tmp_path / "ckpt").glob("*shard*"))) == 2  # ... after the checkpoint of epoch 1
    # resumed on 3 ranks
    assert_same_run(distributed.launch(train_job, 3, 2, ckpt), single)
    assert len(list((tmp_path / "ckpt").glob("*shard*"))) == 3  # the previous checkpoint's shards are gone
    assert_same_run([train_job(2, ckpt)], single)  # and loaded in one process, its rows from 3 shards


def backbone_gradient(grad_scale):
    """The gradient of a DDP-wrapped linear backbone under a sharded head."""
    rank, size = distributed.world()
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D, D).double()
    ddp = torch.nn.parallel.DistributedDataParallel(backbone)
    sharded = distributed.ShardedHead(make_heads()["arcface"], grad_scale=grad_scale)
    x, labels = inputs()
    part = torch.arange(B).tensor_split(size)[rank]
    sharded(ddp(x[part]), labels[part]).backward()
    return backbone.weight.grad


def test_the_backbone_gradient_needs_the_factor_w_under_ddp():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D, D).double()
    x, labels = inputs()
    make_heads()["arcface"].reference(backbone(x), labels).backward()
    exact = backbone.weight.grad
    with_w, without = (distributed.launch(backbone_gradient, 2, s)[0] for s in (2.0, 1.0))
    torch.testing.assert_close(with_w, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(without, exact / 2, rtol=1e-10, atol=1e-12)  # DDP's average alone halves it


def fail_on_rank_one():
    rank, _ = distributed.world()
    if rank == 1:
        raise RuntimeError("rank 1 cannot read its data")
    distributed.all_sum(torch.zeros(1))  # rank 0 waits in a collective that rank 1 never joins
    return rank


def test_a_failing_rank_ends_the_job_with_its_error():
    import time

    start = time.time()
    for _ in range(3):  # whichever rank's error the launcher sees first, the cause is named
        with pytest.raises(RuntimeError, match="^rank 1 failed:(.|\n)*rank 1 cannot read its data"):
            distributed.launch(fail_on_rank_one, 2, timeout_s=30)
    assert time.time() - start < 60


def test_a_rank_with_bad_inputs_stops_every_rank():
    with pytest.raises(Exception, match="every rank needs embeddings"):
        distributed.launch(bad_labels_on_rank_one, 2, timeout_s=30)


def bad_labels_on_rank_one():
    rank, _ = distributed.world()
    x, labels = inputs()
    if rank == 1:
        labels = labels.clone().fill_(C)
    return distributed.ShardedHead(make_heads()["cosface"])(x, labels)


def test_torchrun_runs_frlab_train_on_two_ranks_and_resumes_on_one(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = ["--identities", "8", "--test-identities", "4", "--images-per-identity", "3", "--batch-size", "8"]
    job += ["--embedding-size", "16", "--width", "0.25", "--checkpoint", str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FRLAB_HOME": str(tmp_path)}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "frlab", "train", *job, "--epochs", "1", "--out", str(tmp_path / "run2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and "all_auc" in metrics
    assert json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["world_size"] == 2
    one = subprocess.run(
        [sys.executable, "-m", "frlab", "train", *job, "--epochs", "2", "--out", str(tmp_path / "run1")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    history = json.loads((tmp_path / "run1" / "metrics.json").read_text())["tables"]["history"]["rows"]
    assert len(history) == 2 * 24 // 8  # the first epoch's steps from the checkpoint, the second's trained
