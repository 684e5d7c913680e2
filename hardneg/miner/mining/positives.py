"""Positives: one same-label item per anchor, chosen before the negatives (semi-hard mining and the
positive-aware guard depend on ``d²(a, p)``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hardneg.miner.distances import Distance

# Anchors per block of the hardest-positive search, so that a block holds at most this many distances.
_BLOCK_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Positives:
    """``rows`` (m,) int64 index rows of the positives (``-1`` for an anchor alone in its class) and
    ``d2`` (m,) float64 ``d²(a, p)`` (NaN where there is none)."""

    rows: np.ndarray
    d2: np.ndarray


def class_bounds(labels: np.ndarray, anchor_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row range ``[lo, hi)`` (m,) each of the class of every anchor, for ``labels`` (n,) sorted ascending."""
    lab = labels[anchor_rows]
    return np.searchsorted(labels, lab, "left"), np.searchsorted(labels, lab, "right")


def random_positives(labels: np.ndarray, anchor_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random same-label row other than the anchor's own, per anchor: (m,) int64, ``-1`` for singletons."""
    lo, hi = class_bounds(labels, anchor_rows)
    others = hi - lo - 1
    # Draw among the class's other rows: an offset in [0, others), shifted past the anchor's own row.
    pick = lo + rng.integers(0, np.maximum(others, 1))
    pick += pick >= anchor_rows
    return np.where(others > 0, pick, -1).astype(np.int64)


def hardest_positives(vectors: np.ndarray, labels: np.ndarray, anchor_rows: np.ndarray,
                      distance: Distance) -> np.ndarray:
    """The farthest same-label row from each anchor (lowest row on ties): (m,) int64, ``-1`` for singletons.

    Each class is a contiguous row range, so the anchors of one class are compared with it by one
    matrix product (in blocks of anchors for very large classes).

    Args:
        vectors: (n, d) float32 stored (prepared) vectors.
        labels: (n,) labels, sorted ascending.
        anchor_rows: (m,) anchor rows.
        distance: the index's metric.
    """
    lo, hi = class_bounds(labels, anchor_rows)
    out = np.full(len(anchor_rows), -1, np.int64)
    order = np.argsort(lo, kind="stable")
    starts = np.flatnonzero(np.diff(lo[order], prepend=-1))
    for group in np.split(order, starts[1:]):
        c_lo, c_hi = int(lo[group[0]]), int(hi[group[0]])
        if c_hi - c_lo < 2:
            continue
        x = vectors[c_lo:c_hi]
        step = max(1, _BLOCK_ENTRIES // (c_hi - c_lo))
        for s in range(0, len(group), step):
            idx = group[s:s + step]
            d2 = block_d2(vectors[anchor_rows[idx]], x, distance)
            d2[np.arange(len(idx)), anchor_rows[idx] - c_lo] = -np.inf  # never the anchor itself
            out[idx] = c_lo + np.argmax(d2, axis=1)
    return out


def block_d2(q: np.ndarray, x: np.ndarray, distance: Distance) -> np.ndarray:
    """Squared distances (m, c) float32 between prepared ``q`` (m, d) and ``x`` (c, d), by one matrix product."""
    dots = q @ x.T
    if distance.higher_is_closer:
        return 2.0 - 2.0 * dots
    return (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * dots


def choose_positives(kind: str, vectors: np.ndarray, labels: np.ndarray, anchor_rows: np.ndarray,
                     distance: Distance, rng: np.random.Generator) -> Positives:
    """Positives of ``kind`` (``random`` or ``hardest``) for ``anchor_rows`` (m,), with exact ``d²(a, p)``."""
    if kind == "hardest":
        rows = hardest_positives(vectors, labels, anchor_rows, distance)
    else:
        rows = random_positives(labels, anchor_rows, rng)
    has = rows >= 0
    d2 = np.full(len(anchor_rows), np.nan)
    diff = vectors[anchor_rows[has]].astype(np.float64) - vectors[rows[has]]
    d2[has] = np.einsum("ij,ij->i", diff, diff)
    return Positives(rows, d2)
