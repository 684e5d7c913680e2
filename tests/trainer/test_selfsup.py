"""Self-supervised mode's parts: NT-Xent per view by hand, label-free mining against brute-force numpy,
batch composition, and the options' validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hardneg.miner.distances import get_distance
from hardneg.miner.errors import ValidationError
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import ArrayDataset, load_splits
from hardneg.trainer.losses import nt_xent_loss
from hardneg.trainer.batching import RandomBatches
from hardneg.trainer.losses import TripletLoss
from hardneg.trainer.recipes.base import RecipeContext, TrainData
from hardneg.trainer.recipes.simclr import SimCLR
from hardneg.trainer.selfsup import NegativeMining, compose_batches, mine_negatives


# -------------------------------------------------------------------------------------------- NT-Xent
def test_nt_xent_per_view_terms_by_hand() -> None:
    # Views, t = 1: a = e1, b = e2 (z1), c = e1, d = (e1 + e2)/√2 (z2); positives a-c and b-d; s = 1/√2.
    # a: sims to (b, c, d) = (0, 1, s), positive c -> -log(e / (1 + e + e^s))   = log(1 + e^-1 + e^(s-1))
    # b: sims to (a, c, d) = (0, 0, s), positive d -> -log(e^s / (2 + e^s))     = log(1 + 2·e^-s)
    # c: sims to (a, b, d) = (1, 0, s), positive a -> same as a
    # d: sims to (a, b, c) = (s, s, s), positive b -> -log(1/3)                 = log 3
    s = 1 / math.sqrt(2)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 0.0], [s, s]], dtype=torch.float64)
    a = math.log(1 + math.exp(-1) + math.exp(s - 1))
    expected = [a, math.log(1 + 2 * math.exp(-s)), a, math.log(3)]
    np.testing.assert_allclose(nt_xent_loss(z1, z2, 1.0, reduction="none").numpy(), expected, atol=1e-12)
    assert nt_xent_loss(z1, z2, 1.0).item() == pytest.approx(sum(expected) / 4, abs=1e-12)


def test_nt_xent_temperature_scales_the_logits_by_hand() -> None:
    # Same views at t = 0.5: view d sees three equal logits s/t, still log 3; view b: log(1 + 2·e^(-s/t)).
    s = 1 / math.sqrt(2)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 0.0], [s, s]], dtype=torch.float64)
    terms = nt_xent_loss(z1, z2, 0.5, reduction="none").numpy()
    assert terms[1] == pytest.approx(math.log(1 + 2 * math.exp(-s / 0.5)), abs=1e-12)
    assert terms[3] == pytest.approx(math.log(3), abs=1e-12)


# ---------------------------------------------------------------------------------------------- mining
def brute_force_negatives(x: np.ndarray, m: NegativeMining) -> tuple[np.ndarray, dict]:
    """numpy reference: per image, the other images by d², the nearest ``skip`` dropped, then the next
    ``candidates`` filtered by the near-duplicate floor and the cosine ceiling, in order."""
    cos = get_distance("cosine")
    d2 = cos.pairwise(cos.prepare(x), cos.prepare(x))
    n = len(x)
    table = np.full((n, m.candidates), -1, np.int64)
    counts = {"skipped": 0, "near_duplicate": 0, "max_similarity": 0}
    for i in range(n):
        order = [j for j in np.argsort(d2[i], kind="stable") if j != i]
        counts["skipped"] += len(order[:m.skip])
        kept = []
        for j in order[m.skip:m.skip + m.candidates]:
            if m.near_duplicate is not None and d2[i, j] < m.near_duplicate:
                counts["near_duplicate"] += 1
            elif m.max_similarity is not None and 1 - d2[i, j] / 2 > m.max_similarity:
                counts["max_similarity"] += 1
            else:
                kept.append(j)
        table[i, :len(kept)] = kept
    return table, counts


@pytest.mark.parametrize("mining", [
    NegativeMining(candidates=6, skip=0, max_similarity=None, near_duplicate=None),
    NegativeMining(candidates=8, skip=3, max_similarity=0.9, near_duplicate=None),
    NegativeMining(candidates=10, skip=2, max_similarity=0.95, near_duplicate=0.02),
])
def test_mined_negatives_equal_brute_force(clusters, mining: NegativeMining) -> None:
    # 3 tight clusters in 8-D: an image's nearest neighbours are its cluster mates, and the guards have work.
    data = clusters(120, 8, 3, seed=1, spread=0.15, shuffle_ids=False)
    mined = mine_negatives(data.vectors, mining)
    table, counts = brute_force_negatives(data.vectors, mining)
    np.testing.assert_array_equal(mined.table, table)
    st = mined.stats
    assert st["skipped"] == counts["skipped"]
    for guard in ("near_duplicate", "max_similarity"):
        assert st["dropped"].get(guard, 0) == counts[guard]
    assert st["kept"] == int((table >= 0).sum())
    assert st["images_without_negatives"] == int((table < 0).all(1).sum())
    if mining.max_similarity is not None:
        assert counts["max_similarity"] > 0, "the ceiling must have dropped something for this test to mean much"


def test_mining_few_images_pads_the_table() -> None:
    # 4 images, skip 1, 5 candidates wanted: only 2 others remain after the skip.
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0.2]], np.float32)
    mined = mine_negatives(x, NegativeMining(candidates=5, skip=1, max_similarity=None, near_duplicate=None))
    table, _ = brute_force_negatives(x, NegativeMining(candidates=5, skip=1, max_similarity=None,
                                                        near_duplicate=None))
    np.testing.assert_array_equal(mined.table, table)
    assert (mined.table[:, 2:] == -1).all() and (mined.table[:, :2] >= 0).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"candidates": 0}, "ssl_candidates must be an integer >= 1"),
    ({"skip": -1}, "ssl_skip must be an integer >= 0"),
    ({"max_similarity": 1.5}, "ssl_max_similarity must be a cosine similarity"),
    ({"near_duplicate": 4.0}, "ssl_near_duplicate must be a d² threshold"),
])
def test_bad_mining_options_are_refused(kwargs: dict, match: str) -> None:
    base = {"candidates": 4, "skip": 0, "max_similarity": None, "near_duplicate": None}
    with pytest.raises(ValidationError, match=match):
        NegativeMining(**{**base, **kwargs})


def test_mining_needs_two_images() -> None:
    with pytest.raises(ValidationError, match="n >= 2"):
        mine_negatives(np.ones((1, 4), np.float32), NegativeMining(4, 0, None, None))


# ---------------------------------------------------------------------------------------------- batches
def clique_table(groups: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images in cliques of ``size`` (image order shuffled); each lists its clique mates (shuffled) as candidates.

    Returns the table (n, size - 1 + 2), padded with two -1 columns, and the clique of each image (n,)."""
    rng = np.random.default_rng(seed)
    n = groups * size
    clique = rng.permutation(np.repeat(np.arange(groups), size))
    table = np.full((n, size + 1), -1, np.int64)
    for i in range(n):
        mates = np.flatnonzero((clique == clique[i]) & (np.arange(n) != i))
        table[i, :size - 1] = rng.permutation(mates)
    return table, clique


