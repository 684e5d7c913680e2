"""Global mining with many classes of few items (face identities, product catalogues): no part may assume few classes.

End to end, as real ``hardneg train`` processes: one warm-up epoch plus one refresh and the epoch of class
batches composed from it, on 10,000 and 100,000 classes of 2-3 small vectors each, with the process's peak
resident memory held to a bound derived from N, C and d (:mod:`scale_support`). Code that builds a C x C or
batches x C array fails the bound (or is killed by the watchdog). References for the class-level pieces: the
full pairwise-distance matrix and a Python loop (small C), recounted with numpy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scale_support import assert_peak_within, budget_mib, interpreter_mib, many_small_classes, run_child

from hardneg.miner.errors import ValidationError
from hardneg.trainer.batching import (
    ClassGroups, PKBatches, check_class_batches, composition_stats, confusable_classes, distinct_draws,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test machine's cores are shared
INPUT_DIM, EMBEDDING_DIM, BATCH, PER_CLASS = 16, 16, 128, 2


def write_data(tmp_path: Path, n_classes: int) -> tuple[Path, Path, int]:
    x, y = many_small_classes(n_classes, INPUT_DIM, seed=0)
    ex, ey = many_small_classes(300, INPUT_DIM, seed=1, label_offset=10 * n_classes)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "eval.npz", x=ex, y=ey)
    return tmp_path / "train.npz", tmp_path / "eval.npz", len(y)


@pytest.fixture(scope="module")
def trainer_base_mib() -> float:
    return interpreter_mib("hardneg.cli", "hardneg.trainer.loop", "hardneg.miner.mining")


@pytest.mark.slow
@pytest.mark.parametrize("n_classes", [10_000, 100_000])
def test_one_epoch_and_one_refresh_of_global_mining_fit_a_bound_from_n_c_d(tmp_path: Path, n_classes: int,
                                                                           trainer_base_mib: float) -> None:
    train, evaluation, n = write_data(tmp_path, n_classes)
    p = BATCH // PER_CLASS
    allowed = budget_mib(n, n_classes, INPUT_DIM + EMBEDDING_DIM, p) + 256  # + torch's and FAISS's work buffers
    cmd = [sys.executable, "-m", "hardneg.cli", "train", "--data", f"npz:{train}", "--eval-data", f"npz:{evaluation}",
           "--mining", "global", "--epochs", "2", "--warmup-epochs", "1", "--per-class", str(PER_CLASS),
           "--batch-size", str(BATCH), "--embedding-dim", str(EMBEDDING_DIM), "--store", str(tmp_path / "store"),
           "--run-dir", str(tmp_path / "run")]
    run = run_child(cmd, ceiling_mib=2 * (trainer_base_mib + allowed), timeout=280, env=ENV, cwd=tmp_path)
    assert_peak_within(run, trainer_base_mib, allowed, f"hardneg train on {n_classes} classes")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    refreshed = records[2]  # epoch 2: the first refresh (after one warm-up epoch), then class batches
    assert refreshed["epoch"] == 2 and refreshed["snapshot"] is not None
    assert refreshed["mining"]["classes"] == n_classes and refreshed["mining"]["classes_per_batch"] == p
    # confusable classes are closer than classes at large (the statistic the old code could not compute)
    assert refreshed["mining"]["neighbour_centroid_d2"] < refreshed["mining"]["centroid_d2"]
    assert refreshed["train"]["steps"] == -(-n // BATCH)


def test_class_batches_that_repeat_every_class_are_refused_before_training(tmp_path: Path) -> None:
    """Classes of 2-3 items cannot fill K = 4 distinct items: refused when the run starts, not after the first
    refresh composes class batches (random warm-up batches alone would not have checked K)."""
    train, evaluation, _ = write_data(tmp_path, 50)
    cmd = [sys.executable, "-m", "hardneg.cli", "train", "--data", f"npz:{train}", "--eval-data", f"npz:{evaluation}",
           "--batching", "random", "--per-class", "4", "--store", str(tmp_path / "store"),
           "--run-dir", str(tmp_path / "run")]
    run = run_child(cmd, ceiling_mib=4096, timeout=120, env=ENV, cwd=tmp_path)
    assert run.returncode != 0
    assert "per_class (4) is larger than every class (the largest holds 3 items)" in run.output
    assert "accepted: per_class between 2 and 3" in run.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.parametrize("labels, batch_size, per_class, message", [
    (np.array([0, 0, 0, 1, 1, 1]), 8, 4, r"per_class \(4\) is larger than every class \(the largest holds 3"),
    (np.array([0, 0, 1, 2, 3]), 8, 2, "at least 2 classes with 2 or more items, got 1"),
    (np.array([0, 0, 1, 1]), 3, 2, r"batch_size \(3\) must hold at least 2 classes"),
])
def test_impossible_class_batches_are_refused(labels: np.ndarray, batch_size: int, per_class: int,
                                               message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        check_class_batches(labels, batch_size, per_class)


# --------------------------------------------------------------- class-level pieces against references
def test_composition_stats_equal_the_full_pairwise_means() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(300), rng.integers(1, 5, size=300))  # classes of one item have no centroid
    v = rng.normal(size=(len(y), 5)).astype(np.float32) + 3 * rng.normal(size=(300, 5)).astype(np.float32)[y]
    table = confusable_classes(v, y, 6)
    stats = composition_stats(v, y, table)
    classes = np.array([c for c in range(300) if (y == c).sum() >= 2])
    cent = np.stack([v[y == c].astype(np.float64).mean(0) for c in classes])
    d2 = ((cent[:, None, :] - cent[None, :, :]) ** 2).sum(-1)
    pos = {c: i for i, c in enumerate(classes)}
    near = [d2[pos[r[0]], pos[o]] for r in table for o in r[1:]]
    assert stats["classes"] == len(classes) and stats["classes_per_batch"] == 6
    assert stats["centroid_d2"] == pytest.approx(d2[~np.eye(len(classes), dtype=bool)].mean(), rel=1e-9)
    assert stats["neighbour_centroid_d2"] == pytest.approx(np.mean(near), rel=1e-9)


def test_distinct_draws_are_uniform_subsets() -> None:
    """Every k-subset of a set equally likely (chi-square), every row distinct, short sets taken whole."""
    from itertools import combinations

    from scipy.stats import chisquare

    rng = np.random.default_rng(0)
    draws = distinct_draws(np.full(60_000, 5), 2, rng)
    assert ((draws >= 0) & (draws < 5)).all() and (draws[:, 0] != draws[:, 1]).all()
    subsets = {frozenset(s): i for i, s in enumerate(combinations(range(5), 2))}
    counts = np.bincount([subsets[frozenset(r)] for r in draws.tolist()], minlength=len(subsets))
    assert chisquare(counts).pvalue > 1e-3
    short = distinct_draws(np.array([3, 0, 1]), 4, rng)
    assert sorted(short[0, :3].tolist()) == [0, 1, 2] and short[0, 3] == -1
    assert (short[1] == -1).all() and short[2].tolist() == [0, -1, -1, -1]


def test_pk_classes_are_uniform_over_many_classes() -> None:
    """Each of C classes is drawn about equally often, P distinct per batch, with no batches x C array."""
    y = np.repeat(np.arange(2000), 2)
    sampler = PKBatches(y, batch_size=40, per_class=2)
    chosen = sampler.choose_classes(5000, np.random.default_rng(1))
    assert chosen.shape == (5000, 20)
    assert all(len(set(r)) == 20 for r in chosen.tolist())
    from scipy.stats import chisquare

    assert chisquare(np.bincount(chosen.ravel(), minlength=2000)).pvalue > 1e-3
    groups = ClassGroups.of(y)
    items = groups.draw(chosen[0], 2, np.random.default_rng(2))
    assert (y[items] == groups.classes[chosen[0]][:, None]).all() and (items[:, 0] != items[:, 1]).all()


def test_confusable_classes_beyond_exact_classes_are_mostly_the_exact_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above EXACT_CLASSES the IVF search finds most of the exact nearest classes (brute force over centroids)."""
    import hardneg.trainer.batching as batching

    x, y = many_small_classes(2000, 8, seed=6)
    exact = confusable_classes(x, y, 8)
    monkeypatch.setattr(batching, "EXACT_CLASSES", 1000)
    approx = confusable_classes(x, y, 8)
    assert approx.shape == exact.shape == (2000, 8)
    assert (approx[:, 0] == np.arange(2000)).all()  # each row: the class itself, then 7 others
    assert all(len(set(r)) == 8 for r in approx.tolist())
    cent = np.stack([x[y == c].mean(0) for c in range(2000)]).astype(np.float64)
    sq = (cent * cent).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * cent @ cent.T
    np.fill_diagonal(d2, np.inf)
    brute = np.argsort(d2, axis=1, kind="stable")[:, :7]
    assert all(set(r[1:]) == set(b) for r, b in zip(exact.tolist(), brute.tolist()))  # flat: exact (no ties here)
    recall = np.mean([len(set(a[1:]) & set(b)) / 7 for a, b in zip(approx.tolist(), brute.tolist())])
    assert recall > 0.8, recall
