"""The recipes notebooks share: disjoint identities, one evaluation, one cached baseline."""

import torch

from frlab import experiment
from frlab.data import Const


def test_split_identities_are_disjoint_and_the_evaluation_covers_every_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("FRLAB_HOME", str(tmp_path))
    split = experiment.synth_split(6, 4, images_per_identity=4, seed=3, size=32, progress=False)
    train_ids, test_ids = set(split.train.meta["identity"].tolist()), set(split.test.meta["identity"].tolist())
    assert train_ids == set(range(6)) and test_ids == set(range(experiment.TEST_OFFSET, experiment.TEST_OFFSET + 4))
    bench = experiment.Evaluation(split.test)
    trainer = experiment.baseline(split.train, "cosface", seed=0, epochs=1, batch_size=8)
    report, scores = bench.evaluate(trainer.model, identification=True)
    assert {"all", "orl", "identification"} <= set(report) and len(scores) == len(bench.pairs)
    # the same arguments in another notebook reload the same model
    again = experiment.baseline(split.train, "cosface", seed=0, epochs=1, batch_size=8)
    assert (
        torch.equal(again.head.weight, trainer.head.weight)
        and len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 1
    )
    sharp = experiment.synth_split(
        6,
        4,
        images_per_identity=4,
        seed=3,
        size=32,
        progress=False,
        nuisance=split.train_faces.nuisance.__class__(resolution=Const(1.0)),
    )
    assert float(sharp.train.meta["resolution"].max()) == 1.0


def test_metric_is_nan_where_a_subset_cannot_resolve_a_level():
    report = {"all": {"auc": 0.9, "tpr@fpr=1e-02": 0.5}}
    assert experiment.metric(report, "all", "tpr@fpr=1e-02") == 0.5
    assert torch.isnan(torch.tensor(experiment.metric(report, "hard", "tpr@fpr=1e-02")))
    assert torch.isnan(torch.tensor(experiment.metric(report, "all", "tpr@fpr=1e-04")))
