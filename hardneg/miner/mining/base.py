"""What every negative strategy sees and returns, and the thin base class they share.

The miner hands a strategy a :class:`CandidatePool`: for each of ``m`` anchors, its
nearest wrong-label neighbours that survived the false-negative guards, nearest first,
as padded ``(m, K)`` arrays. The strategy says which anchors need a wider pool
(:meth:`NegativeStrategy.wants_more`) and picks negatives from the rest
(:meth:`NegativeStrategy.select`). Both work on whole batches: no per-anchor Python loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.mining.config import MiningConfig


@dataclass(frozen=True)
class CandidatePool:
    """Admissible wrong-label candidates of ``m`` anchors, nearest first, padded on the right.

    Attributes:
        rows: (m, K) int64 index rows, ``-1`` past each anchor's ``count``.
        d2: (m, K) float32 squared distances to the anchor, ascending, ``inf`` past ``count``.
        count: (m,) int64 admissible candidates per anchor.
        d2_pos: (m,) float64 ``d²(a, p)`` to the anchor's positive.
        reach: (m,) float32 ``d²`` of the farthest neighbour fetched (before the guards), ``inf`` when
            none was: every wrong-label item nearer than this has been looked at.
    """

    rows: np.ndarray
    d2: np.ndarray
    count: np.ndarray
    d2_pos: np.ndarray
    reach: np.ndarray

    def __len__(self) -> int:
        return len(self.count)

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    def subset(self, sel: np.ndarray) -> CandidatePool:
        """The pool of the anchors picked by ``sel`` (a boolean mask or row positions)."""
        return CandidatePool(self.rows[sel], self.d2[sel], self.count[sel], self.d2_pos[sel], self.reach[sel])

    def take(self, cols: np.ndarray) -> np.ndarray:
        """Rows at per-anchor columns ``cols`` (m, p), ``-1`` where ``cols`` is ``-1``: (m, p) int64."""
        safe = np.where(cols >= 0, cols, 0)
        picked = np.take_along_axis(self.rows, safe, axis=1) if self.width else np.full(cols.shape, -1, np.int64)
        return np.where(cols >= 0, picked, -1)

    def first(self, p: int) -> np.ndarray:
        """The ``p`` nearest admissible candidates of each anchor: (m, p) int64 rows, ``-1``-padded."""
        cols = np.broadcast_to(np.arange(p), (len(self), p))
        return self.take(np.where(cols < self.count[:, None], cols, -1))


@dataclass
class Selection:
    """The negatives a strategy picked: ``rows`` (m, per_anchor) int64, ``-1``-padded, plus named counters."""

    rows: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)


class NegativeStrategy(ABC):
    """A way of picking ``per_anchor`` negatives from each anchor's candidate pool.

    Subclasses set ``name``, implement :meth:`wants_more` and :meth:`_select`, and may
    override :meth:`pool_size` and :meth:`check`.

    Args:
        config: the mining configuration (``config.strategy`` must be this strategy's ``name``).
        vectors: (n, d) float32, the stored (prepared) vectors, for strategies that need the geometry.
        metric: the index's metric name (``cosine`` or ``l2``).
    """

    name: ClassVar[str]

    def __init__(self, config: MiningConfig, vectors: np.ndarray, metric: str) -> None:
        if config.strategy != self.name:
            raise ValidationError(f"{type(self).__name__} mines {self.name!r} but the config asks for {config.strategy!r}")
        self.config = config
        self.check(vectors, metric)

    def check(self, vectors: np.ndarray, metric: str) -> None:
        """Refuse (ValidationError) or warn about an index this strategy cannot serve well; default: accept all."""

    def pool_size(self) -> int:
        """How many admissible candidates per anchor the strategy needs at most (widening stops there)."""
        return self.config.per_anchor

    def initial_width(self) -> int:
        """Neighbours to fetch per anchor in the first round: the pool size, or ``candidates`` when guards may drop some."""
        need = self.pool_size()
        return max(need, self.config.candidates) if self.config.guarded else need

    @abstractmethod
    def wants_more(self, pool: CandidatePool) -> np.ndarray:
        """(m,) bool: anchors whose pool is too shallow to select from, were the index to hold more."""

    def select(self, pool: CandidatePool, rng: np.random.Generator) -> Selection:
        """Pick negatives for every anchor of ``pool``: a :class:`Selection` with (m, per_anchor) rows."""
        sel = self._select(pool, rng)
        if sel.rows.shape != (len(pool), self.config.per_anchor):
            raise AssertionError(f"{self.name} returned shape {sel.rows.shape}, "
                                 f"expected {(len(pool), self.config.per_anchor)}")
        return sel

    @abstractmethod
    def _select(self, pool: CandidatePool, rng: np.random.Generator) -> Selection:
        ...


def first_true(mask: np.ndarray, p: int) -> np.ndarray:
    """Columns of the first ``p`` True entries of each row of ``mask`` (m, K): (m, p) int64, ``-1``-padded."""
    m, k = mask.shape
    if k == 0:
        return np.full((m, p), -1, np.int64)
    order = np.argsort(~mask, axis=1, kind="stable")[:, :p]
    cols = np.where(np.take_along_axis(mask, order, axis=1), order, -1)
    return np.pad(cols, ((0, 0), (0, p - cols.shape[1])), constant_values=-1) if cols.shape[1] < p else cols


def top_keys(keys: np.ndarray, p: int) -> np.ndarray:
    """Columns of the ``p`` largest keys of each row of ``keys`` (m, K), largest first; ``-inf`` (and NaN) keys
    are never picked: (m, p) int64, ``-1``-padded."""
    m, k = keys.shape
    if k == 0:
        return np.full((m, p), -1, np.int64)
    neg = -keys
    if k > p:
        part = np.argpartition(neg, p - 1, axis=1)[:, :p]
    else:
        part = np.broadcast_to(np.arange(k), (m, k))
    order = np.take_along_axis(part, np.argsort(np.take_along_axis(neg, part, 1), axis=1, kind="stable"), 1)
    cols = np.where(np.take_along_axis(keys, order, 1) > -np.inf, order, -1)
    return np.pad(cols, ((0, 0), (0, p - cols.shape[1])), constant_values=-1) if cols.shape[1] < p else cols
