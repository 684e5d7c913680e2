"""``hardneg mine`` on a snapshot of 100,000 classes of 2-3 items: peak memory bounded by N, C and d, results exact.

A real process per command (:mod:`scale_support` reads its peak resident memory). Reference: the nearest
wrong-label neighbour of each anchor by brute force (numpy over every stored vector), allowing for ties.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scale_support import assert_peak_within, budget_mib, interpreter_mib, many_small_classes, run_child

from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore

CLASSES, DIM, ANCHORS = 100_000, 8, 4000
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VectorIndex]:
    x, y = many_small_classes(CLASSES, DIM, seed=3)
    index = VectorIndex.build(x, y, np.arange(len(y)) * 3 + 7, metric="cosine", index="flat")
    root = tmp_path_factory.mktemp("many-classes") / "store"
    SnapshotStore(root).publish(index)
    return root, index


@pytest.mark.slow
def test_mine_on_100k_classes_fits_a_bound_and_finds_the_hardest_negatives(snapshot, tmp_path: Path) -> None:
    root, index = snapshot
    rng = np.random.default_rng(0)
    anchors = np.sort(rng.choice(index.ids, size=ANCHORS, replace=False))  # spread over ~4,000 classes
    np.save(tmp_path / "anchors.npy", anchors)
    out = tmp_path / "mined.npz"
    base = interpreter_mib("hardneg.cli", "hardneg.miner.mining")
    allowed = budget_mib(index.count, CLASSES, DIM, 1) + 256  # + FAISS's and numpy's bounded search blocks
    cmd = [sys.executable, "-m", "hardneg.cli", "mine", "--store", str(root), "--strategy", "hardest",
           "--anchors", str(tmp_path / "anchors.npy"), "--out", str(out)]
    run = run_child(cmd, ceiling_mib=2 * (base + allowed), timeout=240, env=ENV, cwd=tmp_path)
    assert_peak_within(run, base, allowed, f"hardneg mine on {CLASSES} classes")

    with np.load(out, allow_pickle=False) as z:
        anchor, negative = z["anchor"], z["negative"]
    assert np.array_equal(np.sort(anchor), anchors)  # every anchor has a positive (classes of 2-3) and one negative
    # brute force: the nearest stored vector of another label, for a sample of the anchors
    xb = index.index.reconstruct_n(0, index.count)
    rows, neg_rows = index.rows_of(anchor), index.rows_of(negative)
    check = rng.choice(len(anchor), size=300, replace=False)
    x64 = xb.astype(np.float64)
    sq = (x64 * x64).sum(1)
    nearest = np.empty(len(check))
    for block in np.array_split(np.arange(len(check)), 6):  # (50, n) distance blocks
        r = rows[check[block]]
        d2 = sq[r, None] + sq[None, :] - 2.0 * x64[r] @ x64.T
        d2[index.labels[r][:, None] == index.labels[None, :]] = np.inf
        nearest[block] = d2.min(1)
    got = ((xb[rows[check]].astype(np.float64) - xb[neg_rows[check]]) ** 2).sum(-1)
    assert (index.labels[neg_rows] != index.labels[rows]).all()
    np.testing.assert_allclose(got, nearest, atol=1e-5)
