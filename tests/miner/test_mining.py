"""The miner against a brute-force reference written as plain loops.

Per anchor the reference walks every item, keeps the wrong-label ones, sorts them by exact float64 d²,
applies the guards one candidate at a time and then the strategy's rule. Deterministic strategies
must match it exactly; sampled ones must draw only from the set it allows, with the distribution it
defines (checked by chi-square over many seeded draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import pytest
from scipy import stats as sps

from hardneg.miner.errors import NotFoundError, ValidationError
from hardneg.miner.index import SearchParams, VectorIndex
from hardneg.miner.mining import STRATEGIES, MiningConfig, MiningResult, mine
from hardneg.miner.mining import ivf_search as mining_ivf
from hardneg.miner.mining import search as mining_search

METRICS = ("cosine", "l2")


# ----------------------------------------------------------------------------- reference
def prepared(x: np.ndarray, metric: str) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x


def sq(x: np.ndarray, i: int, j: int) -> float:
    diff = x[i] - x[j]
    return float(diff @ diff)


def ref_hardest_positive(x: np.ndarray, y: np.ndarray, a: int) -> int | None:
    best, best_d = None, -1.0
    for j in range(len(y)):
        if j != a and y[j] == y[a] and sq(x, a, j) > best_d:
            best, best_d = j, sq(x, a, j)
    return best


@dataclass
class RefPool:
    """One anchor's reference candidates: admissible wrong-label items nearest first, with their d²."""

    items: list[int]
    d2: list[float]
    dropped: dict[str, int]


def ref_pool(x: np.ndarray, y: np.ndarray, a: int, d2p: float, cfg: MiningConfig, metric: str) -> RefPool:
    wrong = sorted((j for j in range(len(y)) if y[j] != y[a]), key=lambda j: sq(x, a, j))
    pool = RefPool([], [], {"near_duplicate": 0, "positive_aware": 0})
    for j in wrong:
        d2 = sq(x, a, j)
        if cfg.near_duplicate is not None and d2 < cfg.near_duplicate:
            pool.dropped["near_duplicate"] += 1
            continue
        if cfg.positive_aware is not None:
            if metric == "cosine":
                too_close = (1 - d2 / 2) > cfg.positive_aware * (1 - d2p / 2)
            else:
                too_close = d2 < d2p / cfg.positive_aware
            if too_close:
                pool.dropped["positive_aware"] += 1
                continue
        pool.items.append(j)
        pool.d2.append(d2)
    return pool


def ref_deterministic(pool: RefPool, d2p: float, cfg: MiningConfig) -> tuple[list[int], str | None]:
    """Negatives of hardest / semihard, and which semihard fallback (if any) was taken."""
    if cfg.strategy == "hardest":
        return pool.items[:cfg.per_anchor], None
    band = [j for j, d in zip(pool.items, pool.d2) if d2p < d < d2p + cfg.margin]
    if band:
        return band[:cfg.per_anchor], None
    if cfg.semihard_fallback == "hardest":
        return pool.items[:cfg.per_anchor], "used" if pool.items else None
    return [], "skipped"


def ref_window(pool: RefPool, cfg: MiningConfig) -> list[int]:
    return pool.items[cfg.window_skip:cfg.window_skip + cfg.window_width]


def ref_dw_probabilities(pool: RefPool, cfg: MiningConfig, dim: int) -> dict[int, float]:
    """Wu et al. 2017: weight 1/q(d) with q(d) = d^(dim-2) (1 - d²/4)^((dim-3)/2), d clipped below, 0 past the cutoff."""
    weights = {}
    for j, d2 in list(zip(pool.items, pool.d2))[:cfg.candidates]:
        d = math.sqrt(d2)
        if d >= cfg.dw_nonzero_loss_cutoff:
            continue
        dc = max(d, cfg.dw_cutoff)
        weights[j] = 1.0 / (dc ** (dim - 2) * (1 - dc * dc / 4) ** ((dim - 3) / 2))
    total = sum(weights.values())
    return {j: w / total for j, w in weights.items()}


