"""Query mode (queries against a corpus with qrels, or labelled external anchors) against brute force.

The reference ranks every corpus item by exact float64 d² to the query, drops the query's positives,
applies sentence-transformers' score rules one candidate at a time against the hardest positive, and
takes the rank window. Exact snapshots must match it (ties allowed: equal distances may swap).
"""

from __future__ import annotations

import numpy as np
import pytest

from hardneg.miner.errors import NotFoundError, ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.mining import MiningConfig, bf16_prefilter, floor_search
from hardneg.miner.mining.guards import Candidates, Guard
from hardneg.miner.mining.queries import PositiveSets, mine_queries

METRICS = ("cosine", "l2")


@pytest.fixture(params=["float32", "bf16"])
def scan(request, monkeypatch) -> str:
    """The exact scan as it runs on a small corpus (float32), or through its bfloat16 prefilter in blocks of
    64 rows (what a large corpus takes where the CPU has bfloat16 instructions): both must give the reference."""
    if request.param == "bf16":
        pytest.importorskip("torch")
        monkeypatch.setattr(bf16_prefilter, "wanted", lambda *_: True)
        monkeypatch.setattr(floor_search, "CORPUS_BLOCK", 64)
    return request.param


def prep(x: np.ndarray, metric: str) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x


def score(d2: float, metric: str) -> float:
    return 1.0 - d2 / 2.0 if metric == "cosine" else -d2


def ref_window(corpus: np.ndarray, ids: np.ndarray, q: np.ndarray, pos: list[int], cfg: MiningConfig,
               metric: str) -> tuple[list[int], list[float], dict[str, int]]:
    """The admissible ranking of one query (ids and d²) and how many candidates each rule dropped (whole corpus)."""
    x, qq = prep(corpus, metric), prep(q[None], metric)[0]
    d2 = ((x - qq) ** 2).sum(1)
    pos_set = set(pos)
    s_p = min(score(float(d2[np.flatnonzero(ids == p)[0]]), metric) for p in pos)
    kept, kept_d2, dropped = [], [], {"absolute_margin": 0, "relative_margin": 0, "max_score": 0}
    for r in np.argsort(d2, kind="stable"):
        if int(ids[r]) in pos_set:
            continue
        s = score(float(d2[r]), metric)
        if cfg.absolute_margin is not None and s > s_p - cfg.absolute_margin:
            dropped["absolute_margin"] += 1
        elif cfg.relative_margin is not None and s > s_p - abs(s_p) * cfg.relative_margin:
            dropped["relative_margin"] += 1
        elif cfg.max_score is not None and s > cfg.max_score:
            dropped["max_score"] += 1
        else:
            kept.append(int(ids[r]))
            kept_d2.append(float(d2[r]))
    return kept, kept_d2, dropped


def corpus_and_qrels(clusters, metric: str, seed: int = 3):
    data = clusters(300, 8, 6, seed=seed)
    index = VectorIndex.build(data.vectors, data.labels, data.ids, metric=metric)
    queries, qlab = data.near(25, seed=seed + 1)
    rng = np.random.default_rng(seed)
    # 1-3 positives per query from its own class; query 0 has none.
    pos = [[] if i == 0 else rng.choice(data.ids[data.labels == qlab[i]], rng.integers(1, 4), replace=False).tolist()
           for i in range(len(queries))]
    return data, index, queries, pos


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("guards", [{}, {"relative_margin": 0.05}, {"absolute_margin": 0.02, "max_score": 0.9}])
def test_top_window_equals_brute_force(clusters, metric: str, guards: dict, scan: str) -> None:
    data, index, queries, pos = corpus_and_qrels(clusters, metric)
    if metric == "l2" and "max_score" in guards:
        guards = {**guards, "max_score": -0.5}
    cfg = MiningConfig(strategy="window", per_anchor=4, window_skip=2, window_width=6, window_sampling="top",
                       candidates=8, **guards)
    res = mine_queries(index, queries, cfg, positives=PositiveSets.from_lists(pos), query_ids=np.arange(25) + 500)
    assert res.query_ids.tolist() == list(range(500, 525))
    for i, p in enumerate(pos):
        got = res.negatives[i][res.negatives[i] >= 0]
        if not p:
            assert len(got) == 0
            continue
        kept, kept_d2, _ = ref_window(data.vectors, data.ids, queries[i], p, cfg, metric)
        want, want_d2 = kept[2:6], kept_d2[2:6]
        assert not set(got.tolist()) & set(p)
        if got.tolist() != want:  # only a tie may reorder
            np.testing.assert_allclose(res.negative_d2[i][:len(got)], want_d2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.negative_d2[i][:len(got)], want_d2, rtol=1e-5, atol=1e-6)
    assert res.stats.anchors_singleton == 1
    assert res.stats.anchors_mined == 24
    assert set(res.stats.guard_dropped) == set(guards)


