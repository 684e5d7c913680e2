"""Distributed training helpers: sharding, torchrun's environment, merging the ranks' mining, the collectives.

References: plain set arithmetic for the shards; one single-process ``mine`` over all anchors for the merged
shares (deterministic strategies must match it exactly, statistics included); for the collectives, a real
two-process gloo group whose ranks check what they received against what the other rank sent.
"""

from __future__ import annotations

import os
import socket
import weakref

import numpy as np
import pytest
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.distributed import (
    LOCAL, DistContext, RankFailedError, check_world, context_from_env, process_group, shard_batches, shard_range,
    shard_strided,
)
from hardneg.trainer.refresh import mine_tuples, mining_seed
from hardneg.trainer.sharded_refresh import check_gathered, merge_shares, mine_sharded, share_index

TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}


# ------------------------------------------------------------------ sharding
@pytest.mark.parametrize("n", [0, 1, 7, 100, 1347])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_range_tiles_the_items_in_rank_order(n: int, world: int) -> None:
    blocks = [shard_range(n, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate([np.arange(lo, hi) for lo, hi in blocks]), np.arange(n))
    sizes = [hi - lo for lo, hi in blocks]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_strided_partitions_any_array(world: int) -> None:
    items = np.random.default_rng(0).permutation(1000) * 3 + 11  # not 0..n-1, not sorted
    shares = [shard_strided(items, r, world) for r in range(world)]
    joined = np.concatenate(shares)
    assert len(joined) == len(items) and np.array_equal(np.sort(joined), np.sort(items))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def epoch_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """An epoch as the loop draws it: a seeded permutation of range(n) in chunks of ``batch_size``."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


@pytest.mark.parametrize("n, batch_size, world", [(1347, 128, 2), (1347, 128, 3), (10, 4, 4), (9, 8, 3),
                                                  (5, 5, 1)])
def test_shard_batches_give_every_index_to_one_rank_in_lockstep(n: int, batch_size: int, world: int) -> None:
    batches = epoch_batches(n, batch_size, seed=4)
    shares = [shard_batches(batches, r, world) for r in range(world)]
    assert all(len(s) == len(batches) for s in shares)  # the same number of steps on every rank
    for step, batch in enumerate(batches):
        parts = [shares[r][step] for r in range(world)]
        # the step's shares partition exactly the global batch, within one item of each other in size
        assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(batch))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    everything = np.concatenate([b for s in shares for b in s])
    assert np.array_equal(np.sort(everything), np.arange(n))  # each index exactly once per epoch
    if world == 1:
        assert all(np.array_equal(a, b) for a, b in zip(shares[0], batches))


def test_shard_batches_are_deterministic_under_the_seed() -> None:
    def shares(seed: int) -> list[list[np.ndarray]]:
        return [shard_batches(epoch_batches(500, 64, seed), r, 3) for r in range(3)]

    same = [np.concatenate(s) for s in shares(1)], [np.concatenate(s) for s in shares(1)]
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    other = [np.concatenate(s) for s in shares(2)]
    assert not all(np.array_equal(a, b) for a, b in zip(same[0], other))


def test_local_context_leaves_batches_alone() -> None:
    batches = epoch_batches(50, 8, seed=0)
    assert LOCAL.batches(batches) is batches and LOCAL.total(7) == 7 and LOCAL.sums([1.5, 2]) == [1.5, 2.0]
    assert LOCAL.from_main(lambda: {"a": 1}) == {"a": 1} and not LOCAL.enabled and LOCAL.is_main


def test_bad_shards_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"rank must lie in \[0, world_size\)"):
        shard_range(10, 2, 2)
    with pytest.raises(ValidationError, match="rank must lie"):
        shard_batches([np.arange(3)], -1, 2)


# ------------------------------------------------------------- environment
def test_without_torchrun_a_single_process() -> None:
    assert context_from_env("cpu", {}) is LOCAL
    assert context_from_env("cuda", {"WORLD_SIZE": "1", "RANK": "0"}) is LOCAL  # torchrun --nproc-per-node 1


def test_torchrun_environment_picks_gloo_on_cpu() -> None:
    ctx = context_from_env("cpu", TORCHRUN_ENV)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (1, 2, 1, "gloo")
    assert ctx.enabled and not ctx.is_main and str(ctx.comm_device) == "cpu"
    assert str(ctx.device_for("cpu")) == "cpu" and str(ctx.device_for("cuda")) == "cuda:1"


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not; start distributed training with "
                          "torchrun"),
    ({**TORCHRUN_ENV, "RANK": "2"}, r"RANK must lie in \[0, 2\)"),
    ({**TORCHRUN_ENV, "WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer, got 'two'"),
    ({**TORCHRUN_ENV, "WORLD_SIZE": "0"}, "WORLD_SIZE must be an integer >= 1"),
])
def test_broken_torchrun_environment_is_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        context_from_env("cpu", env)


@pytest.mark.skipif(tdist.is_nccl_available(), reason="this torch build has NCCL")
def test_cuda_without_nccl_is_a_clear_error() -> None:
    with pytest.raises(ValidationError, match="NCCL backend, which this torch build lacks; use --device cpu"):
        context_from_env("cuda", TORCHRUN_ENV)


def test_a_world_larger_than_the_data_or_the_batch_is_refused() -> None:
    four = DistContext(0, 4, 0, "gloo")
    check_world(four, n_items=4, batch_size=4)  # just enough: one item and one tuple per rank and step
    with pytest.raises(ValidationError, match="4 processes but only 3 training items.*at most 3 processes"):
        check_world(four, n_items=3, batch_size=128)
    with pytest.raises(ValidationError, match=r"batch_size \(3\) is the number of tuples per optimizer step.*at "
                                              r"least 4"):
        check_world(four, n_items=100, batch_size=3)
    check_world(LOCAL, n_items=1, batch_size=1)


# ------------------------------------------------------------- the mining
@pytest.fixture(scope="module")
def index(clusters) -> VectorIndex:
    data = clusters(600, 16, 7, seed=1, spread=0.9, shuffle_ids=False)
    return VectorIndex.build(data.vectors, data.labels, np.arange(600), metric="cosine")


def mine_in_shares(index: VectorIndex, cfg: TrainConfig, world: int) -> tuple:
    """What ``world`` ranks mine, each its strided share of the anchors with its own seed, merged."""
    shares, stats = zip(*[mine_tuples(index, cfg, 3, anchors=shard_strided(index.ids, r, world), shard=r)
                          for r in range(world)])
    return merge_shares(index, list(shares), list(stats), cfg.margin)


@pytest.mark.parametrize("loss, strategy", [("triplet", "hardest"), ("contrastive", "semihard")])
@pytest.mark.parametrize("world", [2, 3])
def test_deterministic_mining_in_shares_equals_one_pass(index: VectorIndex, loss: str, strategy: str,
                                                        world: int) -> None:
    # hardest positives and hardest / semi-hard negatives draw nothing at random: the merged shares must be
    # the single pass's tuples in its order, and the merged statistics its statistics
    # (the guard drops most candidates, so anchors widen their search: rounds and guard counts get merged)
    cfg = TrainConfig.from_dict({"recipe": "mined-tuples", "loss": loss, "strategy": strategy, "positive": "hardest",
                                 "per_anchor": 2, "candidates": 8, "positive_aware": 0.9})
    whole, whole_stats = mine_tuples(index, cfg, 3)
    merged, merged_stats = mine_in_shares(index, cfg, world)
    assert merged.kind == whole.kind and len(merged) == len(whole) > 0
    for field in ("first", "second", "third"):
        assert np.array_equal(getattr(merged, field), getattr(whole, field)), field
    assert whole_stats["search_rounds"] > 1 and whole_stats["guard_dropped"]["positive_aware"] > 0
    # merged in the single pass's order, the recomputed distance summaries come out bit for bit the same
    assert merged_stats == whole_stats


def test_random_mining_in_shares_mines_every_anchor_once(index: VectorIndex) -> None:
    cfg = TrainConfig.from_dict({"recipe": "mined-tuples", "per_anchor": 2})  # semi-hard, random positives: what the ranks draw differs from one pass
    whole, whole_stats = mine_tuples(index, cfg, 3)
    shares = [mine_tuples(index, cfg, 3, anchors=shard_strided(index.ids, r, 2), shard=r)[0] for r in range(2)]
    assert not set(shares[0].first.tolist()) & set(shares[1].first.tolist())  # no anchor on two ranks
    merged, merged_stats = mine_in_shares(index, cfg, 2)
    assert np.array_equal(np.unique(merged.first), np.unique(whole.first))
    assert np.array_equal(np.unique(merged.first), np.arange(600))  # every item has class-mates: all anchors
    assert np.bincount(merged.first).max() <= 2
    rows = index.rows_of(merged.first)
    assert (np.diff(rows) >= 0).all()  # grouped by anchor, in row order, as one pass returns them
    lab = index.labels[index.rows_of(merged.second)], index.labels[index.rows_of(merged.third)]
    assert (lab[0] == index.labels[rows]).all() and (lab[1] != index.labels[rows]).all()
    assert not np.array_equal(merged.second[:100], whole.second[:100])  # each rank draws its own positives
    for key in ("anchors", "anchors_mined", "anchors_singleton"):
        assert merged_stats[key] == whole_stats[key] == 600 * (key != "anchors_singleton"), key
    assert merged_stats["triplets"] == len(merged) and merged_stats["pairs"] == 600 + len(merged)
    assert mining_seed(5, 3, shard=0) == mining_seed(5, 3) != mining_seed(5, 3, shard=1)


def test_gathered_items_must_arrive_once_with_their_labels() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    check_gathered(np.arange(5), labels, labels)
    with pytest.raises(ValidationError, match="4 embeddings for 5 training items"):
        check_gathered(np.array([0, 1, 2, 4]), labels[:4], labels)
    with pytest.raises(ValidationError, match="exactly once"):
        check_gathered(np.array([0, 1, 1, 3, 4]), labels, labels)
    with pytest.raises(ValidationError, match=r"different training data: labels differ at items \[3\]"):
        check_gathered(np.arange(5), np.array([0, 0, 1, 2, 2]), labels)


# ------------------------------------------------------- real collectives
def _worker(rank: int, port: int, vectors: np.ndarray, labels: np.ndarray) -> None:
    """Rank ``rank`` of a two-process gloo group set up as under torchrun: exchange data and check what arrived,
    then fail, and check that the failed frame's objects were released before the group was destroyed."""
    os.environ.update({"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    index = VectorIndex.build(vectors, labels, metric="cosine")
    refs: list[weakref.ref] = []
    alive_at_destroy: list[bool] = []
    destroy = tdist.destroy_process_group

    def watched_destroy() -> None:
        alive_at_destroy.append(refs[0]() is not None)
        destroy()

    tdist.destroy_process_group = watched_destroy
    try:
        with process_group("cpu") as ctx:
            assert ctx == DistContext(rank, 2, rank, "gloo") and tdist.get_world_size() == 2
            _exchange(ctx, index)
            _fail_holding(refs)
    except RuntimeError as e:
        assert str(e) == "failed while holding a model"
    else:
        raise AssertionError(f"rank {rank}: the failure did not propagate")
    # a DDP wrapper left in a failed frame would destroy the group later, joining gloo's threads under the GIL
    assert alive_at_destroy == [False] and not tdist.is_initialized()


def _fail_holding(refs: list[weakref.ref]) -> None:
    model = nn.Linear(2, 2)  # stands for the DDP wrapper a failing training frame holds
    refs.append(weakref.ref(model))
    raise RuntimeError("failed while holding a model")


def _exchange(ctx: DistContext, index: VectorIndex) -> None:
    """The collectives between the two ranks, each checked against what the other rank sent."""
    rank = ctx.rank

    def sent(r: int) -> list[np.ndarray]:  # what rank r sends: sizes, dtypes and dimensions differ by rank
        return [np.arange(3 + r, dtype=np.int64) * (r + 1), np.full((r + 1, 4), r + 0.5, np.float32),
                np.empty((0, 3), np.uint8), np.array([r == 0, True]), np.ones((2, 1, r + 1, 2), np.float64)]

    got = ctx.all_gather_arrays(sent(rank))
    for i in range(5):
        for r in range(2):
            assert got[i][r].dtype == sent(r)[i].dtype and np.array_equal(got[i][r], sent(r)[i]), (i, r)
    gathered = ctx.gather_arrays(sent(rank))
    assert (gathered is None) == (rank == 1)
    if gathered is not None:
        assert all(np.array_equal(gathered[i][r], sent(r)[i]) for i in range(5) for r in range(2))
    cube = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
    (b,) = ctx.broadcast_arrays([cube] if rank == 0 else None)
    assert b.shape == (2, 3, 4) and np.array_equal(b, cube)
    assert ctx.all_gather_json({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
    assert ctx.total(rank + 2) == 5 and ctx.sums([rank + 0.25, 1]) == [1.5, 2.0]
    assert ctx.from_main(lambda: {"name": f"from rank {rank}"}) == {"name": "from rank 0"}

    def fails_validation() -> None:
        raise ValidationError("run folder x already holds a run")

    def fails_otherwise() -> None:
        raise OSError("disk full")

    # every rank raises (none waits forever): rank 0 its own error, the others one with its message
    for fn, on_main, on_others, message in (
            (fails_validation, ValidationError, ValidationError, "run folder x already holds a run"),
            (fails_otherwise, OSError, RankFailedError, "rank 0 failed: OSError: disk full")):
        try:
            ctx.from_main(fn)
        except on_main if rank == 0 else on_others as e:
            assert rank == 0 or str(e) == message
        else:
            raise AssertionError(f"rank {rank}: from_main did not raise")
    # the index rank 0 published reaches rank 1 whole, and mining in shares over it equals one pass
    shared = share_index(index if rank == 0 else None, index.metric, index.spec.to_dict(), ctx)
    assert np.array_equal(shared.ids, index.ids) and np.array_equal(shared.labels, index.labels)
    assert np.array_equal(shared.vectors_of(index.ids), index.vectors_of(index.ids))
    cfg = TrainConfig.from_dict({"recipe": "mined-tuples", "strategy": "hardest", "positive": "hardest",
                                 "candidates": 8})
    merged, stats = mine_sharded(shared, cfg, 3, ctx)
    whole, whole_stats = mine_tuples(index, cfg, 3)
    assert all(np.array_equal(getattr(merged, f), getattr(whole, f)) for f in ("first", "second", "third"))
    assert stats["triplets"] == whole_stats["triplets"] and stats["anchors"] == whole_stats["anchors"]


def test_collectives_between_two_real_processes(clusters) -> None:

    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = clusters(300, 8, 5, seed=2, spread=0.9, shuffle_ids=False)
    mp.spawn(_worker, args=(port, data.vectors, data.labels), nprocs=2, join=True)
