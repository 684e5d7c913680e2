"""Shared fixtures for the hardneg tests: seeded labelled data and a brute-force kNN reference.

The reference is plain numpy over :meth:`hardneg.miner.distances.Distance.pairwise` (exact float64 ``d²``), so
every search test compares FAISS against arithmetic that can be read, never against hard-coded results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from hardneg.miner.distances import get_distance


@dataclass(frozen=True)
class LabelledVectors:
    """Seeded synthetic data: ``vectors`` (n, d) float32, ``labels`` (n,) int64, unique ``ids`` (n,) int64,
    drawn around ``centres`` (c, d) with noise ``spread``; class ``j`` has label ``j + label_offset``."""

    vectors: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    centres: np.ndarray
    spread: float
    label_offset: int

    def near(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` fresh points of the same classes (e.g. queries): vectors (n, d) float32 and labels (n,) int64."""
        rng = np.random.default_rng(seed)
        cls = rng.integers(0, len(self.centres), size=n)
        x = self.centres[cls] + self.spread * rng.normal(size=(n, self.centres.shape[1]))
        return x.astype(np.float32), (cls + self.label_offset).astype(np.int64)


def make_clusters(n: int, dim: int, n_classes: int, *, seed: int, spread: float = 0.5,
                  label_offset: int = 0, shuffle_ids: bool = True) -> LabelledVectors:
    """``n`` points around ``n_classes`` Gaussian centres (unit variance) with per-point noise ``spread``.

    Labels are the centre index plus ``label_offset`` (so negative labels can be tested); ids are a seeded
    permutation of sparse large integers unless ``shuffle_ids`` is False (then ``0..n-1``).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, size=n)
    vectors = (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32)
    ids = (rng.permutation(n) * 7 + 1000).astype(np.int64) if shuffle_ids else np.arange(n, dtype=np.int64)
    return LabelledVectors(vectors, (labels + label_offset).astype(np.int64), ids, centres, spread, label_offset)


@pytest.fixture(scope="session")
def clusters() -> Callable[..., LabelledVectors]:
    """Factory fixture for :func:`make_clusters`."""
    return make_clusters


def reference_distances(vectors: np.ndarray, queries: np.ndarray, metric: str,
                        admissible: np.ndarray | None = None) -> np.ndarray:
    """Exact ``d²`` (nq, n) float64 between ``queries`` and ``vectors``, ``inf`` where ``admissible`` is False."""
    dist = get_distance(metric)
    d2 = dist.pairwise(dist.prepare(queries), dist.prepare(vectors))
    return d2 if admissible is None else np.where(admissible, d2, np.inf)


def assert_knn_matches(hits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], d2: np.ndarray,
                       ids: np.ndarray, labels: np.ndarray, k: int, atol: float = 1e-4) -> None:
    """Check search results against brute force, allowing ties at the cut.

    Args:
        hits: per query ``(ids, labels, distances)`` as returned, nearest first.
        d2: (nq, n) reference ``d²`` from :func:`reference_distances`, ``inf`` for inadmissible items.
        ids, labels: (n,) of the indexed items, in the order ``d2``'s columns use.
        k: neighbours asked for.
        atol: float tolerance on ``d²`` (FAISS computes in float32).
    """
    assert len(hits) == d2.shape[0], "one result per query"
    col_of = {int(v): j for j, v in enumerate(ids)}
    for i, (hit_ids, hit_labels, hit_d) in enumerate(hits):
        hit_ids, hit_d = np.asarray(hit_ids), np.asarray(hit_d, dtype=np.float64)
        finite = np.sort(d2[i][np.isfinite(d2[i])])
        m = min(k, len(finite))
        assert len(hit_ids) == m, f"query {i}: {len(hit_ids)} hits, {m} admissible items among the nearest {k}"
        if m == 0:
            continue
        assert len(set(hit_ids.tolist())) == m, f"query {i}: duplicate ids {hit_ids}"
        cols = np.array([col_of[int(v)] for v in hit_ids])
        assert np.isfinite(d2[i, cols]).all(), f"query {i}: inadmissible ids {hit_ids[~np.isfinite(d2[i, cols])]}"
        np.testing.assert_array_equal(hit_labels, labels[cols], err_msg=f"query {i}: labels do not match ids")
        np.testing.assert_allclose(hit_d, d2[i, cols], atol=atol, err_msg=f"query {i}: reported d² is not the true d²")
        np.testing.assert_allclose(hit_d, finite[:m], atol=atol, err_msg=f"query {i}: not the {m} smallest d²")
        # Every item strictly inside the cut must be there; items tied at the cut may be swapped.
        must = set(ids[d2[i] < finite[m - 1] - atol].tolist())
        assert must <= set(hit_ids.tolist()), f"query {i}: missing ids {sorted(must - set(hit_ids.tolist()))}"


@pytest.fixture(scope="session")
def knn_reference() -> tuple[Callable[..., np.ndarray], Callable[..., None]]:
    """``(reference_distances, assert_knn_matches)``: the brute-force kNN reference and its checker."""
    return reference_distances, assert_knn_matches
