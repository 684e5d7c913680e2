"""``hardneg train --mode self-supervised`` end to end, as real processes, on the digits.

Four runs of 3 epochs (a refresh mining negatives before epoch 2, used by epochs 2 and 3), started together,
all on the split the built-in digits get with held-out samples (1347 training, 450 evaluation images), written
to ``.npz`` files so that only the training labels change between runs:

* ``labelled``: the training images with their true labels;
* ``shuffled`` and ``constant``: the same images with shuffled labels, or all 0 (unlabelled data);
* ``resumed``: ``labelled`` stopped after 2 epochs, then continued with ``--resume``.

Every run evaluates on the same held-out images with their true labels. References: the untrained model
(epoch 0) for the MAP@R gain, and the ``labelled`` run for the rest. A run that read a training label anywhere
(batches, mining, views) would drift from it within a step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hardneg.miner.store import SnapshotStore
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import load_splits

pytestmark = pytest.mark.slow

SEED = 5
COMMON = ["train", "--mode", "self-supervised", "--seed", str(SEED), "--refresh-every", "2", "--warmup-epochs", "1"]
# One OpenMP thread per process: four runs share the machine's cores; results do not depend on it.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(work: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hardneg.cli", *args, "--run-dir", str(work / name / "run"),
                             "--store", str(work / name / "store")], cwd=work, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    return out


def history(work: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (work / name / "run" / "metrics.jsonl").read_text().splitlines()]


def results(work: Path, name: str) -> list[tuple]:
    """What training determines: per epoch the steps, loss, metrics, training counts and mining statistics."""
    return [(r["epoch"], r["step"], r["loss"], r["metrics"], r["train"], r["mining"]) for r in history(work, name)]


def weights(work: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(work / name / "run" / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("selfsup_cli")
    splits = load_splits(TrainConfig.from_dict({"seed": SEED}))  # what the built-in digits train and evaluate on
    train, evaluation = splits.train, splits.eval
    np.savez(work / "labelled.npz", x=train.x, y=train.y)
    np.savez(work / "shuffled.npz", x=train.x, y=np.random.default_rng(0).permutation(train.y))
    np.savez(work / "constant.npz", x=train.x, y=np.zeros_like(train.y))
    np.savez(work / "eval.npz", x=evaluation.x, y=evaluation.y)
    procs = [start(work, name, *COMMON, "--epochs", "2" if name == "resumed" else "3", "--data",
                   f"npz:{'labelled' if name == 'resumed' else name}.npz", "--eval-data", "npz:eval.npz")
             for name in ("labelled", "shuffled", "constant", "resumed")]
    for p in procs:
        finish(p)
    finish(subprocess.Popen([sys.executable, "-m", "hardneg.cli", "train", "--resume", str(work / "resumed" / "run"),
                             "--epochs", "3"], cwd=work, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE))
    return work


def test_self_supervised_training_raises_map_at_r_on_held_out_samples(work: Path) -> None:
    h = history(work, "labelled")
    untrained, final = h[0]["metrics"]["map_at_r"], h[-1]["metrics"]["map_at_r"]
    assert [r["epoch"] for r in h] == [0, 1, 2, 3]
    assert final > untrained + 0.05, f"MAP@R {untrained:.4f} untrained -> {final:.4f} after 3 epochs"
    assert h[-1]["metrics"]["num_queries"] == 450  # the held-out quarter of the 1797 digits


def test_the_refresh_mined_negatives_for_every_image(work: Path) -> None:
    h = history(work, "labelled")
    assert [r["mining"] is not None for r in h] == [False, False, True, False]  # refresh before epoch 2 only
    mining = h[2]["mining"]
    assert mining["images"] == 1347 and mining["images_without_negatives"] == 0
    settings = TrainConfig.from_dict({"recipe": "simclr"}).recipe  # the defaults: 64 candidates after 128 skipped
    assert mining["kept"] == 1347 * settings.candidates and mining["skipped"] == 1347 * settings.skip
    assert h[1]["train"]["tuples"] == 2 * 1347  # NT-Xent terms: two views of every training image per epoch


@pytest.mark.parametrize("labels", ["shuffled", "constant"])
def test_training_labels_are_never_read(work: Path, labels: str) -> None:
    assert results(work, labels) == results(work, "labelled")
    ours, reference = weights(work, labels), weights(work, "labelled")
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), f"{key} differs with {labels} training labels"


def test_snapshots_carry_the_data_labels_for_serving(work: Path) -> None:
    # The snapshot holds whatever labels the data has (used by the api's filters), not what training saw.
    labelled = SnapshotStore(work / "labelled" / "store").open().index
    shuffled = SnapshotStore(work / "shuffled" / "store").open().index
    y = load_splits(TrainConfig.from_dict({"seed": SEED})).train.y
    np.testing.assert_array_equal(labelled.labels[np.argsort(labelled.ids)], y)
    np.testing.assert_array_equal(shuffled.labels[np.argsort(shuffled.ids)],
                                  np.random.default_rng(0).permutation(y))
    np.testing.assert_array_equal(labelled.vectors_of(np.arange(1347)), shuffled.vectors_of(np.arange(1347)))


def test_a_resumed_run_equals_the_uninterrupted_one(work: Path) -> None:
    # Epoch 3 trains on the negatives mined before epoch 2, restored from last.pt.
    assert results(work, "resumed") == results(work, "labelled")
    ours, reference = weights(work, "resumed"), weights(work, "labelled")
    for key in reference:
        assert torch.equal(ours[key], reference[key]), f"{key} differs after resuming"
