"""bench/scale.py: its helpers against brute force, and a small run of the script checked against references."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hardneg.miner.index import ivf_lists
from hardneg.miner.metrics import retrieval_metrics
from hardneg.miner.mining import MiningResult, MiningStats

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
scale = importlib.util.module_from_spec(_spec)
sys.modules["bench_scale"] = scale  # dataclasses look their module up there
_spec.loader.exec_module(scale)


def test_clustered_embeddings_and_wrong_label_rank_by_brute_force() -> None:
    data = scale.clustered_embeddings(600, 8, 5, spread=1.0, seed=3, chunk=100)
    assert data.vectors.dtype == np.float32 and data.vectors.shape == (600, 8)
    np.testing.assert_allclose(np.linalg.norm(data.vectors, axis=1), 1.0, rtol=1e-5)
    ranks = scale.wrong_label_rank(data, sample=20, depth=600, seed=4)
    rows = np.random.default_rng(4).choice(600, size=20, replace=False)
    for r, got in zip(rows, ranks):
        order = np.argsort(-(data.vectors @ data.vectors[r]), kind="stable")
        want = next(i for i, j in enumerate(order) if data.labels[j] != data.labels[r])
        assert got == want


@pytest.mark.parametrize("seed", range(6))
def test_class_subset_takes_a_run_of_whole_classes(seed: int) -> None:
    labels = np.repeat(np.arange(10), np.arange(1, 11))  # class c has c + 1 items
    sub = scale.class_subset(labels, 12, np.random.default_rng(seed))
    taken = np.unique(labels[sub])
    assert np.array_equal(sub, np.flatnonzero(np.isin(labels, taken)))  # every item of each class taken
    assert np.array_equal(taken, np.arange(taken[0], taken[-1] + 1))  # consecutive classes
    # It stops at the class that reaches the size, or at the last class.
    assert (len(sub) >= 12 and len(sub) - (taken[-1] + 1) < 12) or taken[-1] == 9


def _result(anchor: list[int], negative: list[int]) -> MiningResult:
    a, n = np.array(anchor, np.int64), np.array(negative, np.int64)
    empty = np.empty(0, np.int64)
    return MiningResult(anchor=a, positive=a, negative=n, pair_i=empty, pair_j=empty, pair_y=empty,
                        stats=MiningStats("hardest", "cosine", 0.2, 1))


def test_negatives_by_anchor_and_recall_with_ties() -> None:
    res = _result([0, 0, 2, 5], [3, 4, 1, 2])
    np.testing.assert_array_equal(scale.negatives_by_anchor(res, np.array([5, 1, 0, 2])), [2, -1, 3, 1])
    # Anchor 0: item 1 and item 2 at the same distance (a tie counts); anchor 3: a different, farther item.
    x = np.array([[1, 0], [0, 1], [0, -1], [1, 0.1], [-1, 0]], np.float32)
    data = scale.Data(x, np.zeros(5, np.int64))
    got = scale.recall_vs_exact(data, np.array([0, 3]), approx=np.array([2, 4]), exact=np.array([1, 1]))
    assert got == 0.5


def test_small_run_against_references(tmp_path: Path) -> None:
    """Flat mining is exact, so its recall is 1; the ivf kinds follow the ivf rule; the every-query evaluation
    equals a direct call and the sampled one lies within its interval of it."""
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "bench" / "scale.py"), "-n", "1200", "--dim", "8", "--classes", "6",
           "--kinds", "flat", "ivf", "ivf-sq8", "hnsw", "--exact-anchors", "150", "--recall-anchors", "200",
           "--approx-subset", "300", "--eval-items", "600", "--eval-sample", "100", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    kinds = {row["kind"]: row for row in fig["kinds"]}
    assert set(kinds) == {"flat", "ivf", "ivf-sq8", "hnsw"}
    nlist, nprobe = ivf_lists(1200)
    assert kinds["ivf"]["factory"] == f"IVF{nlist},Flat" and kinds["ivf-sq8"]["factory"] == f"IVF{nlist},SQ8,RFlat"
    for strategy in ("hardest", "semihard"):
        assert kinds["flat"]["mining"][strategy]["recall"] == 1.0
        assert kinds["flat"]["mining"][strategy]["anchors_mined"] == 1200
        assert kinds["hnsw"]["mining"][strategy]["anchors_mined"] < 1200  # mined on the subset, scaled
    for row in kinds.values():
        assert row["bytes_per_item"] >= 4 * 8  # at least the float32 vectors of the flat storage or refinement
        assert row["build"]["peak_rss_gib"] > 0
    data = scale.clustered_embeddings(1200, 8, 6, 1.0, 0)
    want = retrieval_metrics(data.vectors[:600], data.labels[:600])
    assert fig["eval"]["blocked"]["metrics"]["map_at_r"] == pytest.approx(want["map_at_r"], abs=1e-12)
    sampled = fig["eval"]["sampled_same_items"]["metrics"]
    assert abs(sampled["map_at_r"] - want["map_at_r"]) <= 3 * sampled["map_at_r_ci95"]
    assert len(fig["exact"]["hardest"]["runs"]) == 2
