"""The output of a mining pass: triplets, pairs and statistics, as stored item ids."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from hardneg.miner.mining.stats import MiningStats

NPZ_ARRAYS = ("anchor", "positive", "negative", "pair_i", "pair_j", "pair_y")


@dataclass
class MiningResult:
    """Triplets ``(anchor, positive, negative)`` (t,) each and pairs ``(pair_i, pair_j, pair_y)`` (p,) each,
    all int64 stored ids (``pair_y``: 0 similar, 1 dissimilar), with the pass's :class:`MiningStats`.

    Triplets are grouped by anchor in the order the anchors were given, each anchor's negatives nearest
    first. The pairs hold, per mined anchor, ``(a, p, 0)`` once and then ``(a, n, 1)`` for each of its negatives.
    """

    anchor: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    pair_i: np.ndarray
    pair_j: np.ndarray
    pair_y: np.ndarray
    stats: MiningStats
    anchor_pos: np.ndarray | None = None  # (t,) position in the anchors asked of each triplet's anchor

    def __len__(self) -> int:
        """Number of triplets."""
        return len(self.anchor)

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write the six id arrays (named as the attributes) to the ``.npz`` file ``path`` (no pickle)."""
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to the name
            np.savez(f, **{name: np.asarray(getattr(self, name), dtype=np.int64) for name in NPZ_ARRAYS})