@pytest.mark.parametrize("metric", METRICS)
def test_guard_drop_counts_equal_reference_over_the_whole_corpus(clusters, metric: str, scan: str) -> None:
    data, index, queries, pos = corpus_and_qrels(clusters, metric, seed=9)
    max_score = 0.95 if metric == "cosine" else -0.3
    cfg = MiningConfig(per_anchor=2, absolute_margin=-0.05, relative_margin=0.02, max_score=max_score,
                       candidates=10_000)  # more than the corpus: every candidate is examined
    res = mine_queries(index, queries, cfg, positives=PositiveSets.from_lists(pos))
    want = {"absolute_margin": 0, "relative_margin": 0, "max_score": 0}
    for i, p in enumerate(pos):
        if p:
            for k, v in ref_window(data.vectors, data.ids, queries[i], p, cfg, metric)[2].items():
                want[k] += v
    assert res.stats.guard_dropped == want
    assert sum(want.values()) > 0


@pytest.mark.parametrize("metric", METRICS)
def test_random_window_draws_inside_the_window(clusters, metric: str) -> None:
    data, index, queries, pos = corpus_and_qrels(clusters, metric, seed=5)
    cfg = MiningConfig(strategy="window", per_anchor=3, window_skip=1, window_width=10, relative_margin=0.1, seed=4)
    res = mine_queries(index, queries, cfg, positives=PositiveSets.from_lists(pos))
    for i, p in enumerate(pos[1:], start=1):
        kept, _, _ = ref_window(data.vectors, data.ids, queries[i], p, cfg, metric)
        got = res.negatives[i].tolist()
        assert len(set(got)) == 3 and set(got) <= set(kept[1:11])
        assert np.all(np.diff(res.negative_d2[i]) >= 0)  # nearest first


class _KeepAll(Guard):
    """A guard that is no radius (it drops nothing): the core must fall back to searching and widening."""

    name = "keep_all"

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        return np.zeros_like(alive)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("widen", [False, True])
def test_deep_margin_in_one_pass_equals_reference(clusters, metric: str, widen: bool) -> None:
    """A margin that drops most of the nearest candidates: exact snapshots search beyond each query's radius in one
    pass (``widen=False``); with a guard that is no radius the core widens instead. Both equal brute force, and so
    do the guards' drop counts (every candidate nearer than the radius, over the whole corpus)."""
    data, index, queries, pos = corpus_and_qrels(clusters, metric, seed=8)
    margin = {"absolute_margin": 0.3} if metric == "cosine" else {"relative_margin": 0.5}
    cfg = MiningConfig(strategy="window", per_anchor=2, window_skip=1, window_width=2, window_sampling="top",
                       candidates=2, **margin)
    res = mine_queries(index, queries, cfg, positives=PositiveSets.from_lists(pos),
                       extra_guards=[_KeepAll()] if widen else ())
    if widen:
        assert res.stats.anchors_widened > 0 and res.stats.search_rounds > 1
    else:
        assert res.stats.anchors_widened == 0 and res.stats.search_rounds == 1
    want = dict.fromkeys(("absolute_margin", "relative_margin", "max_score"), 0)
    for i, p in enumerate(pos[1:], start=1):
        kept, kept_d2, dropped = ref_window(data.vectors, data.ids, queries[i], p, cfg, metric)
        np.testing.assert_allclose(res.negative_d2[i][:len(kept[1:3])], kept_d2[1:3], rtol=1e-5, atol=1e-6)
        assert not set(res.negatives[i].tolist()) & set(p)
        want = {k: want[k] + v for k, v in dropped.items()}
    assert res.stats.guard_dropped[next(iter(margin))] == want[next(iter(margin))] > 0


