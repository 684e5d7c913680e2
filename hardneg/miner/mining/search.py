"""Batched wrong-label nearest-neighbour search for stored anchors: the miner's hot path.

Exact (flat) indexes. Rows are sorted by label, so the anchors, sorted by row, fall into blocks of
consecutive classes. For a block whose classes span the row range ``[lo, hi)``, every row outside that
range has a wrong label for every anchor of the block: those two ranges are searched with
``faiss.knn`` for the whole block at once, on FAISS's BLAS path with query blocks as large as a plain
unfiltered search uses. Only the small in-block range ``[lo, hi)`` needs a label mask; it is searched
with one masked matrix product. The partial top-k lists are then merged. Compared with searching each
class's anchors separately, this keeps FAISS's GEMM calls (and the thread hand-offs around each)
as few as the plain search makes, and never leaves BLAS for an ID-selector scan.

IVF indexes (``IVF..,Flat``, compressed IVF codes, and either under an exact ``RFlat`` refinement) are
probed label-aware and scanned list-major on BLAS (:mod:`hardneg.miner.mining.ivf_search`). Other
approximate indexes (hnsw, other factory strings) go through ``VectorIndex.search(different_label=True)``:
their own search path with an ID selector and the caller's per-call parameters. On HNSW that path must
widen ``efSearch`` by the anchor's whole class (every item of it is blocked and nearer than any negative),
so it is slower than exact mining: HNSW snapshots are for serving, not for mining (docs/benchmarks.md,
"Scale").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import faiss
import numpy as np

from hardneg.miner.distances import Distance
from hardneg.miner.index import SearchParams, SearchResult, VectorIndex
from hardneg.miner.mining.ivf_search import inverted_lists, ivf_wrong_label_knn
from hardneg.miner.mining.topk import merge_topk, score_to_d2, scores

# Anchors per block: FAISS's own BLAS query block (faiss.cvar.distance_compute_blas_query_bs).
QUERY_BLOCK = 4096
# IVF mining probes nprobe x (1 + log2(k) / DEPTH_PROBES) lists for k candidates per anchor (see mining_nprobe).
DEPTH_PROBES = 10
# The masked in-block product is computed in chunks of at most this many distances (64 MiB of float32).
_INNER_ENTRIES = 1 << 24


def wrong_label_knn(index: VectorIndex, vectors: np.ndarray, anchor_rows: np.ndarray, k: int,
                    params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of each anchor row among the rows whose label differs from its own.

    Args:
        index: the index: exact when flat; IVF through :mod:`~hardneg.miner.mining.ivf_search`; any
            other through its own search path. ``params`` applies to the last two.
        vectors: (n, d) float32 stored (prepared) vectors of every row.
        anchor_rows: (m,) rows of the anchors (repeats allowed).
        k: neighbours wanted per anchor, >= 1.
        params: per-call parameters for approximate indexes.

    Returns:
        ``rows`` (m, k) int64 and ``d2`` (m, k) float32 squared distances, nearest first, padded with
        ``-1`` / ``inf``; ``got`` (m,) int64, how many were found.
    """
    if index.exact:
        rows, d2 = exact_wrong_label_knn(vectors, index.labels, anchor_rows, k, index.distance)
    elif (lists := inverted_lists(index)) is not None:
        rows, d2 = ivf_wrong_label_knn(lists, vectors, index.labels, anchor_rows, k, index.distance, params,
                                       mining_nprobe(index.spec.nprobe, k, lists.nlist))
    else:
        res = index.search(vectors[anchor_rows], k, query_labels=index.labels[anchor_rows], different_label=True,
                           params=params)
        rows, d2 = padded(res, k)
    return rows, d2, (rows >= 0).sum(1)