def assert_partition(batches: list[np.ndarray], n: int, batch_size: int) -> None:
    every = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(every), np.arange(n))  # each image exactly once
    assert max(len(b) for b in batches) <= batch_size


@pytest.mark.parametrize("groups, size, batch_size", [(25, 4, 16), (30, 3, 7), (8, 2, 2)])
def test_composed_batches_keep_each_seed_with_its_negatives(groups: int, size: int, batch_size: int) -> None:
    table, clique = clique_table(groups, size)
    batches = compose_batches(table, size - 1, batch_size, np.random.default_rng(3))
    assert_partition(batches, groups * size, batch_size)
    # Whichever member seeds a clique takes all its mates: every clique lies inside one batch.
    where = np.empty(groups * size, np.int64)
    for k, b in enumerate(batches):
        where[b] = k
    for c in range(groups):
        assert len(set(where[clique == c].tolist())) == 1, f"clique {c} was split across batches"


def test_composed_groups_take_per_anchor_negatives_at_random() -> None:
    # A seed with 6 candidates and per_anchor 2 takes 2 of them; over epochs the draws vary.
    table, clique = clique_table(1, 7)
    firsts = set()
    for seed in range(12):
        batches = compose_batches(table, 2, 3, np.random.default_rng(seed))
        assert_partition(batches, 7, 3)
        first = batches[0]
        assert len(first) == 3 and set(first[1:].tolist()) <= set(table[first[0]].tolist())
        firsts.add(tuple(sorted(first.tolist())))
    assert len(firsts) > 3


