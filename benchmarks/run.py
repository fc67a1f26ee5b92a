"""frlab's benchmark suite: one command, one table, the same figures as JSON.

    .venv/bin/python benchmarks/run.py            # everything (about 10 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick    # smaller sizes, for a quick look
    .venv/bin/python benchmarks/run.py --only heads,render
    python benchmarks/run.py --only cuda          # the heads on a CUDA device, fp32 and bf16 autocast

Every row is a time next to the baseline it should be compared with, measured in the same run:
margin heads against the bare classifier (linear + cross-entropy on the same shapes), ROC metrics
against one sort of the scores, rank-1 identification against the bare matrix product, the
trainer against a hand-written loop, a training step with the OTFace term against the step
without it, batched Sinkhorn against POT's loop over the same problems, the renderer against
element-wise passes over its pixels (a yardstick of the machine's speed that day). Peak memory
is the growth of the resident set while one forward + backward runs in a fresh process (Linux;
large tensors are mmap'd, so RSS tracks them).
Results go to runs/bench/<time>.json and runs/bench/latest.{json,md}, and a full run (no --only,
no --quick) also to runs/bench/full.md, which `python -m frlab report --readme README.md` copies
into the README. Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frlab import _fused, heads, models, paths, train  # noqa: E402
from frlab import eval as ev  # noqa: E402
from frlab.data import SynthFaces, materialize  # noqa: E402

HEADS = ("normface", "cosface", "arcface", "curricularface", "npt", "cifp", "cifp_paper")


# ---------------------------------------------------------------- measuring
def timeit(fn, reps: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() over reps runs, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(fns: dict, reps: int = 5, warmup: int = 1, rounds: bool = False) -> dict:
    """Median wall time of each fn over reps rounds, each round running every fn once in turn, so
    that a slow spell of a shared machine falls on all of them and their ratios stay fair (with
    rounds=True: every round's time, in order)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times if rounds else {k: statistics.median(v) for k, v in times.items()}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def peak_memory_mib(kind: str, C: int, B: int, D: int) -> float | None:
    """Peak RSS growth (MiB) of one forward + backward of `kind` in a fresh process."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", kind, str(C), str(B), str(D)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _memory_child(kind: str, C: int, B: int, D: int) -> None:
    fn = make_step(kind, C, B, D)
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    fn()
    print((rss_kib("VmHWM") - before) / 1024)


# ---------------------------------------------------------------- margin heads
def naive_arcface(x, w, labels, s=64.0, m=0.5):
    """The straightforward implementation: acos, add m, cos, one-hot mix over the whole B x C."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cos)
    target = torch.cos(theta + m)
    onehot = F.one_hot(labels, w.shape[0]).to(cos.dtype)
    return F.cross_entropy(s * (onehot * target + (1 - onehot) * cos), labels)


def make_step(kind: str, C: int, B: int, D: int, device: str = "cpu", bf16: bool = False):
    """A closure running one forward + backward of `kind` on fixed random inputs (optionally under
    bf16 autocast)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, C, (B,), generator=g).to(device)
    if kind == "floor":
        w = (torch.randn(C, D, generator=g) * D**-0.5).to(device).requires_grad_(True)
        loss_fn = lambda: F.cross_entropy(F.linear(x, w), labels)  # noqa: E731
    elif kind == "naive_arcface":
        w = (torch.randn(C, D, generator=g) * D**-0.5).to(device).requires_grad_(True)
        loss_fn = lambda: naive_arcface(x, w, labels)  # noqa: E731
    elif kind == "pml_arcface":
        from pytorch_metric_learning.losses import ArcFaceLoss

        pml = ArcFaceLoss(num_classes=C, embedding_size=D)
        loss_fn = lambda: pml(x, labels)  # noqa: E731
    elif kind == "cifp_paper":
        head = heads.CIFP(D, C, form="paper").to(device)
        loss_fn = lambda: head(x, labels)  # noqa: E731
    else:
        head = heads.make_head(kind, D, C).to(device)
        loss_fn = lambda: head(x, labels)  # noqa: E731

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        x.grad = None

    return step


def bench_heads_cuda(sizes, B=512, D=512):
    """The head suite on CUDA, fp32 and bf16 autocast: CUDA-synchronized times, and peak memory as
    torch.cuda.max_memory_allocated growth during one forward + backward."""
    if not torch.cuda.is_available():
        return [{"what": "heads on CUDA", "note": "skipped: no CUDA device"}]
    rows = []
    for bf16 in (False, True):
        for C in sizes:
            t, mem = {}, {}
            for k in ["floor", *HEADS, "naive_arcface"]:
                step = make_step(k, C, B, D, "cuda", bf16)

                def synced(step=step):
                    step()
                    torch.cuda.synchronize()

                t[k] = timeit(synced, reps=20, warmup=3)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                mem[k] = (torch.cuda.max_memory_allocated() - base) / 2**20
                del step
            for k in t:
                rows.append(
                    {
                        "what": f"cuda {'bf16' if bf16 else 'fp32'} " + (f"head {k}" if k != "floor" else "floor"),
                        "size": f"B={B} D={D} C={C:,}",
                        "seconds": t[k],
                        "baseline": "floor",
                        "ratio": t[k] / t["floor"],
                        "peak_mib": mem[k],
                        "mem_ratio": mem[k] / mem["floor"] if mem["floor"] else None,
                    }
                )
    return rows


def bench_heads(sizes, B=512, D=512):
    rows = []
    kinds = ["floor", *HEADS, "naive_arcface"]
    try:
        import pytorch_metric_learning  # noqa: F401

        kinds.append("pml_arcface")
    except ImportError:
        rows.append({"what": "pytorch-metric-learning ArcFaceLoss", "note": "skipped: not installed"})
    for C in sizes:
        reps = 15 if C <= 10_000 else 5  # a 10k round takes under a second; its ratio swings most
        t = timeit_interleaved({k: make_step(k, C, B, D) for k in kinds}, reps=reps, rounds=True)
        mem = {k: peak_memory_mib(k, C, B, D) for k in kinds}
        for k in kinds:
            # the ratio is the median of each round's ratio to the floor timed just before it,
            # and the note gives their range: how far this machine's noise moves one ratio
            ratios = [a / b for a, b in zip(t[k], t["floor"])]
            rows.append(
                {
                    "what": f"head {k}" if k != "floor" else "floor: linear + cross_entropy",
                    "size": f"B={B} D={D} C={C:,}",
                    "seconds": statistics.median(t[k]),
                    "baseline": "floor",
                    "ratio": statistics.median(ratios),
                    "peak_mib": mem[k],
                    "mem_ratio": (mem[k] / mem["floor"]) if mem[k] and mem["floor"] else None,
                    "note": f"rounds: {min(ratios):.2f}-{max(ratios):.2f}x"
                    if k != "floor"
                    else f"{len(ratios)} rounds",
                }
            )
    return rows


# ---------------------------------------------------------------- evaluation
def bench_verification(n: int):
    g = torch.Generator().manual_seed(0)
    same = torch.rand(n, generator=g) < 0.01
    scores = torch.randn(n, generator=g) * 0.2 + same.float() * 0.6
    t = timeit_interleaved(
        {"sort": lambda: torch.sort(scores, descending=True), "ver": lambda: ev.verification(scores, same)}, reps=5
    )
    t_sort, t_ver = t["sort"], t["ver"]
    rows = [
        {
            "what": "one sort of the scores (float32)",
            "size": f"{n:,} scores",
            "seconds": t_sort,
            "baseline": "-",
            "ratio": 1.0,
        },
        {
            "what": "verification: ROC, AUC, EER, TPR@FPR",
            "size": f"{n:,} scores",
            "seconds": t_ver,
            "baseline": "sort",
            "ratio": t_ver / t_sort,
        },
    ]
    try:
        from sklearn.metrics import roc_curve

        y, s = same.numpy(), scores.numpy()
        t_sk = timeit(lambda: roc_curve(y, s), reps=3)
        rows.append(
            {
                "what": "sklearn.metrics.roc_curve",
                "size": f"{n:,} scores",
                "seconds": t_sk,
                "baseline": "sort",
                "ratio": t_sk / t_sort,
            }
        )
    except ImportError:
        rows.append({"what": "sklearn.metrics.roc_curve", "note": "skipped: scikit-learn not installed"})
    return rows


def bench_identification(n_gallery: int, n_probe: int = 256, D: int = 512):
    g = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(n_gallery, D, generator=g), dim=1)
    labels = torch.arange(n_gallery)
    probe = F.normalize(gallery[:n_probe] + 0.5 * torch.randn(n_probe, D, generator=g), dim=1)
    t_mm = timeit(lambda: probe @ gallery.T, reps=2)
    t_id = timeit(lambda: ev.identification(gallery, labels, probe, labels[:n_probe], max_rank=10), reps=2)
    bound = 1024 * 65536 * 4 / 2**20
    return [
        {
            "what": "bare matrix product probes x gallery",
            "size": f"{n_probe} x {n_gallery:,} x {D}",
            "seconds": t_mm,
            "baseline": "-",
            "ratio": 1.0,
            "note": f"holds the full {n_probe * n_gallery * 4 / 2**20:.0f} MiB score matrix",
        },
        {
            "what": "identification: rank-1 and CMC, chunked",
            "size": f"{n_probe} x {n_gallery:,} x {D}",
            "seconds": t_id,
            "baseline": "matmul",
            "ratio": t_id / t_mm,
            "note": f"score blocks of at most {bound:.0f} MiB",
        },
    ]


# ---------------------------------------------------------------- training loop and renderer
def fresh_pair():
    torch.manual_seed(0)
    return models.iresnet("ir8", width=0.25, input_size=32, embedding_size=64), heads.ArcFace(64, 64, s=16)


def bench_trainer():
    data = materialize(SynthFaces(range(64), images_per_identity=20, size=32), progress=False)
    cfg = train.TrainConfig(epochs=1, batch_size=32, lr=0.05, progress=False, flip=False)
    batches = train.Trainer(*fresh_pair(), data, cfg).batches(0)  # the very batches the Trainer will use
    steps = len(batches)

    def bare():
        model, head = fresh_pair()
        opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        for index in batches:
            images, labels, _ = data.batch(index)
            loss = head(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def trainer():
        model, head = fresh_pair()
        train.Trainer(model, head, data, cfg).fit()

    t = timeit_interleaved({"bare": bare, "trainer": trainer}, reps=7)
    t_bare, t_tr = t["bare"], t["trainer"]
    return [
        {
            "what": "bare training loop",
            "size": f"{steps} steps, ir8/4 at 32 px, B=32",
            "seconds": t_bare,
            "baseline": "-",
            "ratio": 1.0,
        },
        {
            "what": "frlab Trainer (same model and batches)",
            "size": f"{steps} steps, ir8/4 at 32 px, B=32",
            "seconds": t_tr,
            "baseline": "bare loop",
            "ratio": t_tr / t_bare,
        },
    ]


def bench_render(batch: int = 256, batches: int = 8):
    """The renderer's images per second, and beside it a yardstick of the machine's speed that
    day: 100 element-wise passes (an add into a kept output) over the same pixels, in the
    renderer's blocks of 64 images. Their ratio moves with the renderer's code, where images per
    second also move with the machine."""
    faces = SynthFaces(range(10_000), images_per_identity=50, size=64)
    a, b, out = torch.rand(3, 64, 64, 64).unbind(0)
    ts = timeit_interleaved(
        {
            "render": lambda: [faces.batch(torch.arange(k * batch, (k + 1) * batch)) for k in range(batches)],
            "passes": lambda: [torch.add(a, b, out=out) for _ in range(100 * batch * batches // 64)],
        },
        reps=5,
        rounds=True,
    )
    n, t, t_passes = batch * batches, statistics.median(ts["render"]), statistics.median(ts["passes"])
    return [
        {
            "what": "SynthFaces render",
            "size": f"{n} images, 64 x 64, batches of {batch}",
            "seconds": t,
            "baseline": "100 element-wise passes over the same pixels",
            "ratio": t / t_passes,
            "note": f"{n / t:,.0f} images/s (rounds: {n / max(ts['render']):,.0f}-{n / min(ts['render']):,.0f}; "
            "target 2,000)",
        }
    ]


def bench_otface(problems: int = 256, side: int = 7, channels: int = 64):
    """OTFace: the term's share of a training step at notebook 08's default size (ArcFace on
    P x K batches of 64, ir8/2 at 64 px: 4 x 4 cells), and batched Sinkhorn against POT's
    `ot.sinkhorn2` (log method) looped over the same problems (the release's eps = 1, 10 iterations)."""
    import numpy as np
    import ot

    from frlab.losses import OTFace, sinkhorn

    data = materialize(SynthFaces(range(100), images_per_identity=10, size=64), progress=False)
    steps = {}
    for name, term in (
        ("none", None),
        ("released", OTFace()),
        ("plan", OTFace(eps=0.1, iters=30, mode="log", grad="plan")),
    ):
        torch.manual_seed(0)
        model = models.iresnet("ir8", width=0.5, input_size=64, embedding_size=64)
        cfg = train.TrainConfig(epochs=1, batch_size=64, sampler="pk", progress=False)
        trainer = train.Trainer(
            model, heads.ArcFace(64, 100, s=16, m=0.45), data, cfg, extra={"ot": term} if term else {}
        )
        batches = trainer.batches(0)[:4]
        steps[name] = lambda trainer=trainer, batches=batches: [trainer.train_step(i) for i in batches]
    t = timeit_interleaved(steps, reps=5)
    size = "4 steps, ArcFace, ir8/2 at 64 px, P x K 16 x 4"
    rows = [
        {"what": "training step, ArcFace alone", "size": size, "seconds": t["none"], "baseline": "-", "ratio": 1.0},
        {
            "what": "ArcFace + OTFace (released: eps 1, 10 it., unrolled)",
            "size": size,
            "seconds": t["released"],
            "baseline": "ArcFace alone",
            "ratio": t["released"] / t["none"],
            "note": "target <= 1.15x",
        },
        {
            "what": "ArcFace + OTFace (eps 0.1, 30 it., plan gradient)",
            "size": size,
            "seconds": t["plan"],
            "baseline": "ArcFace alone",
            "ratio": t["plan"] / t["none"],
        },
    ]
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(problems, side * side, channels, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(problems, side * side, channels, generator=g, dtype=torch.float64), dim=-1)
    cost = 1 - x @ y.transpose(1, 2)
    a = np.full(side * side, 1 / (side * side))
    costs = [c.numpy() for c in cost]

    def pot():
        return [
            ot.sinkhorn2(a, a, c, 1.0, method="sinkhorn_log", numItermax=10, stopThr=0.0, warn=False) for c in costs
        ]

    def batched():
        return (sinkhorn(cost, 1.0, 10) * cost).sum((-2, -1))

    t = timeit_interleaved({"pot": pot, "frlab": batched}, reps=5)
    size = f"{problems} problems of {side * side} x {side * side}, eps 1, 10 it., fp64"
    rows += [
        {"what": "POT ot.sinkhorn2 (log), a loop", "size": size, "seconds": t["pot"], "baseline": "-", "ratio": 1.0},
        {
            "what": "frlab sinkhorn, one batched call",
            "size": size,
            "seconds": t["frlab"],
            "baseline": "POT loop",
            "ratio": t["frlab"] / t["pot"],
            "note": f"{t['pot'] / t['frlab']:.0f}x faster (target 20x)",
        },
    ]
    return rows


def versus(size: str, base: tuple[str, float], candidate: tuple[str, float], baseline: str) -> list[dict]:
    """The two rows of a comparison: (what, seconds) of the baseline, then of the candidate with its ratio."""
    return [
        {"what": base[0], "size": size, "seconds": base[1], "baseline": "-", "ratio": 1.0},
        {
            "what": candidate[0],
            "size": size,
            "seconds": candidate[1],
            "baseline": baseline,
            "ratio": candidate[1] / base[1],
        },
    ]


def bench_quality(n: int = 100_000, identities: int = 1_000, D: int = 512, repeats: int = 12):
    """SDD-FIQA's pseudo-labels (24 + 24 draws per image, 12 repeats) against the bare similarity
    products of the same sampled pairs (the gathered dot products, in the same chunks)."""
    from frlab import quality

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, D, generator=g), dim=1)
    labels = torch.arange(identities).repeat_interleave(n // identities)
    draws = [quality.sample_pairs(labels, 24, 24, torch.Generator().manual_seed(k)) for k in range(repeats)]
    chunk = max(1, 2**22 // (24 * D))

    def products():
        for pos, neg in draws:
            for s in range(0, n, chunk):
                xi = x[s : s + chunk].unsqueeze(1)
                (xi * x[pos[s : s + chunk]]).sum(2), (xi * x[neg[s : s + chunk]]).sum(2)

    t = timeit_interleaved(
        {"products": products, "labels": lambda: quality.pseudo_labels(x, labels, repeats=repeats)}, reps=1, warmup=0
    )
    size = f"{n:,} images, {identities:,} identities, D={D}, 24 + 24 pairs x {repeats} draws"
    return versus(
        size,
        ("similarities of the sampled pairs", t["products"]),
        ("SDD-FIQA pseudo-labels (sampling, W1, scaling)", t["labels"]),
        "the products",
    )


def bench_attacks(batch: int = 256, steps: int = 10, size: int = 32):
    """PGD against the forward + backward passes it consists of: `steps` steps on a batch of
    notebook 11's model (an AFANet, ir8 at quarter width, 32 px), against `steps` bare forward +
    backward passes of the same loss with respect to the images."""
    from frlab import afa, attacks

    torch.manual_seed(0)
    model = afa.AFANet("ir8", width=0.25, input_size=size, embedding_size=32).eval()
    head = heads.CosFace(32, 100, s=16.0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = torch.randint(0, 100, (batch,), generator=g)
    loss = attacks.identification_loss(model, head, y)

    def bare():
        for _ in range(steps):
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(loss(xi).sum(), xi)

    def pgd():
        attacks.pgd(loss, x, 8 / 255, 2 / 255, steps, generator=torch.Generator().manual_seed(1))

    with model.fixed(0.0):
        t = timeit_interleaved({"bare": bare, "pgd": pgd}, reps=5)
    size_s = f"{batch} images of {size} px, {steps} steps, AFANet ir8/4"
    return versus(
        size_s, ("forward + backward to the images", t["bare"]), ("PGD (L-inf, random start)", t["pgd"]), "the passes"
    )


LOAD = """
import torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""


def bench_loaded(C: int = 50_000, B: int = 512, D: int = 512):
    """The heads with the machine shared: one other 2-thread process (products in a loop, as a
    second notebook or sweep job would run) beside the measurement, the floor timed under the same
    load, interleaved. It starts once the load average shows the load (`_fused.machine_busy`, which
    makes the heads' CPU blocks serial), as it does on a machine that has been shared for a while."""
    kinds = ["floor", "cosface", "arcface", "curricularface"]
    steps = {k: make_step(k, C, B, D) for k in kinds}
    load = subprocess.Popen([sys.executable, "-c", LOAD])
    try:
        waited = time.perf_counter()
        while not _fused.machine_busy() and time.perf_counter() - waited < 120:
            steps["floor"]()  # this process's own share of the load, as when it trains
        t = timeit_interleaved(steps, reps=5, rounds=True)
    finally:
        load.kill()
        load.wait()
    rows = []
    for k in kinds:
        ratios = [a / b for a, b in zip(t[k], t["floor"])]
        rows.append(
            {
                "what": f"head {k}, machine shared" if k != "floor" else "floor, machine shared",
                "size": f"B={B} D={D} C={C:,}, one other 2-thread process",
                "seconds": statistics.median(t[k]),
                "baseline": "floor (same load)" if k != "floor" else "-",
                "ratio": statistics.median(ratios),
                "note": f"rounds: {min(ratios):.2f}-{max(ratios):.2f}x" if k != "floor" else f"{len(ratios)} rounds",
            }
        )
    return rows


def _sharded_step(C: int, B: int, D: int) -> dict:
    """On each rank: the memory its shard of a CosFace head costs (RSS growth from before the head
    to the peak of a second forward + backward) and the step's time."""
    from frlab import distributed

    rank, world = distributed.world()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)[torch.arange(B).tensor_split(world)[rank]].requires_grad_(True)
    labels = torch.randint(0, C, (B,), generator=g)[torch.arange(B).tensor_split(world)[rank]]
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    torch.manual_seed(0)
    head = distributed.ShardedHead(heads.CosFace(D, C))
    head(x, labels).backward()  # the gradients' buffers
    start = time.perf_counter()
    head(x, labels).backward()
    return {"seconds": time.perf_counter() - start, "mib": (rss_kib("VmHWM") - before) / 1024}


def bench_sharded(C: int = 100_000, B: int = 512, D: int = 512):
    """The sharded head's memory per rank at W = 1 and 2 (gloo processes, one thread each): proxies,
    their gradient and the logits' block all split by W; the B x D gathered batch is not."""
    from frlab import distributed

    if not Path("/proc/self/clear_refs").exists():
        return [{"what": "sharded CosFace", "note": "skipped: no /proc/self/clear_refs"}]
    rows, base = [], None
    for W in (1, 2):
        ranks = distributed.launch(_sharded_step, W, C, B, D)
        mib = max(r["mib"] for r in ranks)
        base = base or mib
        rows.append(
            {
                "what": f"sharded CosFace, W = {W}, per rank",
                "size": f"B={B} (global) D={D} C={C:,}",
                "seconds": max(r["seconds"] for r in ranks),
                "peak_mib": mib,
                "baseline": "W = 1",
                "mem_ratio": mib / base,
                "note": "one thread per rank; the largest rank",
            }
        )
    return rows


def notebook_times():
    """Wall time of each notebook's latest smoke and default run found under runs/."""
    rows = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        latest = {}
        for p in (ROOT / "runs" / nb.stem).glob("*/params.json"):
            meta = json.loads(p.read_text())
            if meta.get("status") == "ok" and not p.parent.name.startswith("interactive"):
                kind = "smoke" if meta["smoke"] else "default"
                if kind not in latest or p.parent.name > latest[kind][0]:
                    latest[kind] = (p.parent.name, meta["wall_s"])
        for kind in ("smoke", "default"):
            if kind in latest:
                rows.append(
                    {
                        "what": f"notebook {nb.stem}",
                        "size": f"{kind} parameters",
                        "seconds": latest[kind][1],
                        "baseline": "-",
                        "ratio": None,
                        "note": f"run {latest[kind][0]}",
                    }
                )
            else:
                rows.append(
                    {"what": f"notebook {nb.stem}", "size": f"{kind} parameters", "note": "no run under runs/ here"}
                )
    return rows


# ---------------------------------------------------------------- report
def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "seconds":
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    if kind in ("ratio", "mem_ratio"):
        return f"{v:.2f}x"
    if kind == "peak_mib":
        return f"{v:.0f} MiB"
    return str(v)


def table(rows) -> str:
    cols = ["what", "size", "seconds", "baseline", "ratio", "peak_mib", "mem_ratio", "note"]
    head = ["what", "size", "time", "vs", "ratio", "peak mem", "mem ratio", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), c) if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), Python {python}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated: heads, cuda, verification, identification, trainer, render, otface, quality, "
        "attacks, loaded, sharded, notebooks",
    )
    ap.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory:
        kind, C, B, D = args._memory
        _memory_child(kind, int(C), int(B), int(D))
        return 0
    suites = {
        "heads": lambda: bench_heads([10_000] if args.quick else [10_000, 50_000, 100_000]),
        "cuda": lambda: bench_heads_cuda([10_000] if args.quick else [10_000, 100_000, 1_000_000]),
        "verification": lambda: bench_verification(1_000_000 if args.quick else 10_000_000),
        "identification": lambda: bench_identification(100_000 if args.quick else 1_000_000),
        "trainer": bench_trainer,
        "render": bench_render,
        "otface": bench_otface,
        "quality": bench_quality,
        "attacks": bench_attacks,
        "loaded": bench_loaded,
        "sharded": bench_sharded,
        "notebooks": notebook_times,
    }
    chosen = [s for s in args.only.split(",") if s] or list(suites)
    unknown = set(chosen) - set(suites)
    if unknown:
        print(f"error: unknown suite {sorted(unknown)}; choose from {', '.join(suites)}", file=sys.stderr)
        return 2
    rows = []
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += suites[name]()
    md = f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d %H:%M')}.\n\n{table(rows)}\n"
    print(md)
    out = paths.runs() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"machine": machine(), "time": stamp, "quick": args.quick, "rows": rows}
    for path in (out / f"{stamp}.json", out / "latest.json"):
        path.write_text(
            json.dumps(payload, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
            + "\n"
        )
    (out / "latest.md").write_text(md)
    if not args.only and not args.quick:  # what `python -m frlab report --readme` puts in the README
        (out / "full.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
