"""The mining-quality levers: P x K and index-composed batches, mixed mined + in-batch loss, their config.

References: per-batch class counts recounted with numpy, class-centroid neighbours computed by brute force
(a Python loop over classes and a full distance matrix), and loss values computed by hand from the
embeddings with explicit loops over anchors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.miner.store import SnapshotStore
from hardneg.trainer import tuples as tp
from hardneg.trainer.batching import (
    ClassGroups, ConfusableClassBatches, PKBatches, RandomBatches, composition_stats, confusable_classes,
    make_batch_sampler, seed_weights,
)
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.inbatch import BatchHardMiner, SemiHardMiner
from hardneg.trainer.losses import TripletLoss
from hardneg.trainer.loop import Trainer
from hardneg.trainer.recipes.base import ItemBatches, mixed_loss


def labels_with_sizes(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Labels 10, 11, ... with the given class sizes, shuffled (so classes are not contiguous)."""
    y = np.repeat(np.arange(len(sizes)) + 10, sizes)
    return np.random.default_rng(seed).permutation(y)


def brute_neighbours(vectors: np.ndarray, labels: np.ndarray, p: int) -> dict[int, list[int]]:
    """Per class with >= 2 items: itself, then its p - 1 nearest such classes by squared centroid distance."""
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 2]
    centroid = {c: vectors[labels == c].astype(np.float64).mean(0) for c in classes}
    out = {}
    for c in classes:
        others = sorted((float(((centroid[c] - centroid[o]) ** 2).sum()), o) for o in classes if o != c)
        out[int(c)] = [int(c)] + [int(o) for _, o in others[:p - 1]]
    return out


# ------------------------------------------------------------------------------------------- batches
def test_random_batches_cover_every_item_once() -> None:
    y = labels_with_sizes([5, 7, 1, 9])
    batches = RandomBatches(y, 8).batches(np.random.default_rng(3))
    assert [len(b) for b in batches] == [8, 8, 6]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(y)))


def test_pk_batches_hold_p_classes_of_k_distinct_items() -> None:
    y = labels_with_sizes([6, 6, 5, 9, 4, 8, 1, 7])  # class 16 has one item: it can give no positive
    sampler = PKBatches(y, batch_size=12, per_class=4)
    batches = sampler.batches(np.random.default_rng(0))
    assert len(batches) == len(sampler) == int(np.ceil(len(y) / 12))
    seen = set()
    for b in batches:
        classes, counts = np.unique(y[b], return_counts=True)
        assert len(classes) == 3 and (counts == 4).all()  # P = 12 // 4 classes, K = 4 items each
        assert len(set(b.tolist())) == 12  # every class here has >= 4 items: no repeats
        assert 16 not in classes
        seen |= set(classes.tolist())
    again = sampler.batches(np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip(batches, again))  # seeded
    assert len(seen) > 3  # classes are drawn anew per batch


def test_with_few_classes_every_batch_holds_all_of_them_and_k_grows() -> None:
    y = labels_with_sizes([10, 10, 10])
    sampler = PKBatches(y, batch_size=12, per_class=2)  # 12 // 2 = 6 classes wanted, 3 exist
    assert (sampler.classes_per_batch, sampler.per_class) == (3, 4)
    for b in sampler.batches(np.random.default_rng(1)):
        assert np.unique(y[b], return_counts=True)[1].tolist() == [4, 4, 4]