def test_exclude_self_and_positive_d2(clusters) -> None:
    data, index, _, _ = corpus_and_qrels(clusters, "l2")
    anchors = data.ids[:10]
    queries = data.vectors[:10]
    pos = [[int(data.ids[i + 10])] for i in range(10)]
    res = mine_queries(index, queries, MiningConfig(per_anchor=5), positives=PositiveSets.from_lists(pos),
                       exclude_ids=anchors)
    for i in range(10):
        assert anchors[i] not in res.negatives[i] and pos[i][0] not in res.negatives[i]
        want = float(((data.vectors[i].astype(np.float64) - data.vectors[i + 10]) ** 2).sum())
        assert res.positive_d2[i] == pytest.approx(want, rel=1e-6)
        # hardest: the 5 nearest items other than itself and its positive
        d2 = ((data.vectors.astype(np.float64) - data.vectors[i]) ** 2).sum(1)
        order = [int(data.ids[r]) for r in np.argsort(d2) if r != i and data.ids[r] != pos[i][0]][:5]
        np.testing.assert_allclose(res.negative_d2[i], np.sort(d2[[np.flatnonzero(data.ids == j)[0] for j in order]]),
                                   rtol=1e-5)
    assert res.stats.triplets == 50 and res.stats.positive_pairs == 10


@pytest.mark.parametrize("metric", METRICS)
def test_label_mode_for_external_vectors(clusters, metric: str) -> None:
    data, index, queries, _ = corpus_and_qrels(clusters, metric)
    _, qlab = data.near(25, seed=4)
    res = mine_queries(index, queries, MiningConfig(per_anchor=3), labels=qlab)
    x = prep(data.vectors, metric)
    for i in range(len(queries)):
        d2 = ((x - prep(queries[i][None], metric)[0]) ** 2).sum(1)
        d2[data.labels == qlab[i]] = np.inf
        np.testing.assert_allclose(res.negative_d2[i], np.sort(d2)[:3], rtol=1e-5, atol=1e-6)
        labels_of = {int(a): int(b) for a, b in zip(data.ids, data.labels)}
        assert all(labels_of[j] != qlab[i] for j in res.negatives[i])


def test_refusals(clusters) -> None:
    data, index, queries, pos = corpus_and_qrels(clusters, "cosine")
    with pytest.raises(ValidationError, match="exactly one"):
        mine_queries(index, queries, MiningConfig(), positives=PositiveSets.from_lists(pos), labels=np.zeros(25))
    with pytest.raises(ValidationError, match="needs each anchor's positive"):
        mine_queries(index, queries, MiningConfig(relative_margin=0.05), labels=np.zeros(25, np.int64))
    with pytest.raises(NotFoundError, match="positives"):
        mine_queries(index, queries[:1], MiningConfig(), positives=PositiveSets.from_lists([[123456789]]))
    with pytest.raises(ValidationError, match="one per query"):
        mine_queries(index, queries[:2], MiningConfig(), positives=PositiveSets.from_lists([[int(data.ids[0])]]))
    with pytest.raises(ValidationError, match="relative_margin"):
        MiningConfig(relative_margin=1.5)
    with pytest.raises(ValidationError, match="window_sampling"):
        MiningConfig(window_sampling="best")
