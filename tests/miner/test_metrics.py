"""Retrieval metrics against hand-computed values and a literal per-query reference."""

import numpy as np
import pytest

from hardneg.miner.errors import ValidationError
from hardneg.miner.metrics import retrieval_metrics, sample_queries


def test_hand_computed_line() -> None:
    # Points on a line (l2): 0:(0,A) 1:(1,A) 2:(3,B) 3:(10,B) 4:(11.5,A).
    # Neighbour orders and relevance (worked out by hand):
    #   q0 A, R=2: 1A 2B 3B 4A -> rel 1 0 0 1: P@1=1, RP=1/2, AP@R=1/2
    #   q1 A, R=2: 0A 2B 3B 4A -> rel 1 0 0 1: P@1=1, RP=1/2, AP@R=1/2
    #   q2 B, R=1: 1A 0A 3B 4A -> rel 0 0 1 0: P@1=0, RP=0,   AP@R=0, hit within 5
    #   q3 B, R=1: 4A 2B 1A 0A -> rel 0 1 0 0: P@1=0, RP=0,   AP@R=0
    #   q4 A, R=2: 3B 2B 1A 0A -> rel 0 0 1 1: P@1=0, RP=0,   AP@R=0
    x = np.array([[0.0], [1.0], [3.0], [10.0], [11.5]])
    y = np.array([0, 0, 1, 1, 0])
    m = retrieval_metrics(x, y, ks=(1, 2, 5), metric="l2")
    assert m["precision_at_1"] == pytest.approx(2 / 5)
    assert m["recall_at_1"] == pytest.approx(2 / 5)
    assert m["recall_at_2"] == pytest.approx(3 / 5)  # q3 finds 2B at rank 2
    assert m["recall_at_5"] == pytest.approx(1.0)
    assert m["r_precision"] == pytest.approx(1 / 5)
    assert m["map_at_r"] == pytest.approx(1 / 5)
    assert m["num_queries"] == 5


def test_map_at_r_rewards_order_unlike_r_precision() -> None:
    # q0 (A at 0) sees 2B(1), 1A(4), 3A(25): R=2, rel 0 1 1 -> RP=1/2, AP@R=(1/2)(0 + 1/2)=1/4.
    # The other queries: q1 (A at 2): 2B(1), 0A(4), 3A(9) -> same as q0: RP 1/2, AP@R 1/4.
    # q2 (B at 1): R=0 -> left out.  q3 (A at 5): 1A(9), 2B(16), 0A(25) -> rel 1 0: RP 1/2, AP@R 1/2.
    x = np.array([[0.0], [2.0], [1.0], [5.0]])
    y = np.array([0, 0, 1, 0])
    m = retrieval_metrics(x, y, ks=(1,), metric="l2")
    assert m["num_queries"] == 3
    assert m["r_precision"] == pytest.approx(1 / 2)
    assert m["map_at_r"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 2) / 3)
    assert m["precision_at_1"] == pytest.approx(1 / 3)


def _reference(x: np.ndarray, y: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    p1, rp, ap, rec = [], [], [], {k: [] for k in ks}
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        d = [2 - 2 * float(xn[i] @ xn[j]) for j in others]
        order = [others[j] for j in np.argsort(d, kind="stable")]
        rel = [int(y[j] == y[i]) for j in order]
        r = sum(rel)
        if r == 0:
            continue
        p1.append(rel[0])
        for k in ks:
            rec[k].append(int(any(rel[:k])))
        rp.append(sum(rel[:r]) / r)
        hits, s = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                s += hits / (pos + 1)
        ap.append(s / r)
    out = {"precision_at_1": np.mean(p1), "r_precision": np.mean(rp), "map_at_r": np.mean(ap)}
    out.update({f"recall_at_{k}": np.mean(v) for k, v in rec.items()})
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_literal_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, 8))
    y = rng.integers(0, 5, size=120)
    x = centers[y] + 0.9 * rng.normal(size=(120, 8))
    got = retrieval_metrics(x, y, ks=(1, 4, 10))
    ref = _reference(x, y, (1, 4, 10))
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_rejects_bad_input() -> None:
    with pytest.raises(ValidationError, match="two or more items"):
        retrieval_metrics(np.eye(3), np.array([0, 1, 2]))
    with pytest.raises(ValidationError, match="ks must be positive"):
        retrieval_metrics(np.eye(3), np.array([0, 0, 1]), ks=(0,))
    with pytest.raises(ValidationError, match="labels has 2 entries"):
        retrieval_metrics(np.eye(3), np.array([0, 0]))


