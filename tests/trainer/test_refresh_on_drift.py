"""``refresh_on_drift``: the probe's mean class-centroid shift from the newest snapshot, checked by hand, and the
loop refreshing early exactly when it passes the threshold (and from then on measuring from the new snapshot)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.drift import DriftMonitor, mean_centroid_shift, probe_items
from hardneg.trainer.loop import Trainer
from test_trainer_suspects import noisy_blobs


def test_mean_centroid_shift_by_hand() -> None:
    before = np.array([[0, 0], [2, 0], [0, 1], [0, 3]], np.float32)
    after = np.array([[1, 0], [3, 0], [0, 1], [0, 1]], np.float32)
    labels = np.array([5, 5, 7, 7])
    # class 5: centroid (1, 0) -> (2, 0): d² 1; class 7: (0, 2) -> (0, 1): d² 1; and one class moved by (3, 4)
    assert mean_centroid_shift(before, after, labels) == pytest.approx(1.0)
    assert mean_centroid_shift(before, after + np.array([3, 4], np.float32), labels[[0, 0, 0, 0]]) == \
        pytest.approx(((np.array([3, 4]) + after.mean(0) - before.mean(0)) ** 2).sum())


def test_the_monitor_compares_the_probe_with_the_snapshot(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    labels = np.arange(40) % 3
    old, new = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    store = SnapshotStore(tmp_path / "store")
    with torch.no_grad():
        name = store.publish(VectorIndex.build(old(x).numpy(), labels, metric="cosine"))
        after = new(x).numpy()
    monitor = DriftMonitor(x, labels, 1.0, probe=25, seed=3, store=store, batch_size=7)
    items = probe_items(40, 25, 3)
    assert len(set(items.tolist())) == 25 and (monitor.items == items).all()
    with torch.no_grad():
        before = old(x).numpy()[items]
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731 - the snapshot is cosine
    want = np.mean([((unit(before)[labels[items] == c].mean(0) - unit(after[items])[labels[items] == c].mean(0)) ** 2)
                    .sum() for c in range(3)])
    assert monitor.shift(new, name) == pytest.approx(want, rel=1e-5)
    assert monitor.shift(old, name) == pytest.approx(0.0, abs=1e-10)
    for threshold, due in ((0.9 * want, True), (1.1 * want, False)):
        monitor.threshold = threshold
        assert monitor.due(new, name) is due
        assert monitor.take() == {"centroid_shift": pytest.approx(want, rel=1e-5), "since": name,
                                  "threshold": threshold, "refresh": due}
    assert monitor.due(new, None) is False and monitor.take() is None  # no snapshot yet: nothing to compare


def run(tmp_path: Path, name: str, threshold: float) -> list[dict]:
    cfg = TrainConfig.from_dict({
        "data": noisy_blobs(tmp_path / "train.npz", 20, 1, 0.0), "eval_data": noisy_blobs(tmp_path / "eval.npz", 5, 2, 0),
        "batch_size": 24, "per_class": 4, "epochs": 5, "warmup_epochs": 1, "refresh_every": 100, "embedding_dim": 8,
        "hidden_dim": 16, "threads": 1, "lr": 3e-3, "eval_every": 5, "refresh_on_drift": threshold,
        "drift_probe": 60, "store": str(tmp_path / f"store_{name}"), "run_dir": str(tmp_path / name)})
    Trainer.create(cfg).run()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_early_refresh_exactly_when_the_drift_passes_the_threshold(tmp_path: Path) -> None:
    never = run(tmp_path, "never", 4.0)  # centroids of unit vectors are never 4 apart in d²
    first = never[2]["snapshot"]
    assert never[2]["drift"] is None and first  # the scheduled refresh (before epoch 2) needs no check
    checks = [r["drift"] for r in never[3:]]
    assert [c["since"] for c in checks] == [first] * 3 and not any(c["refresh"] for c in checks)
    assert all(r["snapshot"] is None for r in never[3:])
    v3, v4 = checks[0]["centroid_shift"], checks[1]["centroid_shift"]
    assert 0 < v3 < v4, "the model drifts further from the snapshot with every epoch"
    threshold = (v3 + v4) / 2
    early = run(tmp_path, "early", threshold)
    # identical until the first early refresh: epoch 3 measures v3 and does not refresh, epoch 4 measures v4 and does
    assert early[3]["drift"] == {"centroid_shift": v3, "since": first, "threshold": threshold, "refresh": False}
    assert early[3]["snapshot"] is None
    assert early[4]["drift"] == {"centroid_shift": v4, "since": first, "threshold": threshold, "refresh": True}
    assert early[4]["snapshot"] not in (None, first) and early[4]["mining"]
    # from then on the drift is measured from the new snapshot
    assert early[5]["drift"]["since"] == early[4]["snapshot"]
    assert (early[5]["snapshot"] is not None) is early[5]["drift"]["refresh"] is (early[5]["drift"]["centroid_shift"]
                                                                                 > threshold)


@pytest.mark.parametrize("changes,match", [
    ({"refresh_on_drift": 0.0}, "refresh_on_drift must be a finite number > 0"),
    ({"refresh_on_drift": float("inf")}, "refresh_on_drift must be a finite number > 0"),
    ({"refresh_on_drift": 0.1, "recipe": "in-batch"}, "refresh_on_drift needs a labelled recipe"),
    ({"refresh_on_drift": 0.1, "recipe": "simclr"}, "refresh_on_drift needs a labelled recipe"),
    ({"drift_probe": 1}, "drift_probe must be an integer >= 2"),
])
def test_impossible_settings_are_refused(changes: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TrainConfig.from_dict(changes)


def test_the_flags_set_the_options() -> None:
    import argparse

    from hardneg.trainer.cli import _given, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--exclude-suspects", "0.2", "--refresh-on-drift", "0.05", "--drift-probe",
                              "300"])
    cfg = TrainConfig.from_sources(None, _given(args))
    assert (cfg.exclude_suspects, cfg.refresh_on_drift, cfg.drift_probe) == (0.2, 0.05, 300)
    assert TrainConfig().to_dict()["exclude_suspects"] is None and TrainConfig().refresh_on_drift is None
