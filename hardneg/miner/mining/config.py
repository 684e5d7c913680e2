"""The typed configuration of one mining pass."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass

from hardneg.miner.errors import ValidationError

STRATEGIES = ("hardest", "semihard", "window", "distance-weighted")
POSITIVES = ("random", "hardest")
SEMIHARD_FALLBACKS = ("hardest", "skip")
WINDOW_SAMPLINGS = ("random", "top")


@dataclass
class MiningConfig:
    """What to mine and how. Every distance here is a squared Euclidean ``d²`` unless said otherwise.

    Invalid values raise :class:`~hardneg.miner.errors.ValidationError` at construction.
    """

    strategy: str = "hardest"  # hardest | semihard | window | distance-weighted
    per_anchor: int = 1  # negatives (and so triplets) per anchor
    margin: float = 0.2  # in d² units, as the triplet loss uses it
    positive: str = "random"  # random | hardest (farthest same-label item)
    semihard_fallback: str = "hardest"  # hardest | skip, for an anchor with no semi-hard negative
    window_skip: int = 0  # window: skip the nearest `skip` admissible wrong-label neighbours
    window_width: int = 32  # window: sample from the next `width` (sentence-transformers' range_max - range_min)
    window_sampling: str = "random"  # window: random | top (the nearest per_anchor of the window; ST's "top")
    dw_cutoff: float = 0.5  # distance-weighted: Wu et al.'s lower clip on Euclidean d (not d²)
    dw_nonzero_loss_cutoff: float = 1.4  # distance-weighted: weight 0 at d >= this (Wu et al.'s beta + alpha)
    positive_aware: float | None = None  # TopK-PercPos: drop negatives with s_n > this * s_p (NV-Retriever uses 0.95)
    near_duplicate: float | None = None  # drop negatives with d² below this (near-duplicates of the anchor)
    # Score guards, sentence-transformers' rules on the similarity s (cosine: 1 - d²/2; l2: -d²) against the
    # positive's (the hardest positive's when there are several):
    absolute_margin: float | None = None  # drop s_n > s_p - margin
    relative_margin: float | None = None  # drop s_n > s_p - |s_p| * margin (NV-Retriever's TopK-PercPos at 0.05)
    max_score: float | None = None  # drop s_n > max_score
    exclude_suspects: float | None = None  # label mode: never use the top fraction of label-noise suspects as negatives
    candidates: int = 64  # wrong-label neighbours fetched per anchor before guards; doubled for short anchors
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("positive", self.positive, POSITIVES)
        _choice("semihard_fallback", self.semihard_fallback, SEMIHARD_FALLBACKS)
        _choice("window_sampling", self.window_sampling, WINDOW_SAMPLINGS)
        self.per_anchor = _integer("per_anchor", self.per_anchor, minimum=1)
        self.window_skip = _integer("window_skip", self.window_skip, minimum=0)
        self.window_width = _integer("window_width", self.window_width, minimum=1)
        self.candidates = _integer("candidates", self.candidates, minimum=1)
        self.seed = _integer("seed", self.seed, minimum=0)
        self.margin = _number("margin", self.margin, "a finite number >= 0", lambda v: v >= 0)
        self.dw_cutoff = _number("dw_cutoff", self.dw_cutoff, "a finite number > 0", lambda v: v > 0)
        # Wu et al.'s weight has a factor log(1 - d²/4), defined only for d < 2 (the diameter of the unit sphere).
        self.dw_nonzero_loss_cutoff = _number(
            "dw_nonzero_loss_cutoff", self.dw_nonzero_loss_cutoff, f"a number in ({self.dw_cutoff}, 2] (above dw_cutoff)",
            lambda v: self.dw_cutoff < v <= 2.0)
        if self.positive_aware is not None:
            self.positive_aware = _number("positive_aware", self.positive_aware, "None or a finite number > 0",
                                          lambda v: v > 0)
        if self.near_duplicate is not None:
            self.near_duplicate = _number("near_duplicate", self.near_duplicate, "None or a finite number >= 0",
                                          lambda v: v >= 0)
        if self.absolute_margin is not None:
            self.absolute_margin = _number("absolute_margin", self.absolute_margin, "None or a finite number",
                                           lambda v: True)
        if self.relative_margin is not None:
            self.relative_margin = _number("relative_margin", self.relative_margin, "None or a number in [0, 1)",
                                           lambda v: 0 <= v < 1)
        if self.max_score is not None:
            self.max_score = _number("max_score", self.max_score, "None or a finite number", lambda v: True)
        if self.exclude_suspects is not None:
            self.exclude_suspects = _number("exclude_suspects", self.exclude_suspects,
                                            "None or a fraction in (0, 1)", lambda v: 0 < v < 1)
        if self.strategy == "window" and self.window_width < self.per_anchor:
            raise ValidationError(f"window_width ({self.window_width}) must be at least per_anchor ({self.per_anchor}): "
                                  "the window strategy samples per_anchor negatives without replacement from it")

    @property
    def guarded(self) -> bool:
        """True when a false-negative guard is on (so candidates may be dropped before selection)."""
        return any(v is not None for v in (self.positive_aware, self.near_duplicate, self.absolute_margin,
                                           self.relative_margin, self.max_score, self.exclude_suspects))

    @property
    def needs_positive(self) -> bool:
        """True when mining depends on ``d²(a, p)``: semi-hard negatives or a guard relative to the positive."""
        return self.strategy == "semihard" or any(
            v is not None for v in (self.positive_aware, self.absolute_margin, self.relative_margin))

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValidationError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValidationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(name: str, value: object, accepted: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValidationError(f"{name} must be {accepted}, got {value!r}")
    return float(value)
