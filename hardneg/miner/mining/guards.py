"""False-negative guards: drop candidates that are likely unlabelled positives.

Each guard looks at the candidates of ``m`` anchors (a :class:`Candidates`: their squared distances
``d2`` (m, K), index rows and the anchors' ``d2_pos`` (m,)) and says which ones it drops. The miner applies
them in the order of :func:`build_guards` and reports how many candidates each one dropped (a candidate
dropped by an earlier guard is not counted again by a later one, nor shown to it).

Score guards follow sentence-transformers' ``mine_hard_negatives`` on the similarity ``s`` of the metric
(:func:`similarity`): cosine ``s = 1 - d²/2`` (the cosine itself), l2 ``s = -d²``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hardneg.miner.mining.config import MiningConfig


def similarity(d2: np.ndarray, metric: str) -> np.ndarray:
    """The similarity score of squared distances ``d2`` (any shape): ``1 - d²/2`` for cosine, ``-d²`` for l2."""
    return 1.0 - d2 / 2.0 if metric == "cosine" else -d2


@dataclass(frozen=True)
class Candidates:
    """What a guard sees: ``d2`` (m, K) and ``rows`` (m, K) of the candidates (``-1`` padding), the anchors'
    ``d2_pos`` (m,) (NaN: no positive) and ``anchors`` (m,), their positions in the mining pass."""

    d2: np.ndarray
    rows: np.ndarray
    d2_pos: np.ndarray
    anchors: np.ndarray


class Guard(ABC):
    """A rule that drops candidates; ``name`` keys its count in the mining statistics."""

    name: ClassVar[str]

    @abstractmethod
    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        """(m, K) bool: the candidates that this guard drops; only the ``alive`` (m, K) ones are counted, so a
        costly guard may look at those alone."""

    def radius(self, d2_pos: np.ndarray) -> np.ndarray | None:
        """(m,) float64 ``R`` such that this guard drops exactly the candidates with ``d² < R`` (up to rounding), for
        anchors with ``d2_pos`` (m,); None when it is no such radius (then searches cannot skip what it drops)."""
        return None


@dataclass(frozen=True)
class NearDuplicateGuard(Guard):
    """Drop candidates with ``d²(a, n) < threshold``: copies or near-copies of the anchor under another label."""

    threshold: float
    name: ClassVar[str] = "near_duplicate"

    def radius(self, d2_pos: np.ndarray) -> np.ndarray:
        return np.full(len(d2_pos), float(self.threshold))

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        return c.d2 < self.threshold


@dataclass(frozen=True)
class PositiveAwareGuard(Guard):
    """NV-Retriever's TopK-PercPos (Moreira et al. 2024): drop negatives too similar relative to the positive.

    * cosine: with similarity ``s = 1 - d²/2``, drop ``s_n > fraction * s_p`` (the paper uses 0.95);
    * l2 (no bounded similarity): drop ``d²_n < d²_p / fraction``, i.e. negatives nearer than the positive
      scaled by ``1 / fraction``; for ``fraction < 1`` this also drops negatives slightly farther than the positive.
    """

    fraction: float
    cosine: bool
    name: ClassVar[str] = "positive_aware"

    def radius(self, d2_pos: np.ndarray) -> np.ndarray:
        if self.cosine:  # 1 - d²/2 > f (1 - d²_p/2)  <=>  d² < 2 - f (2 - d²_p)
            return 2.0 - self.fraction * (2.0 - d2_pos)
        return d2_pos / self.fraction

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        if self.cosine:
            return (1.0 - c.d2 / 2.0) > self.fraction * (1.0 - c.d2_pos[:, None] / 2.0)
        return c.d2 < c.d2_pos[:, None] / self.fraction


@dataclass(frozen=True)
class AbsoluteMarginGuard(Guard):
    """sentence-transformers' ``absolute_margin``: drop ``s_n > s_p - margin`` (``margin = 0``: a negative must
    not score above the positive)."""

    margin: float
    metric: str
    name: ClassVar[str] = "absolute_margin"

    def radius(self, d2_pos: np.ndarray) -> np.ndarray:
        return _radius_of_score(similarity(d2_pos, self.metric) - self.margin, self.metric)

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        s_p = similarity(c.d2_pos, self.metric)[:, None]
        return similarity(c.d2, self.metric) > s_p - self.margin


@dataclass(frozen=True)
class RelativeMarginGuard(Guard):
    """sentence-transformers' ``relative_margin`` (NV-Retriever's TopK-PercPos): drop ``s_n > s_p - |s_p| * margin``;
    0.05 keeps a negative only when it scores at least 5 % of the positive's magnitude below it."""

    margin: float
    metric: str
    name: ClassVar[str] = "relative_margin"

    def radius(self, d2_pos: np.ndarray) -> np.ndarray:
        s_p = similarity(d2_pos, self.metric)
        return _radius_of_score(s_p - np.abs(s_p) * self.margin, self.metric)

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        s_p = similarity(c.d2_pos, self.metric)[:, None]
        return similarity(c.d2, self.metric) > s_p - np.abs(s_p) * self.margin


