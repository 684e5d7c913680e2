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

At scale, ``sample=M`` evaluates M seeded queries (each still ranked against all n items) and reports each
metric's 95 % confidence interval beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex, check_int_array, check_vectors

# Relevance entries (queries x depth) per block of queries: 16 MiB of bools, whatever the largest class.
_BLOCK_ENTRIES = 1 << 24
# Two-sided normal quantile of the reported confidence intervals (95 %).
Z_95 = 1.959963984540054


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray | Sequence[int],
    *,
    ks: Sequence[int] = (1, 5, 10),
    metric: str = "cosine",
    sample: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Leave-one-out retrieval metrics of ``embeddings`` (n, d) with ``labels`` (n,).

    Returns a dict with ``precision_at_1``, ``recall_at_{k}`` for each k in ``ks``,
    ``r_precision``, ``map_at_r`` and ``num_queries`` (queries with ``R >= 1``).

    ``sample``: evaluate only this many queries, drawn uniformly without replacement (seeded by ``seed``)
    among those with ``R >= 1`` (:func:`sample_queries`), each still ranked against all n items; ``None``
    (default) or at least that count evaluates every query. A sample adds ``{metric}_ci95`` per metric, the
    half-width of its 95 % confidence interval (normal approximation with the finite-population correction,
    so 0 when every query is drawn), and ``num_candidates`` (the queries with ``R >= 1``).

    Queries are searched in blocks of similar ``R`` (each to its block's depth), so memory stays bounded by
    the block size rather than growing as n x the largest class.
    """
    embeddings = check_vectors(embeddings, "embeddings")
    labels = check_int_array(labels, "labels", len(embeddings))
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValidationError(f"ks must be positive integers, got {list(ks)}")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1):
        raise ValidationError(f"sample must be None or a positive integer, got {sample!r}")
    r = class_others(labels)  # (n,) other items of each query's class
    if r.max(initial=0) == 0:
        raise ValidationError("retrieval metrics need at least one class with two or more items")
    n = len(embeddings)
    ids = np.arange(n, dtype=np.int64)
    index = VectorIndex.build(embeddings, labels, ids, metric=metric, index="flat")
    names = ["precision_at_1", *(f"recall_at_{k}" for k in ks), "r_precision", "map_at_r"]
    sums = {name: 0.0 for name in names}
    squares = {name: 0.0 for name in names}
    candidates = int((r > 0).sum())
    queries = sample_queries(labels, sample, seed)
    queries = queries[np.argsort(r[queries], kind="stable")]  # blocks of similar depth
    for block in _depth_blocks(r[queries], max(ks, default=1), n - 1):
        q = queries[block]
        depth = int(min(max(r[q].max(), max(ks, default=1)), n - 1))
        result = index.search(embeddings[q], depth, exclude_self=q)
        if not np.all(result.lengths == depth):  # flat search over n-1 others always fills depth
            raise RuntimeError("exact search returned fewer neighbours than requested")
        _add_block(sums, squares, result.labels.reshape(len(q), depth) == labels[q][:, None], r[q], ks)
    m = len(queries)
    out: dict[str, float] = {key: value / m for key, value in sums.items()}
    out["num_queries"] = int(m)
    if m < candidates:
        fpc = np.sqrt((candidates - m) / max(candidates - 1, 1))
        for name in names:
            var = max(squares[name] - m * out[name] ** 2, 0.0) / (m - 1) if m > 1 else float("inf")
            out[f"{name}_ci95"] = float(Z_95 * np.sqrt(var / m) * fpc)
        out["num_candidates"] = candidates
    return out


def class_others(labels: np.ndarray) -> np.ndarray:
    """``R`` of each item of ``labels`` (n,): how many other items share its label, (n,) int64."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return (counts[inverse] - 1).astype(np.int64)


def sample_queries(labels: np.ndarray, sample: int | None, seed: int = 0) -> np.ndarray:
    """The queries :func:`retrieval_metrics` evaluates: ascending positions among the items of ``labels`` (n,)
    with ``R >= 1``, all of them or ``sample`` drawn uniformly without replacement with ``seed``."""
    candidates = np.flatnonzero(class_others(np.asarray(labels)) > 0)
    if sample is None or sample >= len(candidates):
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, sample, replace=False))


def _depth_blocks(r_sorted: np.ndarray, min_depth: int, max_depth: int) -> list[slice]:
    """Slices of queries sorted by ascending ``R`` (m,) whose (queries x depth) relevance blocks hold at most
    ``_BLOCK_ENTRIES`` entries (one query per block at least): memory O(block), not O(n · largest R)."""
    blocks, s, m = [], 0, len(r_sorted)
    while s < m:
        e = m
        while True:
            depth = min(max(int(r_sorted[e - 1]), min_depth), max_depth)
            if (e - s) * depth <= _BLOCK_ENTRIES or e - s == 1:
                break
            e = s + max(1, _BLOCK_ENTRIES // depth)
        blocks.append(slice(s, e))
        s = e
    return blocks


def _add_block(sums: dict[str, float], squares: dict[str, float], rel: np.ndarray, r: np.ndarray,
               ks: Sequence[int]) -> None:
    """Add the per-query metrics of one block, and their squares, to ``sums`` and ``squares``: ``rel`` (b, depth)
    relevance, ``r`` (b,) R >= 1."""
    width = rel.shape[1]
    ranks = np.arange(1, width + 1)
    within_r = ranks[None, :] <= r[:, None]  # (b, width): the first R positions of each query
    hits_r = rel & within_r
    precision_at_i = np.cumsum(hits_r, axis=1) / ranks[None, :]
    per_query = {"precision_at_1": rel[:, 0].astype(np.float64)}
    for k in ks:
        per_query[f"recall_at_{k}"] = rel[:, : min(k, width)].any(axis=1).astype(np.float64)
    per_query["r_precision"] = hits_r.sum(1) / r
    per_query["map_at_r"] = (precision_at_i * hits_r).sum(1) / r
    for name, v in per_query.items():
        sums[name] += float(v.sum())
        squares[name] += float((v * v).sum())
