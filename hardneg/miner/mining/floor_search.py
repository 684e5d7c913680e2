"""Exact "nearest items beyond a radius" search over flat snapshots: one pass whatever the guards drop.

The score guards (margins against the positive, ``max_score``, near-duplicates) each drop exactly the
candidates nearer than a per-anchor radius (:meth:`~hardneg.miner.mining.guards.Guard.radius`). Searching
the plain nearest neighbours and widening until enough survive costs a pass over the corpus per widening
(sentence-transformers' ``relative_margin=0.05`` at 1M items drops the ~1,000 nearest documents of a
query's topic: three passes). Here the corpus is scanned once in blocks: each block's scores come from one
matrix product (numpy's BLAS), and only the entries at or above a query's running ``k``-th best score (its
*floor*, seeded from the first block) are taken out of it, found by one comparison and a scan of the mask
eight entries at a time: after the first blocks a query gains only a few entries per block, so selecting
costs a small fraction of the product. Entries nearer than the radius, or blocked for the query (its
positives, itself), are counted and left out. Without a radius (no guard) this is the plain exact top-``k``,
at about the cost of the matrix product alone, which FAISS's flat search (a heap per query, BLAS threads
that spin between small products) exceeds about twofold on two cores.

For large scans on CPUs with bfloat16 instructions the product itself is taken in bfloat16
(:mod:`~hardneg.miner.mining.bf16_prefilter`, 3-4x cheaper): its error is bounded, so comparing it with each
floor lowered by that bound finds every entry that can matter, and only those are scored in float32. The
result is the float32 scan's (up to float32 ties), at a third to a half of its CPU time.

The radius is lowered by a few float32 ulps of the distance scale, so an item whose float32 ``d²`` the guard
would keep is never masked; the guards still run over what is returned and decide the band's few items.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from hardneg.miner.distances import Distance
from hardneg.miner.mining import bf16_prefilter
from hardneg.miner.mining.bf16_prefilter import Bf16Corpus, Bf16Queries, Prefilter, round_down_f32, torch_threads
from hardneg.miner.mining.topk import score_to_d2, sparse_nonzero

if TYPE_CHECKING:
    import torch

# Queries and corpus rows per block: a (1024, 8192) float32 score block is 32 MiB per thread.
QUERY_BLOCK = 1024
CORPUS_BLOCK = 8192
# Fewer queries than this per CPU are not worth a thread.
MIN_QUERIES_PER_WORKER = 64
# How far below each radius the mask starts, relative to the distance scale (float32 eps is 1.2e-7).
_SLACK = 1e-5


def floor_knn(q: np.ndarray, vectors: np.ndarray, floors: np.ndarray, k: int, distance: Distance,
              blocked: tuple[np.ndarray, np.ndarray] | None = None,
              prefilter: Prefilter = "auto", cache: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``vectors`` to each query at ``d²`` not below its radius, and how many lie below.

    Args:
        q: (b, d) float32 prepared queries.
        vectors: (n, d) float32 prepared corpus.
        floors: (b, g) float64 radii in ``d²`` per query, non-decreasing along each row (the guards' cumulative
            radii, in the order the guards run); the last one bounds the search.
        k: neighbours wanted per query, >= 1.
        distance: the metric.
        blocked: ``(query, row)`` (p,) each: pairs never to return nor count (a query's positives, itself).
        prefilter: ``"bf16"`` finds each block's candidates (after the first) with a bfloat16 product and scores
            only those exactly (:mod:`~hardneg.miner.mining.bf16_prefilter`: the same result, 3-4x less
            product on CPUs with bfloat16 instructions); ``"off"`` scores every entry in float32; ``"auto"``
            takes ``"bf16"`` for large scans where a calibration product shows it faster.
        cache: a dict the caller keeps between scans of the same ``vectors`` and ``distance``, where the bfloat16
            corpus is kept once built.

    Returns:
        ``rows`` (b, k) int64 and ``d2`` (b, k) float32, nearest first, ``-1`` / ``inf``-padded; ``below``
        (b, g) int64: how many unblocked rows lie nearer than each (lowered) radius, none of them returned.
    """
    b, n = len(q), len(vectors)
    g = floors.shape[1]
    rows = np.full((b, k), -1, np.int64)
    d2 = np.full((b, k), np.inf, np.float32)
    below = np.zeros((b, g), np.int64)
    if n == 0 or b == 0:
        return rows, d2, below
    x = np.ascontiguousarray(vectors, np.float32)
    half_norm = None if distance.higher_is_closer else 0.5 * np.einsum("ij,ij->i", x, x)
    qn = np.einsum("ij,ij->i", q, q).astype(np.float64)
    # d² < F  <=>  score > (offset - F) / 2, with score and offset as in topk.scores / score_to_d2.
    offset = np.full(b, 2.0) if distance.higher_is_closer else qn
    scale = offset + (0.0 if distance.higher_is_closer else float(half_norm.max()) * 2.0)
    caps = (offset[:, None] - (floors - _SLACK * (scale[:, None] + np.abs(floors)))) / 2.0
    bq, br = (np.empty(0, np.int64),) * 2 if blocked is None else blocked

    low = None
    if bf16_prefilter.wanted(prefilter, b, n, x.shape[1]):
        cache = {} if cache is None else cache
        if cache.get("bf16", (None, None))[0] != CORPUS_BLOCK:
            cache["bf16"] = (CORPUS_BLOCK, Bf16Corpus.build(x, half_norm, CORPUS_BLOCK))
        low = cache["bf16"][1]

    def scan(block: tuple[int, int]) -> None:
        a, e_q = block
        mine = (bq >= a) & (bq < e_q)
        r, s = _scan(np.ascontiguousarray(q[a:e_q], np.float32), x, half_norm,
                     caps[a:e_q].astype(np.float32), k, bq[mine] - a, br[mine], below[a:e_q], low)
        ok = np.isfinite(s)
        rows[a:e_q] = np.where(ok, r, -1)
        d2[a:e_q] = np.where(ok, score_to_d2(s, q[a:e_q], distance), np.inf)

    # Query blocks run in parallel, each matrix product on one BLAS thread: BLAS's own threads split each
    # product finely and spin between them, which costs ~1.5x the CPU of the same products on one thread.
    workers = max(1, min(len(os.sched_getaffinity(0)), -(-b // MIN_QUERIES_PER_WORKER)))
    per = -(-b // (workers * -(-b // (workers * QUERY_BLOCK))))
    blocks = [(a, min(a + per, b)) for a in range(0, b, per)]
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        if low is None:
            list(pool.map(scan, blocks))
        else:
            with torch_threads(1):
                list(pool.map(scan, blocks))
    return rows, d2, below


def _scan(q: np.ndarray, x: np.ndarray, half_norm: np.ndarray | None, caps: np.ndarray, k: int,
          bq: np.ndarray, br: np.ndarray, below: np.ndarray,
          low: Bf16Corpus | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One query block over the whole corpus: the top-``k`` scores under ``caps[:, -1]`` (rows, scores), nearest
    first, and ``below`` (b, g) incremented in place by the unblocked entries above each cap. With ``low``, every
    block is searched through its bfloat16 product and only its candidates are scored (after the first block under
    a cap, whose floors are seeded from float32 scores)."""
    b, n = len(q), len(x)
    last = caps[:, -1] if caps.shape[1] else np.full(b, np.inf, np.float32)
    best_s = np.full((b, k), -np.inf, np.float32)
    best_r = np.full((b, k), -1, np.int64)
    # The running k-th best kept score of each query: only entries at or above it can still enter its top-k.
    floor = np.full(b, -np.inf, np.float32)
    size = b * min(CORPUS_BLOCK, n)
    score_buf = np.empty(size, np.float32)
    hit_buf = np.empty(size, bool)
    if low is not None:
        import torch

        low_q = low.queries(q)
        low_out = torch.empty((b, min(CORPUS_BLOCK, n)), dtype=torch.bfloat16)
    for s in range(0, n, CORPUS_BLOCK):
        e = min(s + CORPUS_BLOCK, n)
        in_block = (br >= s) & (br < e)
        block_blocked = (bq[in_block], br[in_block] - s)
        hn = None if half_norm is None else half_norm[s:e]
        if low is not None and (s > 0 or not caps.shape[1]):
            r, c, v, floor = _bf16_block(low, low_q, low_out, q, x[s:e], hn, s, k, caps, last, floor, block_blocked)
        else:
            r, c, v, floor = _float32_block(q, x[s:e], hn, s == 0, k, last, floor, block_blocked, score_buf, hit_buf)
        # Every entry above a cap is a hit (a floor never exceeds the last cap): count them, then drop them.
        for j in range(caps.shape[1]):
            below[:, j] += np.bincount(r[v > caps[r, j]], minlength=b)
        keep = (v <= last[r]) & (v > -np.inf) & (v >= floor[r])
        if keep.any():
            best_s, best_r = _merge(best_s, best_r, r[keep], c[keep] + s, v[keep], k)
            floor = best_s.min(1)
    order = np.lexsort((best_r, -best_s), axis=-1)
    return np.take_along_axis(best_r, order, 1), np.take_along_axis(best_s, order, 1)


def _float32_block(q: np.ndarray, x: np.ndarray, half_norm: np.ndarray | None, first: bool, k: int,
                   last: np.ndarray, floor: np.ndarray, blocked: tuple[np.ndarray, np.ndarray], score_buf: np.ndarray,
                   hit_buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One corpus block ``x`` (w, d) scored in float32: its entries (query, column, score) at or above each query's
    floor, and the floors (seeded on the ``first`` block)."""
    b, w = len(q), len(x)
    score = score_buf[:b * w].reshape(b, w)
    np.matmul(q, x.T, out=score)
    if half_norm is not None:
        score -= half_norm
    score[blocked] = -np.inf
    if first and w > k:
        # Seed the floors with the first block's k-th best entry under the cap, so that no block (the first one
        # included) yields more than the few entries that can still enter the top-k.
        floor = np.partition(np.where(score > last[:, None], -np.inf, score), w - k, axis=1)[:, w - k]
    hit = hit_buf[:b * w].reshape(b, w)
    np.greater_equal(score, floor[:, None], out=hit)
    r, c = sparse_nonzero(hit)
    return r, c, score[r, c], floor


def _bf16_block(low: Bf16Corpus, low_q: Bf16Queries, low_out: torch.Tensor, q: np.ndarray, x: np.ndarray,
                half_norm: np.ndarray | None, s: int, k: int, caps: np.ndarray, last: np.ndarray, floor: np.ndarray,
                blocked: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same through the block's bfloat16 product (``x`` is rows ``s..e`` of the corpus that ``low`` holds;
    ``last`` (b,) each query's last cap, +inf without one):
    entries that can reach a floor or lie above a cap, with their float32 score, or their bfloat16 one where it
    surely lies beyond the last cap; blocked entries at -inf."""
    w = len(x)
    bits, bound = low.product(low_q, s, s + w, low_out)
    if s == 0:
        bits[blocked] = np.int16(-128)  # -inf: never a seed
        if w > k:
            floor = round_down_f32(low.seed(bits, bound, k))
    r, c, v, err = low.candidates(bits, bound, floor.astype(np.float64))
    is_blocked = np.isin(r * w + c, blocked[0] * w + blocked[1]) if len(blocked[0]) else np.zeros(len(r), bool)
    # A query whose nearest items lie in this block (a snapshot keeps each class together) has hundreds of
    # candidates: raise its floor from their bfloat16 scores first, and drop those that cannot reach it.
    floor = _raise_floors(floor, r, v, err, ~is_blocked & (v + err <= last[r]), k)
    reach = v + err >= floor[r]
    r, c, v, err, is_blocked = r[reach], c[reach], v[reach], err[reach], is_blocked[reach]
    # Score exactly the candidates that may be kept or that lie within their error of a cap; the others lie
    # beyond the last cap for sure and are counted from their bfloat16 score (under a deep margin, most of them:
    # the ~1,000 nearest documents of the query's topic at 1M).
    exact = v - err <= last[r]
    for j in range(caps.shape[1]):
        exact |= np.abs(v - caps[r, j].astype(np.float64)) < err
    v[exact] = _rescore(q, x, half_norm, r[exact], c[exact])
    v[is_blocked] = -np.inf
    return r, c, v, floor


def _raise_floors(floor: np.ndarray, r: np.ndarray, v: np.ndarray, err: np.ndarray, sure: np.ndarray,
                  k: int) -> np.ndarray:
    """Floors (b,) float32 raised, for each query with at least ``k`` ``sure`` candidates (admissible, under the
    last cap), to the ``k``-th best lower bound ``v - err`` among them: its ``k``-th best exact score is no lower.

    ``r`` (h,) the candidates' queries (sorted), ``v`` their bfloat16 scores, ``err`` how far off those can be."""
    r, lower = r[sure], (v - err)[sure]
    counts = np.bincount(r, minlength=len(floor))
    rows = np.flatnonzero(counts >= k)
    if not len(rows):
        return floor
    order = np.lexsort((-lower, r))  # by query, best lower bound first
    kth = lower[order][np.cumsum(counts)[rows] - counts[rows] + k - 1]
    raised = floor.copy()
    raised[rows] = np.maximum(floor[rows], round_down_f32(kth))
    return raised


def _rescore(q: np.ndarray, x: np.ndarray, half_norm: np.ndarray | None, r: np.ndarray,
             rows: np.ndarray) -> np.ndarray:
    """The float32 scores of queries ``r`` against corpus ``rows`` (h,) each."""
    v = np.einsum("ij,ij->i", q[r], x[rows])
    if half_norm is not None:
        v -= half_norm[rows]
    return v


def _merge(best_s: np.ndarray, best_r: np.ndarray, r: np.ndarray, c: np.ndarray, v: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The running top-``k`` (b, k) merged, in place on the rows that get some, with new entries ``(r, c, v)``
    (query, row, score; sorted by query)."""
    touched, at, counts = np.unique(r, return_inverse=True, return_counts=True)
    slot = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
    new_s = np.full((len(touched), int(counts.max())), -np.inf, np.float32)
    new_r = np.full(new_s.shape, -1, np.int64)
    new_s[at, slot], new_r[at, slot] = v, c
    all_s = np.concatenate([best_s[touched], new_s], 1)
    all_r = np.concatenate([best_r[touched], new_r], 1)
    top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
    best_s[touched], best_r[touched] = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_r, top, 1)
    return best_s, best_r
