"""How much the embedding moved between two snapshots, over the items both hold.

Three statistics, each exact (brute force on BLAS, in query blocks):

* **neighbour overlap at k**: for a seeded sample of anchors, the share of an anchor's ``k`` nearest other
  items in snapshot A that are still among its ``k`` nearest in B (mean, and mean per class). 1 means the
  neighbourhoods, and so the mined negatives, no longer change: a refresh would mine nearly the same tuples.
* **centroid shift per class**: ``d²`` between a class's mean stored vector in A and in B (on cosine
  snapshots, the means of the stored unit vectors).
* **hardest-negative change**: the share of the sampled anchors whose nearest wrong-label item differs.

Neighbours are searched among the common items only, so items added or dropped between the snapshots do
not count as drift. Labels are each snapshot's own (a relabelled item is judged by its label at the time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex, check_k, stored_vectors
from hardneg.miner.mining.topk import scores

DEFAULT_SAMPLE = 2000  # anchors: the overlap's standard error is below 0.01 at this size
_BLOCK_ENTRIES = 1 << 24  # scores per block (64 MiB of float32)


@dataclass(frozen=True)
class Drift:
    """Drift from snapshot ``A`` to snapshot ``B``. Per-class dicts are keyed by label (in B for the overlap).

    Attributes:
        common: items both snapshots hold; only_from / only_to: items only A / only B holds.
        k: neighbours compared per anchor; anchors: the sample size.
        overlap_mean: mean over the anchors of ``|N_A ∩ N_B| / k``.
        overlap_per_class: that mean per class.
        centroid_shift: per class held by both, ``d²`` between its centroids in A and B.
        centroid_shift_mean: their mean.
        hardest_negative_changed: share of the anchors (with a wrong-label item in both) whose nearest
            wrong-label item differs; ``None`` when no anchor has one.
    """

    common: int
    only_from: int
    only_to: int
    k: int
    anchors: int
    overlap_mean: float
    overlap_per_class: dict[int, float]
    centroid_shift: dict[int, float]
    centroid_shift_mean: float
    hardest_negative_changed: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def snapshot_drift(a: VectorIndex, b: VectorIndex, k: int = 10, sample: int = DEFAULT_SAMPLE,
                   seed: int = 0) -> Drift:
    """Drift from index ``a`` to index ``b`` (see the module docstring).

    Args:
        a, b: the older and the newer snapshot's index (any dimension each; ids are matched).
        k: neighbours per anchor, 1 <= k < number of common items.
        sample: anchors drawn (seeded) from the common items; all of them when there are fewer.
        seed: the sample's seed.
    """
    k = check_k(k)
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1:
        raise ValidationError(f"sample must be a positive integer (anchors to compare), got {sample!r}")
    common = np.intersect1d(a.ids, b.ids)
    m = len(common)
    if m <= k:
        raise ValidationError(f"the snapshots share {m} item(s); drift at k={k} needs more than k common items")
    ra, rb = a.rows_of(common), b.rows_of(common)
    xa, xb = stored_vectors(a)[ra], stored_vectors(b)[rb]
    la, lb = a.labels[ra], b.labels[rb]
    anchors = np.sort(np.random.default_rng(seed).choice(m, size=min(sample, m), replace=False))
    na, ha = _neighbours_and_hardest(xa, la, anchors, k, a)
    nb, hb = _neighbours_and_hardest(xb, lb, anchors, k, b)
    overlap = np.array([len(np.intersect1d(na[i], nb[i])) for i in range(len(anchors))]) / k
    both = (ha >= 0) & (hb >= 0)
    classes, inverse = np.unique(lb[anchors], return_inverse=True)
    per_class = {int(c): float(overlap[inverse == j].mean()) for j, c in enumerate(classes)}
    shift = centroid_shift(xa, la, xb, lb)
    return Drift(
        common=m, only_from=int(a.count - m), only_to=int(b.count - m), k=k, anchors=len(anchors),
        overlap_mean=float(overlap.mean()), overlap_per_class=per_class, centroid_shift=shift,
        centroid_shift_mean=float(np.mean(list(shift.values()))) if shift else 0.0,
        hardest_negative_changed=float((ha[both] != hb[both]).mean()) if both.any() else None)


def _neighbours_and_hardest(x: np.ndarray, labels: np.ndarray, anchors: np.ndarray, k: int,
                            index: VectorIndex) -> tuple[np.ndarray, np.ndarray]:
    """For each anchor position: its ``k`` nearest other positions (m, k) and nearest wrong-label position (m,)
    (``-1`` when every item shares its label)."""
    n = len(x)
    near = np.empty((len(anchors), k), np.int64)
    hardest = np.empty(len(anchors), np.int64)
    step = max(1, _BLOCK_ENTRIES // n)
    for s in range(0, len(anchors), step):
        pos = anchors[s:s + step]
        sc = scores(x[pos], x, index.distance)
        sc[np.arange(len(pos)), pos] = -np.inf  # never its own neighbour
        near[s:s + step] = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        sc[labels[pos][:, None] == labels[None, :]] = -np.inf
        best = sc.argmax(1)
        hardest[s:s + step] = np.where(np.isfinite(sc[np.arange(len(pos)), best]), best, -1)
    return near, hardest


def centroid_shift(xa: np.ndarray, la: np.ndarray, xb: np.ndarray, lb: np.ndarray) -> dict[int, float]:
    """``d²`` between each class's centroid in A and in B, for the classes both hold (comparable only when the
    snapshots have the same dimension; otherwise empty)."""
    if xa.shape[1] != xb.shape[1]:
        return {}
    out = {}
    for c in np.intersect1d(la, lb):
        diff = xa[la == c].astype(np.float64).mean(0) - xb[lb == c].astype(np.float64).mean(0)
        out[int(c)] = float(diff @ diff)
    return out
