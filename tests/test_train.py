"""The trainer: one forward with what the terms need, registered modules, schedules and optimizers
against hand-written steps, exact resume, checkpoints, and cache keys that see every hyper-parameter."""

import copy
import inspect
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from frlab import heads, models
from frlab.data import SynthFaces, materialize
from frlab.hparams import code_files
from frlab.losses import DDL, EKD, CentrePull, FeatureDistill, IntraLoss, SimilarityPreserving
from frlab.train import Batch, TrainConfig, Trainer, cache_key, finetune, fit_cached, weights_digest

ROOT = Path(__file__).resolve().parents[1]


def small_setup(seed=0):
    torch.manual_seed(seed)
    model = models.iresnet("ir8", width=0.125, input_size=32, embedding_size=8)
    head = heads.CurricularFace(8, 6, s=16)
    return model, head


DATA = materialize(SynthFaces(range(6), images_per_identity=8, size=32), progress=False)


def cfg(tmp_path=None, **kw):
    base = dict(
        epochs=3, batch_size=12, lr=0.05, progress=False, checkpoint=str(tmp_path / "ck.pt") if tmp_path else ""
    )
    return TrainConfig(**{**base, **kw})


class ToyTerm(torch.nn.Module):
    """An extra loss term with parameters of its own."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 1)

    def forward(self, out, batch):
        return self.proj(out["embedding"]).pow(2).mean()


class Spy(torch.nn.Module):
    """A term that records what it was given and adds nothing."""

    def __init__(self, needs=()):
        super().__init__()
        self.needs, self.seen = tuple(needs), []

    def forward(self, out, batch):
        self.seen.append(({k: v.detach().clone() for k, v in out.items()}, batch))
        return out["embedding"].sum() * 0


def test_one_step_moves_model_head_and_extra_term():
    model, head = small_setup()
    term = ToyTerm()
    groups = {"model": model, "head": head, "term": term}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in groups.items()}
    t = Trainer(model, head, DATA, cfg(), extra={"toy": term})
    row = t.train_step(t.batches(0)[0])
    for k, m in groups.items():
        moved = [not torch.equal(a, b.detach()) for a, b in zip(before[k], m.parameters())]
        assert any(moved) if k == "model" else all(moved), f"{k} parameters did not change"
    assert {"loss", "loss_head", "loss_toy", "lr"} <= set(row)


def test_a_term_gets_the_feature_map_from_the_single_forward():
    model, head = small_setup()
    spy = Spy(needs=("features",))
    calls = []
    model.stem.register_forward_hook(lambda *a: calls.append(1))
    captured = []
    model.stages.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    t = Trainer(model, head, DATA, cfg(), extra={"spy": spy})
    bn = model.stem[1]
    t.train_step(t.batches(0)[0])
    assert len(calls) == 1 and int(bn.num_batches_tracked) == 1  # one forward: BatchNorm's statistics move once
    out, batch = spy.seen[0]
    assert out["features"].shape == (12, 32, 2, 2) and torch.equal(out["features"], captured[0])
    assert isinstance(batch, Batch) and batch.images.shape == (12, 3, 32, 32)


def test_head_losses_and_logits_come_from_the_head_call_the_loss_uses():
    model, head = small_setup()
    spy = Spy(needs=("head_losses", "logits"))
    t = Trainer(model, head, DATA, cfg(), extra={"spy": spy})
    row = t.train_step(t.batches(0)[0])
    out, batch = spy.seen[0]
    assert out["head_losses"].shape == (12,) and out["logits"].shape == (12, 6)
    assert float(out["head_losses"].mean()) == pytest.approx(row["loss_head"], rel=1e-6)
    torch.testing.assert_close(
        torch.nn.functional.cross_entropy(out["logits"], batch.labels, reduction="none"),
        out["head_losses"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_model_without_outputs_cannot_serve_a_term_that_needs_features():
    _, head = small_setup()
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    t = Trainer(plain, head, DATA, cfg(), extra={"spy": Spy(needs=("features",))})
    with pytest.raises(ValueError, match=r"terms \['spy'\] need \['features'\].*no `outputs"):
        t.train_step(t.batches(0)[0])
    model, _ = small_setup()
    t = Trainer(model, head, DATA, cfg(), extra={"spy": Spy(needs=("attention",))})
    with pytest.raises(ValueError, match="unknown model outputs"):
        t.train_step(t.batches(0)[0])


def test_paired_views_are_the_same_samples_flipped_alike():
    sharp = materialize(
        SynthFaces(range(6), images_per_identity=8, size=32).with_nuisance(
            resolution=__import__("frlab").data.Const(1.0)
        ),
        progress=False,
    )
    model, head = small_setup()
    spy = Spy()
    t = Trainer(model, head, DATA, cfg(), extra={"spy": spy}, views={"sharp": sharp})
    t.fit()
    for _, batch in spy.seen[:5]:
        raw = sharp.batch(batch.index)[0]
        flipped = [torch.equal(v, r.flip(2)) for v, r in zip(batch.views["sharp"], raw)]
        same = [torch.equal(v, r) for v, r in zip(batch.views["sharp"], raw)]
        assert all(f or s for f, s in zip(flipped, same))
        image_flipped = [
            torch.equal(v, r.flip(2)) and not torch.equal(v, r)
            for v, r in zip(batch.images, DATA.batch(batch.index)[0])
        ]
        assert [f and not s for f, s in zip(flipped, same)] == image_flipped
    with pytest.raises(ValueError, match="pairs sample by sample"):
        Trainer(model, head, DATA, cfg(), views={"short": materialize(SynthFaces(range(2), size=32), progress=False)})


def test_batch_transforms_run_before_the_forward_and_see_the_trainer():
    model, head = small_setup()
    spy = Spy()
    seen = []

    def darken(trainer, batch):
        seen.append(trainer.model is model)
        return batch.replace(images=batch.images * 0.5)

    t = Trainer(model, head, DATA, cfg(flip=False), extra={"spy": spy}, transforms=[darken])
    index = t.batches(0)[0]
    t.train_step(index)
    assert seen == [True] and torch.equal(spy.seen[0][1].images, DATA.batch(index)[0] * 0.5)


def test_registered_teacher_moves_with_the_trainer_and_is_not_optimized():
    model, head = small_setup()
    teacher = models.iresnet("ir8", width=0.125, input_size=32, embedding_size=8)
    ekd = EKD(teacher)
    assert all(p.requires_grad for p in teacher.parameters()), "EKD must not freeze the caller's model"
    t = Trainer(model, head, DATA, cfg(), extra={"ekd": ekd})
    optimized = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in ekd.teacher.parameters()}
    assert any(k.startswith("extra.ekd.teacher.") for k in t.net.state_dict())
    t.net.to(torch.float64)  # what .to(device) does, on a machine without a second device
    assert next(ekd.teacher.parameters()).dtype == torch.float64
    t.net.train()
    assert not ekd.teacher.training  # the teacher's BatchNorm statistics stay its own


def test_optimizer_sees_a_head_shared_with_a_term_once():
    model, head = small_setup()
    t = Trainer(model, head, DATA, cfg(), extra={"centre": CentrePull(head)})
    params = [id(p) for g in t.opt.param_groups for p in g["params"]]
    assert len(params) == len(set(params)) and params.count(id(head.weight)) == 1


def test_finetune_copies_head_and_terms_together(tmp_path):
    model, head = small_setup()
    before = head.weight.detach().clone()
    tr = finetune(
        "ft", model, head, DATA, cfg(epochs=1), cache_dir=tmp_path, extra={"centre": CentrePull(head, weight=5.0)}
    )
    assert tr.extra["centre"].head is tr.head and tr.head is not head  # the copy pulls toward the copied proxies
    assert torch.equal(head.weight, before) and not torch.equal(tr.head.weight, before)


def test_resume_is_exact(tmp_path):
    model, head = small_setup()
    full = Trainer(model, head, DATA, cfg())
    full.fit()

    model2, head2 = small_setup()
    part = Trainer(model2, head2, DATA, cfg(tmp_path, epochs=3))
    batches = part.batches

    def interrupted(epoch):  # the process dies as epoch 1 begins
        if epoch == 1:
            raise KeyboardInterrupt
        return batches(epoch)

    part.batches = interrupted
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["epoch"] == 1
    model3, head3 = small_setup(seed=123)  # fresh objects: everything must come from the checkpoint
    resumed = Trainer(model3, head3, DATA, cfg(tmp_path, epochs=3))
    resumed.fit()
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(full.head.weight, resumed.head.weight, rtol=0, atol=0)
    assert float(full.head.t) == float(resumed.head.t)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_checkpoint_loads_with_weights_only(tmp_path):
    model, head = small_setup()
    Trainer(model, head, DATA, cfg(tmp_path, epochs=1)).fit()
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert state["epoch"] == 1 and "net" in state and "optimizer" in state
    assert not list(tmp_path.glob("*.tmp*")), "atomic save leaves no temporary file"


def test_fit_cached_trains_once(tmp_path):
    model, head = small_setup()
    first = fit_cached("toy", model, head, DATA, cfg(epochs=1), cache_dir=tmp_path)
    model2, head2 = small_setup()
    second = fit_cached("toy", model2, head2, DATA, cfg(epochs=1), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("toy-*.pt"))) == 1
    torch.testing.assert_close(first.head.weight, second.head.weight, rtol=0, atol=0)
    assert second.history == first.history
    # other starting weights (a different seed, or fine-tuning from another model) train anew
    model3, head3 = small_setup(seed=9)
    fit_cached("toy", model3, head3, DATA, cfg(epochs=1), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("toy-*.pt"))) == 2


def test_fit_cached_trains_again_when_the_cached_history_lacks_a_tracked_quantity(tmp_path):
    model, head = small_setup()
    fit_cached("toy", model, head, DATA, cfg(epochs=1), cache_dir=tmp_path)
    calls = []

    def norm(tr):
        calls.append(tr.step)
        return float(tr.head.weight.detach().norm())

    model2, head2 = small_setup()
    tracked = fit_cached("toy", model2, head2, DATA, cfg(epochs=1), cache_dir=tmp_path, track={"norm": norm})
    assert calls and all("norm" in row for row in tracked.history)
    model3, head3 = small_setup()
    again = fit_cached("toy", model3, head3, DATA, cfg(epochs=1), cache_dir=tmp_path, track={"norm": norm})
    assert len(calls) == len(tracked.history), "the tracked run is cached: no second training"
    assert again.history == tracked.history


def test_mixed_batches_hold_p_x_k_and_terms_see_the_augmented_images():
    spy = Spy()
    model, head = small_setup()
    trainer = Trainer(
        model, head, DATA, cfg(epochs=1, batch_size=16, sampler="mixed", images_per_identity=4), extra={"spy": spy}
    )
    trainer.fit()
    assert spy.seen and all(b.images.shape == (16, 3, 32, 32) for _, b in spy.seen)
    for _, b in spy.seen:
        assert torch.equal(b.labels, b.meta["label"])
        pk = b.labels[8:]  # the second half: 2 identities x 4 images
        assert sorted(torch.unique(pk, return_counts=True)[1].tolist()) == [4, 4]
    with pytest.raises(ValueError, match="no room"):
        Trainer(model, head, DATA, cfg(batch_size=6, sampler="mixed", images_per_identity=4)).batches(0)


# ------------------------------------------------------------------ schedules and optimizers
def lrs(**kw):
    model, head = small_setup()
    t = Trainer(model, head, DATA, cfg(**kw))  # 48 images / 12 = 4 steps per epoch
    return [t.opt.param_groups[0]["lr"] / t.cfg.lr] + [
        t._lr_factor(s) for s in range(1, t.cfg.epochs * t.steps_per_epoch)
    ]


def test_schedules():
    assert lrs(epochs=5, schedule="constant") == [1.0] * 20
    warm = lrs(epochs=5, schedule="constant", warmup_epochs=1)
    assert warm[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and warm[4:] == [1.0] * 16
    step = lrs(epochs=5, schedule="step")  # x0.1 from 60% of the steps, x0.01 from 85%
    assert step == pytest.approx([1.0] * 12 + [0.1] * 5 + [0.01] * 3)
    cos = lrs(epochs=5, schedule="cosine", warmup_epochs=1)
    assert cos[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cos[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 16)) for k in range(16)])


def hand_step(model, head, index, make_opt, clip=0.0):
    """One step written out: the same batch and flips the trainer draws, the loss, the optimizer."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    model.train(), head.train()
    torch.manual_seed(7)
    images, labels, _ = DATA.batch(index)
    flip = (torch.rand(len(images)) < 0.5)[:, None, None, None]
    images = torch.where(flip, images.flip(3), images)
    loss = head(model(images).float(), labels)
    params = list(model.parameters()) + list(head.parameters())
    opt = make_opt([{"params": list(model.parameters())}, {"params": list(head.parameters())}])
    opt.zero_grad()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return model, head


