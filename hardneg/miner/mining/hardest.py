"""Hardest negatives: the nearest admissible wrong-label neighbours."""

from __future__ import annotations

import numpy as np

from hardneg.miner.mining.base import CandidatePool, NegativeStrategy, Selection


class HardestNegatives(NegativeStrategy):
    """The ``per_anchor`` nearest wrong-label neighbours of each anchor that pass the guards, nearest first.

    An anchor whose class complement (after guards) holds fewer than ``per_anchor`` items gets them all.
    """

    name = "hardest"

    def wants_more(self, pool: CandidatePool) -> np.ndarray:
        return pool.count < self.config.per_anchor

    def _select(self, pool: CandidatePool, rng: np.random.Generator) -> Selection:
        return Selection(pool.first(self.config.per_anchor))