@dataclass(frozen=True)
class MaxScoreGuard(Guard):
    """sentence-transformers' ``max_score``: drop candidates scoring above ``threshold``."""

    threshold: float
    metric: str
    name: ClassVar[str] = "max_score"

    def radius(self, d2_pos: np.ndarray) -> np.ndarray:
        return _radius_of_score(np.full(len(d2_pos), float(self.threshold)), self.metric)

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        return similarity(c.d2, self.metric) > self.threshold


@dataclass(frozen=True, eq=False)
class SuspectGuard(Guard):
    """Drop candidates that are suspected label errors: ``suspects`` (n,) bool over index rows, e.g. the top of
    :func:`hardneg.miner.audit.audit_labels` (``MiningConfig.exclude_suspects``). A mislabelled item is the
    nearest wrong-label neighbour of many anchors of its true class: a false negative for all of them."""

    suspects: np.ndarray
    name: ClassVar[str] = "exclude_suspects"

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        return alive & self.suspects[np.where(c.rows >= 0, c.rows, 0)]


def _radius_of_score(s: np.ndarray, metric: str) -> np.ndarray:
    """The ``d²`` below which :func:`similarity` exceeds ``s``: ``2 (1 - s)`` for cosine, ``-s`` for l2."""
    return 2.0 * (1.0 - s) if metric == "cosine" else -s


def guard_radii(guards: list[Guard], d2_pos: np.ndarray) -> np.ndarray | None:
    """(m, g) the cumulative radii of ``guards`` in their order (column ``j``: the largest of the first ``j + 1``), so
    a candidate nearer than column ``j`` and not than ``j - 1`` is dropped by guard ``j``; (m, 0) when there is no
    guard, None when some guard is not a radius."""
    radii = [g.radius(d2_pos) for g in guards]
    if not radii:
        return np.empty((len(d2_pos), 0))
    if any(r is None for r in radii):
        return None
    return np.maximum.accumulate(np.stack(radii, axis=1).astype(np.float64), axis=1)


def build_guards(config: MiningConfig, metric: str) -> list[Guard]:
    """The guards ``config`` switches on, in the order they are applied (sentence-transformers' order for its own)."""
    guards: list[Guard] = []
    if config.near_duplicate is not None:
        guards.append(NearDuplicateGuard(config.near_duplicate))
    if config.positive_aware is not None:
        guards.append(PositiveAwareGuard(config.positive_aware, cosine=metric == "cosine"))
    if config.absolute_margin is not None:
        guards.append(AbsoluteMarginGuard(config.absolute_margin, metric))
    if config.relative_margin is not None:
        guards.append(RelativeMarginGuard(config.relative_margin, metric))
    if config.max_score is not None:
        guards.append(MaxScoreGuard(config.max_score, metric))
    return guards


def apply_guards(guards: list[Guard], c: Candidates, valid: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run ``guards`` over the ``valid`` (m, K) candidates ``c``.

    Returns:
        ``keep`` (m, K) bool, and for each guard's name the (m,) count of candidates it dropped per anchor.
    """
    keep = valid.copy()
    dropped: dict[str, np.ndarray] = {}
    for guard in guards:
        hit = keep & guard.drops(c, keep)
        dropped[guard.name] = hit.sum(1)
        keep &= ~hit
    return keep, dropped
