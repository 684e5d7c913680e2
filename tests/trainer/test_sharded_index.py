"""A sharded index (``--shard-index``): mining across shards, class centroids, the snapshot streamed to the store.

References: one process's ``mine_tuples`` over the whole index (deterministic strategies must give the same
tuples and statistics), ``class_centroids`` / ``confusable_classes`` of the whole set of vectors, and
``VectorIndex.build`` of all vectors for the published snapshot (byte for byte the same rows, ids and labels).
The collectives run in a real two-process gloo group (torch.multiprocessing, as under torchrun); a single shard
(``LOCAL``: the collectives are the identity) checks the mining logic for every strategy cheaply.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch.multiprocessing as mp

from hardneg.miner.errors import ValidationError
from hardneg.miner.flat_file import FlatIndexWriter
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.batching import (
    centroid_seed_weights, class_centroids, class_neighbours, confusable_classes, seed_weights,
)
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.distributed import LOCAL, DistContext, process_group
from hardneg.trainer.refresh import mine_tuples
from hardneg.trainer.sharded_index import IndexShard, mine_shards, shard_index_enabled, stream_snapshot

N, DIM, CLASSES = 600, 16, 7
DETERMINISTIC = [  # (loss, options): hardest positives and hardest / semi-hard negatives draw nothing at random
    ("triplet", {"strategy": "hardest", "per_anchor": 2, "candidates": 8, "positive_aware": 0.9}),
    ("contrastive", {"strategy": "semihard", "per_anchor": 2, "candidates": 8}),
]


def config(loss: str, options: dict) -> TrainConfig:
    return TrainConfig.from_dict({"recipe": "mined-tuples", "loss": loss, "positive": "hardest", **options})


def shard_of(vectors: np.ndarray, labels: np.ndarray, ctx: DistContext) -> IndexShard:
    """Rank ``ctx.rank``'s shard: its block of the items, indexed as publish_shards indexes it."""
    lo, hi = ctx.block(len(labels))
    index = VectorIndex.build(vectors[lo:hi], labels[lo:hi], np.arange(lo, hi), metric="cosine")
    return IndexShard(index, labels, ctx, lo, hi)


def assert_same_mining(shard: IndexShard, whole: VectorIndex, cfg: TrainConfig) -> None:
    """Sharded mining equals one process's: the same tuples in the same order, the same statistics."""
    merged, stats = mine_shards(shard, cfg, 3)
    ref, ref_stats = mine_tuples(whole, cfg, 3)
    assert merged.kind == ref.kind and len(merged) == len(ref) > 0
    for field in ("first", "second", "third"):
        assert np.array_equal(getattr(merged, field), getattr(ref, field)), field
    assert stats == ref_stats


@pytest.fixture(scope="module")
def data(clusters):
    return clusters(N, DIM, CLASSES, seed=1, spread=0.9, shuffle_ids=False)


@pytest.mark.parametrize("loss, options", DETERMINISTIC)
def test_one_shard_mines_what_one_process_does(data, loss: str, options: dict) -> None:
    whole = VectorIndex.build(data.vectors, data.labels, metric="cosine")
    assert_same_mining(shard_of(data.vectors, data.labels, LOCAL), whole, config(loss, options))


@pytest.mark.parametrize("options", [{"strategy": "window", "window_skip": 2, "window_width": 8},
                                     {"strategy": "distance-weighted", "per_anchor": 2},
                                     {"strategy": "semihard", "positive": "random", "near_duplicate": 0.05}])
def test_random_strategies_on_a_shard_mine_every_anchor_with_valid_tuples(data, options: dict) -> None:
    cfg = TrainConfig.from_dict({"recipe": "mined-tuples", **options})
    merged, stats = mine_shards(shard_of(data.vectors, data.labels, LOCAL), cfg, 3)
    a, p, n = merged.first, merged.second, merged.third
    assert np.array_equal(np.unique(a), np.arange(N)) and stats["triplets"] == len(merged)
    assert (data.labels[p] == data.labels[a]).all() and (p != a).all() and (data.labels[n] != data.labels[a]).all()
    order = np.argsort(data.labels, kind="stable")
    row_of = np.argsort(order)
    assert (np.diff(row_of[a]) >= 0).all()  # grouped by anchor, anchors in snapshot row order


def test_class_centroids_of_one_shard_are_the_whole_sets(data) -> None:
    classes, centroids = shard_of(data.vectors, data.labels, LOCAL).class_centroids()
    ref_classes, ref = class_centroids(VectorIndex.build(data.vectors, data.labels).vectors_of(np.arange(N)),
                                       data.labels)
    assert np.array_equal(classes, ref_classes)
    np.testing.assert_allclose(centroids, ref, atol=1e-6)  # float32 sums added in another order