# ----------------------------------------------------------------------------- helpers
def _clusters(n: int = 240, dim: int = 8, n_classes: int = 6, seed: int = 3, spread: float = 0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, size=n).astype(np.int64)
    vectors = (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32)
    if n_classes > 1:
        vectors[:, 0] += 0.5 * labels  # classes of different norms, so l2 and cosine rank differently
    ids = (rng.permutation(n) * 5 + 100).astype(np.int64)
    return vectors, labels, ids


def _by_anchor(result: MiningResult) -> dict[int, tuple[int, list[int]]]:
    out: dict[int, tuple[int, list[int]]] = {}
    for a, p, n in zip(result.anchor.tolist(), result.positive.tolist(), result.negative.tolist()):
        out.setdefault(a, (p, []))[1].append(n)
    return out


def _mine_all(vectors, labels, ids, metric, cfg, index="flat", params=None):
    vi = VectorIndex.build(vectors, labels, ids, metric=metric, index=index)
    return vi, mine(vi, cfg, ids, params=params)


def _check_invariants(result: MiningResult, ids: np.ndarray, labels: np.ndarray) -> None:
    lab = dict(zip(ids.tolist(), labels.tolist()))
    for a, p, n in zip(result.anchor.tolist(), result.positive.tolist(), result.negative.tolist()):
        assert lab[p] == lab[a] and p != a, f"positive {p} of anchor {a} is not another same-label item"
        assert lab[n] != lab[a], f"negative {n} of anchor {a} has the anchor's label"


def _row_of(ids: np.ndarray) -> dict[int, int]:
    return {int(v): i for i, v in enumerate(ids)}


