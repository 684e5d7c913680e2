"""``hardneg train`` under ``torchrun --nproc-per-node 2`` (gloo on CPU), end to end, on the built-in digits.

References: a single-process run of the same config and seed (the first refresh embeds the untrained model,
so its snapshot, mined tuples and mining statistics must match), the digits training split (every item once in
every snapshot) and an uninterrupted two-process run (for resume). Mining is hardest/hardest here, so that the
mined tuples are a function of the embeddings alone and can be compared across rank counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from hardneg.miner.store import SnapshotStore
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import load_splits

pytestmark = pytest.mark.slow

# One OpenMP thread per process: two ranks share the test machine's cores (see test_train_cli.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A refresh before epochs 1 and 3 (the first embeds the untrained model), the final model after the last epoch;
# training on the mined triplets themselves.
COMMON = ["--warmup-epochs", "0", "--refresh-every", "2", "--global-batches", "tuples", "--strategy", "hardest",
          "--positive", "hardest", "--seed", "5"]
N_TRAIN = 1347  # digits, held-out samples: 3/4 of 1797


def run(args: list[str], cwd: Path, ranks: int) -> subprocess.CompletedProcess:
    """``hardneg ARGS`` in one process, or under torchrun with ``ranks`` processes (a free port: --standalone)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd = [*(launcher if ranks > 1 else [sys.executable]), "-m", "hardneg.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def results(hist: list[dict]) -> list[tuple]:
    """What must be reproducible: per epoch, the step count, loss, metrics, training and mining counts."""
    return [(r["epoch"], r["step"], r["loss"], r["metrics"], r["train"], r["mining"]) for r in hist]


@dataclass
class Run:
    run_dir: Path
    store: Path
    proc: subprocess.CompletedProcess
    history: list[dict]  # metrics.jsonl right after this command
    mined: dict[str, np.ndarray]  # last.pt's mined tuples right after this command
    names: list[str]  # the store's snapshots right after this command


def train(cwd: Path, name: str, epochs: int, ranks: int, resume: bool = False, extra: tuple[str, ...] = ()) -> Run:
    args = ["train", "--resume", name] if resume else ["train", *COMMON, *extra, "--run-dir", name, "--store",
                                                       f"store_{name}"]
    proc = run([*args, "--epochs", str(epochs)], cwd, ranks)
    mined = torch.load(cwd / name / "last.pt", weights_only=True)["recipe"]["tuples"]
    store = cwd / f"store_{name}"
    return Run(cwd / name, store, proc, history(cwd / name),
               {k: mined[k].numpy() for k in ("first", "second", "third")}, SnapshotStore(store).names())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_ddp")


@pytest.fixture(scope="module")
def one(work: Path) -> Run:
    return train(work, "one", epochs=2, ranks=1)


@pytest.fixture(scope="module")
def two(work: Path) -> Run:
    return train(work, "two", epochs=2, ranks=2)


@pytest.fixture(scope="module")
def resumed(work: Path, two: Run) -> Run:
    return train(work, "two", epochs=4, ranks=2, resume=True)


@pytest.fixture(scope="module")
def straight(work: Path) -> Run:
    return train(work, "four", epochs=4, ranks=2)


def test_one_complete_snapshot_per_refresh_holding_every_item_once(straight: Run) -> None:
    store = SnapshotStore(straight.store)
    names = store.names()
    manifests = [store.verify(n) for n in names]  # each one complete: manifest and checksums
    assert [(m["meta"]["epoch"], m["meta"]["reason"]) for m in manifests] == [(0, "refresh"), (2, "refresh"),
                                                                              (4, "final")]
    assert len(set(names)) == 3 and store.latest_name() == names[-1]
    assert sorted(p.name for p in straight.store.iterdir()) == ["LATEST", "snapshots"]  # no temp folders left
    assert sorted(p.name for p in (straight.store / "snapshots").iterdir()) == names
    train_labels = load_splits(TrainConfig.from_dict(manifests[0]["meta"]["config"])).train.y
    assert len(train_labels) == N_TRAIN
    for name, manifest in zip(names, manifests):
        index = store.open(name).index
        assert manifest["count"] == index.count == N_TRAIN
        assert np.array_equal(np.sort(index.ids), np.arange(N_TRAIN))  # every training item, none twice
        assert np.array_equal(index.labels, train_labels[index.ids])
    assert [r["snapshot"] for r in straight.history] == [None, names[0], None, names[1], None]


def test_rank_zero_alone_writes_metrics_and_reports(straight: Run) -> None:
    hist = straight.history
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3, 4]  # one line per epoch, written once
    # batch_size is the global batch: ceil(1347 / 128) = 11 steps an epoch, as in one process, and the two
    # ranks' shares add up to every mined triplet once (hardest/hardest: one per training item)
    assert [r["step"] for r in hist] == [0, 11, 22, 33, 44]
    assert all(r["train"]["tuples"] == N_TRAIN and r["train"]["steps"] == 11 for r in hist[1:])
    assert hist[-1]["metrics"]["map_at_r"] > hist[0]["metrics"]["map_at_r"]
    err, out = straight.proc.stderr, straight.proc.stdout
    assert err.count("epoch 4/4: loss") == 1 and err.count("published snapshot") == 3
    assert out.count("finished 4 epochs") == 1 and out.count("run folder: four\n") == 1
    assert sorted(p.name for p in straight.run_dir.iterdir()) == ["best.pt", "config.json", "last.pt",
                                                                  "metrics.jsonl", "plot.png"]


