"""The trainer: parameters move, resume is exact, checkpoints load with weights_only=True."""
import pytest
import torch

from frlab import heads, models
from frlab.data import SynthFaces, materialize
from frlab.train import TrainConfig, Trainer, fit_cached


def small_setup(seed=0):
    torch.manual_seed(seed)
    model = models.iresnet("ir8", width=0.125, input_size=32, embedding_size=8)
    head = heads.CurricularFace(8, 6, s=16)
    return model, head


DATA = materialize(SynthFaces(range(6), images_per_identity=8, size=32), progress=False)


def cfg(tmp_path=None, **kw):
    base = dict(epochs=3, batch_size=12, lr=0.05, progress=False, checkpoint=str(tmp_path / "ck.pt") if tmp_path else "")
    return TrainConfig(**{**base, **kw})


class ToyTerm(torch.nn.Module):
    """An extra loss term with parameters of its own: (B, D) embeddings -> scalar."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 1)

    def forward(self, embeddings, labels, meta):
        return self.proj(embeddings).pow(2).mean()


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
    assert state["epoch"] == 1 and "model" in state and "optimizer" in state
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


def test_extra_terms_see_the_augmented_images_and_mixed_batches_hold_p_x_k():
    seen = []

    def spy(embeddings, labels, meta):
        seen.append((meta["images"].shape, labels.clone(), meta["label"].clone()))
        return embeddings.sum() * 0

    model, head = small_setup()
    trainer = Trainer(model, head, DATA, cfg(epochs=1, batch_size=16, sampler="mixed", images_per_identity=4), extra={"spy": spy})
    trainer.fit()
    assert seen and all(shape == (16, 3, 32, 32) for shape, _, _ in seen)
    for _, labels, meta_labels in seen:
        assert torch.equal(labels, meta_labels)
        pk = labels[8:]  # the second half: 2 identities x 4 images
        assert sorted(torch.unique(pk, return_counts=True)[1].tolist()) == [4, 4]
    with pytest.raises(ValueError, match="no room"):
        Trainer(model, head, DATA, cfg(batch_size=6, sampler="mixed", images_per_identity=4)).batches(0)