def test_blocks_of_queries_by_depth_give_the_same_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries searched in many small blocks (one large class, many small ones) score as the literal loop does."""
    import hardneg.miner.metrics as metrics

    rng = np.random.default_rng(3)
    y = np.concatenate([np.zeros(60, np.int64), np.repeat(np.arange(1, 31), 2), [99]])  # R = 59, 1 and 0
    x = rng.normal(size=(len(y), 6)) + 0.8 * rng.normal(size=(100, 6))[y]
    monkeypatch.setattr(metrics, "_BLOCK_ENTRIES", 100)  # blocks of <= 100 entries: one query of depth 59 each
    got = metrics.retrieval_metrics(x, y, ks=(1, 4))
    ref = _reference(x, y, (1, 4))
    assert got["num_queries"] == len(y) - 1
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def _reference_per_query(x: np.ndarray, y: np.ndarray, queries: np.ndarray) -> dict[str, list[float]]:
    """MAP@R and P@1 of each query by loops over a cosine ranking (stable order of equal distances)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    out: dict[str, list[float]] = {"precision_at_1": [], "map_at_r": []}
    for i in queries:
        others = [j for j in range(len(x)) if j != i]
        order = [others[j] for j in np.argsort([2 - 2 * float(xn[i] @ xn[j]) for j in others], kind="stable")]
        rel = [int(y[j] == y[i]) for j in order]
        r = sum(rel)
        hits, s = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                s += hits / (pos + 1)
        out["precision_at_1"].append(rel[0])
        out["map_at_r"].append(s / r)
    return out


def _blobs(seed: int, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, size=n)
    y[0] = 6  # a singleton class: never a query
    return rng.normal(size=(7, 8))[y] + 0.9 * rng.normal(size=(n, 8)), y


def test_sampled_queries_and_confidence_interval_by_hand() -> None:
    x, y = _blobs(3)
    queries = sample_queries(y, 40, seed=5)
    assert len(queries) == 40 and len(set(queries.tolist())) == 40 and 0 not in queries  # the singleton is left out
    got = retrieval_metrics(x, y, sample=40, seed=5)
    ref = _reference_per_query(x, y, queries)
    fpc = np.sqrt((149 - 40) / (149 - 1))
    for key, values in ref.items():
        assert got[key] == pytest.approx(np.mean(values), abs=1e-9), key
        half = 1.959963984540054 * np.std(values, ddof=1) / np.sqrt(40) * fpc
        assert got[f"{key}_ci95"] == pytest.approx(half, rel=1e-9), key
    assert got["num_queries"] == 40 and got["num_candidates"] == 149


def test_sample_of_every_query_is_the_full_evaluation() -> None:
    x, y = _blobs(4)
    full = retrieval_metrics(x, y)
    assert retrieval_metrics(x, y, sample=149) == full and "map_at_r_ci95" not in full


def test_confidence_interval_covers_the_full_value() -> None:
    """Over 40 seeded samples of 30 queries, the 95 % interval holds the full-set MAP@R for most of them."""
    x, y = _blobs(6, n=300)
    full = retrieval_metrics(x, y)["map_at_r"]
    covered = []
    for seed in range(40):
        m = retrieval_metrics(x, y, sample=30, seed=seed)
        covered.append(abs(m["map_at_r"] - full) <= m["map_at_r_ci95"])
    assert 0.85 <= np.mean(covered) < 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sample": 0}, "sample must be None or a positive integer, got 0"),
    ({"sample": 2.5}, "sample must be None or a positive integer"),
])
def test_rejects_bad_scale_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        retrieval_metrics(np.eye(3), np.array([0, 0, 1]), **kwargs)
