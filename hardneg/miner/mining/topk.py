"""Top-k building blocks shared by the exact and the IVF wrong-label searches."""

from __future__ import annotations

import numpy as np

from hardneg.miner.distances import Distance


def scores(q: np.ndarray, x: np.ndarray, distance: Distance) -> np.ndarray:
    """(b, c) float32 scores of prepared ``q`` (b, d) against ``x`` (c, d) that grow as d² shrinks, from one
    matrix product: ``q·x`` for cosine (d² = 2 - 2 q·x), ``q·x - |x|²/2`` for l2 (d² = |q|² - 2 score)."""
    s = q @ x.T
    if not distance.higher_is_closer:
        s -= 0.5 * np.einsum("ij,ij->i", x, x)
    return s


def score_to_d2(best: np.ndarray, q: np.ndarray, distance: Distance) -> np.ndarray:
    """d² (b, j) from scores ``best`` (b, j) of :func:`scores` for the queries ``q`` (b, d)."""
    offset = 2.0 if distance.higher_is_closer else np.einsum("ij,ij->i", q, q)[:, None]
    return np.maximum(offset - 2.0 * best, 0.0)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int,
               ordered: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial top-k lists (rows, d²) of the same queries into one, padded to ``k``: nearest first, or in no
    particular order when not ``ordered`` (for a running top-k that is sorted once at the end)."""
    rows = np.concatenate([p[0] for p in parts], axis=1)
    d2 = np.concatenate([p[1] for p in parts], axis=1)
    if rows.shape[1] > k:
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        rows, d2 = np.take_along_axis(rows, part, 1), np.take_along_axis(d2, part, 1)
    if ordered and rows.shape[1] > 1:
        rows, d2 = sort_by_distance(rows, d2)
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        d2 = np.pad(d2, ((0, 0), (0, pad)), constant_values=np.inf)
    return rows, d2.astype(np.float32, copy=False)


def sort_by_distance(rows: np.ndarray, d2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` and ``d2`` (m, k) reordered per query by ascending ``d2`` (stable)."""
    order = np.argsort(d2, axis=1, kind="stable")
    return np.take_along_axis(rows, order, 1), np.take_along_axis(d2, order, 1)


def sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a C-contiguous (b, w) bool ``mask`` that is mostly False: (row, column) pairs in row-major
    order. The mask is scanned 8 entries at a time (as uint64 words) and only the words that hold one are expanded,
    several times faster than ``np.nonzero`` when few entries are set."""
    flat = mask.reshape(-1)
    whole = len(flat) // 8 * 8
    at = np.flatnonzero(flat[:whole].view(np.uint64))
    word, byte = np.nonzero(flat[:whole].reshape(-1, 8)[at])
    idx = at[word] * 8 + byte
    if whole < len(flat):
        idx = np.concatenate([idx, np.flatnonzero(flat[whole:]) + whole])
    return np.divmod(idx, max(mask.shape[1], 1))
