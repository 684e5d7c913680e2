"""Refreshes by steps (``refresh_every_steps``), their staleness records and plot spans, in one process.

References: the refresh steps and per-batch staleness computed by hand from the schedule's definition (the
first refresh at the first step after the warm-up epochs, then one every N steps), and a second identical run
(synchronous runs by steps stay bit-for-bit reproducible).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from hardneg.miner.errors import ValidationError
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.distributed import DistContext
from hardneg.trainer.loop import Parts, Trainer, _check_async
from hardneg.trainer.plots import refresh_spans


def test_exactly_one_refresh_period() -> None:
    cfg = TrainConfig.from_dict({"refresh_every_steps": 5})
    assert (cfg.refresh_every, cfg.refresh_every_steps) == (None, 5)
    assert TrainConfig.from_dict({}).refresh_every == 4  # the default period stays in epochs
    with pytest.raises(ValidationError, match="give exactly one"):
        TrainConfig.from_dict({"refresh_every": 2, "refresh_every_steps": 5})
    with pytest.raises(ValidationError, match="exactly one of refresh_every"):
        TrainConfig(refresh_every=None).validate()
    with pytest.raises(ValidationError, match="refresh_every_steps must be"):
        TrainConfig.from_dict({"refresh_every_steps": 0})
    with pytest.raises(ValidationError, match="refresh must be one of"):
        TrainConfig.from_dict({"refresh": "later"})
    # a stored config (both keys, one None) reads back, and resuming cannot change the period
    stored = TrainConfig.from_dict(cfg.to_dict())
    assert (stored.refresh_every, stored.refresh_every_steps) == (None, 5)
    assert stored.with_changes({"refresh_every_steps": 7})[1] == ["refresh_every_steps"]


def test_refresh_steps_follow_the_definition() -> None:
    cfg = TrainConfig.from_dict({"refresh_every_steps": 4, "warmup_epochs": 1})
    assert not cfg.is_refresh_step(1, 0, None)  # warm-up epoch
    assert cfg.is_refresh_step(2, 11, None)  # the first boundary after the warm-up
    assert not cfg.is_refresh_step(2, 14, 11) and cfg.is_refresh_step(2, 15, 11)
    assert not any(cfg.is_refresh_epoch(e) for e in range(1, 20))


def test_async_refusals() -> None:
    cfg = TrainConfig.from_dict({"refresh": "async"})
    with pytest.raises(ValidationError, match="not supported under torchrun"):
        _check_async(cfg, DistContext(rank=0, world_size=2), Parts())

    class Other:
        name = "mined-tuples"

    with pytest.raises(ValidationError, match="registered recipe 'class-batches'"):
        _check_async(cfg, DistContext(), Parts(recipe=Other))  # type: ignore[arg-type]



def test_publish_every_counts_refreshes() -> None:
    by_steps = TrainConfig.from_dict({"refresh_every_steps": 5, "publish_every": 3})
    assert not any(by_steps.is_publish_epoch(e) for e in range(1, 12))  # refresh_every is None: no epoch publishes
    assert [k for k in range(10) if by_steps.is_publish_refresh(k)] == [0, 3, 6, 9]
    assert TrainConfig.from_dict({"refresh": "async", "refresh_every_steps": 5, "publish_every": 2}).publish_every == 2
    by_epochs = TrainConfig.from_dict({"refresh_every": 1, "publish_every": 2, "warmup_epochs": 1, "epochs": 8})
    assert [e for e in range(1, 9) if by_epochs.is_publish_epoch(e)] == [2, 4, 6, 8]
    # the refresh before epoch e is refresh number e - 2 here: both rules agree
    assert [e for e in range(2, 9) if by_epochs.is_publish_refresh(e - 2)] == [2, 4, 6, 8]


@pytest.mark.parametrize(("option", "named"), [({"refresh_on_drift": 0.1}, "refresh_on_drift"),
                                               ({"shard_index": "on"}, "shard_index 'on'")])
def test_async_refuses_what_its_worker_cannot_honour(option: dict, named: str) -> None:
    TrainConfig.from_dict(option if "shard_index" not in option else {})  # each is accepted with sync
    with pytest.raises(ValidationError, match=f"refresh 'async' does not support {re.escape(named)}"):
        TrainConfig.from_dict({"refresh": "async", **option})
    # what the worker's compute_refresh does honour stays accepted
    assert TrainConfig.from_dict({"refresh": "async", "exclude_suspects": 0.05}).exclude_suspects == 0.05


def _run(tmp_path: Path, name: str, **changes: object) -> list[dict]:
    cfg = TrainConfig.from_dict({"epochs": 3, "refresh_every_steps": 6, "batch_size": 128, "seed": 3, "threads": 1,
                                 "store": str(tmp_path / f"{name}-store"), "run_dir": str(tmp_path / name),
                                 **changes})
    Trainer.create(cfg).run()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sync_refreshes_by_steps_and_their_staleness(tmp_path: Path) -> None:
    history = _run(tmp_path, "a")
    steps = [r["step"] for r in history]
    first = steps[1]  # warm-up: epoch 1; the first refresh comes before its next step
    due = list(range(first, steps[-1], 6))
    spans = [s for r in history[1:] for s in r["refresh"]["spans"]]
    assert spans == [[s, s] for s in due]  # synchronous: taken over at the step of its weights
    for r, before in zip(history[1:], steps):
        batches = range(before, r["step"])
        stale = [s - max(d for d in due if d <= s) for s in batches if s >= first]
        expected = {"mean": round(float(np.mean(stale)), 4) if stale else None, "max": max(stale, default=None),
                    "batches": len(stale)}
        assert r["staleness"] == expected
        assert r["refresh"]["finished"] == r["refresh"]["started"] == sum(before <= d < r["step"] for d in due)
        assert r["refresh"]["skipped"] == 0
    # bit-for-bit reproducible: the same config trains the same
    again = _run(tmp_path, "b")
    keep = ("step", "loss", "metrics", "train", "mining", "staleness")
    assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in history]


@pytest.mark.slow
def test_sync_refreshes_by_steps_publish_every_nth(tmp_path: Path) -> None:
    history = _run(tmp_path, "p", publish_every=3, keep_snapshots=20, centroid_sample=3)
    steps = [r["step"] for r in history]
    due = list(range(steps[1], steps[-1], 6))  # as above: the first after the warm-up, then every 6 steps
    assert len(due) >= 4
    store = SnapshotStore(tmp_path / "p-store")
    metas = [store.open(n).manifest["meta"] for n in store.names()]
    # refreshes 0, 3, 6, ... publish (with the model), then the final model; the others store nothing
    assert [(m["step"], m["reason"]) for m in metas] == [(d, "refresh") for d in due[::3]] + [(steps[-1], "final")]
    assert all(store.open(n).model_path is not None for n in store.names())
    spans = [s for r in history[1:] for s in r["refresh"]["spans"]]
    assert spans == [[s, s] for s in due]  # every due refresh ran, published or not
    for r in history[2:]:
        assert r["mining"] is not None
    sampled = [r for r in history[2:] if "centroid_items" in r["mining"]]  # an epoch whose last refresh sampled
    assert sampled and all(r["mining"]["centroid_items"] == 3 * 10 for r in sampled)  # 3 of each of 10 digits


def test_refresh_spans_on_the_epoch_axis() -> None:
    history = [{"epoch": 0, "step": 0}, {"epoch": 1, "step": 10, "refresh": {"spans": []}},
               {"epoch": 2, "step": 20, "refresh": {"spans": [[10, 15], [15, 25]]}},
               {"epoch": 3, "step": 40, "refresh": {"spans": [[30, 30]]}}]
    assert refresh_spans(history) == [(1.0, 1.5), (1.5, 2.25), (2.5, 2.5)]
    assert refresh_spans([{"epoch": 0, "step": 0}, {"epoch": 1, "step": 10, "snapshot": "000001"}]) is None
