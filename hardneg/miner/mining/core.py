"""The mining core shared by label mode (``mine``) and query mode (``mine_queries``).

Both modes reduce to the same loop: for each anchor a search returns its nearest *admissible* items
(another label, or not one of its positives), the guards drop likely false negatives, the strategy
says which anchors need a deeper pool, and only those are searched again with a wider width, until
satisfied or every admissible item has been seen; then the strategy picks the negatives.

When every guard is a radius (each drops exactly the candidates nearer than a per-anchor ``d²``, as the score
guards do) and the mode offers a *floor search* (exact snapshots), each round instead asks for the nearest
items beyond the anchors' radii, so a deep margin costs one search, not one per widening; the items skipped
below the radii are counted as the guards' drops, as the plain search would have counted them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from hardneg.miner.mining.base import CandidatePool, NegativeStrategy
from hardneg.miner.mining.guards import Candidates, Guard, apply_guards, guard_radii
from hardneg.miner.mining.stats import MiningStats

# search(positions (j,), k) -> rows (j, k) int64 and d2 (j, k) float32, nearest first, -1 / inf padded.
CandidateSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
# floor_search(positions (j,), k, radii (j, g)) -> rows, d2 as above among the items not nearer than radii[:, -1],
# and (j, g) int64 how many admissible items lie nearer than each radius (see floor_search.floor_knn).
FloorSearch = Callable[[np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
# Extra width of a floor search: candidates within rounding of a radius are returned and left to the guards.
FLOOR_SLACK = 8


def make_pool(rows: np.ndarray, d2: np.ndarray, keep: np.ndarray, d2_pos: np.ndarray,
              reach: np.ndarray) -> CandidatePool:
    """The kept candidates moved left (their order is kept, so they stay nearest first)."""
    order = np.argsort(~keep, axis=1, kind="stable")
    count = keep.sum(1)
    inside = np.arange(rows.shape[1])[None, :] < count[:, None]
    rows = np.where(inside, np.take_along_axis(rows, order, 1), -1)
    d2 = np.where(inside, np.take_along_axis(d2, order, 1), np.inf).astype(np.float32)
    return CandidatePool(rows, d2, count, d2_pos, reach)


def mine_negatives(search: CandidateSearch, pending: np.ndarray, admissible: np.ndarray, d2_pos: np.ndarray,
                   strategy: NegativeStrategy, guards: list[Guard], rng: np.random.Generator,
                   stats: MiningStats, m: int, growth: int = 2,
                   floor_search: FloorSearch | None = None) -> np.ndarray:
    """Negatives of ``m`` anchors: (m, per_anchor) int64 rows, ``-1``-padded.

    Args:
        search: the admissible-neighbour search of the mode.
        pending: positions (j,) of the anchors to mine (the others get no negative).
        admissible: (m,) how many items each anchor could be given at most (its search is exhausted there).
        d2_pos: (m,) ``d²(a, p)`` each (NaN where there is no positive).
        strategy, guards, rng: what to pick and drop.
        stats: filled with the search, guard and strategy counters.
        m: anchors in the pass.
        growth: how much wider each new search round is.
        floor_search: the mode's search beyond per-anchor radii, used when every guard is a radius.
    """
    p = strategy.config.per_anchor
    negatives = np.full((m, p), -1, np.int64)
    pending = pending[admissible[pending] > 0]
    dropped = {g.name: 0 for g in guards}
    counters: Counter[str] = Counter()
    radii = guard_radii(guards, d2_pos) if floor_search is not None else None
    if radii is None:
        k = strategy.initial_width()
    else:  # no slack without guards: nothing lies within rounding of a radius
        k = strategy.pool_size() + (FLOOR_SLACK if radii.shape[1] else 0)
    while pending.size:
        k_eff = int(min(k, admissible[pending].max()))
        if radii is None:
            rows, d2 = search(pending, k_eff)
            skipped = np.zeros((len(pending), 0), np.int64)
        else:
            rows, d2, skipped = floor_search(pending, k_eff, radii[pending])
        got = (rows >= 0).sum(1)
        seen = got + (skipped[:, -1] if skipped.shape[1] else 0)
        stats.search_rounds += 1
        # Exhausted: every admissible item the index can return has been seen (on approximate indexes,
        # a search that returns fewer than asked after its own widening counts as exhausted).
        exhausted = (got < k_eff) | (seen >= admissible[pending])
        reach = np.where(exhausted, np.inf, d2[:, k_eff - 1])
        if guards:
            keep, guard_drops = apply_guards(guards, Candidates(d2, rows, d2_pos[pending], pending), rows >= 0)
            for j, name in enumerate(guard_drops if skipped.shape[1] else ()):
                guard_drops[name] = guard_drops[name] + skipped[:, j] - (skipped[:, j - 1] if j else 0)
            pool = make_pool(rows, d2, keep, d2_pos[pending], reach)
        else:
            guard_drops = {}
            pool = CandidatePool(rows, d2, got, d2_pos[pending], reach)
        more = strategy.wants_more(pool) & ~exhausted
        done = ~more
        sel = strategy.select(pool.subset(done), rng)
        negatives[pending[done]] = sel.rows
        counters.update(sel.counters)
        for name, per_anchor in guard_drops.items():
            dropped[name] += int(per_anchor[done].sum())
        stats.candidates_examined += int(seen[done].sum())
        stats.anchors_widened += int(more.sum()) if stats.search_rounds == 1 else 0
        pending = pending[more]
        k *= growth
    stats.guard_dropped = dropped
    stats.semihard_fallback_used = counters["semihard_fallback_used"]
    stats.semihard_skipped = counters["semihard_skipped"]
    return negatives