def test_composition_stats_by_hand() -> None:
    # three classes with centroids 0, 1 and 3 on a line (two items each)
    v = np.array([[-0.5], [0.5], [1.0], [1.0], [2.0], [4.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    table = confusable_classes(v, y, 2)
    assert table.tolist() == [[0, 1], [1, 0], [2, 1]]
    stats = composition_stats(v, y, table)
    assert stats["neighbour_centroid_d2"] == pytest.approx((1 + 1 + 4) / 3)
    assert stats["centroid_d2"] == pytest.approx(2 * (1 + 9 + 4) / 6)
    assert (stats["classes"], stats["classes_per_batch"]) == (3, 2)


def test_a_class_smaller_than_k_gives_all_its_items_then_repeats() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    groups = ClassGroups.of(y)
    items = groups.draw(np.array([0, 0, 1, 2]), 4, np.random.default_rng(1))  # class 0 has 3 items
    for row, c in zip(items, [0, 0, 1, 2]):
        assert (y[row] == c).all()
    for row in items[:2]:
        assert set(row.tolist()) == {0, 1, 2}  # all three, one repeated
    assert len(set(items[2].tolist())) == 4 and len(set(items[3].tolist())) == 4


def test_confusable_classes_match_brute_force_centroid_neighbours() -> None:
    rng = np.random.default_rng(5)
    y = labels_with_sizes([4, 6, 3, 5, 7, 4, 1, 5, 6, 3], seed=1)
    v = rng.normal(size=(len(y), 6)).astype(np.float32) + 0.5 * rng.normal(size=(20, 6))[y - 10].astype(np.float32)
    table = confusable_classes(v, y, 4)
    want = brute_neighbours(v, y, 4)
    assert table.shape == (9, 4)  # class 16 (one item) has no row
    assert {int(r[0]): r.tolist() for r in table} == want


def test_composed_batches_are_a_class_and_its_nearest_classes() -> None:
    rng = np.random.default_rng(2)
    y = labels_with_sizes([8] * 12, seed=2)
    v = rng.normal(size=(len(y), 5)).astype(np.float32) + rng.normal(size=(12, 5))[y - 10].astype(np.float32)
    want = brute_neighbours(v, y, 4)
    sampler = ConfusableClassBatches(y, 16, 4, confusable_classes(v, y, 4))
    assert sampler.classes_per_batch == 4 and sampler.per_class == 4
    rows = {frozenset(r) for r in want.values()}
    for b in sampler.batches(np.random.default_rng(7)):
        classes, counts = np.unique(y[b], return_counts=True)
        assert frozenset(classes.tolist()) in rows and (counts == 4).all()


def test_seed_weights_by_hand_and_the_seeds_follow_them() -> None:
    # classes 10, 11 close together, 12 far: rows (10, 11), (11, 10), (12, 11)
    y = np.repeat([10, 11, 12], 2)
    v = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [4, 0], [4, 0]], np.float32)
    table = confusable_classes(v, y, 2)
    assert table.tolist() == [[10, 11], [11, 10], [12, 11]]
    d2 = np.array([1.0, 1.0, 9.0])
    np.testing.assert_allclose(seed_weights(v, y, table, 1.0), (d2 / d2.mean()) ** -1.0)
    np.testing.assert_allclose(seed_weights(v, y, table, 0.0), [1.0, 1.0, 1.0])
    sampler = ConfusableClassBatches(y, 4, 2, table, seed_weights(v, y, table, 1.0))
    np.testing.assert_allclose(sampler.seed_p, [9 / 19, 9 / 19, 1 / 19])  # 1/1 : 1/1 : 1/9
    counts = np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(4000):
        counts[sampler.choose_classes(1, rng)[0, 0]] += 1
    np.testing.assert_allclose(counts / counts.sum(), [9 / 19, 9 / 19, 1 / 19], atol=0.02)
    # without weights the seeds stay uniform, drawn as before
    plain = ConfusableClassBatches(y, 4, 2, table)
    assert plain.seed_p is None
    np.testing.assert_array_equal(plain.choose_classes(5, np.random.default_rng(3)),
                                  plain.table[np.random.default_rng(3).integers(0, 3, size=5)])


@pytest.mark.parametrize("make, message", [
    (lambda y: PKBatches(y, 12, 1), "per_class must be an integer >= 2"),
    (lambda y: PKBatches(y, 6, 4), r"batch_size \(6\) must hold at least 2 classes"),
    (lambda y: PKBatches(np.array([0, 0, 1]), 4, 2), "at least 2 classes with 2 or more items"),
    (lambda y: ConfusableClassBatches(y, 8, 2, np.array([10, 11, 12])), r"must be a \(classes, >= 3\) table"),
    (lambda y: ConfusableClassBatches(y, 8, 2, np.array([[10, 11, 12], [11, 10, 12]])),
     r"has no row for classes \[12\]"),
    (lambda y: ConfusableClassBatches(y, 4, 2, np.array([[10, 11], [11, 12], [12, 11]]), np.array([1.0, -1.0, 1.0])),
     r"seed_weights must be \(3,\) finite weights >= 0"),
    (lambda y: make_batch_sampler("classes", y, 8, 2), "batching must be one of random, pk, got 'classes'"),
])
def test_bad_batching_is_refused(make, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make(labels_with_sizes([4, 4, 4]))


# ------------------------------------------------------------------------------------------- mixing
class Lookup(nn.Module):
    """A model whose input is an item's fixed vector: embeds (B, D) -> normalised (B, D); counts rows embedded."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.rows_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen.append(len(x))
        return F.normalize(x * self.scale, dim=1)


def hand_triplet(e: np.ndarray, a: int, p: int, n: int, m: float) -> float:
    return max(0.0, float(((e[a] - e[p]) ** 2).sum() - ((e[a] - e[n]) ** 2).sum()) + m)


@pytest.mark.parametrize("miner_name", ["batch-hard", "semihard"])
def test_mixed_loss_is_mined_mean_plus_weighted_in_batch_mean(miner_name: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    batch = tp.triplets([0, 3, 0, 7], [1, 4, 2, 8], [4, 0, 9, 5])  # items 0 (3x) and 4 (2x) repeat
    model = Lookup()
    miner = BatchHardMiner() if miner_name == "batch-hard" else SemiHardMiner(0.3)
    loss, terms = mixed_loss(model, torch.from_numpy(x), torch.from_numpy(y), batch, miner, TripletLoss(0.3), 0.7)

    assert model.rows_seen == [9]  # the 9 distinct items of 12 slots, embedded once
    e = x / np.linalg.norm(x, axis=1, keepdims=True)
    mined = [hand_triplet(e, a, p, n, 0.3) for a, p, n in zip(batch.first, batch.second, batch.third)]
    items = sorted(set(np.concatenate([batch.first, batch.second, batch.third]).tolist()))
    d2 = {(i, j): float(((e[i] - e[j]) ** 2).sum()) for i in items for j in items}
    inbatch = []
    for a in items:
        pos = [j for j in items if j != a and y[j] == y[a]]
        neg = [j for j in items if y[j] != y[a]]
        if miner_name == "batch-hard":
            if pos and neg:
                p = max(pos, key=lambda j: d2[a, j])
                inbatch.append(hand_triplet(e, a, p, min(neg, key=lambda j: d2[a, j]), 0.3))
        else:
            for p in pos:
                band = [j for j in neg if d2[a, p] < d2[a, j] < d2[a, p] + 0.3]
                if band:
                    inbatch.append(hand_triplet(e, a, p, min(band, key=lambda j: d2[a, j]), 0.3))
    assert len(inbatch) > 0
    # terms: the mined ones in batch order, then the in-batch ones by (anchor, positive) item index
    np.testing.assert_allclose(terms.detach().numpy(), mined + inbatch, atol=1e-5)
    np.testing.assert_allclose(float(loss.detach()), np.mean(mined) + 0.7 * np.mean(inbatch), atol=1e-5)
    loss.backward()
    assert model.scale.grad is not None


def test_mixed_loss_without_in_batch_triplets_is_the_mined_mean() -> None:
    x = np.eye(4, dtype=np.float32)
    y = np.array([0, 1, 2, 3])  # no class twice: the in-batch miner finds nothing
    batch = tp.triplets([0], [0], [1])
    loss, terms = mixed_loss(Lookup(), torch.from_numpy(x), torch.from_numpy(y), batch, BatchHardMiner(),
                             TripletLoss(0.5), 2.0)
    assert terms.shape == (1,)
    np.testing.assert_allclose(float(loss.detach()), max(0.0, 0.0 - 2.0 + 0.5), atol=1e-6)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("values, message", [
    ({"batching": "classes"}, "batching must be one of random, pk, got 'classes'"),
    ({"global_batches": "items"}, "global_batches must be one of tuples, classes"),
    ({"batching": "pk", "per_class": 4, "batch_size": 7}, r"batch_size \(7\) must hold at least 2 classes"),
    ({"global_batches": "classes", "per_class": 4, "batch_size": 7}, r"batch_size \(7\) must hold"),
    ({"per_class": 1}, "per_class must be an integer >= 2"),
    ({"inbatch_mix": -0.5, "global_batches": "tuples"}, "inbatch_mix must be a finite number >= 0"),
    ({"inbatch_mix": 0.5, "mining": "in-batch"}, "'inbatch_mix' in the config is an option of recipe 'mined-tuples', "
                                                 "not of the chosen recipe 'in-batch'"),
    ({"inbatch_mix": 0.5, "global_batches": "classes"}, "an option of recipe 'mined-tuples', not of the chosen "
                                                        "recipe 'class-batches'"),
    ({"inbatch_strategy": "hardest"}, "inbatch_strategy must be one of batch-hard, semihard"),
    ({"seed_hardness": -1.0}, "seed_hardness must be a finite number >= 0"),
    ({"seed_hardness": 1.0, "mining": "in-batch"}, "an option of recipe 'class-batches', not of the chosen recipe "
                                                   "'in-batch'"),
    ({"strategy": "hardest"}, "'strategy' in the config is an option of recipe 'mined-tuples' and 'in-batch', not "
                              "of the chosen recipe 'class-batches'"),
    ({"positive_aware": 0.9, "near_duplicate": 0.1}, "'positive_aware' in the config is an option of recipe "
                                                     "'mined-tuples'"),
])
def test_impossible_lever_values_name_the_field(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig.from_dict(values)


def test_lever_flags_fill_the_config() -> None:
    from hardneg.cli import build_parser
    from hardneg.trainer.cli import _given

    args = build_parser().parse_args(["train", "--global-batches", "classes", "--batching", "pk", "--per-class", "8",
                                      "--inbatch-strategy", "batch-hard", "--warmup-epochs", "2", "--refresh-every",
                                      "3", "--seed-hardness", "1.5"])
    cfg = TrainConfig.from_sources(None, _given(args))
    assert (cfg.recipe.name, cfg.recipe.batching, cfg.recipe.per_class) == ("class-batches", "pk", 8)
    assert cfg.recipe.seed_hardness == 1.5
    assert (cfg.recipe.inbatch_strategy, cfg.warmup_epochs, cfg.refresh_every) == ("batch-hard", 2, 3)
    args = build_parser().parse_args(["train", "--global-batches", "tuples", "--inbatch-mix", "0.25", "--strategy",
                                      "window", "--window-skip", "2", "--positive-aware", "0.9"])
    cfg = TrainConfig.from_sources(None, _given(args))
    assert (cfg.recipe.name, cfg.recipe.inbatch_mix, cfg.recipe.miner.strategy) == ("mined-tuples", 0.25, "window")
    assert (cfg.recipe.miner.window_skip, cfg.recipe.miner.positive_aware) == (2, 0.9)


# ------------------------------------------------------------------------------------------- in the loop
def write_blobs(path: Path, per_class: int, seed: int) -> str:
    """8 Gaussian classes in 16-d (fixed centres), ``per_class`` items each, as an npz data source."""
    centres = np.random.default_rng(0).normal(size=(8, 16))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(8), per_class)
    np.savez(path, x=(centres[y] + 0.8 * rng.normal(size=(len(y), 16))).astype(np.float32), y=y)
    return f"npz:{path}"


def composed_config(tmp_path: Path, name: str, epochs: int, **changes: object) -> TrainConfig:
    return TrainConfig.from_dict({**changes,
        "data": write_blobs(tmp_path / "train.npz", 12, 1), "eval_data": write_blobs(tmp_path / "eval.npz", 5, 2),
        "recipe": "class-batches", "batching": "pk", "per_class": 4, "batch_size": 16, "inbatch_strategy": "semihard",
        "warmup": "in-batch", "refresh_every": 2, "epochs": epochs, "embedding_dim": 8, "hidden_dim": 32,
        "store": str(tmp_path / f"store_{name}"), "run_dir": str(tmp_path / name)})


def test_global_run_composes_batches_from_its_snapshot_and_resumes_them(tmp_path: Path) -> None:
    trainer = Trainer.create(composed_config(tmp_path, "full", 3))
    trainer.run()
    hist = trainer.state.history
    # class composition mines no triplets; its refresh records how near the batch neighbours are
    assert [r["mining"] is not None for r in hist] == [False, False, True, False]
    stats = hist[2]["mining"]
    assert (stats["classes"], stats["classes_per_batch"]) == (8, 4)
    assert stats["neighbour_centroid_d2"] < stats["centroid_d2"]
    for r in hist[1:]:  # the totals, and each phase that ran within them
        assert set(r["timing"]) >= {"refresh_s", "train_s", "refresh_cpu_s", "train_cpu_s", "forward_s", "eval_s"}
        phases = sum(v for k, v in r["timing"].items() if k.endswith("_s") and not k.endswith("cpu_s")
                     and k not in ("refresh_s", "train_s", "eval_s"))
        assert phases <= r["timing"]["refresh_s"] + r["timing"]["train_s"] + 1e-3
    assert "embed_s" in hist[2]["timing"] and "mine_s" in hist[2]["timing"] and "embed_s" not in hist[3]["timing"]
    assert [r["snapshot"] is not None for r in hist] == [False, False, True, False]  # one refresh, before epoch 2

    # The table epochs 2 and 3 trained on: brute-force centroid neighbours in the snapshot published before epoch 2.
    store = SnapshotStore(trainer.cfg.store)
    snap = store.open(store.names()[0])
    assert snap.manifest["meta"]["epoch"] == 1
    want = brute_neighbours(snap.index.vectors_of(snap.index.ids), snap.index.labels, 4)
    assert {int(r[0]): r.tolist() for r in trainer.recipe.neighbours} == want
    plan = trainer.recipe.plan(3)
    assert isinstance(plan, ItemBatches) and isinstance(plan.sampler, ConfusableClassBatches)
    rows = {frozenset(r) for r in want.values()}
    y = trainer.splits.train.y
    for b in plan.sampler.batches(np.random.default_rng(0)):
        assert frozenset(np.unique(y[b]).tolist()) in rows

    # Stopped after epoch 2 and resumed, epoch 3 trains on the checkpointed table: the same results.
    Trainer.create(composed_config(tmp_path, "cut", 2)).run()
    resumed = Trainer.resume(tmp_path / "cut", {"epochs": 3})
    np.testing.assert_array_equal(resumed.recipe.neighbours, trainer.recipe.neighbours)
    resumed.run()
    key = [(r["epoch"], r["step"], r["loss"], r["metrics"], r["train"]) for r in hist]
    assert [(r["epoch"], r["step"], r["loss"], r["metrics"], r["train"]) for r in resumed.state.history] == key


def test_hardness_weighted_seeds_come_from_the_snapshot_and_resume(tmp_path: Path) -> None:
    trainer = Trainer.create(composed_config(tmp_path, "full", 3, seed_hardness=2.0))
    trainer.run()
    store = SnapshotStore(trainer.cfg.store)
    snap = store.open(store.names()[0])  # published before epoch 2
    vectors, labels = snap.index.vectors_of(snap.index.ids), snap.index.labels
    brute = brute_neighbours(vectors, labels, 4)
    centroid = {c: vectors[labels == c].astype(np.float64).mean(0) for c in brute}
    d2 = np.array([np.mean([((centroid[c] - centroid[o]) ** 2).sum() for o in brute[c][1:]]) for c in sorted(brute)])
    np.testing.assert_allclose(trainer.recipe.seed_weights, (d2 / d2.mean()) ** -2.0, rtol=1e-5)
    Trainer.create(composed_config(tmp_path, "cut", 2, seed_hardness=2.0)).run()
    resumed = Trainer.resume(tmp_path / "cut", {"epochs": 3})
    np.testing.assert_array_equal(resumed.recipe.seed_weights, trainer.recipe.seed_weights)
    resumed.run()
    key = [(r["epoch"], r["step"], r["loss"], r["metrics"]) for r in trainer.state.history]
    assert [(r["epoch"], r["step"], r["loss"], r["metrics"]) for r in resumed.state.history] == key
