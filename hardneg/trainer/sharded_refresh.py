"""The snapshot refresh of a distributed run: sharded embedding, one publisher, sharded mining.

The single-process refresh (:func:`hardneg.trainer.refresh.publish_local`, then the recipe's mining) split over
the ranks of a torchrun job:

1. every rank embeds its contiguous block of the training items (:func:`~hardneg.trainer.refresh.embed_items`);
2. the embeddings, ids and labels are gathered on rank 0, which checks that every item arrived exactly once
   and publishes the one snapshot (:class:`~hardneg.trainer.refresh.SnapshotPublisher`); the other ranks wait
   for its name;
3. rank 0 broadcasts the published index, so every rank mines from exactly what was published (approximate
   indexes are not rebuilt per rank);
4. each rank mines every ``world_size``-th anchor of the index's rows (class-balanced shares), and the shares
   are all-gathered back into the single-process order (grouped by anchor, anchors in row order): every rank
   holds the same full tuple set, which :func:`~hardneg.trainer.distributed.shard_batches` splits for training.

Each anchor is mined exactly once over the ranks, so the mined anchors do not depend on the rank count.
Deterministic choices (hardest positives; hardest and semi-hard negatives) equal the single-process ones up to
floating point; random ones (random positives, window and distance-weighted sampling) come from each rank's
own seeded stream: the same distribution, not the same draws. The statistics are merged to what one process
would report: counters summed (search rounds: the most any rank ran), distance summaries recomputed over all
tuples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from hardneg.miner.distances import get_distance
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import IndexSpec, VectorIndex
from hardneg.trainer import tuples as tp
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.distributed import DistContext
from hardneg.trainer.refresh import Published, SnapshotPublisher, embed_items, mine_tuples

log = logging.getLogger(__name__)

# Stats fields every rank reports alike (the mining options), and the ones recomputed over all tuples.
_SAME = ("strategy", "metric", "margin", "per_anchor")
_RECOMPUTED = ("nonzero_loss_share", "d2_positive", "d2_negative")


def publish_sharded(model: nn.Module, x: torch.Tensor, labels: np.ndarray, publisher: SnapshotPublisher,
                    meta: Mapping[str, Any], dist: DistContext) -> Published:
    """Embed the training items ``x`` (n, ...) with ``labels`` (n,) across the ranks -> rank 0 publishes -> every
    rank gets the published index.

    Every rank of ``dist`` must call this together, with the same model weights and data. The result's
    ``embeddings`` (n, d) are rank 0's gathered ones; the other ranks get None there.
    """
    cfg = publisher.cfg
    n = len(labels)
    lo, hi = dist.block(n)
    with publisher.timer.phase("embed"):
        local = embed_items(model, x[lo:hi], cfg.eval_batch_size)
        gathered = dist.gather_arrays([local, np.arange(lo, hi, dtype=np.int64),
                                       np.asarray(labels[lo:hi], dtype=np.int64)])
    published: Published | None = None

    def publish() -> dict[str, Any]:
        nonlocal published
        assert gathered is not None  # rank 0
        embeddings, ids, got = (np.concatenate(parts) for parts in gathered)
        check_gathered(ids, got, labels)
        published = publisher.publish(model, embeddings, got, meta)
        return {"name": published.name, "metric": published.index.metric, "spec": published.index.spec.to_dict()}

    head = dist.from_main(publish)
    with publisher.timer.phase("publish"):
        index = share_index(published.index if published is not None else None, head["metric"], head["spec"], dist)
    return Published(head["name"], index, published.embeddings if published is not None else None)


def check_gathered(ids: np.ndarray, gathered_labels: np.ndarray, labels: np.ndarray) -> None:
    """Every training item must arrive exactly once, in order, with rank 0's label for it.

    Args:
        ids: (n',) gathered item ids, by rank.
        gathered_labels: (n',) the labels the ranks sent with them.
        labels: (n,) rank 0's training labels.
    """
    n = len(labels)
    if len(ids) != n or not np.array_equal(ids, np.arange(n)):
        raise ValidationError(f"the ranks sent {len(ids)} embeddings for {n} training items (ids "
                              f"{np.unique(ids).size} distinct); every item must be embedded exactly once")
    differ = np.flatnonzero(gathered_labels != labels)
    if differ.size:
        raise ValidationError(f"the ranks hold different training data: labels differ at items "
                              f"{differ[:10].tolist()}; every rank must load the same --data")


def share_index(index: VectorIndex | None, metric: str, spec: Mapping[str, Any], dist: DistContext) -> VectorIndex:
    """Rank 0's ``index`` on every rank (others pass None): the FAISS index serialised, with ids and labels."""
    arrays = [faiss.serialize_index(index.index), index.ids, index.labels] if index is not None else None
    blob, ids, labels = dist.broadcast_arrays(arrays)
    if index is not None:
        return index
    return VectorIndex(faiss.deserialize_index(blob), ids, labels, get_distance(metric), IndexSpec.from_dict(spec))


def mine_sharded(index: VectorIndex, cfg: TrainConfig, epoch: int,
                 dist: DistContext) -> tuple[tp.TupleSet, dict[str, Any]]:
    """This rank mines its share of the anchors; returns every rank's tuples merged, and merged statistics."""
    anchors = dist.strided(index.ids)
    tuples, stats = mine_tuples(index, cfg, epoch, anchors=anchors, shard=dist.rank)
    parts = dist.all_gather_arrays([tuples.first, tuples.second, tuples.third])
    shares = [tp.TupleSet(tuples.kind, *arrays) for arrays in zip(*parts)]
    return merge_shares(index, shares, dist.all_gather_json(stats), cfg.margin)


def merge_shares(index: VectorIndex, shares: Sequence[tp.TupleSet], stats: Sequence[dict[str, Any]],
                 margin: float) -> tuple[tp.TupleSet, dict[str, Any]]:
    """Join the ranks' tuples (mined from disjoint anchor shares of ``index``) and their statistics.

    The tuples come back grouped by anchor, anchors in ``index`` row order, each anchor's tuples in the order
    its rank mined them: the order of one :func:`~hardneg.miner.mining.mine` call over all anchors.
    """
    kind = shares[0].kind
    first, second, third = (np.concatenate([getattr(s, f) for s in shares]) for f in ("first", "second", "third"))
    order = np.argsort(index.rows_of(first), kind="stable")
    merged = tp.TupleSet(kind, first[order], second[order], third[order])
    return merged, merge_stats(index, merged, stats, margin)


def merge_stats(index: VectorIndex, tuples: tp.TupleSet, stats: Sequence[dict[str, Any]],
                margin: float) -> dict[str, Any]:
    """One mining pass's statistics from the ranks' ``stats`` (``MiningStats.to_dict()`` each).

    Counts are merged by :func:`merge_counters`; the non-zero-loss share and the distance summaries are
    recomputed from ``tuples`` (the merged set) and ``index``'s stored vectors, as the miner computes them.
    """
    out = merge_counters(stats)
    out.update(summarised_distances(out, margin, *_tuple_distances(index, tuples)))
    return out


def merge_counters(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The counters of several shares of one mining pass (``MiningStats.to_dict()`` each), merged: counts summed
    (``search_rounds``: the largest, as one pass runs as many rounds as its slowest anchor needs; per-guard
    drops summed by guard); the mining options and the distance fields are the first share's."""
    out: dict[str, Any] = {}
    for key, value in stats[0].items():
        values = [s[key] for s in stats]
        if key in _SAME or key in _RECOMPUTED:
            out[key] = value
        elif key == "search_rounds":
            out[key] = max(values)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = sum(values)
        elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
            out[key] = {k: sum(v[k] for v in values) for k in value}
        else:
            out[key] = value  # a field this merge does not know: the first share's
    return out


def summarised_distances(merged: Mapping[str, Any], margin: float, d2_pos: np.ndarray, d2_triplet_pos: np.ndarray,
                         d2_neg: np.ndarray) -> dict[str, Any]:
    """The non-zero-loss share and distance summaries of a merged pass (``MiningStats.summarise_distances``'s
    arguments, over all tuples in one process's order)."""
    from hardneg.miner.mining import MiningStats

    summary = MiningStats(merged["strategy"], merged["metric"], margin, merged["per_anchor"])
    summary.summarise_distances(d2_pos, d2_triplet_pos, d2_neg)
    recomputed = summary.to_dict()
    return {key: recomputed[key] for key in _RECOMPUTED}


def _tuple_distances(index: VectorIndex, t: tp.TupleSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``d²(a, p)`` per mined anchor (one positive each), ``d²(a, p)`` per negative, ``d²(a, n)`` per negative."""
    from hardneg.miner.mining.miner import stored_vectors

    vectors = stored_vectors(index)

    def d2(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # float64 over the stored vectors, as the miner computes
        if len(a) == 0:
            return np.empty(0, np.float64)
        diff = vectors[index.rows_of(a)].astype(np.float64) - vectors[index.rows_of(b)]
        return np.einsum("ij,ij->i", diff, diff)

    if t.kind == "triplet":
        anchor, positive, negative = t.first, t.second, t.third
        _, firsts = np.unique(anchor, return_index=True)  # an anchor's triplets share its positive
        return d2(anchor[firsts], positive[firsts]), d2(anchor, positive), d2(anchor, negative)
    pos, neg = t.third == 0, t.third == 1
    pos_anchor, d2_pos_anchor = t.first[pos], d2(t.first[pos], t.second[pos])
    neg_anchor = t.first[neg]
    order = np.argsort(pos_anchor, kind="stable")  # each mined anchor has one positive pair
    d2_trip_pos = d2_pos_anchor[order][np.searchsorted(pos_anchor[order], neg_anchor)]
    return d2_pos_anchor, d2_trip_pos, d2(neg_anchor, t.second[neg])
