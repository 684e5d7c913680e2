"""Semi-hard negatives (FaceNet: Schroff, Kalenichenko and Philbin, CVPR 2015)."""

from __future__ import annotations

import numpy as np

from hardneg.miner.mining.base import CandidatePool, NegativeStrategy, Selection, first_true


class SemiHardNegatives(NegativeStrategy):
    """Wrong-label neighbours farther than the positive but inside the margin, nearest first.

    A negative ``n`` is semi-hard for the triplet ``(a, p)`` when ``d²(a,p) < d²(a,n) < d²(a,p) + margin``
    (Schroff et al. 2015, eq. 4): it still has a positive triplet loss but does not outrank the positive.
    Each anchor gets the ``per_anchor`` nearest such negatives that pass the guards. An anchor with none:

    * ``semihard_fallback="hardest"`` takes the ``per_anchor`` nearest admissible negatives instead
      (counted as ``semihard_fallback_used``);
    * ``semihard_fallback="skip"`` gets no triplet (counted as ``semihard_skipped``).

    An anchor with some semi-hard negatives but fewer than ``per_anchor`` keeps the ones it has.
    """

    name = "semihard"

    def pool_size(self) -> int:
        # The band may start deep in the ranking: fetch `candidates` and widen while the band is cut off.
        return max(self.config.per_anchor, self.config.candidates)

    def initial_width(self) -> int:
        return self.pool_size()

    def _band(self, pool: CandidatePool) -> np.ndarray:
        lo = pool.d2_pos[:, None]
        return (pool.d2 > lo) & (pool.d2 < lo + self.config.margin)

    def wants_more(self, pool: CandidatePool) -> np.ndarray:
        p = self.config.per_anchor
        n_band = self._band(pool).sum(1)
        band_cut = pool.reach < pool.d2_pos + self.config.margin  # items beyond the fetched ones may be in the band
        more = (n_band < p) & band_cut
        if self.config.semihard_fallback == "hardest":
            more |= (n_band == 0) & (pool.count < p)
        return more

    def _select(self, pool: CandidatePool, rng: np.random.Generator) -> Selection:
        p = self.config.per_anchor
        band = self._band(pool)
        rows = pool.take(first_true(band, p))
        none = ~band.any(1)
        if self.config.semihard_fallback == "hardest":
            fallback = pool.first(p)
            rows[none] = fallback[none]
            return Selection(rows, {"semihard_fallback_used": int((none & (pool.count > 0)).sum())})
        return Selection(rows, {"semihard_skipped": int(none.sum())})
