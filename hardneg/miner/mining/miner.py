"""``mine``: hard negatives, positives, triplets and pairs from a :class:`~hardneg.miner.index.VectorIndex`.

One pass goes:

1. positives first, one per anchor (random or farthest same-label item), since semi-hard mining and the
   positive-aware guard depend on ``d²(a, p)``;
2. a batched wrong-label search for every anchor at once (:mod:`hardneg.miner.mining.search`: exact on
   flat indexes, on FAISS's BLAS path; approximate indexes through their own search path);
3. the guards (and, with ``exclude_suspects``, the suspected label errors) drop candidates, the strategy
   says which anchors need a deeper pool, and only those are searched again with twice the width, until
   satisfied or their class complement is exhausted (the loop of :mod:`hardneg.miner.mining.core`, shared
   with query mode);
4. the strategy picks negatives; triplets and pairs are assembled with numpy, and statistics computed.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from hardneg.miner.audit import DEFAULT_K as AUDIT_K
from hardneg.miner.audit import LabelAudit, audit_labels
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import SearchParams, VectorIndex, check_int_array, stored_vectors  # noqa: F401 - re-exported
from hardneg.miner.mining.base import NegativeStrategy
from hardneg.miner.mining.config import MiningConfig
from hardneg.miner.mining.distance_weighted import DistanceWeightedNegatives
from hardneg.miner.mining.core import mine_negatives
from hardneg.miner.mining.guards import Guard, SuspectGuard, build_guards
from hardneg.miner.mining.hardest import HardestNegatives
from hardneg.miner.mining.positives import Positives, choose_positives, class_bounds
from hardneg.miner.mining.result import MiningResult
from hardneg.miner.mining.search import wrong_label_knn
from hardneg.miner.mining.semihard import SemiHardNegatives
from hardneg.miner.mining.stats import MiningStats
from hardneg.miner.mining.window import WindowNegatives

log = logging.getLogger(__name__)

STRATEGIES: dict[str, type[NegativeStrategy]] = {
    cls.name: cls for cls in (HardestNegatives, SemiHardNegatives, WindowNegatives, DistanceWeightedNegatives)
}


def mine(index: VectorIndex, config: MiningConfig, anchors: np.ndarray | None = None,
         params: SearchParams | None = None, audit: LabelAudit | None = None) -> MiningResult:
    """Mine triplets and pairs for ``anchors`` from ``index``.

    Args:
        index: the embeddings, ids and labels to mine from (e.g. ``SnapshotStore.open().index``).
        config: what to mine; see :class:`MiningConfig` and each strategy's docstring.
        anchors: (m,) stored ids of the anchors (default: every item); repeats are mined independently.
        params: per-call search parameters for approximate (ivf, hnsw) indexes.
        audit: with ``config.exclude_suspects``, ``index``'s label audit when already computed (e.g. cached by
            the api); default: audited here (:func:`suspect_mask`).

    Returns:
        A :class:`MiningResult` with ids, not rows. Anchors alone in their class get no triplet.

    Raises:
        ValidationError: a bad argument. NotFoundError: an anchor id the index does not hold.
    """
    if not isinstance(index, VectorIndex):
        raise ValidationError(f"index must be a VectorIndex, got {type(index).__name__}")
    if not isinstance(config, MiningConfig):
        raise ValidationError(f"config must be a MiningConfig, got {type(config).__name__}")
    if params is not None and not isinstance(params, SearchParams):
        raise ValidationError(f"params must be a SearchParams or None, got {type(params).__name__}")
    started = time.perf_counter()
    if isinstance(index.index, faiss.IndexHNSW):
        log.warning("mining an HNSW index: every search must get past the anchor's whole class, so this is slower "
                    "than exact mining on a flat index at any size measured (docs/benchmarks.md, Scale); "
                    "publish a flat or ivf snapshot to mine from")
    anchor_ids = index.ids if anchors is None else check_int_array(anchors, "anchors")
    anchor_rows = index.rows_of(anchor_ids) if len(anchor_ids) else np.empty(0, np.int64)
    vectors = stored_vectors(index)
    rng = np.random.default_rng(config.seed)
    strategy = STRATEGIES[config.strategy](config, vectors, index.metric)
    positives = choose_positives(config.positive, vectors, index.labels, anchor_rows, index.distance, rng)
    stats = MiningStats(config.strategy, index.metric, config.margin, config.per_anchor, anchors=len(anchor_rows))
    suspects = suspect_mask(index, config.exclude_suspects, audit)
    stats.suspects_excluded = 0 if suspects is None else int(suspects.sum())
    guards = ([SuspectGuard(suspects)] if suspects is not None else []) + build_guards(config, index.metric)
    negatives = _mine_negatives(index, vectors, anchor_rows, positives, strategy, guards, params, rng, stats)
    result = _assemble(index, vectors, anchor_rows, positives, negatives, stats)
    log.info("%s in %.2fs", stats.summary(), time.perf_counter() - started)
    return result


def suspect_mask(index: VectorIndex, fraction: float | None, audit: LabelAudit | None = None) -> np.ndarray | None:
    """(n,) bool over rows: the top ``fraction`` of label-noise suspects of ``audit`` (default:
    :func:`hardneg.miner.audit.audit_labels` at k :func:`suspect_k`), or None when ``fraction`` is None."""
    if fraction is None:
        return None
    mask = np.zeros(index.count, bool)
    if index.count >= 2:
        audit = audit if audit is not None else audit_labels(index, k=suspect_k(index))
        mask[index.rows_of(audit.top(fraction))] = True
    return mask


def suspect_k(index: VectorIndex) -> int:
    """The neighbours the suspects of ``exclude_suspects`` are audited with: the audit's default, fewer on tiny
    indexes (at least 2 items)."""
    return min(AUDIT_K, index.count - 1)


def _mine_negatives(index: VectorIndex, vectors: np.ndarray, anchor_rows: np.ndarray, positives: Positives,
                    strategy: NegativeStrategy, guards: list[Guard], params: SearchParams | None,
                    rng: np.random.Generator, stats: MiningStats) -> np.ndarray:
    """Negatives (m, per_anchor) int64 rows, ``-1``-padded; fills the search, guard and strategy counters."""
    lo, hi = class_bounds(index.labels, anchor_rows)

    def search(pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows, d2, _ = wrong_label_knn(index, vectors, anchor_rows[pos], k, params)
        return rows, d2

    has_pos = positives.rows >= 0
    stats.anchors_singleton = int((~has_pos).sum())
    negatives = mine_negatives(search, np.flatnonzero(has_pos), index.count - (hi - lo), positives.d2, strategy,
                               guards, rng, stats, len(anchor_rows))
    p = strategy.config.per_anchor
    stats.anchors_short = int((has_pos & ((negatives >= 0).sum(1) < p)).sum()) - stats.semihard_skipped
    return negatives


def _assemble(index: VectorIndex, vectors: np.ndarray, anchor_rows: np.ndarray, positives: Positives,
              negatives: np.ndarray, stats: MiningStats) -> MiningResult:
    """Triplets and pairs as ids, grouped by anchor, negatives nearest first; fills the output statistics."""
    valid = negatives >= 0
    t_anchor = np.repeat(np.arange(len(anchor_rows)), valid.sum(1))
    t_neg = negatives[valid]
    diff = vectors[anchor_rows[t_anchor]].astype(np.float64) - vectors[t_neg]
    ids = index.ids
    return assemble(ids[anchor_rows], np.where(positives.rows >= 0, ids[positives.rows], -1), positives.d2,
                    t_anchor, ids[t_neg], np.einsum("ij,ij->i", diff, diff), stats)


def assemble(anchors: np.ndarray, positives: np.ndarray, d2_pos: np.ndarray, t_anchor: np.ndarray,
             t_neg: np.ndarray, d2_neg: np.ndarray, stats: MiningStats) -> MiningResult:
    """Triplets and pairs from ``m`` anchors' positives and negatives (ids), with the output statistics.

    Args:
        anchors: (m,) anchor ids; positives: (m,) their positives' ids (``-1``: none); d2_pos: (m,) float64
            ``d²(a, p)``.
        t_anchor: (t,) each negative's anchor position, ascending; t_neg: (t,) negative ids; d2_neg: (t,)
            float64 ``d²(a, n)``.
        stats: filled with the output sizes and distance summaries.

    Returns:
        Triplets grouped by anchor in the order of ``anchors``, each anchor's negatives nearest first; per mined
        anchor its positive pair (y=0), then its negative pairs (y=1) in triplet order.
    """
    m = len(anchors)
    per = np.bincount(t_anchor, minlength=m)
    order = np.lexsort((d2_neg, t_anchor))
    t_anchor, t_neg, d2_neg = t_anchor[order], t_neg[order], d2_neg[order]
    mined = np.flatnonzero(per > 0)
    p_anchor = np.concatenate([mined, t_anchor])
    p_other = np.concatenate([positives[mined], t_neg])
    p_y = np.concatenate([np.zeros(len(mined), np.int64), np.ones(len(t_neg), np.int64)])
    p_order = np.lexsort((p_y, p_anchor))
    stats.anchors_mined = len(mined)
    stats.triplets = len(t_neg)
    stats.positive_pairs = len(mined)
    stats.negative_pairs = len(t_neg)
    stats.pairs = len(p_y)
    stats.summarise_distances(d2_pos[mined], d2_pos[t_anchor], d2_neg)
    return MiningResult(
        anchor=anchors[t_anchor], positive=positives[t_anchor], negative=t_neg,
        pair_i=anchors[p_anchor[p_order]], pair_j=p_other[p_order], pair_y=p_y[p_order], stats=stats,
        anchor_pos=t_anchor)