def test_composition_is_seeded() -> None:
    table, _ = clique_table(20, 4)
    a = compose_batches(table, 3, 16, np.random.default_rng(5))
    b = compose_batches(table, 3, 16, np.random.default_rng(5))
    c = compose_batches(table, 3, 16, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_images_without_candidates_still_train_once() -> None:
    table = np.full((10, 3), -1, np.int64)
    table[0, :2] = [5, 7]
    batches = compose_batches(table, 2, 4, np.random.default_rng(0))
    assert_partition(batches, 10, 4)


def test_composition_refuses_a_batch_too_small_for_a_group() -> None:
    with pytest.raises(ValidationError, match="batch_size >= 4"):
        compose_batches(np.full((5, 3), -1, np.int64), 3, 2, np.random.default_rng(0))


def test_random_batches_are_a_permutation() -> None:
    batches = RandomBatches.chunks(103, 10, np.random.default_rng(0))
    assert_partition(batches, 103, 10)
    assert [len(b) for b in batches] == [10] * 10 + [3]


# ---------------------------------------------------------------------------------------- options, data
def test_mode_and_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="mode must be one of supervised, self-supervised"):
        TrainConfig.from_dict({"mode": "simclr"})
    ssl = {"mode": "self-supervised"}
    with pytest.raises(ValidationError, match="ssl_negatives must be one of mined, in-batch"):
        TrainConfig.from_dict({**ssl, "ssl_negatives": "hard"})
    with pytest.raises(ValidationError, match="temperature must be a number > 0"):
        TrainConfig.from_dict({**ssl, "temperature": 0.0})
    with pytest.raises(ValidationError, match="aug_flip must be a probability"):
        TrainConfig.from_dict({"recipe": "simclr", "aug_flip": -0.5})
    with pytest.raises(ValidationError, match="ssl_max_similarity"):
        TrainConfig.from_dict({"recipe": "simclr", "simclr": {"max_similarity": 2.0}})
    with pytest.raises(ValidationError, match="'temperature' in the config is an option of recipe 'simclr'"):
        TrainConfig.from_dict({"temperature": 0.1})  # a supervised recipe's run
    with pytest.raises(ValidationError, match="batch_size >= 4"):
        TrainConfig.from_dict({"mode": "self-supervised", "ssl_per_anchor": 3, "batch_size": 3})
    # supervised-only constraints do not bind self-supervised runs: one epoch, no warm-up left over
    assert TrainConfig.from_dict({"mode": "self-supervised", "epochs": 1}).warmup_epochs == 1


def simclr_on(cfg: TrainConfig, ds: ArrayDataset) -> SimCLR:
    data = TrainData(torch.from_numpy(ds.x), torch.from_numpy(ds.y), ds.y)
    return SimCLR(RecipeContext(cfg, data, TripletLoss(cfg.margin)))


def test_self_supervised_runs_need_images() -> None:
    cfg = TrainConfig.from_dict({"mode": "self-supervised"})
    vectors = ArrayDataset(np.zeros((10, 5), np.float32), np.zeros(10, np.int64), "vectors")
    with pytest.raises(ValidationError, match="augments images"):
        simclr_on(cfg, vectors)
    one = ArrayDataset(np.zeros((1, 1, 8, 8), np.float32), np.zeros(1, np.int64), "one image")
    with pytest.raises(ValidationError, match="at least 2 training images"):
        simclr_on(cfg, one)


def test_unlabelled_training_data_is_accepted_only_in_self_supervised_mode(tmp_path) -> None:
    # One constant label (no labels at all) trains in self-supervised mode; supervised mode needs 2 classes.
    x = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.zeros(40, np.int64))
    np.savez(tmp_path / "eval.npz", x=x[:10], y=np.arange(10) % 2)
    common = {"data": f"npz:{tmp_path / 'train.npz'}", "eval_data": f"npz:{tmp_path / 'eval.npz'}"}
    splits = load_splits(TrainConfig.from_dict({**common, "mode": "self-supervised"}))
    assert len(splits.train) == 40
    with pytest.raises(ValidationError, match="at least 2 classes"):
        load_splits(TrainConfig.from_dict(common))
