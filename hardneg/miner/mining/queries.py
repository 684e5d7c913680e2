"""Query mode: hard negatives for queries that are not (or not only) stored items, from a corpus snapshot.

Retrieval training mines each query against a separate corpus (sentence-transformers'
``mine_hard_negatives(corpus=...)``, FlagEmbedding's ``candidate_pool``): a query has several positive
documents (its qrels), and a negative is any corpus item that is none of them. An anchor may instead
carry a label, and then a negative is any stored item of another label (label mode for vectors that
are not stored, as ``POST /mine`` and the pytorch-metric-learning adapter use it).

::

    from hardneg.miner.mining import MiningConfig
    from hardneg.miner.mining.queries import PositiveSets, mine_queries
    cfg = MiningConfig(strategy="window", per_anchor=5, window_skip=3, window_width=47,
                       window_sampling="top", relative_margin=0.05)
    res = mine_queries(index, query_vectors, cfg, positives=PositiveSets.from_lists([[12, 40], [7]]))

Both go through the mining core of :mod:`hardneg.miner.mining.core` with the strategies and guards
of label mode; the margins relative to the positive use the query's *hardest* positive (the farthest
one, sentence-transformers' choice), so a negative kept for one positive is kept for all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hardneg.miner.errors import NotFoundError, ValidationError
from hardneg.miner.index import SearchParams, VectorIndex, check_int_array, check_vectors
from hardneg.miner.mining.core import mine_negatives
from hardneg.miner.mining.config import MiningConfig
from hardneg.miner.mining.floor_search import floor_knn
from hardneg.miner.mining.guards import Guard, build_guards, similarity
from hardneg.miner.mining.miner import STRATEGIES, stored_vectors
from hardneg.miner.mining.search import padded
from hardneg.miner.mining.stats import MiningStats

log = logging.getLogger(__name__)

# Where a query-mode search must widen (approximate snapshots, or a guard that is no score radius), each
# round costs a pass over the corpus whatever its width, so anchors whose guards emptied the window are
# searched again 8x (not 2x) wider: fewer passes. Exact snapshots under score guards search once.
WIDEN_GROWTH = 8


@dataclass(frozen=True)
class PositiveSets:
    """Positive stored ids of ``m`` queries in compressed rows: query ``i`` owns ``ids[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # (m + 1,) int64
    ids: np.ndarray  # (nnz,) int64

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> PositiveSets:
        """From one list of ids per query (duplicates within a list are dropped, first kept)."""
        lists = [list(dict.fromkeys(int(i) for i in ids)) for ids in lists]
        offsets = np.zeros(len(lists) + 1, np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        flat = np.fromiter((i for x in lists for i in x), np.int64, count=int(offsets[-1]))
        return cls(offsets, flat)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def owner(self) -> np.ndarray:
        """(nnz,) the query position of each positive."""
        return np.repeat(np.arange(len(self)), self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class QueryMiningResult:
    """Negatives of ``m`` queries, as stored ids, with their positives.

    Attributes:
        query_ids: (m,) int64 the queries' ids (the caller's; positions 0..m-1 when none were given).
        positives: the queries' positive ids (empty sets in label mode).
        positive_d2: (nnz,) float64 ``d²`` of each positive to its query.
        negatives: (m, per_anchor) int64 negative ids, nearest first, ``-1``-padded.
        negative_d2: (m, per_anchor) float64 their ``d²`` (``inf`` in the padding).
        metric: the corpus's metric (scores are :func:`~hardneg.miner.mining.guards.similarity` of ``d²``).
        stats: what the pass did; ``anchors_singleton`` counts queries without a positive (positives mode).
    """

    query_ids: np.ndarray
    positives: PositiveSets
    positive_d2: np.ndarray
    negatives: np.ndarray
    negative_d2: np.ndarray
    metric: str
    stats: MiningStats

    def __len__(self) -> int:
        return len(self.query_ids)

    def scores(self, d2: np.ndarray) -> np.ndarray:
        """Similarity scores of ``d2`` on this result's metric (cosine: the cosine; l2: ``-d²``)."""
        return similarity(np.asarray(d2, np.float64), self.metric)


def mine_queries(index: VectorIndex, queries: np.ndarray, config: MiningConfig, *,
                 positives: PositiveSets | None = None, labels: np.ndarray | Sequence[int] | None = None,
                 exclude_ids: np.ndarray | Sequence[int] | None = None, query_ids: np.ndarray | None = None,
                 params: SearchParams | None = None, extra_guards: Sequence[Guard] = ()) -> QueryMiningResult:
    """Mine negatives for ``queries`` (m, d) from ``index``, given each query's ``positives`` or its ``labels``.

    Args:
        index: the corpus.
        queries: (m, d) raw query vectors (normalised here for cosine).
        config: strategy, per-anchor count, window and guards (:class:`MiningConfig`); with ``labels``, settings
            that need a positive (semi-hard, margins relative to the positive) are refused.
        positives: the positive stored ids of each query: never negatives, and the hardest of them sets the
            margins. Queries without one get no negatives.
        labels: (m,) the queries' labels instead: negatives are stored items of another label.
        exclude_ids: (m,) one stored id per query never to return for it (a query that is a stored item itself).
        query_ids: (m,) the queries' own ids, carried to the result.
        params: per-call search parameters for approximate indexes.
        extra_guards: guards run after the configured ones (e.g. a :class:`~hardneg.miner.mining.rescore.RescoreGuard`).

    Raises:
        ValidationError: bad arguments. NotFoundError: a positive or excluded id the index does not hold.
    """
    if (positives is None) == (labels is None):
        raise ValidationError("give each query's positives or its labels (exactly one of the two)")
    if not isinstance(config, MiningConfig):
        raise ValidationError(f"config must be a MiningConfig, got {type(config).__name__}")
    if config.exclude_suspects is not None:
        raise ValidationError("exclude_suspects is for label mode (mine): it audits the snapshot's own labels")
    if labels is not None and config.needs_positive:
        raise ValidationError("this configuration needs each anchor's positive (semihard strategy, positive_aware, "
                              "absolute_margin or relative_margin); give positives instead of labels")
    started = time.perf_counter()
    q = index.distance.prepare(check_vectors(queries, "queries", dim=index.dim))
    m, n = len(q), index.count
    qids = np.arange(m, dtype=np.int64) if query_ids is None else check_int_array(query_ids, "query_ids", m)
    self_rows = None if exclude_ids is None else _rows(index, check_int_array(exclude_ids, "exclude_ids", m),
                                                       "exclude_ids")
    vectors = stored_vectors(index, copy=False)  # read within this call only
    stats = MiningStats(config.strategy, index.metric, config.margin, config.per_anchor, anchors=m)
    if positives is not None:
        if len(positives) != m:
            raise ValidationError(f"positives has {len(positives)} sets but there are {m} queries; give one per query")
        pos_rows = _rows(index, positives.ids, "positives")
        owner = positives.owner()
        pos_d2 = _pair_d2(q[owner], vectors[pos_rows])
        d2_pos = np.full(m, np.nan)
        np.fmax.at(d2_pos, owner, pos_d2)  # the hardest (farthest) positive of each query
        if self_rows is None:
            blocked = _Blocked(n, m, owner, pos_rows)
        else:
            blocked = _Blocked(n, m, np.concatenate([owner, np.arange(m)]), np.concatenate([pos_rows, self_rows]))
        admissible = n - blocked.count
        pending = np.flatnonzero(positives.lengths > 0)
        stats.anchors_singleton = int(m - len(pending))
        search = _positives_search(index, q, blocked, params)
        floor_search = _positives_floor_search(index, vectors, q, blocked) if index.exact else None
    else:
        positives = PositiveSets(np.zeros(m + 1, np.int64), np.empty(0, np.int64))
        pos_d2 = np.empty(0)
        d2_pos = np.full(m, np.nan)
        qlab = check_int_array(labels, "labels", m)
        self_same = (index.labels[self_rows] == qlab) if self_rows is not None else np.ones(m, bool)
        admissible = n - index.class_sizes_of(qlab) - (~self_same).astype(np.int64)
        pending = np.arange(m)
        search = _label_search(index, q, qlab, self_rows, params)
        floor_search = None
    strategy = STRATEGIES[config.strategy](config, vectors, index.metric)
    guards = build_guards(config, index.metric) + list(extra_guards)
    neg_rows = mine_negatives(search, pending, admissible, d2_pos, strategy, guards,
                              np.random.default_rng(config.seed), stats, m, growth=WIDEN_GROWTH,
                              floor_search=floor_search)
    result = _assemble(index, vectors, q, qids, positives, pos_d2, neg_rows, stats)
    stats.anchors_short = int(((result.negatives >= 0).sum(1) < config.per_anchor)[pending].sum()) \
        - stats.semihard_skipped
    log.info("%s in %.2fs", stats.summary(), time.perf_counter() - started)
    return result


class _Blocked:
    """Rows never to return per query (its positives and, when it is stored, itself) as sorted pair keys.

    Args:
        n: rows in the index; m: queries.
        owner, rows: (b,) each, the query position and the row of each blocked pair.
    """

    def __init__(self, n: int, m: int, owner: np.ndarray, rows: np.ndarray) -> None:
        self.n = n
        self.keys = np.unique(owner.astype(np.int64) * n + rows)
        self.count = np.bincount(self.keys // max(n, 1), minlength=m).astype(np.int64)

    def hit(self, pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(j, k) bool: which ``rows`` (j, k) are blocked for the queries at positions ``pos`` (j,)."""
        keys = pos[:, None].astype(np.int64) * self.n + rows
        return (rows >= 0) & np.isin(keys, self.keys)


def _positives_search(index: VectorIndex, q: np.ndarray, blocked: _Blocked, params: SearchParams | None):
    """Nearest items that are neither a positive of the query nor the query itself: fetch ``k`` + as many as are
    blocked, drop the blocked ones, keep ``k`` (exact on flat indexes)."""
    count = blocked.count

    def search(pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = int(min(k + count[pos].max(), index.count))
        rows, d2 = padded(index.search(q[pos], kk, params=params), kk)
        hit = blocked.hit(pos, rows)
        rows = np.where(hit, -1, rows)
        order = np.argsort(rows < 0, axis=1, kind="stable")[:, :k]
        rows, d2 = np.take_along_axis(rows, order, 1), np.take_along_axis(d2, order, 1)
        return rows, np.where(rows >= 0, d2, np.inf).astype(np.float32)

    return search


def _positives_floor_search(index: VectorIndex, vectors: np.ndarray, q: np.ndarray, blocked: _Blocked):
    """Exact nearest items beyond per-query radii that are neither a positive of the query nor the query itself:
    one blockwise pass over the corpus (:func:`~hardneg.miner.mining.floor_search.floor_knn`)."""
    owner, rows = blocked.keys // max(blocked.n, 1), blocked.keys % max(blocked.n, 1)
    cache: dict = {}  # the corpus in bfloat16, when a scan takes that path, for the next rounds

    def search(pos: np.ndarray, k: int, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        local = np.full(len(q), -1, np.int64)
        local[pos] = np.arange(len(pos))
        mine = local[owner] >= 0
        return floor_knn(q[pos], vectors, radii, k, index.distance, (local[owner[mine]], rows[mine]), cache=cache)

    return search


def _label_search(index: VectorIndex, q: np.ndarray, qlab: np.ndarray, self_rows: np.ndarray | None,
                  params: SearchParams | None):
    """Nearest items of another label than the query's (and not the query itself)."""
    self_ids = None if self_rows is None else index.ids[self_rows]

    def search(pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        res = index.search(q[pos], k, query_labels=qlab[pos], different_label=True,
                           exclude_self=None if self_ids is None else self_ids[pos], params=params)
        return padded(res, k)

    return search


def _rows(index: VectorIndex, ids: np.ndarray, what: str) -> np.ndarray:
    """Index rows of stored ``ids``; NotFoundError naming the first unknown ones."""
    try:
        return index.rows_of(ids) if len(ids) else np.empty(0, np.int64)
    except NotFoundError as e:
        raise NotFoundError(f"{what}: {e}") from None


def _pair_d2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact float64 ``d²`` between matching rows of prepared ``a`` and ``b`` (j, d): (j,)."""
    diff = a.astype(np.float64) - b
    return np.einsum("ij,ij->i", diff, diff)


def _assemble(index: VectorIndex, vectors: np.ndarray, q: np.ndarray, qids: np.ndarray, positives: PositiveSets,
              pos_d2: np.ndarray, neg_rows: np.ndarray, stats: MiningStats) -> QueryMiningResult:
    """Ids and exact distances, each query's negatives nearest first; fills the output statistics."""
    m, p = neg_rows.shape
    valid = neg_rows >= 0
    r, c = np.nonzero(valid)
    d2 = np.full((m, p), np.inf)
    d2[r, c] = _pair_d2(q[r], vectors[neg_rows[r, c]])
    order = np.argsort(d2, axis=1, kind="stable")
    neg_rows, d2 = np.take_along_axis(neg_rows, order, 1), np.take_along_axis(d2, order, 1)
    negatives = np.where(neg_rows >= 0, index.ids[np.maximum(neg_rows, 0)], -1)
    per = (negatives >= 0).sum(1)
    mined = per > 0
    npos = np.maximum(positives.lengths, 1)  # label mode: one "triplet" per negative
    owner = positives.owner()
    pos_of_mined = mined[owner]
    stats.anchors_mined = int(mined.sum())
    stats.triplets = int((per * npos).sum()) if len(positives.ids) else int(per.sum())
    stats.positive_pairs = int(pos_of_mined.sum())
    stats.negative_pairs = int(per.sum())
    stats.pairs = stats.positive_pairs + stats.negative_pairs
    # Triplet (query, positive, negative): every positive of a query with every one of its negatives.
    reps = per[owner[pos_of_mined]]
    t_pos = np.repeat(pos_d2[pos_of_mined], reps)
    t_neg = d2[np.repeat(owner[pos_of_mined], reps), np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)]
    if len(positives.ids):
        stats.summarise_distances(pos_d2[pos_of_mined], t_pos, t_neg)
    else:
        neg = d2[np.isfinite(d2)]
        stats.summarise_distances(np.empty(0), np.full(len(neg), np.nan), neg)
        stats.nonzero_loss_share = None  # no positive, no triplet loss
    return QueryMiningResult(qids, positives, pos_d2, negatives, d2, index.metric, stats)
