"""A sharded index under torchrun (``--shard-index``): each rank embeds and indexes its block of the training
items only, so that the embeddings take about N / world_size memory per rank instead of N on every rank.

The refresh, split over the ranks:

1. **embed and index**: rank ``r`` embeds its contiguous block ``[lo, hi)`` of the items and builds a flat
   (exact) :class:`~hardneg.miner.index.VectorIndex` of it: its :class:`IndexShard`. Every rank holds every
   item's label (each loads the training data), so the snapshot's row order, items by (label, id), is known
   everywhere without moving a vector;
2. **publish one complete snapshot**: the rows are streamed to rank 0 in blocks of ``STREAM_ROWS`` in that
   order, and rank 0 appends each block to ``index.faiss`` (:class:`~hardneg.miner.flat_file.FlatIndexWriter`,
   byte for byte what ``faiss.write_index`` writes) in a staging folder of the store, which is then published
   as any snapshot (:meth:`~hardneg.miner.store.SnapshotStore.publish_prepared`). Rank 0 never holds more
   than its shard and one block; the api and ``hardneg mine`` read the snapshot as any other;
3. **mine across the shards** (recipe ``mined-tuples``): each rank mines the anchors of its own block, in chunks
   of ``ANCHOR_CHUNK``, with the miner's own loop (:func:`hardneg.miner.mining.core.mine_negatives`: guards,
   strategies, widening). Each search is a round of :class:`ShardSearch`: the ranks all-gather their
   queries, every rank searches them all against its shard (exact wrong-label kNN by class blocks), and the
   partial top-k lists go back to the asking rank (one gather per rank), which merges them into the exact
   top-k. Hardest positives (farthest same-label item: the largest ``d²`` over the shards, lowest id on ties)
   and the float64 ``d²`` of chosen pairs are rounds too. The ranks' tuples are then all-gathered into one
   process's order (grouped by anchor, anchors in snapshot row order) and the statistics merged as one
   process reports them;
4. **class centroids** (recipe ``class-batches``): each rank sums its items' vectors per class; the sums are
   all-reduced (float64) and divided by the global class sizes. No item vector leaves its rank.

Exact mining gives one process's tuples: the same candidates and the same choices (up to ties in ``d²`` and
float rounding of the centroids), the same statistics. Random choices (random positives, window and
distance-weighted sampling) come from each rank's seeded stream, as in :mod:`~hardneg.trainer.sharded_refresh`.

Not sharded: approximate indexes (``ivf``, ``hnsw``: trained on all vectors at once), ``exclude_suspects``
(the label audit reads the whole index), ``refresh_on_drift`` (it reads the whole snapshot) and recipe
``simclr``; a sharded snapshot carries no thumbnails; ``--shard-index on`` refuses them,
``auto`` (the default) shards only when none of them is asked for and the training set holds at least
``SHARD_INDEX_FROM`` items.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.miner.flat_file import FlatIndexWriter
from hardneg.miner.index import VectorIndex
from hardneg.miner.mining.config import MiningConfig
from hardneg.miner.mining.core import mine_negatives
from hardneg.miner.mining.guards import build_guards
from hardneg.miner.mining.miner import STRATEGIES, assemble
from hardneg.miner.mining.positives import block_d2, random_positives
from hardneg.miner.mining.search import wrong_label_knn_of_queries
from hardneg.miner.mining.stats import MiningStats
from hardneg.miner.mining.topk import merge_topk
from hardneg.miner.store import IDS_FILE, INDEX_FILE, LABELS_FILE
from hardneg.trainer import tuples as tp
from hardneg.trainer.batching import ClassGroups
from hardneg.trainer.config import TrainConfig, unshardable
from hardneg.trainer.distributed import DistContext
from hardneg.trainer.refresh import Published, SnapshotPublisher, _plain, embed_items, mining_config
from hardneg.trainer.sharded_refresh import merge_counters, summarised_distances

log = logging.getLogger(__name__)

# "auto" shards from this many training items on: below it every rank's copy of the embeddings is small
# (256 MB at d = 64), and the unsharded refresh mines with fewer collective rounds (docs/benchmarks.md, "Scale").
SHARD_INDEX_FROM = 1_000_000
STREAM_ROWS = 1 << 16  # rows per block streamed to rank 0 for index.faiss: 16 MiB at d = 64
ANCHOR_CHUNK = 1 << 14  # anchors a rank mines per chunk: the queries all-gathered in one round
_BLOCK_ENTRIES = 1 << 24  # distances per block of the hardest-positive search
METRIC = "cosine"  # the trainer's snapshots are cosine indexes


def shard_index_enabled(cfg: TrainConfig, dist: DistContext, n_items: int) -> bool:
    """Whether this run's refreshes use a sharded index: ``cfg.shard_index`` "on" (checked: ValidationError when
    the run cannot shard), "off", or "auto": under torchrun, from ``SHARD_INDEX_FROM`` items, when it can."""
    if cfg.shard_index == "off" or not dist.enabled:
        return False
    reason = unshardable(cfg)
    if cfg.shard_index == "on":
        if reason:
            raise ValidationError(f"--shard-index on: {reason}")
        return True
    return reason is None and n_items >= SHARD_INDEX_FROM


# ------------------------------------------------------------------ the shard
@dataclass(frozen=True)
class IndexShard:
    """This rank's block ``[lo, hi)`` of a sharded snapshot.

    Attributes:
        index: the block's items (ids ``lo..hi-1``), flat, rows sorted by (label, id).
        labels: (N,) int64 the label of every training item (id = position).
        dist: the ranks.
    """

    index: VectorIndex
    labels: np.ndarray
    dist: DistContext
    lo: int
    hi: int

    @property
    def count(self) -> int:
        """N: items over all shards."""
        return len(self.labels)

    @property
    def vectors(self) -> np.ndarray:
        """(hi - lo, d) float32 zero-copy view of this shard's prepared vectors, in its row order."""
        n, d = self.index.count, self.index.dim
        if n == 0:
            return np.empty((0, d), np.float32)
        return faiss.rev_swig_ptr(self.index.index.get_xb(), n * d).reshape(n, d)

    def snapshot_order(self) -> np.ndarray:
        """(N,) item ids in the snapshot's row order: by label, then id."""
        return np.argsort(self.labels, kind="stable")

    def bounds(self) -> np.ndarray:
        """(world + 1,) the first id of every rank's block, then N."""
        n, w = self.count, self.dist.world_size
        return np.array([n * r // w for r in range(w + 1)], np.int64)

    def class_centroids(self) -> tuple[np.ndarray, np.ndarray]:
        """The classes with 2 or more items over all shards (C,) and their mean vectors (C, d) float32: each
        rank's per-class sums (float32, as one process sums) all-reduced in float64, over the global class sizes.
        No item vector leaves its rank; the means equal one process's up to float32 rounding of the sums."""
        groups = ClassGroups.of(self.labels)
        sums = np.zeros((len(groups.classes), self.index.dim), np.float64)
        if self.index.count:  # the shard's rows are sorted by label: one run per class
            local, starts = np.unique(self.index.labels, return_index=True)
            part = np.add.reduceat(self.vectors, starts, axis=0)
            pos = np.searchsorted(groups.classes, local)
            held = pos < len(groups.classes)
            held[held] = groups.classes[pos[held]] == local[held]  # classes with 2 or more items over all shards
            sums[pos[held]] = part[held]
        sums = self.dist.all_reduce_array(sums)
        return groups.classes, (sums / groups.counts[:, None]).astype(np.float32)


def check_same_labels(labels: np.ndarray, dist: DistContext) -> None:
    """ValidationError on every rank unless every rank holds the same training labels."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()
    digests = dist.all_gather_json(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValidationError(f"the ranks hold different training data: ranks {differ} have other labels than "
                              f"rank 0; every rank must load the same --data")


# ---------------------------------------------------------------- publishing
def publish_shards(model: nn.Module, x: torch.Tensor, labels: np.ndarray, publisher: SnapshotPublisher,
                   meta: Mapping[str, Any], dist: DistContext) -> Published:
    """Embed and index this rank's block of ``x`` (n, ...) with ``labels`` (n,); rank 0 publishes the complete
    snapshot, streamed from every shard. Every rank must call this together. The result's ``shard`` is this
    rank's :class:`IndexShard` (its ``index`` the shard's index; ``embeddings`` None)."""
    timer = publisher.timer
    lo, hi = dist.block(len(labels))
    labels = np.asarray(labels, np.int64)
    check_same_labels(labels, dist)
    with timer.phase("embed"):
        local = embed_items(model, x[lo:hi], publisher.cfg.eval_batch_size)
    with timer.phase("index"):
        index = VectorIndex.build(local, labels[lo:hi], np.arange(lo, hi), metric=METRIC, index="flat")
    del local
    shard = IndexShard(index, labels, dist, lo, hi)
    with ExitStack() as stack:
        folder, error = None, None
        if dist.is_main:
            try:
                folder = stack.enter_context(publisher.store.staging("shards"))
            except Exception as e:  # reported after the stream, which every rank must run to the end
                error = e
        with timer.phase("publish"):
            error = stream_snapshot(shard, folder, error)

        def publish() -> dict[str, Any]:
            if error is not None:
                raise error
            assert folder is not None
            return {"name": publisher.publish_written(model, folder, index.dim, meta)}

        head = dist.from_main(publish)
    return Published(head["name"], index, None, shard)


def stream_snapshot(shard: IndexShard, folder: Path | None, error: Exception | None = None) -> Exception | None:
    """Stream every shard's rows to rank 0 in snapshot order; rank 0 writes ``index.faiss``, ``ids.npy`` and
    ``labels.npy`` into ``folder``. Every rank runs every round, also after rank 0 met an error (returned to
    rank 0, to be raised once the other ranks are free; None elsewhere)."""
    dist = shard.dist
    order = shard.snapshot_order()
    bounds = shard.bounds()
    writer: FlatIndexWriter | None = None
    if dist.is_main and error is None:
        try:
            assert folder is not None
            np.save(folder / IDS_FILE, order, allow_pickle=False)
            np.save(folder / LABELS_FILE, shard.labels[order], allow_pickle=False)
            writer = FlatIndexWriter(folder / INDEX_FILE, shard.index.dim, METRIC, len(order))
        except Exception as e:
            error = e
    for s in range(0, len(order), STREAM_ROWS):
        ids = order[s:s + STREAM_ROWS]
        mine = ids[(ids >= shard.lo) & (ids < shard.hi)]
        parts = dist.gather_arrays([shard.index.vectors_of(mine)])
        if parts is None or writer is None:
            continue
        try:
            block = np.empty((len(ids), shard.index.dim), np.float32)
            owner = np.searchsorted(bounds, ids, "right") - 1
            for r, part in enumerate(parts[0]):
                block[owner == r] = part
            writer.write(block)
        except Exception as e:
            error, writer = e, writer.abort()
    if writer is not None:
        try:
            writer.close()
        except Exception as e:
            error = e
    return error


# -------------------------------------------------------------------- search
_NEGATIVES, _FARTHEST, _PAIR = range(3)


class ShardSearch:
    """Searches over every rank's shard, in collective rounds.

    In a round every rank all-gathers its request (kind, k, queries (j, d), their labels, their ids), answers
    every rank's request from its own shard, and sends each answer back to the rank that asked (one gather per
    rank). Ranks ask different numbers of questions (the miner widens only where it must), so a rank without a
    question takes part with an idle request (:meth:`finish`) until every rank is idle.
    """

    def __init__(self, shard: IndexShard) -> None:
        self.shard = shard
        self.dist = shard.dist
        self.distance = shard.index.distance
        self.vectors = shard.vectors
        self.dim = shard.index.dim

    # ------------------------------------------------------------ asking
    def negatives(self, q: np.ndarray, qlab: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items of another label over all shards: ids (j, k) int64 and d² (j, k) float32,
        nearest first, ``-1`` / ``inf``-padded."""
        answers = self._round(True, _NEGATIVES, k, q, qlab, np.full(len(q), -1, np.int64))
        return merge_topk([(ids, d2) for ids, d2, _ in answers], k)

    def farthest_positives(self, q: np.ndarray, qlab: np.ndarray, qids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The farthest item of the same label other than the query itself (the lowest id on ties), over all
        shards: ids (j,) int64 (``-1``: none) and float64 ``d²`` (j,) (NaN: none)."""
        answers = self._round(True, _FARTHEST, 1, q, qlab, qids)
        ids = np.concatenate([a[0] for a in answers], axis=1)
        d2 = np.concatenate([a[1] for a in answers], axis=1)
        d2_64 = np.concatenate([a[2] for a in answers], axis=1)
        best = np.lexsort((ids, -d2.astype(np.float64)))[:, 0]  # largest d², then lowest id; none: -inf, last
        rows = np.arange(len(q))
        return ids[rows, best], d2_64[rows, best]

    def pair_d2(self, q: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Exact float64 ``d²`` between each query (j, d) and the item ``targets`` (j,) (NaN where -1), computed by
        the rank holding the item, as one process computes it from the stored vectors."""
        answers = self._round(True, _PAIR, 1, q, np.zeros(len(q), np.int64), targets)
        return np.fmax.reduce([a[2][:, 0] for a in answers])

    def finish(self) -> None:
        """Answer the other ranks' questions until no rank has one left."""
        while self._round(False, 0, 0, np.empty((0, self.dim), np.float32), np.empty(0, np.int64),
                          np.empty(0, np.int64)) is not None:
            pass

    # ---------------------------------------------------------- one round
    def _round(self, active: bool, kind: int, k: int, q: np.ndarray, qlab: np.ndarray,
               qids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
        head = np.array([int(active), kind, k], np.int64)
        heads, queries, labels, ids = self.dist.all_gather_arrays(
            [head, np.ascontiguousarray(q, np.float32), np.asarray(qlab, np.int64), np.asarray(qids, np.int64)])
        if not any(h[0] for h in heads):
            return None
        answers = [self._answer(int(h[1]), int(h[2]), queries[r], labels[r], ids[r]) if h[0] else self._empty(0, 0)
                   for r, h in enumerate(heads)]
        back = self.dist.exchange_arrays([list(a) for a in answers])
        return list(zip(*back)) if active else []

    def _answer(self, kind: int, k: int, q: np.ndarray, qlab: np.ndarray,
                qids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This shard's answer: ids (j, kk) int64, d² (j, kk) float32 and float64 d² (j, kk') of the request."""
        index = self.shard.index
        if kind == _NEGATIVES:
            rows, d2 = wrong_label_knn_of_queries(q, qlab, self.vectors, index.labels, k, self.distance)
            return np.where(rows >= 0, index.ids[np.maximum(rows, 0)], -1), d2, np.empty((len(q), 0))
        if kind == _FARTHEST:
            return self._farthest(q, qlab, qids)
        d2_64 = np.full((len(q), 1), np.nan)
        mine = (qids >= self.shard.lo) & (qids < self.shard.hi)
        if mine.any():
            diff = q[mine].astype(np.float64) - index.vectors_of(qids[mine])
            d2_64[mine, 0] = np.einsum("ij,ij->i", diff, diff)
        return np.where(mine, qids, -1)[:, None], np.full((len(q), 1), np.nan, np.float32), d2_64

    def _farthest(self, q: np.ndarray, qlab: np.ndarray, qids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query its farthest same-label item in this shard other than itself (lowest id on ties), as
        :func:`hardneg.miner.mining.positives.hardest_positives` computes it over a whole class."""
        index, j = self.shard.index, len(q)
        out_ids, out_d2, out_64 = self._empty(j, 1)
        order = np.argsort(qlab, kind="stable")
        cuts = np.flatnonzero(np.diff(qlab[order])) + 1
        for group in np.split(order, cuts) if j else []:
            lo, hi = index.class_rows(int(qlab[group[0]]))
            if hi <= lo:
                continue
            x, x_ids = self.vectors[lo:hi], index.ids[lo:hi]
            step = max(1, _BLOCK_ENTRIES // (hi - lo))
            for s in range(0, len(group), step):
                g = group[s:s + step]
                d2 = block_d2(q[g], x, self.distance)
                d2[x_ids[None, :] == qids[g][:, None]] = -np.inf  # never the query itself
                best = np.argmax(d2, axis=1)
                found = d2[np.arange(len(g)), best] > -np.inf
                out_ids[g[found], 0] = x_ids[best[found]]
                out_d2[g[found], 0] = d2[np.arange(len(g)), best][found]
                diff = q[g[found]].astype(np.float64) - x[best[found]]
                out_64[g[found], 0] = np.einsum("ij,ij->i", diff, diff)
        return out_ids, out_d2, out_64

    @staticmethod
    def _empty(j: int, kk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.full((j, kk), -1, np.int64), np.full((j, kk), -np.inf, np.float32), np.full((j, kk), np.nan)


# -------------------------------------------------------------------- mining
def mine_shards(shard: IndexShard, cfg: TrainConfig, epoch: int) -> tuple[tp.TupleSet, dict[str, Any]]:
    """Mine the tuples of recipe ``mined-tuples`` over a sharded index: this rank mines its block's anchors
    against every shard; returns every rank's tuples merged into one process's order, and merged statistics."""
    from hardneg.trainer.losses import LOSSES

    dist = shard.dist
    config = mining_config(cfg, epoch, dist.rank)
    if config.exclude_suspects is not None:
        raise ValidationError(unshardable(cfg) or "exclude_suspects needs the whole index")
    search = ShardSearch(shard)
    miner = _ShardMiner(search, config)
    anchors = np.arange(shard.lo, shard.hi)
    chunks = [miner.mine(anchors[s:s + ANCHOR_CHUNK]) for s in range(0, len(anchors), ANCHOR_CHUNK)]
    search.finish()
    names = ("anchor", "positive", "negative", "pair_i", "pair_j", "pair_y", "d2_pos", "d2_neg")
    local = [np.concatenate([c[i] for c in chunks]) if chunks else np.empty(0, np.float64 if i > 5 else np.int64)
             for i in range(len(names))]
    got = dist.all_gather_arrays(local)
    merged = dict(zip(names, (np.concatenate(parts) for parts in got)))
    row_of = np.empty(shard.count, np.int64)
    row_of[shard.snapshot_order()] = np.arange(shard.count)
    t_order = np.argsort(row_of[merged["anchor"]], kind="stable")
    p_order = np.argsort(row_of[merged["pair_i"]], kind="stable")
    stats = merge_counters([c for per_rank in dist.all_gather_json([c[-1] for c in chunks]) for c in per_rank])
    t_anchor = merged["anchor"][t_order]
    firsts = np.flatnonzero(np.diff(t_anchor, prepend=-1) != 0) if len(t_anchor) else np.empty(0, np.int64)
    d2_tpos = merged["d2_pos"][t_order]
    stats.update(summarised_distances(stats, config.margin, d2_tpos[firsts], d2_tpos, merged["d2_neg"][t_order]))
    if LOSSES[cfg.loss].kind == "pair":
        tuples = tp.pairs(*(merged[f][p_order] for f in ("pair_i", "pair_j", "pair_y")))
    else:
        tuples = tp.triplets(*(merged[f][t_order] for f in ("anchor", "positive", "negative")))
    return tuples, stats


class _ShardMiner:
    """Label-mode mining (:func:`hardneg.miner.mining.mine`) of this rank's anchors over every shard."""

    def __init__(self, search: ShardSearch, config: MiningConfig) -> None:
        self.search, self.config = search, config
        shard = search.shard
        self.rng = np.random.default_rng(config.seed)
        self.strategy = STRATEGIES[config.strategy](config, search.vectors, shard.index.metric)
        self.guards = build_guards(config, shard.index.metric)
        self.order = shard.snapshot_order()
        self.sorted_labels = shard.labels[self.order]
        self.row_of = np.empty(shard.count, np.int64)
        self.row_of[self.order] = np.arange(shard.count)
        self.classes, self.class_sizes = np.unique(shard.labels, return_counts=True)

    def mine(self, anchors: np.ndarray) -> tuple[np.ndarray, ...]:
        """Mine ``anchors`` (m,) ids of this rank's block: the result's eight arrays (triplets, pairs, and per
        triplet ``d²(a, p)`` and ``d²(a, n)``) and the pass's statistics (a dict)."""
        shard, search, config = self.search.shard, self.search, self.config
        q = shard.index.vectors_of(anchors)
        qlab = shard.labels[anchors]
        m = len(anchors)
        stats = MiningStats(config.strategy, shard.index.metric, config.margin, config.per_anchor, anchors=m)
        if config.positive == "hardest":
            positives, d2_pos = search.farthest_positives(q, qlab, anchors)
        else:
            rows = random_positives(self.sorted_labels, self.row_of[anchors], self.rng)
            positives = np.where(rows >= 0, self.order[np.maximum(rows, 0)], -1)
            d2_pos = search.pair_d2(q, positives)
        has_pos = positives >= 0
        stats.anchors_singleton = int((~has_pos).sum())
        admissible = shard.count - self.class_sizes[np.searchsorted(self.classes, qlab)]
        negatives = mine_negatives(lambda pos, k: search.negatives(q[pos], qlab[pos], k), np.flatnonzero(has_pos),
                                   admissible, d2_pos, self.strategy, self.guards, self.rng, stats, m)
        p = config.per_anchor
        stats.anchors_short = int((has_pos & ((negatives >= 0).sum(1) < p)).sum()) - stats.semihard_skipped
        valid = negatives >= 0
        t_anchor = np.repeat(np.arange(m), valid.sum(1))
        t_neg = negatives[valid]
        d2_neg = search.pair_d2(q[t_anchor], t_neg)
        order = np.lexsort((d2_neg, t_anchor))  # assemble's order: by anchor, nearest negative first
        t_anchor, t_neg, d2_neg = t_anchor[order], t_neg[order], d2_neg[order]
        res = assemble(anchors, positives, d2_pos, t_anchor, t_neg, d2_neg, stats)
        return (res.anchor, res.positive, res.negative, res.pair_i, res.pair_j, res.pair_y, d2_pos[t_anchor],
                d2_neg, _plain_stats(stats))


def _plain_stats(stats: MiningStats) -> dict[str, Any]:
    return _plain(stats.to_dict())
