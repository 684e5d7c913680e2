"""Data audits of one snapshot: label-noise suspects and near-duplicates, from the stored embeddings alone.

Plain functions over a :class:`~hardneg.miner.index.VectorIndex`, in the style of faiss.contrib: every item is a
query against every other, in query blocks, so memory stays O(n·k) (labels) or O(pairs) (duplicates) however
large the snapshot. Exact on flat snapshots (the stored vectors are searched with ``faiss.knn`` on BLAS); on
ivf / hnsw snapshots the vectors are reconstructed and searched exactly too, which costs as much as a flat search.

**Label noise.** Two estimates of how well an item's embedding supports its given label, averaged:

* ``p_given``, local: the share of its ``k`` nearest *other* items that carry its label, the classic kNN
  estimate of ``p(y_i | x_i)`` (Cover and Hart 1967), which Cleanlab calls *self-confidence* when it comes
  from a classifier (Northcutt, Jiang and Chuang, "Confident Learning", JAIR 2021);
* ``p_centroid``, global: the nearest-class-mean view (Mensink et al., TPAMI 2013),
  ``d²_other / (d²_other + d²_own)`` with ``d²_own`` the distance to the mean of the *other* items of its
  class and ``d²_other`` to the nearest mean of another class; 1/2 when the two are equally near.

``quality = (p_given + p_centroid) / 2`` ranks the items, lowest (most suspicious) first. The local vote alone
is coarse (k + 1 values) and is fooled where an item sits among a few others of its wrong label; the class
means see the whole class. On digits with flipped labels the average ranks the flipped items better than
either alone (docs/benchmarks.md). The suggested label is the neighbours' most frequent one (ties: nearest).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex, check_k, stored_vectors

DEFAULT_K = 10  # neighbours voting on each item's label; Cleanlab's kNN-based issue managers use 10 too
QUERY_BLOCK = 4096  # queries per faiss.knn call: FAISS's own BLAS query block


@dataclass(frozen=True)
class LabelAudit:
    """Per-item label-noise scores of a snapshot, ranked most suspicious first.

    Attributes:
        ids, labels: (n,) int64 the items and their given labels, most suspicious first.
        quality: (n,) float64 ``(p_given + p_centroid) / 2``, ascending: the ranking.
        p_given: (n,) float64 the share of the k nearest other items that carry the given label.
        p_centroid: (n,) float64 ``d²_other / (d²_other + d²_own)`` to the class means (own: without the item).
        suggested: (n,) int64 the neighbours' most frequent label.
        p_suggested: (n,) float64 its share of the votes.
        k: neighbours per item.
    """

    ids: np.ndarray
    labels: np.ndarray
    quality: np.ndarray
    p_given: np.ndarray
    p_centroid: np.ndarray
    suggested: np.ndarray
    p_suggested: np.ndarray
    k: int

    def __len__(self) -> int:
        return len(self.ids)

    def top(self, fraction: float) -> np.ndarray:
        """Ids of the ``ceil(fraction * n)`` most suspicious items: (m,) int64."""
        if isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
            raise ValidationError(f"fraction must be between 0 and 1, got {fraction!r}")
        return self.ids[:int(np.ceil(fraction * len(self)))]

    def rows(self, limit: int | None = None) -> list[dict]:
        """The first ``limit`` (default all) suspects as JSON-able dicts."""
        end = len(self) if limit is None else min(limit, len(self))
        return [{"rank": r, "id": int(self.ids[r]), "label": int(self.labels[r]), "quality": float(self.quality[r]),
                 "p_given": float(self.p_given[r]), "p_centroid": float(self.p_centroid[r]),
                 "suggested": int(self.suggested[r]), "p_suggested": float(self.p_suggested[r])}
                for r in range(end)]


def neighbour_rows(vectors: np.ndarray, k: int, metric: int, block: int = QUERY_BLOCK):
    """Exact ``k`` nearest other rows of each row of ``vectors`` (n, d), by query block.

    Yields ``(start, rows, scores)``: rows (b, k) int64 of the block's queries ``start:start+b`` (``-1`` padded
    when n <= k) and their FAISS scores (b, k). A row is never its own neighbour, even among exact duplicates.
    """
    n = len(vectors)
    kk = min(k + 1, n)
    for s in range(0, n, block):
        q = vectors[s:s + block]
        scores, rows = faiss.knn(q, vectors, kk, metric=metric)
        self_rows = np.arange(s, s + len(q))[:, None]
        hit = rows == self_rows
        # A query with duplicates at distance 0 may find itself anywhere among them, or not at all: drop it
        # where it is, else the farthest of the k + 1.
        drop = np.where(hit.any(1), hit.argmax(1), kk - 1)
        keep = np.ones_like(hit)
        keep[np.arange(len(q)), drop] = False
        rows = rows[keep].reshape(len(q), kk - 1)
        scores = scores[keep].reshape(len(q), kk - 1)
        if kk - 1 < k:
            rows = np.pad(rows, ((0, 0), (0, k - kk + 1)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, k - kk + 1)), constant_values=np.nan)
        yield s, rows.astype(np.int64), scores


def audit_labels(index: VectorIndex, k: int = DEFAULT_K) -> LabelAudit:
    """Score every item of ``index`` by how much its ``k`` nearest other items agree with its label.

    Args:
        index: the snapshot's index (at least 2 items).
        k: voting neighbours per item, 1 <= k < n.

    Returns:
        A :class:`LabelAudit`, most suspicious first.
    """
    k = check_k(k)
    n = index.count
    if n < 2:
        raise ValidationError(f"a label audit needs at least 2 items; the snapshot holds {n}")
    if k >= n:
        raise ValidationError(f"k must be below the number of items ({n}), got {k}")
    vectors = stored_vectors(index)
    labels = index.labels
    p_given = np.empty(n)
    suggested = np.empty(n, np.int64)
    p_suggested = np.empty(n)
    for s, rows, scores in neighbour_rows(vectors, k, index.distance.faiss_metric):
        e = s + len(rows)
        nl = labels[rows]
        agree = nl == labels[s:e, None]
        p_given[s:e] = agree.mean(1)
        suggested[s:e], p_suggested[s:e] = _mode(nl)
    p_centroid = centroid_confidence(vectors, labels)
    quality = (p_given + p_centroid) / 2
    order = np.lexsort((index.ids, p_given, quality))
    return LabelAudit(index.ids[order], labels[order], quality[order], p_given[order], p_centroid[order],
                      suggested[order], p_suggested[order], k)


def centroid_confidence(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``d²_other / (d²_other + d²_own)`` for each row of ``vectors`` (n, d), whose ``labels`` (n,) are ascending.

    ``d²_own`` is the squared distance to the mean of the other items of its class (``inf`` when it is alone:
    the result is then 0), ``d²_other`` to the nearest mean of another class (``inf`` when there is none: 1).
    Blockwise: memory O(block·d + classes·d).
    """
    classes, starts, counts = np.unique(labels, return_index=True, return_counts=True)
    sums = np.add.reduceat(vectors.astype(np.float64), starts, axis=0)
    means = (sums / counts[:, None]).astype(np.float32)
    cls = np.searchsorted(classes, labels)
    out = np.empty(len(labels))
    kk = min(2, len(classes))
    for s in range(0, len(labels), QUERY_BLOCK):
        x, c = vectors[s:s + QUERY_BLOCK], cls[s:s + QUERY_BLOCK]
        with np.errstate(divide="ignore", invalid="ignore"):
            own = (sums[c] - x) / (counts[c] - 1)[:, None]
        d2_own = np.where(counts[c] > 1, ((x - own) ** 2).sum(1), np.inf)
        d2, near = faiss.knn(np.ascontiguousarray(x, np.float32), means, kk, metric=faiss.METRIC_L2)
        if kk == 1:
            d2_other = np.full(len(x), np.inf)
        else:  # the nearest mean of another class: the first of the two nearest that is not its own
            d2_other = np.where(near[:, 0] != c, d2[:, 0], d2[:, 1]).astype(np.float64)
        with np.errstate(invalid="ignore"):
            q = d2_other / (d2_other + d2_own)
        q = np.where(np.isinf(d2_own), 0.0, np.nan_to_num(q, nan=0.5))  # nan: both 0 (an item on both means)
        out[s:s + len(x)] = np.where(np.isinf(d2_other), 1.0, q)
    return out


