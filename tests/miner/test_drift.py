"""Snapshot drift, checked against brute force over the common items' stored vectors."""

from __future__ import annotations

import numpy as np
import pytest

from hardneg.miner.drift import snapshot_drift
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex, stored_vectors


def by_id(index: VectorIndex, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = index.rows_of(ids)
    return stored_vectors(index)[rows], index.labels[rows]


def brute_drift(a: VectorIndex, b: VectorIndex, k: int) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """Over all common ids: per-anchor overlap (m,), whether the hardest negative changed (m,) (nan: none),
    per-class centroid d², and the labels in B (m,)."""
    common = np.intersect1d(a.ids, b.ids)
    (xa, la), (xb, lb) = by_id(a, common), by_id(b, common)
    out = []
    for x, lab, idx in ((xa, la, a), (xb, lb, b)):
        d2 = idx.distance.pairwise(x, x)
        np.fill_diagonal(d2, np.inf)
        near = [set(np.argsort(row, kind="stable")[:k].tolist()) for row in d2]
        wrong = np.where(lab[:, None] != lab[None, :], d2, np.inf)
        hardest = np.where(np.isfinite(wrong.min(1)), wrong.argmin(1), -1)
        out.append((near, hardest))
    overlap = np.array([len(na & nb) / k for na, nb in zip(out[0][0], out[1][0])])
    ha, hb = out[0][1], out[1][1]
    changed = np.where((ha >= 0) & (hb >= 0), (ha != hb).astype(float), np.nan)
    shift = {int(c): float(((xa[la == c].mean(0) - xb[lb == c].mean(0)) ** 2).sum()) for c in np.intersect1d(la, lb)}
    return overlap, changed, shift, lb


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_drift_matches_brute_force(clusters, metric):
    data = clusters(300, 8, 4, seed=21, spread=0.8)
    rng = np.random.default_rng(21)
    a = VectorIndex.build(data.vectors[:260], data.labels[:260], data.ids[:260], metric=metric)
    moved = data.vectors + 0.4 * rng.normal(size=data.vectors.shape).astype(np.float32)
    labels = data.labels.copy()
    labels[50:55] = (labels[50:55] + 1) % 4  # relabelled items are judged by each snapshot's own label
    b = VectorIndex.build(moved[40:], labels[40:], data.ids[40:], metric=metric)
    k = 5
    drift = snapshot_drift(a, b, k=k, sample=10_000)  # the sample holds every common item
    overlap, changed, shift, lb = brute_drift(a, b, k)
    assert (drift.common, drift.only_from, drift.only_to, drift.anchors) == (220, 40, 40, 220)
    assert drift.overlap_mean == pytest.approx(overlap.mean())
    assert 0.1 < drift.overlap_mean < 0.9  # the data really moved, but not beyond recognition
    for c, v in drift.overlap_per_class.items():
        assert v == pytest.approx(overlap[lb == c].mean())
    assert drift.centroid_shift == pytest.approx(shift, rel=1e-4)
    assert drift.centroid_shift_mean == pytest.approx(np.mean(list(shift.values())), rel=1e-4)
    assert drift.hardest_negative_changed == pytest.approx(np.nanmean(changed))


def test_a_snapshot_has_no_drift_from_itself(clusters):
    data = clusters(200, 6, 3, seed=5)
    index = VectorIndex.build(data.vectors, data.labels, data.ids)
    drift = snapshot_drift(index, index, k=8, sample=50, seed=3)
    assert drift.anchors == 50 and drift.overlap_mean == 1.0 and drift.hardest_negative_changed == 0.0
    assert drift.centroid_shift_mean == 0.0 and set(drift.overlap_per_class.values()) == {1.0}


def test_sample_is_seeded(clusters):
    data = clusters(200, 6, 3, seed=5)
    a = VectorIndex.build(data.vectors, data.labels, data.ids)
    b = VectorIndex.build(np.roll(data.vectors, 1, axis=0), data.labels, data.ids)
    assert snapshot_drift(a, b, sample=40, seed=1) == snapshot_drift(a, b, sample=40, seed=1)


def test_snapshots_of_different_dimension_compare_neighbours_only(clusters):
    data = clusters(100, 6, 3, seed=5)
    a = VectorIndex.build(data.vectors, data.labels, data.ids)
    b = VectorIndex.build(data.vectors[:, :4], data.labels, data.ids)
    drift = snapshot_drift(a, b, k=3)
    assert drift.centroid_shift == {} and 0 < drift.overlap_mean <= 1


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "k must"), ({"sample": 0}, "sample must"),
                                          ({"sample": True}, "sample must"), ({"k": 60}, "share 50 item")])
def test_drift_refuses_bad_arguments(clusters, kwargs, match):
    data = clusters(100, 6, 3, seed=5)
    a = VectorIndex.build(data.vectors[:50], data.labels[:50], data.ids[:50])
    with pytest.raises(ValidationError, match=match):
        snapshot_drift(a, a, **kwargs)
