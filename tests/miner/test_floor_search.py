"""The one-pass search beyond per-query radii against brute force (numpy float64 over the whole corpus)."""

from __future__ import annotations

import numpy as np
import pytest

from hardneg.miner.distances import COSINE, L2
from hardneg.miner.mining import floor_search
from hardneg.miner.mining.floor_search import floor_knn


@pytest.mark.parametrize("prefilter", ["off", "bf16"])
@pytest.mark.parametrize("distance", [COSINE, L2], ids=["cosine", "l2"])
def test_floor_knn_equals_brute_force(monkeypatch, distance, prefilter) -> None:
    monkeypatch.setattr(floor_search, "CORPUS_BLOCK", 37)  # several corpus blocks, the last one short
    monkeypatch.setattr(floor_search, "QUERY_BLOCK", 5)
    rng = np.random.default_rng(0)
    x = distance.prepare(rng.standard_normal((200, 6)).astype(np.float32))
    q = distance.prepare(rng.standard_normal((12, 6)).astype(np.float32))
    d2 = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    # Two cumulative radii per query past its ~10th and ~40th nearest, midway in a gap wider than the search's
    # rounding band (an item within float32 rounding of a radius is returned, for the guards to decide).
    srt = np.sort(d2, 1)
    gap = np.diff(srt, axis=1) > 1e-3
    at = [[int(np.argmax(gap[i, j:])) + j for j in (9, 39)] for i in range(12)]
    floors = np.array([[(srt[i, c] + srt[i, c + 1]) / 2 for c in at[i]] for i in range(12)])
    blocked_q = np.repeat(np.arange(12), 3)
    blocked_r = rng.integers(0, 200, size=36)
    k = 7
    rows, got_d2, below = floor_knn(q, x, floors, k, distance, (blocked_q, blocked_r), prefilter)
    for i in range(12):
        allowed = np.ones(200, bool)
        allowed[blocked_r[blocked_q == i]] = False
        assert below[i].tolist() == [int((allowed & (d2[i] < f)).sum()) for f in floors[i]]
        cand = np.flatnonzero(allowed & (d2[i] >= floors[i, 1]))
        want = cand[np.argsort(d2[i, cand], kind="stable")[:k]]
        assert rows[i].tolist() == want.tolist()
        np.testing.assert_allclose(got_d2[i], d2[i, want], rtol=1e-5, atol=1e-5)


def test_floor_knn_pads_when_too_few_lie_beyond() -> None:
    rng = np.random.default_rng(1)
    x = COSINE.prepare(rng.standard_normal((30, 4)).astype(np.float32))
    q = x[:2].copy()
    d2 = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    floors = np.sort(d2, 1)[:, [-3]] - 1e-3  # only the three farthest rows lie beyond
    rows, got_d2, below = floor_knn(q, x, floors, 5, COSINE)
    assert (rows[:, :3] >= 0).all() and (rows[:, 3:] == -1).all() and np.isinf(got_d2[:, 3:]).all()
    assert below[:, 0].tolist() == [27, 27]
    assert np.all(np.diff(got_d2[:, :3], axis=1) >= 0)


@pytest.mark.parametrize("prefilter", ["off", "bf16"])
@pytest.mark.parametrize("distance", [COSINE, L2], ids=["cosine", "l2"])
def test_floor_knn_without_radius_is_plain_knn(monkeypatch, distance, prefilter) -> None:
    """No radius (no guard): the exact k nearest unblocked rows, over several query blocks run in parallel
    and corpus blocks whose score block is no whole number of 8-entry words."""
    monkeypatch.setattr(floor_search, "CORPUS_BLOCK", 45)
    monkeypatch.setattr(floor_search, "QUERY_BLOCK", 16)
    monkeypatch.setattr(floor_search, "MIN_QUERIES_PER_WORKER", 8)
    rng = np.random.default_rng(2)
    x = distance.prepare(rng.standard_normal((301, 5)).astype(np.float32))
    q = distance.prepare(rng.standard_normal((70, 5)).astype(np.float32))
    d2 = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    blocked_q = np.repeat(np.arange(70), 2)
    blocked_r = np.argsort(d2, 1)[:, [0, 3]].reshape(-1)  # the nearest and the fourth nearest of each query
    rows, got_d2, below = floor_knn(q, x, np.empty((70, 0)), 9, distance, (blocked_q, blocked_r), prefilter)
    assert below.shape == (70, 0)
    for i in range(70):
        allowed = np.ones(301, bool)
        allowed[blocked_r[blocked_q == i]] = False
        cand = np.flatnonzero(allowed)
        want = cand[np.argsort(d2[i, cand], kind="stable")[:9]]
        assert rows[i].tolist() == want.tolist()
        np.testing.assert_allclose(got_d2[i], d2[i, want], rtol=1e-5, atol=1e-5)
