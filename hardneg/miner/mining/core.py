"""The mining core shared by label mode (``mine``) and query mode (``mine_queries``).

Both modes reduce to the same loop: for each anchor a search returns its nearest *admissible* items
(another label, or not one of its positives), the guards drop likely false negatives, the strategy
says which anchors need a deeper pool, and only those are searched again with a wider width, until
satisfied or every admissible item has been seen; then the strategy picks the negatives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from hardneg.miner.mining.base import CandidatePool, NegativeStrategy
from hardneg.miner.mining.guards import Candidates, Guard, apply_guards
from hardneg.miner.mining.stats import MiningStats

# search(positions (j,), k) -> rows (j, k) int64 and d2 (j, k) float32, nearest first, -1 / inf padded.
CandidateSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


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
                   stats: MiningStats, m: int, growth: int = 2) -> np.ndarray:
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
    """
    p = strategy.config.per_anchor
    negatives = np.full((m, p), -1, np.int64)
    pending = pending[admissible[pending] > 0]
    dropped = {g.name: 0 for g in guards}
    counters: Counter[str] = Counter()
    k = strategy.initial_width()
    while pending.size:
        k_eff = int(min(k, admissible[pending].max()))
        rows, d2 = search(pending, k_eff)
        got = (rows >= 0).sum(1)
        stats.search_rounds += 1
        # Exhausted: every admissible item the index can return has been seen (on approximate indexes,
        # a search that returns fewer than asked after its own widening counts as exhausted).
        exhausted = (got < k_eff) | (got >= admissible[pending])
        reach = np.where(exhausted, np.inf, d2[:, k_eff - 1])
        if guards:
            keep, guard_drops = apply_guards(guards, Candidates(d2, rows, d2_pos[pending], pending), rows >= 0)
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
        stats.candidates_examined += int(got[done].sum())
        stats.anchors_widened += int(more.sum()) if stats.search_rounds == 1 else 0
        pending = pending[more]
        k *= growth
    stats.guard_dropped = dropped
    stats.semihard_fallback_used = counters["semihard_fallback_used"]
    stats.semihard_skipped = counters["semihard_skipped"]
    return negatives
