"""Retrieval metrics of an embedding: P@1, Recall@K, R-Precision and MAP@R.

All are leave-one-out kNN queries over one labelled set: every item queries all the
others. Definitions follow Musgrave et al. 2020, "A Metric Learning Reality Check":

* ``R`` for a query is the number of *other* items with its label;
* ``precision_at_1``: share of queries whose nearest neighbour has their label;
* ``recall_at_k``: share of queries with at least one same-label item among their
  ``k`` nearest (the convention of the CUB/SOP papers);
* ``r_precision``: mean of ``(# same-label among the R nearest) / R``;
* ``map_at_r``: mean of ``(1/R) · Σ_{i≤R} P(i)·rel(i)``, where ``rel(i)`` is 1 when the
  ``i``-th neighbour has the query's label and ``P(i)`` is the precision of the first ``i``.

Queries whose class has no other item (``R = 0``) are left out of every mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex, check_int_array, check_vectors


def relevance_matrix(embeddings: np.ndarray, labels: np.ndarray, k: int, metric: str = "cosine") -> np.ndarray:
    """For each item, whether each of its ``k`` nearest *other* items shares its label.

    Args:
        embeddings: (n, d) vectors.
        labels: (n,) integer labels.
        k: neighbours per item (clipped to ``n - 1``).
        metric: ``cosine`` or ``l2``.

    Returns:
        (n, k') bool matrix, nearest first, ``k' = min(k, n - 1)``.
    """
    n = len(embeddings)
    ids = np.arange(n, dtype=np.int64)
    index = VectorIndex.build(embeddings, labels, ids, metric=metric, index="flat")
    k = min(k, n - 1)
    result = index.search(embeddings, k, exclude_self=ids)
    if not np.all(result.lengths == k):  # flat search over n-1 others always fills k
        raise RuntimeError("exact search returned fewer neighbours than requested")
    neighbour_labels = result.labels.reshape(n, k)
    return neighbour_labels == np.asarray(labels)[:, None]


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray | Sequence[int],
    *,
    ks: Sequence[int] = (1, 5, 10),
    metric: str = "cosine",
) -> dict[str, float]:
    """Leave-one-out retrieval metrics of ``embeddings`` (n, d) with ``labels`` (n,).

    Returns a dict with ``precision_at_1``, ``recall_at_{k}`` for each k in ``ks``,
    ``r_precision``, ``map_at_r`` and ``num_queries`` (queries with ``R >= 1``).
    """
    embeddings = check_vectors(embeddings, "embeddings")
    labels = check_int_array(labels, "labels", len(embeddings))
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValidationError(f"ks must be positive integers, got {list(ks)}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1  # (n,) other items of each query's class
    if r.max(initial=0) == 0:
        raise ValidationError("retrieval metrics need at least one class with two or more items")
    depth = int(max(r.max(), max(ks, default=1)))
    rel = relevance_matrix(embeddings, labels, depth, metric)  # (n, depth)
    valid = r > 0
    rel, r = rel[valid], r[valid]
    n, width = rel.shape
    ranks = np.arange(1, width + 1)
    within_r = ranks[None, :] <= r[:, None]  # (n, width): the first R positions of each query
    hits_r = rel & within_r
    precision_at_i = np.cumsum(hits_r, axis=1) / ranks[None, :]
    out: dict[str, float] = {"precision_at_1": float(rel[:, 0].mean())}
    for k in ks:
        out[f"recall_at_{k}"] = float(rel[:, : min(k, width)].any(axis=1).mean())
    out["r_precision"] = float((hits_r.sum(1) / r).mean())
    out["map_at_r"] = float(((precision_at_i * hits_r).sum(1) / r).mean())
    out["num_queries"] = int(n)
    return out
