"""Distance-weighted negatives (Wu, Manmatha, Smola and Krähenbühl, "Sampling Matters in Deep Embedding
Learning", ICCV 2017)."""

from __future__ import annotations

import logging

import numpy as np

from hardneg.miner.mining.base import CandidatePool, NegativeStrategy, Selection, top_keys

log = logging.getLogger(__name__)

# How far from 1 a stored vector's norm may be before the l2 weighting stops being Wu et al.'s.
_UNIT_TOL = 1e-3


def log_inverse_density(d: np.ndarray, dim: int, cutoff: float) -> np.ndarray:
    """``-log q(d)`` up to a constant, for Euclidean distances ``d`` (any shape) between points on the unit
    sphere in ``dim`` dimensions, with ``d`` clipped below at ``cutoff`` (Wu et al. 2017, eq. 3-4):

    ``log q(d) = (dim - 2) log d + ((dim - 3) / 2) log(1 - d²/4)``.
    """
    dc = np.clip(d.astype(np.float64), cutoff, None)
    # d < 2 on the sphere; the floor only keeps an antipodal pair finite.
    return -(dim - 2.0) * np.log(dc) - ((dim - 3.0) / 2.0) * np.log(np.maximum(1.0 - dc * dc / 4.0, 1e-12))


class DistanceWeightedNegatives(NegativeStrategy):
    """Sample ``per_anchor`` negatives per anchor with probability proportional to ``1 / q(d)``.

    ``q(d)`` is the density of pairwise distances of points spread uniformly on the unit sphere, so
    weighting by its inverse draws negatives spread evenly over distances rather than bunched near
    ``sqrt(2)`` (Wu et al. 2017). ``d = sqrt(d²)`` is clipped below at ``dw_cutoff`` (which caps the weight of
    very near, noisy negatives), and the weight is zero for ``d >= dw_nonzero_loss_cutoff`` (those give
    zero loss). The draw is among the ``candidates`` nearest admissible wrong-label neighbours, which hold
    nearly all the weight in high dimension; raise ``candidates`` to widen it. Several negatives per anchor
    are drawn without replacement (Gumbel-top-k, which for ``per_anchor=1`` is exactly proportional
    sampling); an anchor with fewer non-zero-weight candidates than ``per_anchor`` gets those it has.

    Metric ``l2``: the same weight is applied to ``d`` measured on the stored vectors. That is Wu et al.'s
    weighting when those vectors are unit-norm (as hardneg's trainer produces them); otherwise it is only
    a weighting of the same shape, and a warning is logged.
    """

    name = "distance-weighted"

    def check(self, vectors: np.ndarray, metric: str) -> None:
        self.dim = int(vectors.shape[1])
        if metric != "cosine" and len(vectors):
            norms = np.linalg.norm(vectors[:: max(1, len(vectors) // 10_000)], axis=1)
            if np.abs(norms - 1.0).max() > _UNIT_TOL:
                log.warning("distance-weighted sampling assumes unit-norm embeddings, but this l2 index holds norms "
                            "from %.3g to %.3g; the weights follow Wu et al.'s formula on the raw distances",
                            norms.min(), norms.max())

    def pool_size(self) -> int:
        return max(self.config.per_anchor, self.config.candidates)

    def initial_width(self) -> int:
        return self.pool_size()

    def wants_more(self, pool: CandidatePool) -> np.ndarray:
        # Past the non-zero-loss cutoff every weight is 0: no reason to look deeper.
        return (pool.count < self.pool_size()) & (pool.reach < self.config.dw_nonzero_loss_cutoff ** 2)

    def log_weights(self, d2: np.ndarray) -> np.ndarray:
        """Log sampling weights (unnormalised) for squared distances ``d2`` (any shape); ``-inf`` = weight 0."""
        d = np.sqrt(np.maximum(d2, 0.0))
        logw = log_inverse_density(d, self.dim, self.config.dw_cutoff)
        return np.where(np.isfinite(d) & (d < self.config.dw_nonzero_loss_cutoff), logw, -np.inf)

    def _select(self, pool: CandidatePool, rng: np.random.Generator) -> Selection:
        width = min(pool.width, self.pool_size())
        logw = self.log_weights(pool.d2[:, :width])
        # Gumbel-max: argmax(log w + G) is distributed as w / sum(w); the top p are a weighted draw without replacement.
        keys = logw + rng.gumbel(size=logw.shape)
        return Selection(pool.take(top_keys(keys, self.config.per_anchor)))