def mining_nprobe(nprobe: int | None, k: int, nlist: int) -> int | None:
    """The lists an IVF mining search for ``k`` candidates per anchor probes by default (a caller's ``nprobe``
    is used as given): the snapshot's ``nprobe``, set for the nearest wrong-label item, times
    ``1 + log2(k) / DEPTH_PROBES``, at most ``nlist``.

    The k-th candidate lies farther from the anchor than the first, so its ball meets more lists: semi-hard
    mining (64 candidates, for a band that starts beyond the positive) probes 1.6x the lists of ``hardest``
    (one candidate). On clustered data at 100k and 1M this lifted semi-hard recall from 0.89-0.91 to >= 0.95
    (docs/benchmarks.md, "Scale").
    """
    if nprobe is None or k <= 1:
        return nprobe
    return min(nlist, math.ceil(nprobe * (1 + math.log2(k) / DEPTH_PROBES)))


def exact_wrong_label_knn(vectors: np.ndarray, labels: np.ndarray, anchor_rows: np.ndarray, k: int,
                          distance: Distance) -> tuple[np.ndarray, np.ndarray]:
    """Exact wrong-label kNN by class blocks (see the module docstring).

    Args:
        vectors: (n, d) float32 prepared vectors, rows sorted by label.
        labels: (n,) labels, ascending.
        anchor_rows: (m,) anchor rows.
        k: neighbours per anchor.
        distance: the metric.

    Returns:
        ``rows`` (m, k) int64 and ``d2`` (m, k) float32, nearest first, ``-1`` / ``inf``-padded.
    """
    order = np.argsort(anchor_rows, kind="stable")  # rows sorted by label: the anchors come out sorted by label
    return _class_block_knn(lambda sel: vectors[anchor_rows[sel]], labels[anchor_rows], order, vectors, labels, k,
                            distance)


def wrong_label_knn_of_queries(queries: np.ndarray, query_labels: np.ndarray, vectors: np.ndarray,
                               labels: np.ndarray, k: int, distance: Distance) -> tuple[np.ndarray, np.ndarray]:
    """Exact wrong-label kNN of outside queries by class blocks: :func:`exact_wrong_label_knn` for vectors that
    are not rows (e.g. another rank's anchors searched against this rank's shard of a sharded index).

    Args:
        queries: (m, d) float32 prepared query vectors.
        query_labels: (m,) their labels (classes the rows lack are allowed).
        vectors: (n, d) float32 prepared vectors, rows sorted by label.
        labels: (n,) labels, ascending.
        k: neighbours per query.
        distance: the metric.

    Returns:
        ``rows`` (m, k) int64 and ``d2`` (m, k) float32, nearest first, ``-1`` / ``inf``-padded.
    """
    order = np.argsort(query_labels, kind="stable")
    return _class_block_knn(lambda sel: queries[sel], query_labels, order, vectors, labels, k, distance)


def _class_block_knn(query_of: Callable[[np.ndarray], np.ndarray], query_labels: np.ndarray, order: np.ndarray,
                     vectors: np.ndarray, labels: np.ndarray, k: int,
                     distance: Distance) -> tuple[np.ndarray, np.ndarray]:
    """Wrong-label top-k of the queries ``query_of(positions)``, taken in ``order`` (which sorts ``query_labels``)."""
    n, m = len(labels), len(query_labels)
    out_rows = np.full((m, k), -1, np.int64)
    out_d2 = np.full((m, k), np.inf, np.float32)
    sorted_labels = query_labels[order]
    for a, b, lo, hi in _blocks(labels, sorted_labels):
        q = query_of(order[a:b])
        parts = [_range_knn(q, vectors, s, e, k, distance) for s, e in ((0, lo), (hi, n)) if e > s]
        qlab = sorted_labels[a:b]
        if qlab[0] != qlab[-1] and hi > lo:  # several classes: the block's own range holds wrong-label rows too
            parts.append(_masked_knn(q, qlab, vectors, labels, lo, hi, k, distance))
        if parts:
            out_rows[order[a:b]], out_d2[order[a:b]] = merge_topk(parts, k)
    return out_rows, out_d2


