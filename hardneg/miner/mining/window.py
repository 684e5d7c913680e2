"""Rank-window negatives: skip the nearest few, sample from the next ones (a false-negative guard)."""

from __future__ import annotations

import numpy as np

from hardneg.miner.mining.base import CandidatePool, NegativeStrategy, Selection, top_keys


class WindowNegatives(NegativeStrategy):
    """Skip the ``window_skip`` nearest admissible wrong-label neighbours, then sample ``per_anchor`` of the next
    ``window_width`` uniformly without replacement (``window_sampling="random"``), or take the nearest
    ``per_anchor`` of them (``window_sampling="top"``, sentence-transformers' ``sampling_strategy="top"``).

    The nearest wrong-label items are the likeliest to be unlabelled positives; sampling from a window of
    ranks below them is sentence-transformers' ``mine_hard_negatives(range_min, range_max)`` and
    FlagEmbedding's ``sample_range``. When fewer than ``window_skip + window_width`` admissible items exist,
    the window is whatever lies past the skipped ones.
    """

    name = "window"

    def pool_size(self) -> int:
        top = self.config.window_sampling == "top"
        return self.config.window_skip + (self.config.per_anchor if top else self.config.window_width)

    def wants_more(self, pool: CandidatePool) -> np.ndarray:
        return pool.count < self.pool_size()

    def _select(self, pool: CandidatePool, rng: np.random.Generator) -> Selection:
        skip, width = self.config.window_skip, self.config.window_width
        if self.config.window_sampling == "top":
            cols = skip + np.arange(self.config.per_anchor)
            return Selection(pool.take(np.where(cols[None, :] < pool.count[:, None], cols[None, :], -1)))
        cols = skip + np.arange(width)
        inside = cols[None, :] < pool.count[:, None]
        # The p smallest of i.i.d. uniform keys form a uniform p-subset of the window.
        keys = np.where(inside, -rng.random((len(pool), width)), -np.inf)
        picked = top_keys(keys, self.config.per_anchor)
        return Selection(pool.take(np.where(picked >= 0, picked + skip, -1)))
