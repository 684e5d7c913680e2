"""``exclude_suspects`` in training: after each refresh, the snapshot's top label-noise suspects are in no batch
(class-batches) and in no mined tuple (mined-tuples), checked against the audit of the published snapshot and a
brute-force nearest-negative search; counted in metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hardneg.miner.audit import audit_labels
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import stored_vectors
from hardneg.miner.mining.miner import suspect_k
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.loop import Trainer

FRACTION = 0.1


def noisy_blobs(path: Path, per_class: int, seed: int, flip: float) -> str:
    """6 Gaussian classes in 10-d; a share ``flip`` of the labels moved to the next class."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(6, 10)) * 2
    y = np.repeat(np.arange(6), per_class)
    x = centres[y] + 0.6 * rng.normal(size=(len(y), 10))
    flipped = rng.choice(len(y), size=round(flip * len(y)), replace=False)
    y[flipped] = (y[flipped] + 1) % 6
    np.savez(path, x=x.astype(np.float32), y=y)
    return f"npz:{path}"


def config(tmp_path: Path, name: str, **changes: object) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": noisy_blobs(tmp_path / "train.npz", 20, 1, 0.1), "eval_data": noisy_blobs(tmp_path / "eval.npz", 5, 2, 0),
        "batch_size": 24, "per_class": 4, "epochs": 3, "warmup_epochs": 1, "refresh_every": 1, "embedding_dim": 8,
        "hidden_dim": 16, "threads": 1, "store": str(tmp_path / f"store_{name}"), "run_dir": str(tmp_path / name),
        **changes})


def recording(trainer: Trainer) -> dict[int, list[np.ndarray]]:
    """Record the recipe's batches of every epoch."""
    seen: dict[int, list[np.ndarray]] = {}
    inner = trainer.recipe.batches

    def batches(epoch, rng):
        seen[epoch] = [np.asarray(b) for b in inner(epoch, rng)]
        return seen[epoch]

    trainer.recipe.batches = batches
    return seen


def suspects(store: str, name: str) -> set[int]:
    index = SnapshotStore(store).open(name).index
    return set(audit_labels(index, suspect_k(index)).top(FRACTION).tolist())


def history(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_class_batches_leave_the_suspects_out(tmp_path: Path) -> None:
    trainer = Trainer.create(config(tmp_path, "excl", exclude_suspects=FRACTION))
    seen = recording(trainer)
    trainer.run()
    n = len(trainer.splits.train)
    refreshes = [r for r in history(trainer) if r["snapshot"]]
    assert [r["epoch"] for r in refreshes] == [2, 3]
    for r in refreshes:
        left_out = suspects(trainer.cfg.store, r["snapshot"])
        assert r["mining"]["suspects_excluded"] == len(left_out) == math.ceil(FRACTION * n)
        drawn = set(np.concatenate(seen[r["epoch"]]).tolist())
        assert not drawn & left_out
        assert len(drawn) > n // 2  # the batches still cover the kept items
    # the class table of the last window: centroids of the kept items only, nearest classes by brute force
    index = SnapshotStore(trainer.cfg.store).open(refreshes[-1]["snapshot"]).index
    keep = ~np.isin(index.ids, list(suspects(trainer.cfg.store, refreshes[-1]["snapshot"])))
    x, y = stored_vectors(index)[keep].astype(np.float64), index.labels[keep]
    centroids = np.stack([x[y == c].mean(0) for c in range(6)])
    d2 = ((centroids[:, None] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(trainer.recipe.neighbours, np.argsort(d2, axis=1, kind="stable"))
    # without the option, the first window (the same snapshot: training is identical until then) uses them
    plain = Trainer.create(config(tmp_path, "plain"))
    plain_seen = recording(plain)
    plain.run()
    first = [r for r in history(plain) if r["snapshot"]][0]
    assert "suspects_excluded" not in first["mining"]
    assert set(np.concatenate(plain_seen[2]).tolist()) & suspects(trainer.cfg.store, refreshes[0]["snapshot"])
    assert SnapshotStore(plain.cfg.store).open(first["snapshot"]).manifest["thumbs"] is None  # vectors: no thumbs


def test_mined_tuples_never_use_a_suspect(tmp_path: Path) -> None:
    trainer = Trainer.create(config(tmp_path, "tuples", recipe="mined-tuples", strategy="hardest", epochs=2,
                                    exclude_suspects=FRACTION))
    trainer.run()
    record = [r for r in history(trainer) if r["snapshot"]][0]
    index = SnapshotStore(trainer.cfg.store).open(record["snapshot"]).index
    left_out = suspects(trainer.cfg.store, record["snapshot"])
    assert record["mining"]["suspects_excluded"] == len(left_out) > 0
    t = trainer.recipe.tuples
    assert not (set(t.first.tolist()) | set(t.second.tolist()) | set(t.third.tolist())) & left_out
    # brute force: every kept item is an anchor once, its negative the nearest kept item of another label
    x = np.zeros((index.count, index.dim))
    x[index.ids] = stored_vectors(index)
    labels = np.zeros(index.count, np.int64)
    labels[index.ids] = index.labels
    kept = np.array(sorted(set(range(index.count)) - left_out))
    assert sorted(t.first.tolist()) == kept.tolist()
    assert (labels[t.second] == labels[t.first]).all() and (t.second != t.first).all()
    for a, n in zip(t.first, t.third):
        others = kept[labels[kept] != labels[a]]
        d2 = ((x[others] - x[a]) ** 2).sum(1)
        assert ((x[n] - x[a]) ** 2).sum() == pytest.approx(d2.min(), abs=1e-6)


@pytest.mark.parametrize("changes,match", [
    ({"exclude_suspects": 0.0}, "exclude_suspects must be a fraction in"),
    ({"exclude_suspects": 1.0}, "exclude_suspects must be a fraction in"),
    ({"exclude_suspects": 0.1, "recipe": "in-batch"}, "exclude_suspects works with recipe class-batches"),
    ({"exclude_suspects": "0.1"}, "exclude_suspects must be a number"),
])
def test_impossible_settings_are_refused(changes: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TrainConfig.from_dict(changes)