def _blocks(labels: np.ndarray, sorted_labels: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """Split anchors (whose labels ``sorted_labels`` ascend) into blocks ``(a, b, lo, hi)``: anchors ``a:b``, whose classes span rows ``[lo, hi)``.

    A block gathers whole consecutive classes while it holds at most ``QUERY_BLOCK`` anchors and spans at
    most ``max(n / 8, QUERY_BLOCK)`` rows (the masked in-block product grows with the span, while small
    blocks cost FAISS more calls, each with its own thread hand-offs); a class with more anchors than
    ``QUERY_BLOCK`` is split into blocks of its own.
    """
    n = len(labels)
    classes, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    c_lo = np.searchsorted(labels, classes, "left")
    c_hi = np.searchsorted(labels, classes, "right")
    max_span = max(n // 8, QUERY_BLOCK)
    cur: list[int] | None = None  # [a, b, lo, hi] of the open block
    for s, c, lo, hi in zip(starts.tolist(), counts.tolist(), c_lo.tolist(), c_hi.tolist()):
        if cur is not None and (cur[1] - cur[0] + c > QUERY_BLOCK or hi - cur[2] > max_span):
            yield tuple(cur)
            cur = None
        if c > QUERY_BLOCK:
            for a in range(s, s + c, QUERY_BLOCK):
                yield a, min(a + QUERY_BLOCK, s + c), lo, hi
        elif cur is None:
            cur = [s, s + c, lo, hi]
        else:
            cur[1], cur[3] = s + c, hi
    if cur is not None:
        yield tuple(cur)


def _range_knn(q: np.ndarray, vectors: np.ndarray, s: int, e: int, k: int,
               distance: Distance) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of (b, d) queries among rows ``[s, e)`` with faiss.knn (BLAS): rows (b, k') and d² (b, k')."""
    scores, idx = faiss.knn(q, vectors[s:e], min(k, e - s), metric=distance.faiss_metric)
    return np.where(idx >= 0, idx + s, -1), np.where(idx >= 0, distance.to_distance(scores), np.inf)


def _masked_knn(q: np.ndarray, qlab: np.ndarray, vectors: np.ndarray, labels: np.ndarray, lo: int, hi: int, k: int,
                distance: Distance) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of (b, d) queries with ascending labels ``qlab`` (b,) among the rows ``[lo, hi)`` of another label."""
    x, xlab = vectors[lo:hi], labels[lo:hi]
    kk = min(k, hi - lo)
    rows = np.empty((len(q), kk), np.int64)
    d2 = np.empty((len(q), kk), np.float32)
    step = max(1, _INNER_ENTRIES // (hi - lo))
    for s in range(0, len(q), step):
        qc, lab = q[s:s + step], qlab[s:s + step]
        score = scores(qc, x, distance)
        # Queries and rows are both sorted by label, so same-label entries are rectangles, one per class.
        classes, q_start = np.unique(lab, return_index=True)
        q_end = np.append(q_start[1:], len(lab))
        for c, a, b in zip(classes, q_start, q_end):
            score[a:b, np.searchsorted(xlab, c, "left"):np.searchsorted(xlab, c, "right")] = -np.inf
        if kk == 1:
            cols = np.argmax(score, axis=1)[:, None]
        else:
            cols = np.argpartition(score, -kk, axis=1)[:, -kk:]
        best = np.take_along_axis(score, cols, 1)
        rows[s:s + step] = np.where(best > -np.inf, cols + lo, -1)
        d2[s:s + step] = np.where(best > -np.inf, score_to_d2(best, qc, distance), np.inf)
    return rows, d2


def padded(res: SearchResult, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A compressed-row :class:`SearchResult` as padded (m, k) ``rows`` (``-1``) and ``d2`` (``inf``)."""
    m, got = len(res), res.lengths
    rows = np.full((m, k), -1, np.int64)
    d2 = np.full((m, k), np.inf, np.float32)
    r = np.repeat(np.arange(m), got)
    c = np.arange(len(res.rows)) - np.repeat(res.offsets[:-1], got)
    rows[r, c] = res.rows
    d2[r, c] = res.distances
    return rows, d2