def trainer_step(model, head, index, **kw):
    t = Trainer(copy.deepcopy(model), copy.deepcopy(head), DATA, cfg(schedule="constant", **kw))
    t.net.train()
    torch.manual_seed(7)
    t.train_step(index)
    return t.model, t.head


@pytest.mark.parametrize("kind", ["sgd", "adamw", "clip"])
def test_optimizers_and_clipping_match_hand_written_steps(kind):
    model, head = small_setup()
    index = torch.arange(12)
    if kind == "sgd":
        want = hand_step(model, head, index, lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=5e-4))
        got = trainer_step(model, head, index)
    elif kind == "adamw":
        want = hand_step(model, head, index, lambda g: torch.optim.AdamW(g, lr=0.003, weight_decay=0.01))
        got = trainer_step(model, head, index, optimizer="adamw", lr=0.003, weight_decay=0.01)
    else:
        want = hand_step(
            model, head, index, lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=5e-4), clip=0.01
        )
        got = trainer_step(model, head, index, grad_clip=0.01)
    for a, b in zip(
        [*want[0].state_dict().values(), *want[1].state_dict().values()],
        [*got[0].state_dict().values(), *got[1].state_dict().values()],
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if kind == "clip":  # and clipping did bound the step: the update is lr * (clipped gradient) on SGD's first step
        free = trainer_step(model, head, index)
        moved = lambda m: sum(
            float((a - b).detach().pow(2).sum()) for a, b in zip(m[0].parameters(), model.parameters())
        )  # noqa: E731
        assert moved(got) < 0.1 * moved(free)


def test_head_lr_mult_scales_the_head_and_terms_only():
    model, head = small_setup()
    index = torch.arange(12)
    base = trainer_step(model, head, index, weight_decay=0.0)
    fast = trainer_step(model, head, index, weight_decay=0.0, head_lr_mult=3.0)
    torch.testing.assert_close(fast[1].weight - head.weight, 3 * (base[1].weight - head.weight), rtol=1e-4, atol=1e-7)
    for a, b in zip(fast[0].parameters(), base[0].parameters()):
        torch.testing.assert_close(a, b)


def test_cpu_autocast_runs_the_backbone_in_bfloat16():
    model, head = small_setup()
    dtypes = []
    model.output.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    t = Trainer(model, head, DATA, cfg(amp=True))
    row = t.train_step(t.batches(0)[0])
    assert dtypes == [torch.bfloat16] and math.isfinite(row["loss"])


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=-1.0), "lr"),
        (dict(batch_size=1), "batch_size"),
        (dict(momentum=1.0), "momentum"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(schedule="linear"), "schedule"),
        (dict(sampler="balanced"), "sampler"),
        (dict(warmup_epochs=9), "warmup_epochs"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(epochs=2.5), "epochs"),
        (dict(device="gpu0"), "device"),
        (dict(amp=1), "amp"),
    ],
)
def test_train_config_rejects_bad_values(kw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainConfig(**kw)


# ------------------------------------------------------------------ cache keys
def _alternative(value):
    """Another valid value of a constructor argument."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.25
    if isinstance(value, tuple):
        return tuple(_alternative(v) for v in value)
    return {"hardest": "released", "code": "paper", "released": "log", "unrolled": "plan"}.get(value)


def _key(model=None, head=None, extra=None, config=None):
    torch.manual_seed(0)
    model = model or models.iresnet("ir8", width=0.125, input_size=32, embedding_size=8)
    head = head or heads.ArcFace(8, 6)
    return cache_key("k", model, head, DATA, config or cfg(), extra=extra)


def _variants(cls, required, skip=()):
    """(argument name, an object of cls with that one argument changed) for every argument."""
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", *required, *skip) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        value = p.default if p.default is not None else 0.5
        other = _alternative(value)
        assert other is not None, f"{cls.__name__}.{name}: the test needs an alternative value for {value!r}"
        yield name, other


@pytest.mark.parametrize("cls", [c for c in heads.HEADS.values()], ids=lambda c: c.__name__)
def test_cache_key_changes_with_every_head_hyper_parameter(cls):
    base = _key(head=cls(8, 6))
    for name, other in _variants(cls, ("in_features", "num_classes")):
        if cls is heads.NPT and name == "k":
            other = 3
        torch.manual_seed(0)
        changed = cls(8, 6, **{name: other})
        assert _key(head=changed) != base, f"{cls.__name__}({name}={other}) has the same cache key"
    assert _key(head=cls(8, 7)) != base


def test_cache_key_changes_with_every_term_and_model_hyper_parameter():
    head = heads.ArcFace(8, 6)
    teacher = models.iresnet("ir8", width=0.125, input_size=32, embedding_size=8)
    terms = {
        DDL: (),
        IntraLoss: ("num_classes", "in_features"),
        EKD: ("teacher",),
        FeatureDistill: ("teacher",),
        SimilarityPreserving: ("teacher",),
        CentrePull: ("head",),
    }
    made = {
        DDL: lambda **kw: DDL(**kw),
        IntraLoss: lambda **kw: IntraLoss(6, 8, **kw),
        EKD: lambda **kw: EKD(teacher, **kw),
        FeatureDistill: lambda **kw: FeatureDistill(teacher, **kw),
        SimilarityPreserving: lambda **kw: SimilarityPreserving(teacher, **kw),
        CentrePull: lambda **kw: CentrePull(head, **kw),
    }
    for cls, required in terms.items():
        base = _key(head=head, extra={"t": made[cls]()})
        skip = ("easy", "hard", "levels") if cls in (DDL, EKD) else ()
        for name, other in _variants(cls, required, skip):
            assert _key(head=head, extra={"t": made[cls](**{name: other})}) != base, f"{cls.__name__}({name}={other})"
    from frlab.protocols import EasyRule, HardRule

    base = _key(head=head, extra={"t": DDL()})
    assert _key(head=head, extra={"t": DDL(easy=EasyRule(max_yaw=10.0))}) != base
    assert _key(head=head, extra={"t": DDL(hard=HardRule(min_resolution=2.0))}) != base
    assert _key(head=head, extra={"t": EKD(teacher, levels=(0.1, 0.01))}) != _key(head=head, extra={"t": EKD(teacher)})
    other_teacher = copy.deepcopy(teacher)
    torch.nn.init.zeros_(other_teacher.output[3].weight)
    assert _key(head=head, extra={"t": EKD(other_teacher)}) != _key(
        head=head, extra={"t": EKD(teacher)}
    )  # the teacher's weights
    small = dict(depths=(1, 1, 1, 1), widths=(4, 8, 16, 32), embedding_size=8, input_size=32, dropout=0.0)
    torch.manual_seed(0)
    base = _key(model=models.IResNet(**small), head=head)
    for name, other in [
        ("depths", (1, 2, 1, 1)),
        ("widths", (4, 8, 16, 48)),
        ("dropout", 0.1),
        ("norm_layer", lambda c: torch.nn.GroupNorm(2, c)),
    ]:
        torch.manual_seed(0)
        assert _key(model=models.IResNet(**{**small, name: other}), head=head) != base, name
    torch.manual_seed(0)
    assert _key(model=models.IResNet(**{**small, "embedding_size": 9}), head=heads.ArcFace(9, 6)) != _key(
        model=models.IResNet(**{**small, "embedding_size": 8}), head=heads.ArcFace(9, 6)
    )


def test_cache_key_changes_with_every_training_field_and_not_with_where_or_how_it_shows():
    base = _key()
    for name, other in [
        ("epochs", 4),
        ("batch_size", 16),
        ("lr", 0.01),
        ("momentum", 0.5),
        ("weight_decay", 0.0),
        ("optimizer", "adamw"),
        ("schedule", "step"),
        ("warmup_epochs", 1.0),
        ("head_lr_mult", 2.0),
        ("flip", False),
        ("sampler", "pk"),
        ("images_per_identity", 2),
        ("grad_clip", 1.0),
        ("amp", True),
        ("seed", 1),
    ]:
        assert _key(config=cfg(**{name: other})) != base, name
    from dataclasses import fields

    assert {f.name for f in fields(TrainConfig)} - set(cfg().training()) == {"device", "progress", "checkpoint"}
    assert _key(config=cfg(progress=True, checkpoint="/elsewhere")) == base


def test_cache_key_hashes_the_code_training_runs_and_not_figures():
    files = {str(f.relative_to(ROOT / "frlab")) for f in code_files(Trainer, DATA, *small_setup(), DDL())}
    assert {"heads.py", "_fused.py", "models.py", "train.py", "data/synth.py", "losses/ddl.py", "protocols.py"} <= files
    assert not files & {"viz.py", "record.py", "runner.py", "report.py", "experiment.py"}


EKD_SCRIPT = textwrap.dedent("""
    import torch
    from frlab import heads, models, train
    from frlab.data import SynthFaces, materialize
    from frlab.losses import EKD
    data = materialize(SynthFaces(range(16), images_per_identity=8, size=32), progress=False)
    torch.manual_seed(5)
    teacher = models.iresnet("ir8", width=0.125, input_size=32, embedding_size=64)
    torch.manual_seed(0)
    student = models.MobileFaceNet(64, input_size=32, width=0.25)
    head = heads.ArcFace(64, 16, s=16.0, m=0.4)
    # batches of 64: 2,016 pairs of 64-D embeddings, enough for torch to split a backward over threads
    cfg = train.TrainConfig(epochs=1, batch_size=64, lr=0.05, sampler="mixed", images_per_identity=4, progress=False)
    trainer = train.Trainer(student, head, data, cfg, extra={"ekd": EKD(teacher)})
    trainer.fit()
    print(train.weights_digest(trainer.model, trainer.head, trainer.extra["ekd"]))
""")


def test_two_fresh_processes_train_an_ekd_student_to_the_same_weights():
    digests = [
        subprocess.run([sys.executable, "-c", EKD_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
        for _ in range(2)
    ]
    for d in digests:
        assert d.returncode == 0, d.stderr[-2000:]
    assert digests[0].stdout.strip() == digests[1].stdout.strip() and len(digests[0].stdout.strip()) == 16


def test_weights_digest_sees_buffers():
    model, head = small_setup()
    before = weights_digest(model, head)
    head.t.fill_(0.5)
    assert weights_digest(model, head) != before