def test_two_ranks_publish_and_mine_what_one_process_does(one: Run, two: Run) -> None:
    first = [SnapshotStore(r.store).open(r.names[0]).index for r in (one, two)]
    ids = np.arange(N_TRAIN)
    np.testing.assert_allclose(first[1].vectors_of(ids), first[0].vectors_of(ids), atol=1e-6)
    # last.pt holds the tuples mined from that first snapshot: the ranks' shares gathered by rank 0
    assert np.array_equal(np.bincount(two.mined["first"], minlength=N_TRAIN), np.ones(N_TRAIN))  # once each
    for key in ("first", "second", "third"):
        assert np.array_equal(two.mined[key], one.mined[key]), key
    # and the merged mining statistics are the single pass's
    assert two.history[1]["mining"] == one.history[1]["mining"]


def test_a_sharded_index_publishes_and_mines_what_one_process_does(work: Path, one: Run) -> None:
    """--shard-index: each rank indexes its half; rank 0 streams the snapshot; mining searches both shards."""
    sharded = train(work, "sharded", epochs=2, ranks=2, extra=("--shard-index",))
    first = [SnapshotStore(r.store).open(r.names[0]).index for r in (one, sharded)]
    assert np.array_equal(first[1].ids, first[0].ids) and np.array_equal(first[1].labels, first[0].labels)
    ids = np.arange(N_TRAIN)
    np.testing.assert_allclose(first[1].vectors_of(ids), first[0].vectors_of(ids), atol=1e-6)
    for key in ("first", "second", "third"):
        assert np.array_equal(sharded.mined[key], one.mined[key]), key
    assert sharded.history[1]["mining"] == one.history[1]["mining"]
    assert [SnapshotStore(sharded.store).verify(n)["meta"]["reason"] for n in sharded.names] == ["refresh", "final"]


def test_resume_under_torchrun_continues_the_same_run(resumed: Run, straight: Run) -> None:
    assert "resuming" in resumed.proc.stderr
    assert results(resumed.history) == results(straight.history)
    assert [SnapshotStore(resumed.store).verify(n)["meta"]["epoch"] for n in resumed.names] == [0, 2, 2, 4]
    assert np.array_equal(np.sort(resumed.mined["first"]), np.arange(N_TRAIN))


# ------------------------------------------------------------------ self-supervised
SSL = ["train", "--mode", "self-supervised", "--warmup-epochs", "0", "--refresh-every", "2", "--ssl-skip", "32",
       "--ssl-per-anchor", "2", "--seed", "5", "--epochs", "1"]


def test_self_supervised_under_torchrun_publishes_and_mines_what_one_process_does(work: Path) -> None:
    """The refresh before epoch 1 embeds the untrained model: the snapshot and the mined negatives (rank 0 mines,
    every rank composes the same batches from them) equal one process's; the epoch then trains on two ranks."""
    for name, ranks in (("ssl1", 1), ("ssl2", 2)):
        run([*SSL, "--run-dir", name, "--store", f"store_{name}"], work, ranks)
    stores = [SnapshotStore(work / f"store_{n}") for n in ("ssl1", "ssl2")]
    first = [s.open(s.names()[0]).index for s in stores]
    ids = np.arange(N_TRAIN)
    np.testing.assert_allclose(first[1].vectors_of(ids), first[0].vectors_of(ids), atol=1e-6)
    negatives = [torch.load(work / n / "last.pt", weights_only=True)["recipe"]["negatives"].numpy()
                 for n in ("ssl1", "ssl2")]
    assert negatives[0].shape == (N_TRAIN, 64) and np.array_equal(negatives[1], negatives[0])
    one, two = history(work / "ssl1"), history(work / "ssl2")
    assert two[1]["mining"] == one[1]["mining"] and one[1]["mining"]["kept"] > 0
    # the same composed batches: as many steps, and every image's two views once over the ranks' shares
    assert two[1]["train"]["steps"] == one[1]["train"]["steps"]
    assert two[1]["train"]["tuples"] == one[1]["train"]["tuples"] == 2 * N_TRAIN
    # each rank's NT-Xent is over its share's views: fewer negatives per view than one process's, a lower loss
    assert 0 < two[1]["loss"] < one[1]["loss"]
