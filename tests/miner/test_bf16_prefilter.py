"""The bfloat16 prefilter against float64 references: its threshold keys against every bfloat16 value, its
candidate masks against exact scores, and the scan through it against brute force on near-ties."""

from __future__ import annotations

import numpy as np
import pytest

from hardneg.miner.distances import COSINE, L2
from hardneg.miner.mining import bf16_prefilter, floor_search
from hardneg.miner.mining.bf16_prefilter import Bf16Corpus, _round_down_bits
from hardneg.miner.mining.floor_search import floor_knn

torch = pytest.importorskip("torch")

# Every finite bfloat16 value, as the float32 whose low 16 bits are zero, and its bits read as int16.
_ALL_BITS = np.arange(1 << 16, dtype=np.uint32)
_ALL = (_ALL_BITS << 16).view(np.float32)
_FINITE = np.isfinite(_ALL)
_VALUES = _ALL[_FINITE].astype(np.float64)
_INT16 = _ALL_BITS[_FINITE].astype(np.uint16).view(np.int16).astype(np.int32)


def _key(bits: np.ndarray) -> np.ndarray:
    """The order key of bfloat16 bits (int16), both zeros at -1."""
    return np.where(bits > 0, bits, -32769 - np.where(bits == 0, -32768, bits))


def test_threshold_keys_order_like_the_values() -> None:
    """key(v) >= key(round_down(t)) exactly when v >= t's largest bfloat16 at or below it, for every bfloat16 v."""
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.normal(0, 1, 300), rng.normal(0, 1e-3, 100), rng.normal(0, 1e3, 100),
                        [0.0, -0.0, 1.0, -1.0, 0.5, -0.25, 1e-40, -1e-40, 3.0e38, -3.0e38, -np.inf]])
    keys = _round_down_bits(t)
    order = np.argsort(_VALUES, kind="stable")
    srt = _VALUES[order]
    for ti, key in zip(t, keys):
        below = srt[srt <= ti]
        want = _VALUES >= (below.max() if len(below) else -np.inf)
        got = _key(_INT16) >= key
        assert (got == want).all(), ti


@pytest.mark.parametrize("distance", [COSINE, L2], ids=["cosine", "l2"])
def test_candidates_hold_every_entry_at_or_above_the_threshold(distance) -> None:
    """Against float64 scores: every entry at or above a query's threshold is a candidate, every candidate lies
    within 1 % of the score range below it, and its exact score within the error given of its bfloat16 score."""
    rng = np.random.default_rng(1)
    scale = 1.0 if distance is COSINE else 4.0
    x = distance.prepare(scale * rng.standard_normal((3000, 48)).astype(np.float32))
    q = distance.prepare(scale * rng.standard_normal((40, 48)).astype(np.float32))
    half = None if distance.higher_is_closer else 0.5 * (x.astype(np.float64) ** 2).sum(1)
    exact = q.astype(np.float64) @ x.astype(np.float64).T - (0.0 if half is None else half)
    low = Bf16Corpus.build(x, half, block=1000)
    qs = low.queries(q)
    # Thresholds from the 5th best to below the median, some negative (l2 scores are mostly negative).
    quantiles = np.linspace(0.5, 0.9985, len(q))
    out = torch.empty((len(q), 1000), dtype=torch.bfloat16)
    spread = exact.max() - exact.min()
    for s in range(0, 3000, 1000):
        block = exact[:, s:s + 1000]
        t = np.array([np.quantile(block[i], quantiles[i]) for i in range(len(q))])
        t[::7] = -np.inf
        bits, bound = low.product(qs, s, s + 1000, out)
        seed = low.seed(bits, bound, 5)
        kth = -np.sort(-block, 1)[:, 4]
        assert ((seed <= kth) & (seed >= kth - 0.01 * spread)).all()
        r, c, approx, err = low.candidates(bits, bound, t)
        assert (np.diff(r) >= 0).all()
        assert (np.abs(block[r, c] - approx) <= err).all()
        mask = np.zeros((len(q), 1000), bool)
        mask[r, c] = True
        assert (mask | (block < t[:, None])).all()
        assert not (mask & (block < t[:, None] - 0.01 * spread)).any()
        assert mask[::7].all()