def test_seed_weights_from_shard_centroids_are_the_whole_sets(data) -> None:
    classes, centroids = shard_of(data.vectors, data.labels, LOCAL).class_centroids()
    whole = VectorIndex.build(data.vectors, data.labels).vectors_of(np.arange(N))
    table = confusable_classes(whole, data.labels, 4)
    np.testing.assert_allclose(centroid_seed_weights(classes, centroids, table, 2.0),
                               seed_weights(whole, data.labels, table, 2.0), rtol=1e-5)


def test_auto_shards_large_runs_under_torchrun_only() -> None:
    two = DistContext(0, 2, 0, "gloo")
    cfg = TrainConfig.from_dict({})
    assert not shard_index_enabled(cfg, two, 999_999) and shard_index_enabled(cfg, two, 1_000_000)
    assert not shard_index_enabled(cfg, LOCAL, 10**7)
    assert shard_index_enabled(cfg.replace(shard_index="on"), two, 10)
    assert not shard_index_enabled(cfg.replace(shard_index="off"), two, 10**7)
    assert not shard_index_enabled(cfg.replace(index="ivf"), two, 10**7)  # auto: cannot, so it does not
    with pytest.raises(ValidationError, match="shard_index 'on': index 'ivf' is trained on all vectors"):
        TrainConfig.from_dict({"shard_index": "on", "index": "ivf"})
    with pytest.raises(ValidationError, match="shard_index 'on': recipe 'simclr' mines the whole index"):
        TrainConfig.from_dict({"shard_index": "on", "recipe": "simclr"})
    with pytest.raises(ValidationError, match="shard_index 'on': exclude_suspects audits"):
        TrainConfig.from_dict({"shard_index": "on", "recipe": "mined-tuples", "exclude_suspects": 0.01})


def test_flat_writer_writes_what_faiss_writes(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    for metric, faiss_metric in (("cosine", faiss.METRIC_INNER_PRODUCT), ("l2", faiss.METRIC_L2)):
        ref = faiss.IndexFlat(8, faiss_metric)
        ref.add(x)
        with FlatIndexWriter(tmp_path / metric, 8, metric, 10) as w:
            w.write(x[:3])
            w.write(x[3:])
        assert (tmp_path / metric).read_bytes() == faiss.serialize_index(ref).tobytes()
    with pytest.raises(ValidationError, match="9 of 10 rows were written"):
        with FlatIndexWriter(tmp_path / "short", 8, "l2", 10) as w:
            w.write(x[:9])
    assert not (tmp_path / "short").exists()


# ------------------------------------------------------- two real ranks
def _worker(rank: int, port: int, vectors: np.ndarray, labels: np.ndarray, store_root: str) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    whole = VectorIndex.build(vectors, labels, metric="cosine")  # the reference: one process's index
    with process_group("cpu") as ctx:
        shard = shard_of(vectors, labels, ctx)
        assert shard.index.count == N // 2  # each rank indexes its half only
        for loss, options in DETERMINISTIC:
            assert_same_mining(shard, whole, config(loss, options))
        # class batches: centroids from the all-reduced sums, the same class-neighbour table
        classes, centroids = shard.class_centroids()
        ref_classes, ref = class_centroids(whole.vectors_of(np.arange(N)), labels)
        assert np.array_equal(classes, ref_classes)
        np.testing.assert_allclose(centroids, ref, atol=1e-6)  # float32 sums added in another order
        assert np.array_equal(class_neighbours(classes, centroids, 4),
                              confusable_classes(whole.vectors_of(np.arange(N)), labels, 4))
        # the snapshot: streamed to rank 0 in blocks smaller than a shard, published whole
        store = SnapshotStore(store_root)
        import hardneg.trainer.sharded_index as si

        si.STREAM_ROWS = 128
        with store.staging("shards") if rank == 0 else _nothing() as folder:
            assert stream_snapshot(shard, folder) is None
            if rank == 0:
                store.publish_prepared(folder, dim=DIM, metric="cosine", spec=whole.spec, meta={"epoch": 0})


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_two_ranks_mine_and_publish_what_one_process_does(data, tmp_path: Path) -> None:
    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, data.vectors, data.labels, str(tmp_path)), nprocs=2, join=True)
    snap = SnapshotStore(tmp_path).open()
    ref = VectorIndex.build(data.vectors, data.labels, metric="cosine")
    assert snap.manifest["count"] == N and snap.manifest["num_classes"] == CLASSES
    assert np.array_equal(snap.index.ids, ref.ids) and np.array_equal(snap.index.labels, ref.labels)
    assert np.array_equal(snap.index.vectors_of(ref.ids), ref.vectors_of(ref.ids))
    assert faiss.serialize_index(snap.index.index).tobytes() == faiss.serialize_index(ref.index).tobytes()
