"""Statistics of one mining pass: counts, guard drops, the non-zero-loss share and distance summaries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HISTOGRAM_BINS = 20


@dataclass
class DistanceSummary:
    """Summary of a set of squared distances. Empty sets have ``count == 0`` and ``None`` everywhere else."""

    count: int
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    quantiles: dict[str, float] = field(default_factory=dict)  # "0.5" -> median, ...
    histogram: dict[str, list] = field(default_factory=dict)  # {"edges": (B+1,), "counts": (B,)}

    @classmethod
    def of(cls, d2: np.ndarray, edges: np.ndarray | None = None) -> DistanceSummary:
        """Summarise ``d2`` (k,); ``edges`` (B+1,) are the histogram bins (default: 20 over the data's range)."""
        d2 = np.asarray(d2, dtype=np.float64)
        if d2.size == 0:
            return cls(0)
        if edges is None:
            edges = np.histogram_bin_edges(d2, bins=HISTOGRAM_BINS)
        counts, _ = np.histogram(d2, bins=edges)
        qs = np.quantile(d2, QUANTILES)
        return cls(int(d2.size), float(d2.mean()), float(d2.min()), float(d2.max()),
                   {str(q): float(v) for q, v in zip(QUANTILES, qs)},
                   {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]})


@dataclass
class MiningStats:
    """What a mining pass found. Distances are squared Euclidean ``d²``.

    Attributes:
        strategy, metric, margin, per_anchor: what was mined, on which metric.
        anchors: anchors asked for.
        anchors_singleton: anchors alone in their class (no positive, so no triplet).
        anchors_mined: anchors that got at least one triplet.
        anchors_short: anchors with a positive that got fewer than ``per_anchor`` negatives (the semi-hard
            ``skip`` fallback's deliberate skips are counted in ``semihard_skipped`` instead).
        anchors_widened: anchors whose candidate search had to be widened at least once.
        search_rounds: candidate searches run (1 + the widening rounds).
        candidates_examined: wrong-label neighbours looked at over all anchors (before the guards).
        guard_dropped: per active guard, candidates it dropped (``exclude_suspects``: candidates that are
            suspected label errors).
        suspects_excluded: items marked as suspected label errors, never used as negatives.
        semihard_fallback_used: anchors without a semi-hard negative that took hardest ones instead.
        semihard_skipped: anchors without a semi-hard negative that were skipped.
        triplets, positive_pairs, negative_pairs, pairs: output sizes (pairs = positive + negative).
        nonzero_loss_share: share of triplets with ``max(0, d²(a,p) - d²(a,n) + margin) > 0`` (None: no triplet).
        d2_positive: summary of ``d²(a, p)`` over the positive pairs (one per mined anchor).
        d2_negative: summary of ``d²(a, n)`` over the negative pairs (one per triplet); same histogram bins.
    """

    strategy: str
    metric: str
    margin: float
    per_anchor: int
    anchors: int = 0
    anchors_singleton: int = 0
    anchors_mined: int = 0
    anchors_short: int = 0
    anchors_widened: int = 0
    search_rounds: int = 0
    candidates_examined: int = 0
    guard_dropped: dict[str, int] = field(default_factory=dict)
    suspects_excluded: int = 0
    semihard_fallback_used: int = 0
    semihard_skipped: int = 0
    triplets: int = 0
    positive_pairs: int = 0
    negative_pairs: int = 0
    pairs: int = 0
    nonzero_loss_share: float | None = None
    d2_positive: DistanceSummary = field(default_factory=lambda: DistanceSummary(0))
    d2_negative: DistanceSummary = field(default_factory=lambda: DistanceSummary(0))

    def summarise_distances(self, d2_pos: np.ndarray, d2_triplet_pos: np.ndarray, d2_neg: np.ndarray) -> None:
        """Fill the loss share and the distance summaries.

        Args:
            d2_pos: (a,) ``d²(a, p)`` per mined anchor.
            d2_triplet_pos: (t,) ``d²(a, p)`` per triplet.
            d2_neg: (t,) ``d²(a, n)`` per triplet.
        """
        if len(d2_neg):
            loss = np.maximum(0.0, d2_triplet_pos - d2_neg + self.margin)
            self.nonzero_loss_share = float((loss > 0).mean())
        both = np.concatenate([d2_pos, d2_neg]).astype(np.float64)
        edges = np.histogram_bin_edges(both, bins=HISTOGRAM_BINS) if both.size else None
        self.d2_positive = DistanceSummary.of(d2_pos, edges)
        self.d2_negative = DistanceSummary.of(d2_neg, edges)

    def to_dict(self) -> dict:
        """A JSON-able dict of every field."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        share = "n/a" if self.nonzero_loss_share is None else f"{self.nonzero_loss_share:.3f}"
        return (f"{self.strategy}: {self.triplets} triplets from {self.anchors_mined}/{self.anchors} anchors "
                f"(singleton {self.anchors_singleton}, short {self.anchors_short}), non-zero loss share {share}")
