"""False-negative guards: drop wrong-label candidates that are likely unlabelled positives.

Each guard looks at the squared distances ``d2`` (m, K) of the candidates of ``m`` anchors and the
``d2_pos`` (m,) of their positives, and says which candidates it drops. The miner applies them in the
order of :func:`build_guards` and reports how many candidates each one dropped (a candidate dropped by
an earlier guard is not counted again by a later one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hardneg.miner.mining.config import MiningConfig


class Guard(ABC):
    """A rule that drops candidates; ``name`` keys its count in the mining statistics."""

    name: ClassVar[str]

    @abstractmethod
    def drops(self, d2: np.ndarray, d2_pos: np.ndarray) -> np.ndarray:
        """(m, K) bool: the candidates with squared distances ``d2`` (m, K) that this guard drops."""


@dataclass(frozen=True)
class NearDuplicateGuard(Guard):
    """Drop candidates with ``d²(a, n) < threshold``: copies or near-copies of the anchor under another label."""

    threshold: float
    name: ClassVar[str] = "near_duplicate"

    def drops(self, d2: np.ndarray, d2_pos: np.ndarray) -> np.ndarray:
        return d2 < self.threshold


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

    def drops(self, d2: np.ndarray, d2_pos: np.ndarray) -> np.ndarray:
        if self.cosine:
            return (1.0 - d2 / 2.0) > self.fraction * (1.0 - d2_pos[:, None] / 2.0)
        return d2 < d2_pos[:, None] / self.fraction


def build_guards(config: MiningConfig, metric: str) -> list[Guard]:
    """The guards ``config`` switches on, in the order they are applied."""
    guards: list[Guard] = []
    if config.near_duplicate is not None:
        guards.append(NearDuplicateGuard(config.near_duplicate))
    if config.positive_aware is not None:
        guards.append(PositiveAwareGuard(config.positive_aware, cosine=metric == "cosine"))
    return guards


def apply_guards(guards: list[Guard], d2: np.ndarray, valid: np.ndarray,
                 d2_pos: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run ``guards`` over the ``valid`` (m, K) candidates with squared distances ``d2`` (m, K).

    Returns:
        ``keep`` (m, K) bool, and for each guard's name the (m,) count of candidates it dropped per anchor.
    """
    keep = valid.copy()
    dropped: dict[str, np.ndarray] = {}
    for guard in guards:
        hit = keep & guard.drops(d2, d2_pos)
        dropped[guard.name] = hit.sum(1)
        keep &= ~hit
    return keep, dropped