# ----------------------------------------------------------------------------- deterministic strategies
DETERMINISTIC = [
    MiningConfig(strategy="hardest", per_anchor=3, positive="hardest"),
    MiningConfig(strategy="hardest", per_anchor=2, positive="hardest", positive_aware=0.9, near_duplicate=0.3,
                 candidates=4),
    MiningConfig(strategy="semihard", per_anchor=2, positive="hardest", margin=0.5, candidates=4),
    MiningConfig(strategy="semihard", per_anchor=3, positive="hardest", margin=0.05, semihard_fallback="skip"),
    MiningConfig(strategy="semihard", per_anchor=2, positive="hardest", margin=0.02, near_duplicate=0.2),
    MiningConfig(strategy="semihard", per_anchor=2, positive="hardest", margin=0.3, positive_aware=1.1, candidates=8),
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("cfg", DETERMINISTIC, ids=lambda c: f"{c.strategy}-{c.per_anchor}-{c.semihard_fallback}"
                         f"-pa{c.positive_aware}-nd{c.near_duplicate}-k{c.candidates}")
def test_deterministic_strategies_equal_reference(metric: str, cfg: MiningConfig) -> None:
    vectors, labels, ids = _clusters()
    _, result = _mine_all(vectors, labels, ids, metric, cfg)
    x = prepared(vectors, metric)
    got = _by_anchor(result)
    used = skipped = 0
    for a in range(len(ids)):
        p = ref_hardest_positive(x, labels, a)
        pool = ref_pool(x, labels, a, sq(x, a, p), cfg, metric)
        want, fallback = ref_deterministic(pool, sq(x, a, p), cfg)
        used += fallback == "used"
        skipped += fallback == "skipped"
        if not want:
            assert int(ids[a]) not in got
            continue
        pos, negs = got[int(ids[a])]
        assert pos == ids[p], f"anchor {ids[a]}: positive"
        assert negs == ids[want].tolist(), f"anchor {ids[a]}: negatives"
    _check_invariants(result, ids, labels)
    assert result.stats.semihard_fallback_used == used
    assert result.stats.semihard_skipped == skipped
    if cfg.strategy == "semihard" and cfg.margin <= 0.05:
        assert used + skipped > 0, "a thin band should leave some anchors without a semi-hard negative"


@pytest.mark.parametrize("metric", METRICS)
def test_random_positive_then_reference_negatives(metric: str) -> None:
    """With random positives the negatives still follow from d²(a, p) exactly as the reference says."""
    vectors, labels, ids = _clusters(seed=5)
    cfg = MiningConfig(strategy="semihard", per_anchor=2, margin=0.4, positive="random", positive_aware=0.95,
                       candidates=3, seed=11)
    _, result = _mine_all(vectors, labels, ids, metric, cfg)
    x, row = prepared(vectors, metric), _row_of(ids)
    _check_invariants(result, ids, labels)
    got = _by_anchor(result)
    assert len(got) == len(ids)
    for a_id, (p_id, negs) in got.items():
        a, p = row[a_id], row[p_id]
        want, _ = ref_deterministic(ref_pool(x, labels, a, sq(x, a, p), cfg, metric), sq(x, a, p), cfg)
        assert negs == ids[want].tolist()


def test_random_positive_is_uniform_over_the_class() -> None:
    vectors, labels, ids = _clusters(n=60, n_classes=3, seed=2)
    vi = VectorIndex.build(vectors, labels, ids)
    anchor = int(ids[0])
    draws = 6000
    result = mine(vi, MiningConfig(positive="random", seed=4), np.full(draws, anchor))
    mates = ids[(labels == labels[0]) & (ids != anchor)]
    counts = np.array([(result.positive == m).sum() for m in mates])
    assert counts.sum() == draws, "every positive is a class mate other than the anchor"
    assert sps.chisquare(counts).pvalue > 1e-3


# ----------------------------------------------------------------------------- sampled strategies
@pytest.mark.parametrize("metric", METRICS)
def test_window_samples_lie_in_the_window(metric: str) -> None:
    vectors, labels, ids = _clusters(seed=7)
    cfg = MiningConfig(strategy="window", per_anchor=3, window_skip=4, window_width=6, positive="hardest",
                       near_duplicate=0.05, positive_aware=0.5, seed=3)
    _, result = _mine_all(vectors, labels, ids, metric, cfg)
    x = prepared(vectors, metric)
    got = _by_anchor(result)
    for a in range(len(ids)):
        p = ref_hardest_positive(x, labels, a)
        window = ref_window(ref_pool(x, labels, a, sq(x, a, p), cfg, metric), cfg)
        negs = got.get(int(ids[a]), (None, []))[1]
        assert len(negs) == min(cfg.per_anchor, len(window))
        assert len(set(negs)) == len(negs), "sampled without replacement"
        assert set(negs) <= set(ids[window].tolist())
    _check_invariants(result, ids, labels)


@pytest.mark.parametrize("metric", METRICS)
def test_window_distribution_is_uniform(metric: str) -> None:
    vectors, labels, ids = _clusters(n=80, n_classes=4, seed=8)
    cfg = MiningConfig(strategy="window", per_anchor=1, window_skip=2, window_width=5, positive="hardest", seed=9)
    vi = VectorIndex.build(vectors, labels, ids, metric=metric)
    draws = 5000
    result = mine(vi, cfg, np.full(draws, ids[0]))
    x = prepared(vectors, metric)
    p = ref_hardest_positive(x, labels, 0)
    window = ids[ref_window(ref_pool(x, labels, 0, sq(x, 0, p), cfg, metric), cfg)]
    counts = np.array([(result.negative == w).sum() for w in window])
    assert counts.sum() == draws
    assert sps.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("metric", METRICS)
def test_distance_weighted_follows_wu_et_al_weights(metric: str) -> None:
    # Low dimension and unit-norm data, so that several candidates share the weight.
    rng = np.random.default_rng(12)
    vectors = rng.normal(size=(90, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = rng.integers(0, 3, 90).astype(np.int64)
    ids = np.arange(90, dtype=np.int64)
    cfg = MiningConfig(strategy="distance-weighted", per_anchor=1, positive="hardest", candidates=20,
                       dw_cutoff=0.3, dw_nonzero_loss_cutoff=1.0, seed=1)
    vi = VectorIndex.build(vectors, labels, ids, metric=metric)
    draws = 20000
    result = mine(vi, cfg, np.full(draws, 0))
    x = prepared(vectors, metric)
    p = ref_hardest_positive(x, labels, 0)
    probs = ref_dw_probabilities(ref_pool(x, labels, 0, sq(x, 0, p), cfg, metric), cfg, dim=4)
    assert 3 <= len(probs) < cfg.candidates, "the case should have several non-zero and some zero weights"
    assert set(result.negative.tolist()) <= set(probs), "only candidates with non-zero weight are drawn"
    items = sorted(probs)
    counts = np.array([(result.negative == j).sum() for j in items])
    expected = np.array([probs[j] for j in items]) * draws
    assert sps.chisquare(counts, expected).pvalue > 1e-3


@pytest.mark.parametrize("metric", METRICS)
def test_distance_weighted_several_per_anchor_in_allowed_set(metric: str) -> None:
    vectors, labels, ids = _clusters(seed=13)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cfg = MiningConfig(strategy="distance-weighted", per_anchor=3, positive="hardest", candidates=10,
                       near_duplicate=0.01, dw_nonzero_loss_cutoff=1.3, seed=2)
    _, result = _mine_all(vectors, labels, ids, metric, cfg)
    x = prepared(vectors, metric)
    got = _by_anchor(result)
    short = 0
    for a in range(len(ids)):
        p = ref_hardest_positive(x, labels, a)
        allowed = ref_dw_probabilities(ref_pool(x, labels, a, sq(x, a, p), cfg, metric), cfg, vectors.shape[1])
        negs = got.get(int(ids[a]), (None, []))[1]
        assert len(negs) == min(cfg.per_anchor, len(allowed)) and len(set(negs)) == len(negs)
        assert set(negs) <= set(ids[list(allowed)].tolist())
        short += len(negs) < cfg.per_anchor
    assert result.stats.anchors_short == short


# ----------------------------------------------------------------------------- widening, guards, stats
@pytest.mark.parametrize("metric", METRICS)
def test_widening_reaches_deep_negatives(metric: str) -> None:
    """The band beyond the farthest positive lies deep in the wrong-label ranking; 2 candidates must grow."""
    vectors, labels, ids = _clusters(n=300, n_classes=3, spread=1.5, seed=21)
    cfg = MiningConfig(strategy="semihard", per_anchor=2, margin=0.3, positive="hardest", candidates=2,
                       semihard_fallback="skip")
    _, result = _mine_all(vectors, labels, ids, metric, cfg)
    x = prepared(vectors, metric)
    got = _by_anchor(result)
    depths = []
    for a in range(len(ids)):
        p = ref_hardest_positive(x, labels, a)
        pool = ref_pool(x, labels, a, sq(x, a, p), cfg, metric)
        want, _ = ref_deterministic(pool, sq(x, a, p), cfg)
        assert got.get(int(ids[a]), (None, []))[1] == ids[want].tolist()
        if want:
            depths.append(pool.items.index(want[-1]))
    assert np.median(depths) > 20, "the chosen negatives should lie deep in the ranking"
    assert result.stats.search_rounds > 3 and result.stats.anchors_widened > 0


@pytest.mark.parametrize("metric", METRICS)
def test_guard_counts_equal_reference(metric: str) -> None:
    vectors, labels, ids = _clusters(seed=17)
    n = len(ids)
    # candidates >= n: every wrong-label item is examined, so the counts cover the whole complement.
    cfg = MiningConfig(strategy="hardest", per_anchor=2, positive="hardest",
                       near_duplicate=0.8 if metric == "cosine" else 8.0,
                       positive_aware=0.9 if metric == "cosine" else 1.2, candidates=n)
    _, result = _mine_all(vectors, labels, ids, metric, cfg)
    x = prepared(vectors, metric)
    dropped = {"near_duplicate": 0, "positive_aware": 0}
    for a in range(n):
        p = ref_hardest_positive(x, labels, a)
        for k, v in ref_pool(x, labels, a, sq(x, a, p), cfg, metric).dropped.items():
            dropped[k] += v
    assert min(dropped.values()) > 0, "both guards should drop something here"
    assert result.stats.guard_dropped == dropped
    assert result.stats.candidates_examined == sum(int((labels != labels[a]).sum()) for a in range(n))


def test_singleton_classes_and_short_anchors_are_counted() -> None:
    vectors, labels, ids = _clusters(n=40, n_classes=2, seed=4)
    # Two singleton classes and a 3-item class: that class's complement is 39 - 2 items.
    labels = labels.copy()
    labels[:2] = [50, 51]
    labels[2:5] = 60
    cfg = MiningConfig(strategy="hardest", per_anchor=3, positive="hardest", near_duplicate=0.0, candidates=1)
    vi = VectorIndex.build(vectors, labels, ids)
    result = mine(vi, cfg)
    assert result.stats.anchors_singleton == 2
    assert not set(ids[:2].tolist()) & set(result.anchor.tolist()), "singletons get no triplet"
    assert set(ids[:2].tolist()) <= set(result.negative.tolist()), "but they serve as negatives"
    assert result.stats.anchors_mined == 38 and result.stats.triplets == 38 * 3
    # per_anchor beyond what a class complement holds: one class of two items left, everything else same class.
    labels2 = np.zeros(len(ids), np.int64)
    labels2[:2] = 1
    vi2 = VectorIndex.build(vectors, labels2, ids)
    res2 = mine(vi2, MiningConfig(per_anchor=3, positive="hardest"))
    assert res2.stats.anchors_short == len(ids) - 2  # the big class sees only the 2 wrong-label items
    assert res2.stats.triplets == 2 * (len(ids) - 2) + 2 * 3


@pytest.mark.parametrize("metric", METRICS)
def test_stats_equal_reference(metric: str) -> None:
    vectors, labels, ids = _clusters(seed=23)
    cfg = MiningConfig(strategy="hardest", per_anchor=2, positive="random", margin=0.2, seed=6)
    _, result = _mine_all(vectors, labels, ids, metric, cfg)
    x, row = prepared(vectors, metric), _row_of(ids)
    loss_pos, d2p_all, d2n_all = [], [], []
    for a_id, (p_id, _) in _by_anchor(result).items():
        a, p = row[a_id], row[p_id]
        d2p = sq(x, a, p)
        d2p_all.append(d2p)
        for j in ref_pool(x, labels, a, d2p, cfg, metric).items[:2]:
            d2n_all.append(sq(x, a, j))
            loss_pos.append(max(0.0, d2p - sq(x, a, j) + cfg.margin) > 0)
    s = result.stats
    assert (s.anchors, s.anchors_mined, s.triplets, s.positive_pairs, s.negative_pairs, s.pairs) == (
        len(ids), len(ids), 2 * len(ids), len(ids), 2 * len(ids), 3 * len(ids))
    assert 0 < s.nonzero_loss_share < 1
    assert s.nonzero_loss_share == pytest.approx(np.mean(loss_pos), abs=1e-12)
    for summary, values in ((s.d2_positive, d2p_all), (s.d2_negative, d2n_all)):
        assert summary.count == len(values)
        assert summary.mean == pytest.approx(np.mean(values), rel=1e-5)
        assert summary.min == pytest.approx(min(values), rel=1e-5)
        assert summary.max == pytest.approx(max(values), rel=1e-5)
        assert summary.quantiles["0.5"] == pytest.approx(np.median(values), rel=1e-5)
        assert sum(summary.histogram["counts"]) == len(values)
    assert s.d2_positive.histogram["edges"] == s.d2_negative.histogram["edges"]
    d = s.to_dict()
    assert d["d2_negative"]["count"] == 2 * len(ids) and d["guard_dropped"] == {}


def test_pairs_hold_each_positive_once_then_the_negatives(tmp_path) -> None:
    vectors, labels, ids = _clusters(n=50, seed=31)
    vi = VectorIndex.build(vectors, labels, ids)
    result = mine(vi, MiningConfig(per_anchor=3, seed=5))
    want_i, want_j, want_y = [], [], []
    for a, (p, negs) in _by_anchor(result).items():
        want_i += [a] * (1 + len(negs))
        want_j += [p] + negs
        want_y += [0] + [1] * len(negs)
    assert result.pair_i.tolist() == want_i and result.pair_j.tolist() == want_j and result.pair_y.tolist() == want_y
    path = tmp_path / "mined.npz"
    result.save_npz(path)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(["anchor", "positive", "negative", "pair_i", "pair_j", "pair_y"])
        for name in z.files:
            np.testing.assert_array_equal(z[name], getattr(result, name))
            assert z[name].dtype == np.int64


def test_same_seed_same_result_other_seed_differs() -> None:
    vectors, labels, ids = _clusters(seed=33)
    vi = VectorIndex.build(vectors, labels, ids)
    cfg = dict(strategy="window", per_anchor=2, window_width=8)
    a, b = mine(vi, MiningConfig(**cfg, seed=1)), mine(vi, MiningConfig(**cfg, seed=1))
    c = mine(vi, MiningConfig(**cfg, seed=2))
    np.testing.assert_array_equal(a.negative, b.negative)
    np.testing.assert_array_equal(a.positive, b.positive)
    assert (a.negative != c.negative).any()


# ----------------------------------------------------------------------------- search paths
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("block,n_classes", [(16, 30), (4096, 40), (5, 12)])
def test_block_search_equals_reference(metric: str, block: int, n_classes: int, monkeypatch) -> None:
    """Blocks of several classes (masked in-block product), a class split over blocks and repeated anchors
    all give the exact answer."""
    monkeypatch.setattr(mining_search, "QUERY_BLOCK", block)
    vectors, labels, ids = _clusters(n=200, n_classes=n_classes, seed=41)
    labels = np.where(np.isin(labels, [2, 3, 4, 5]), 2, labels)  # one class bigger than a block
    vi = VectorIndex.build(vectors, labels, ids, metric=metric)
    rng = np.random.default_rng(0)
    anchors = np.concatenate([ids, rng.choice(ids, 30)])
    k = 5
    rows, d2 = mining_search.exact_wrong_label_knn(vi.index.reconstruct_n(0, vi.count), vi.labels,
                                                   vi.rows_of(anchors), k, vi.distance)
    x = prepared(vectors, metric)
    row = _row_of(ids)
    for i, a_id in enumerate(anchors.tolist()):
        a = row[a_id]
        want = sorted((j for j in range(len(ids)) if labels[j] != labels[a]), key=lambda j: sq(x, a, j))[:k]
        assert vi.ids[rows[i]].tolist() == ids[want].tolist()
        np.testing.assert_allclose(d2[i], [sq(x, a, j) for j in want], rtol=1e-4, atol=1e-4)


def ref_ivf_knn(x: np.ndarray, labels: np.ndarray, lists: list[list[int]], centroids: np.ndarray, a: int,
                k: int, nprobe: int, metric: str) -> tuple[list[int], int]:
    """hardneg's IVF rule by loops: probe the nprobe nearest lists holding a wrong-label item (doubling
    nprobe while they hold fewer than k such items and lists remain), exact top-k of those items."""
    def closeness(c: int) -> float:  # the quantizer ranks by inner product for cosine, by distance for l2
        return -float(x[a] @ centroids[c]) if metric == "cosine" else float((x[a] - centroids[c]) @ (x[a] - centroids[c]))
    eligible = sorted((c for c in range(len(lists)) if any(labels[j] != labels[a] for j in lists[c])), key=closeness)
    complement = int((labels != labels[a]).sum())
    while True:
        items = [j for c in eligible[:nprobe] for j in lists[c] if labels[j] != labels[a]]
        if len(items) >= min(k, complement) or nprobe >= len(lists):
            return sorted(items, key=lambda j: sq(x, a, j))[:k], nprobe
        nprobe *= 2


@pytest.mark.parametrize(("factory", "chunk"), [("IVF12,Flat", None), ("IVF12,Flat", 37), ("IVF12,SQ8,RFlat", None)])
@pytest.mark.parametrize("metric", METRICS)
def test_ivf_label_aware_list_major_search_equals_reference(metric: str, factory: str, chunk: int | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """IVF-Flat, and compressed IVF codes under an exact refinement: the lists choose the candidates and the
    exact vectors (what ``reconstruct`` returns for both) score them; anchors scanned in one chunk or several."""
    if chunk is not None:
        monkeypatch.setattr(mining_ivf, "ANCHOR_CHUNK", chunk)
    vectors, labels, ids = _clusters(n=300, n_classes=4, seed=45)
    vi = VectorIndex.build(vectors, labels, ids, metric=metric, index=factory)
    lists_info = mining_ivf.inverted_lists(vi)
    assert lists_info is not None and lists_info.pure.any(), "the case should have single-label lists to skip"
    ivf = faiss.extract_index_ivf(vi.index)
    lists = [[int(r) for r in lists_info.rows[lists_info.bounds[c]:lists_info.bounds[c + 1]]] for c in range(ivf.nlist)]
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float64)
    xv = vi.index.reconstruct_n(0, vi.count).astype(np.float64)  # rows order
    k, nprobe = 20, 2
    anchors = np.random.default_rng(7).permutation(vi.count)  # any order in, answers in that order out
    rows, d2 = mining_search.wrong_label_knn(vi, vi.index.reconstruct_n(0, vi.count), anchors, k,
                                             SearchParams(nprobe=nprobe))[:2]
    back = np.argsort(anchors)
    rows, d2 = rows[back], d2[back]
    widened = 0
    for a in range(vi.count):
        want, used = ref_ivf_knn(xv, vi.labels, lists, centroids, a, k, nprobe, metric)
        assert rows[a][rows[a] >= 0].tolist() == want, f"row {a}"
        np.testing.assert_allclose(d2[a][:len(want)], [sq(xv, a, j) for j in want], rtol=1e-4, atol=1e-4)
        widened += used > nprobe
    assert 0 < widened < vi.count, "some anchors, not all, should need more lists than nprobe"


def test_ivf_mining_probes_more_lists_for_deeper_searches() -> None:
    """Without a caller's nprobe, a search for k candidates probes nprobe x (1 + log2(k) / 10) lists (hand-computed
    here), by the reference loop; a caller's nprobe is used as given."""
    assert [mining_search.mining_nprobe(64, k, 1000) for k in (1, 2, 64)] == [64, math.ceil(64 * 1.1), 103]
    assert mining_search.mining_nprobe(64, 1 << 20, 80) == 80 and mining_search.mining_nprobe(None, 64, 80) is None
    vectors, labels, ids = _clusters(n=600, n_classes=5, seed=46)
    vi = VectorIndex.build(vectors, labels, ids, metric="l2", index="ivf")
    ivf = faiss.extract_index_ivf(vi.index)
    assert (ivf.nlist, vi.spec.nprobe) == (15, 8)
    k, deeper = 20, math.ceil(8 * (1 + math.log2(20) / 10))  # 12 lists
    lists_info = mining_ivf.inverted_lists(vi)
    lists = [[int(r) for r in lists_info.rows[lists_info.bounds[c]:lists_info.bounds[c + 1]]] for c in range(ivf.nlist)]
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float64)
    xv = vi.index.reconstruct_n(0, vi.count)
    anchors = np.arange(0, vi.count, 5)
    default = mining_search.wrong_label_knn(vi, xv, anchors, k)[0]
    given = mining_search.wrong_label_knn(vi, xv, anchors, k, SearchParams(nprobe=8))[0]
    changed = 0
    for i, a in enumerate(anchors.tolist()):
        want = ref_ivf_knn(xv.astype(np.float64), vi.labels, lists, centroids, a, k, deeper, "l2")[0]
        assert default[i][default[i] >= 0].tolist() == want, f"row {a}"
        shallow = ref_ivf_knn(xv.astype(np.float64), vi.labels, lists, centroids, a, k, 8, "l2")[0]
        assert given[i][given[i] >= 0].tolist() == shallow, f"row {a}"
        changed += want != shallow
    assert changed > 0, "the deeper probe should change some anchors' candidates"


@pytest.mark.parametrize("kind,params", [("ivf", SearchParams(nprobe=1000)), ("hnsw", SearchParams(ef_search=400))])
@pytest.mark.parametrize("strategy", ["hardest", "semihard"])
def test_approximate_indexes_with_full_search_equal_reference(kind: str, params: SearchParams, strategy: str) -> None:
    vectors, labels, ids = _clusters(n=400, n_classes=5, seed=43)
    cfg = MiningConfig(strategy=strategy, per_anchor=2, positive="hardest", margin=0.5, candidates=4)
    vi, result = _mine_all(vectors, labels, ids, "cosine", cfg, index=kind, params=params)
    assert not vi.exact
    x = prepared(vectors, "cosine")
    got = _by_anchor(result)
    for a in range(len(ids)):
        p = ref_hardest_positive(x, labels, a)
        want, _ = ref_deterministic(ref_pool(x, labels, a, sq(x, a, p), cfg, "cosine"), sq(x, a, p), cfg)
        assert got.get(int(ids[a]), (None, []))[1] == ids[want].tolist()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_on_hnsw_keeps_the_invariants(strategy: str) -> None:
    vectors, labels, ids = _clusters(n=300, seed=47)
    vi, result = _mine_all(vectors, labels, ids, "cosine", MiningConfig(strategy=strategy, per_anchor=2), index="hnsw")
    _check_invariants(result, ids, labels)
    assert result.stats.anchors_mined > 0.9 * len(ids)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,field", [
    (dict(strategy="nearest"), "strategy"),
    (dict(per_anchor=0), "per_anchor"),
    (dict(per_anchor=1.5), "per_anchor"),
    (dict(margin=-0.1), "margin"),
    (dict(margin=float("nan")), "margin"),
    (dict(positive="closest"), "positive"),
    (dict(semihard_fallback="random"), "semihard_fallback"),
    (dict(window_skip=-1), "window_skip"),
    (dict(window_width=0), "window_width"),
    (dict(strategy="window", per_anchor=4, window_width=3), "window_width"),
    (dict(dw_cutoff=0), "dw_cutoff"),
    (dict(dw_cutoff=0.5, dw_nonzero_loss_cutoff=0.4), "dw_nonzero_loss_cutoff"),
    (dict(dw_nonzero_loss_cutoff=2.5), "dw_nonzero_loss_cutoff"),
    (dict(positive_aware=0), "positive_aware"),
    (dict(near_duplicate=-1.0), "near_duplicate"),
    (dict(candidates=0), "candidates"),
    (dict(seed=-3), "seed"),
    (dict(per_anchor=True), "per_anchor"),
])
def test_config_refuses_impossible_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        MiningConfig(**kwargs)


def test_mine_refuses_bad_arguments() -> None:
    vectors, labels, ids = _clusters(n=30, seed=1)
    vi = VectorIndex.build(vectors, labels, ids)
    with pytest.raises(NotFoundError, match="unknown id"):
        mine(vi, MiningConfig(), np.array([ids[0], 123456789]))
    with pytest.raises(ValidationError, match="anchors must be integers"):
        mine(vi, MiningConfig(), np.array([1.5]))
    with pytest.raises(ValidationError, match="MiningConfig"):
        mine(vi, {"strategy": "hardest"})
    empty = mine(vi, MiningConfig(), np.array([], dtype=np.int64))
    assert len(empty) == 0 and empty.stats.anchors == 0 and empty.stats.nonzero_loss_share is None


def test_mining_an_hnsw_index_warns_and_mining_ivf_does_not(caplog: pytest.LogCaptureFixture) -> None:
    vectors, labels, ids = _clusters(n=200, n_classes=4, seed=46)
    for kind, warns in (("hnsw", True), ("ivf", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="hardneg.miner.mining.miner"):
            mine(VectorIndex.build(vectors, labels, ids, index=kind), MiningConfig())
        assert any("mining an HNSW index" in r.getMessage() for r in caplog.records) == warns, kind