@pytest.mark.parametrize("distance", [COSINE, L2], ids=["cosine", "l2"])
def test_scan_through_bfloat16_equals_brute_force_on_near_ties(monkeypatch, distance) -> None:
    """Clusters of 30 rows a few float32 ulps apart, which bfloat16 cannot tell apart: past two radii between
    clusters, the prefiltered scan still returns the float64 order within the third nearest cluster (up to
    float32 rounding) and counts exactly what lies inside each radius."""
    monkeypatch.setattr(floor_search, "CORPUS_BLOCK", 64)
    rng = np.random.default_rng(2)
    base = rng.standard_normal((20, 16)).astype(np.float32)
    x = distance.prepare(np.repeat(base, 30, 0) + 1e-4 * rng.standard_normal((600, 16)).astype(np.float32))
    q = distance.prepare(base[:8] + 0.3 * rng.standard_normal((8, 16)).astype(np.float32))
    d2 = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    srt = np.sort(d2, 1)
    assert (srt[:, [30, 60]] - srt[:, [29, 59]] > 1e-3).all()  # the radii lie in gaps between clusters
    floors = np.stack([(srt[:, 29] + srt[:, 30]) / 2, (srt[:, 59] + srt[:, 60]) / 2], 1)
    k = 12
    rows, got_d2, below = floor_knn(q, x, floors, k, distance, prefilter="bf16")
    plain = floor_knn(q, x, floors, k, distance, prefilter="off")
    for i in range(len(q)):
        assert below[i].tolist() == [int((d2[i] < f).sum()) for f in floors[i]]
        cand = np.flatnonzero(d2[i] >= floors[i, 1])
        want = cand[np.argsort(d2[i, cand], kind="stable")[:k]]
        ulp = 2.0 ** (np.floor(np.log2(d2[i, want].max())) - 7)  # bfloat16's spacing at these d²
        assert np.ptp(d2[i, want]) < ulp / 4  # near-ties that bfloat16 cannot order
        np.testing.assert_allclose(got_d2[i], d2[i, want], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d2[i, rows[i]], d2[i, want], rtol=1e-6, atol=1e-7)
    assert (below == plain[2]).all()
    np.testing.assert_allclose(got_d2, plain[1], rtol=1e-6, atol=1e-7)


def test_auto_takes_bfloat16_only_for_large_scans(monkeypatch) -> None:
    monkeypatch.setattr(bf16_prefilter, "bf16_speedup", lambda: 3.0)
    assert not bf16_prefilter.wanted("auto", 100, 1000, 128)
    assert bf16_prefilter.wanted("auto", 5000, 1_000_000, 128)
    monkeypatch.setattr(bf16_prefilter, "bf16_speedup", lambda: 1.0)  # a CPU without bfloat16 instructions
    assert not bf16_prefilter.wanted("auto", 5000, 1_000_000, 128)
    assert bf16_prefilter.wanted("bf16", 1, 1, 1) and not bf16_prefilter.wanted("off", 5000, 1_000_000, 128)
    with pytest.raises(ValueError, match="prefilter must be one of auto, bf16, off"):
        bf16_prefilter.wanted("fast", 1, 1, 1)


def test_torch_threads_are_put_back_after_overlapping_scans() -> None:
    """Two scans that overlap in time (concurrent requests): torch's thread count is 1 while either runs and the
    caller's own number afterwards, whichever ends first."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = bf16_prefilter.torch_threads(1), bf16_prefilter.torch_threads(1)
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)
        assert torch.get_num_threads() == 1
        b.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_raised_floors_are_the_kth_best_lower_bound_of_sure_candidates() -> None:
    rng = np.random.default_rng(4)
    b, h, k = 6, 200, 5
    r = np.sort(rng.integers(0, b - 1, h))  # the last query has no candidate
    v = rng.normal(0.5, 0.1, h).astype(np.float32)
    err = rng.uniform(0.001, 0.01, h)
    sure = rng.random(h) < 0.8
    floor = np.full(b, 0.45, np.float32)
    got = floor_search._raise_floors(floor, r, v, err, sure, k)
    for i in range(b):
        lower = np.sort((v - err)[(r == i) & sure])[::-1]
        want = max(0.45, lower[k - 1]) if len(lower) >= k else floor[i]
        assert got[i] <= want and got[i] >= np.float32(want) - 1e-7


@pytest.mark.parametrize("distance", [COSINE, L2], ids=["cosine", "l2"])
def test_scan_through_bfloat16_when_a_query_s_nearest_share_one_block(monkeypatch, distance) -> None:
    """A snapshot keeps each class together, so a query's nearest items sit in one block: floors raised from that
    block's bfloat16 scores must not lose any of them (tight clusters: bfloat16 cannot order their members)."""
    monkeypatch.setattr(floor_search, "CORPUS_BLOCK", 128)
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((16, 24)).astype(np.float32)
    x = distance.prepare(np.repeat(centres, 64, 0) + 2e-3 * rng.standard_normal((1024, 24)).astype(np.float32))
    q = distance.prepare(centres[rng.integers(0, 16, 40)] + 0.05 * rng.standard_normal((40, 24)).astype(np.float32))
    d2 = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    k = 10
    rows, got_d2, _ = floor_knn(q, x, np.empty((40, 0)), k, distance, prefilter="bf16")
    want_d2 = np.sort(d2, 1)[:, :k]
    # l2 d² comes from |q|² - 2·score in float32, which loses ~1e-5 at |q|² ≈ 24; cosine keeps 1e-6.
    atol = 1e-6 if distance is COSINE else 5e-5
    np.testing.assert_allclose(got_d2, want_d2, rtol=0, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(d2, rows, 1), want_d2, rtol=0, atol=atol)