def _mode(nl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most frequent entry of each row of ``nl`` (b, k), ties to the one appearing first; and its share."""
    same = nl[:, :, None] == nl[:, None, :]  # (b, k, k): k is small
    counts = same.sum(2)
    best = counts.argmax(1)  # first column with the highest count: the nearest of the tied labels
    return nl[np.arange(len(nl)), best], counts.max(1) / nl.shape[1]


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups of items linked by pairs within a ``d²`` threshold (connected components of the pair graph).

    Attributes:
        threshold: the ``d²`` threshold (pairs with ``d² <= threshold``).
        groups: each group's ids (ascending), largest group first.
        id_labels: the label of each of those ids.
        group_labels: each group's distinct labels (ascending).
        pairs: the number of linking pairs found.
    """

    threshold: float
    groups: list[np.ndarray]
    id_labels: list[np.ndarray]
    group_labels: list[np.ndarray]
    pairs: int

    @property
    def same_label(self) -> list[int]:
        """Positions in ``groups`` of groups with one label: redundant copies."""
        return [i for i, lab in enumerate(self.group_labels) if len(lab) == 1]

    @property
    def conflicts(self) -> list[int]:
        """Positions in ``groups`` of groups with several labels: near-copies filed under different labels."""
        return [i for i, lab in enumerate(self.group_labels) if len(lab) > 1]

    def group_dict(self, i: int) -> dict:
        return {"ids": self.groups[i].tolist(), "id_labels": self.id_labels[i].tolist(),
                "labels": self.group_labels[i].tolist()}


def near_duplicate_pairs(index: VectorIndex, threshold: float, max_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of rows ``(i, j)``, ``i < j``, with ``d² <= threshold``: two (p,) int64 arrays.

    Raises ValidationError when there are more than ``max_pairs`` (the threshold is too wide to be a
    near-duplicate test, and the pairs would not fit in memory).
    """
    upper = 4.0 if index.metric == "cosine" else np.inf  # cosine d² = 2 - 2cos lies in [0, 4]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold) \
            or not 0 <= threshold < upper:
        raise ValidationError(f"threshold must be a finite d² >= 0 (below 4 for cosine snapshots), got {threshold!r}")
    vectors = stored_vectors(index)
    n = len(vectors)
    flat = faiss.IndexFlat(index.dim, index.distance.faiss_metric)
    flat.add(vectors)
    # FAISS range search keeps L2 distances < radius and inner products > radius; nudge so "<=" holds.
    radius = (1.0 - threshold / 2.0) if index.distance.higher_is_closer else threshold
    radius = float(np.nextafter(np.float32(radius), np.float32(-np.inf if index.distance.higher_is_closer else np.inf)))
    left, right, total = [], [], 0
    for s in range(0, n, QUERY_BLOCK):
        lims, _, rows = flat.range_search(vectors[s:s + QUERY_BLOCK], radius)
        q = np.repeat(np.arange(s, s + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = rows > q
        total += int(keep.sum())
        if total > max_pairs:
            raise ValidationError(f"more than {max_pairs} pairs lie within d² {threshold:g}: that is not a "
                                  "near-duplicate threshold; lower it")
        left.append(q[keep])
        right.append(rows[keep].astype(np.int64))
    if not left:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(left), np.concatenate(right)


def find_duplicates(index: VectorIndex, threshold: float, max_pairs: int = 1_000_000) -> DuplicateGroups:
    """Group the items of ``index`` that lie within ``d² <= threshold`` of one another (transitively).

    Args:
        index: the snapshot's index.
        threshold: the ``d²`` below which two items count as near-duplicates (e.g. 1e-3 for copies).
        max_pairs: refuse (ValidationError) thresholds that link more pairs than this.
    """
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) or max_pairs < 1:
        raise ValidationError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    i, j = near_duplicate_pairs(index, threshold, max_pairs)
    comp = _components(index.count, i, j)
    members = np.unique(np.concatenate([i, j]))
    groups = []
    if len(members):
        roots = comp[members]
        order = np.lexsort((index.ids[members], roots))  # by group, then by id
        members, roots = members[order], roots[order]
        groups = np.split(members, np.flatnonzero(np.diff(roots)) + 1)
    groups.sort(key=lambda rows: (-len(rows), int(index.ids[rows[0]])))
    return DuplicateGroups(float(threshold), [index.ids[g] for g in groups], [index.labels[g] for g in groups],
                           [np.unique(index.labels[g]) for g in groups], len(i))


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label (the smallest row in it) of each of ``n`` rows under edges ``(i, j)``: (n,)."""
    comp = np.arange(n)
    while True:
        low = np.minimum(comp[i], comp[j])
        before = comp.copy()
        np.minimum.at(comp, i, low)
        np.minimum.at(comp, j, low)
        comp = comp[comp]  # pointer jumping: halves the remaining path lengths
        if np.array_equal(comp, before):
            return comp
