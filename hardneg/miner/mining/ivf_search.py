"""Wrong-label search on IVF-Flat snapshots: label-aware probing, lists scanned list-major on BLAS.

Two changes to how an IVF index is searched for hard negatives, both keeping its structure (the coarse
quantizer and the inverted lists) and the caller's ``nprobe``:

* **Label-aware probing.** An anchor probes the ``nprobe`` nearest lists (by the quantizer) that hold at
  least one item of another label. On clustered data the nearest lists often hold only the anchor's own class; FAISS's
  filtered search would spend probes on them and skip every item inside.
* **List-major scan.** FAISS scans probed lists query by query with an ID selector, one vector at a
  time. Here the (anchor, list) probes are grouped by list, and each list is compared with all the
  anchors that probe it in one matrix product; the per-list top-k lists are merged into each anchor's
  running top-k. Same candidates, a BLAS kernel.

Each list keeps its rows in ascending order, which (rows being sorted by label) sorts it by label; the
anchors that probe it are scanned in row order too, so the same-label entries of the score matrix are
rectangles, one per label that both hold, masked by slicing instead of comparing every label pair.
Anchors are scanned in chunks of ``ANCHOR_CHUNK``, which bounds the memory of the probe tables.

Anchors whose probed lists hold fewer than ``k`` wrong-label items are searched again with twice the
``nprobe`` (up to every list), so a result is short only when the class complement is.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from hardneg.miner.distances import Distance
from hardneg.miner.index import SearchParams, VectorIndex
from hardneg.miner.mining.topk import merge_topk, score_to_d2, scores, sort_by_distance

# Anchors per scan: the probe tables take ~40 bytes per (anchor, fetched list), and each list still meets
# thousands of anchors at N = 1M and nprobe / nlist ~ 1/20, so its matrix products stay on BLAS's fast path.
ANCHOR_CHUNK = 1 << 17


@dataclass(frozen=True)
class InvertedLists:
    """The lists of an IVF-Flat index as rows: list ``l`` holds ``rows[bounds[l]:bounds[l+1]]``, ascending (so
    sorted by label); ``pure[l]`` says whether all its items share one label, ``pure_label[l]``."""

    quantizer: faiss.Index
    rows: np.ndarray  # (n,) int64
    bounds: np.ndarray  # (nlist + 1,) int64
    pure: np.ndarray  # (nlist,) bool: the list holds items of exactly one label
    pure_label: np.ndarray  # (nlist,) int64: that label (meaningless where not pure)
    max_skipped: int  # the most lists any anchor skips: the empty ones and its label's single-label ones

    @property
    def nlist(self) -> int:
        return len(self.bounds) - 1


def inverted_lists(index: VectorIndex) -> InvertedLists | None:
    """The inverted lists of ``index`` when their ids are its rows, else None.

    Accepted: an IVF index (``IVF..,Flat``, or compressed codes such as ``IVF..,SQ8`` or ``IVF..,PQ..``, whose
    decoded vectors are then what is scanned), bare or under an exact refinement (``IVF..,SQ8,RFlat``: the
    lists pick the candidates and the refinement's exact vectors score them). Not under a transform: its
    lists live in another space than the stored vectors.
    """
    base = index.index
    if isinstance(base, faiss.IndexRefine):
        base = faiss.downcast_index(base.base_index)
    if not isinstance(base, faiss.IndexIVF):
        return None
    ivf = faiss.extract_index_ivf(base)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(lst) for lst in range(ivf.nlist)], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.empty(int(bounds[-1]), np.int64)
    for lst in np.flatnonzero(sizes):
        rows[bounds[lst]:bounds[lst + 1]] = np.sort(faiss.rev_swig_ptr(invlists.get_ids(int(lst)), int(sizes[lst])))
    if not np.array_equal(np.sort(rows), np.arange(index.count)):
        return None  # the lists' ids are not the index's rows (not added in row order): use FAISS's own search
    labels = index.labels[rows]
    nonempty = sizes > 0
    first = np.where(nonempty, labels[np.minimum(bounds[:-1], max(len(rows) - 1, 0))], -1)
    lo = np.minimum.reduceat(labels, bounds[:-1][nonempty]) if len(rows) else np.empty(0, np.int64)
    hi = np.maximum.reduceat(labels, bounds[:-1][nonempty]) if len(rows) else np.empty(0, np.int64)
    pure = np.zeros(ivf.nlist, bool)
    pure[nonempty] = lo == hi
    per_label = np.unique(first[pure], return_counts=True)[1]
    max_skipped = int((~nonempty).sum()) + (int(per_label.max()) if len(per_label) else 0)
    return InvertedLists(ivf.quantizer, rows, bounds, pure, first, max_skipped)


def ivf_wrong_label_knn(lists: InvertedLists, vectors: np.ndarray, labels: np.ndarray, anchor_rows: np.ndarray,
                        k: int, distance: Distance, params: SearchParams | None,
                        default_nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest wrong-label items of each anchor within its probed lists (see the module docstring).

    Args:
        lists: the index's inverted lists (:func:`inverted_lists`).
        vectors: (n, d) float32 stored vectors; labels: (n,) their labels.
        anchor_rows: (m,) anchor rows.
        k: neighbours per anchor.
        distance: the metric.
        params: ``nprobe`` for this call (default: the snapshot's).
        default_nprobe: the snapshot's ``nprobe``.

    Returns:
        ``rows`` (m, k) int64 and ``d2`` (m, k) float32, nearest first, ``-1`` / ``inf``-padded.
    """
    m = len(anchor_rows)
    out_rows = np.full((m, k), -1, np.int64)
    out_d2 = np.full((m, k), np.inf, np.float32)
    nprobe = min((params.nprobe if params and params.nprobe else None) or default_nprobe or 1, lists.nlist)
    complement = len(labels) - (np.searchsorted(labels, labels[anchor_rows], "right")
                                - np.searchsorted(labels, labels[anchor_rows], "left"))
    todo = np.argsort(anchor_rows, kind="stable")  # row order: labels ascending within every list's anchors
    while todo.size:
        for s in range(0, len(todo), ANCHOR_CHUNK):
            chunk = todo[s:s + ANCHOR_CHUNK]
            out_rows[chunk], out_d2[chunk] = _probe_and_scan(lists, vectors, labels, anchor_rows[chunk], k, distance,
                                                             nprobe)
        short = (out_rows[todo] >= 0).sum(1) < np.minimum(k, complement[todo])
        if nprobe >= lists.nlist or not short.any():
            break
        todo, nprobe = todo[short], min(2 * nprobe, lists.nlist)
    return out_rows, out_d2


def _probe_and_scan(lists: InvertedLists, vectors: np.ndarray, labels: np.ndarray, anchor_rows: np.ndarray, k: int,
                    distance: Distance, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """One scan of (m,) anchors in ascending row order: (m, k) rows and d², nearest first, padded."""
    q = vectors[anchor_rows]
    qlab = labels[anchor_rows]
    # Fetch enough nearest lists that dropping the empty ones and the anchor's own single-label ones leaves nprobe.
    depth = min(lists.nlist, nprobe + lists.max_skipped)
    _, near = lists.quantizer.search(q, depth)
    valid = near >= 0
    safe = np.where(valid, near, 0)
    own = lists.pure[safe] & (lists.pure_label[safe] == qlab[:, None])
    usable = valid & ~own & (np.diff(lists.bounds)[safe] > 0)
    probe = usable & (np.cumsum(usable, axis=1) <= nprobe)
    anchor_idx, col = np.nonzero(probe)
    probed = near[anchor_idx, col]
    order = np.argsort(probed, kind="stable")
    anchor_idx, probed = anchor_idx[order], probed[order]
    starts = np.searchsorted(probed, np.arange(lists.nlist + 1))
    best_rows = np.full((len(anchor_rows), k), -1, np.int64)
    best_d2 = np.full((len(anchor_rows), k), np.inf, np.float32)
    for lst in np.flatnonzero(np.diff(starts)):
        a = anchor_idx[starts[lst]:starts[lst + 1]]
        rows = lists.rows[lists.bounds[lst]:lists.bounds[lst + 1]]
        x = vectors[rows]
        s = scores(q[a], x, distance)
        if not lists.pure[lst]:  # single-label lists of the anchor's own label were never probed
            _mask_same_label(s, qlab[a], labels[rows])
        kk = min(k, len(rows))
        cols = np.argmax(s, axis=1)[:, None] if kk == 1 else np.argpartition(s, -kk, axis=1)[:, -kk:]
        best = np.take_along_axis(s, cols, 1)
        found = best > -np.inf
        cand_rows = np.where(found, rows[cols], -1)
        cand_d2 = np.where(found, score_to_d2(best, q[a], distance), np.inf).astype(np.float32)
        best_rows[a], best_d2[a] = merge_topk([(best_rows[a], best_d2[a]), (cand_rows, cand_d2)], k, ordered=False)
    return sort_by_distance(best_rows, best_d2) if k > 1 else (best_rows, best_d2)


def _mask_same_label(s: np.ndarray, qlab: np.ndarray, xlab: np.ndarray) -> None:
    """Set to ``-inf`` the entries of ``s`` (b, c) where the query's label ``qlab`` (b,) equals the item's ``xlab``
    (c,); both are ascending, so each shared label is one rectangle."""
    lo = np.searchsorted(xlab, qlab, "left")
    hi = np.searchsorted(xlab, qlab, "right")
    shared = np.flatnonzero(hi > lo)
    if not shared.size:
        return
    # Anchors sharing a label are consecutive: split the shared ones where the label changes.
    cuts = np.flatnonzero(np.diff(qlab[shared]) != 0) + 1
    for run in np.split(shared, cuts):
        a, b = run[0], run[-1] + 1
        s[a:b, lo[a]:hi[a]] = -np.inf
