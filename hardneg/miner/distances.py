"""Distances between embeddings, as objects that know how FAISS scores them.

Every distance the library reports is a *squared Euclidean* distance ``d²``,
the quantity the seed's losses use:

* ``l2``: ``d² = ||q - x||²`` on the raw vectors (FAISS ``METRIC_L2``);
* ``cosine``: vectors are L2-normalised, FAISS scores them by inner product
  ``s = q·x`` (bigger is closer), and the reported distance is the squared
  chord ``d² = ||q - x||² = 2 - 2s``.

So a margin ``m`` means the same thing for both metrics, and mining, losses and
the HTTP ``distance`` field agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from hardneg.miner.errors import ValidationError


@dataclass(frozen=True)
class Distance:
    """A metric: how to prepare vectors, how FAISS scores them and how scores map to ``d²``."""

    name: str
    faiss_metric: int
    higher_is_closer: bool  # True when FAISS returns similarities (inner product)
    normalize: bool

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` (n, d) as contiguous float32, L2-normalised for cosine."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.normalize:
            with np.errstate(over="ignore", under="ignore"):
                norms = np.linalg.norm(x, axis=1, keepdims=True)
            bad = (norms == 0) | ~np.isfinite(norms)
            if np.any(bad):
                # The float32 sum of squares overflows above ~1.8e19 per entry (or underflows below ~1e-23):
                # those rows are first divided by their largest magnitude, which leaves their direction as it is.
                scale = np.abs(x).max(axis=1, keepdims=True)
                if np.any(scale == 0):
                    raise ValidationError("cosine metric: a vector has zero norm and has no direction; remove it "
                                          "or use metric 'l2'")
                x = np.where(bad, x / scale, x)
                norms = np.where(bad, np.linalg.norm(x, axis=1, keepdims=True), norms)
            x = np.ascontiguousarray(x / norms, dtype=np.float32)
        return x

    def to_distance(self, scores: np.ndarray) -> np.ndarray:
        """Map FAISS scores (any shape) to squared Euclidean distances."""
        if self.higher_is_closer:
            # FAISS marks missing results with similarity -FLT_MAX; they overflow to an infinite distance.
            with np.errstate(over="ignore"):
                return np.maximum(2.0 - 2.0 * scores, 0.0).astype(np.float32, copy=False)
        return np.maximum(scores, 0.0).astype(np.float32, copy=False)

    def pairwise(self, q: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Exact ``d²`` between prepared rows of ``q`` (n, d) and ``x`` (m, d): shape (n, m)."""
        q = q.astype(np.float64)
        x = x.astype(np.float64)
        if self.higher_is_closer:
            return np.maximum(2.0 - 2.0 * (q @ x.T), 0.0)
        sq = (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * (q @ x.T)
        return np.maximum(sq, 0.0)


COSINE = Distance("cosine", faiss.METRIC_INNER_PRODUCT, higher_is_closer=True, normalize=True)
L2 = Distance("l2", faiss.METRIC_L2, higher_is_closer=False, normalize=False)
_DISTANCES = {d.name: d for d in (COSINE, L2)}


def get_distance(name: str) -> Distance:
    """Look a metric up by name: ``cosine`` or ``l2``."""
    try:
        return _DISTANCES[name]
    except KeyError:
        raise ValidationError(f"unknown metric {name!r}; accepted: {', '.join(sorted(_DISTANCES))}") from None
