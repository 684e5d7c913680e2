"""A recipe's in-batch miner, the loss and the recipe itself can be passed to the trainer as objects.

Reference: the same run with the parts the config names. An object that does what the named part does must
give the identical run; a counting wrapper shows it was the one called.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from hardneg.trainer.config import TrainConfig
from hardneg.trainer.inbatch import SemiHardMiner, Triplets
from hardneg.trainer.losses import ContrastiveLoss
from hardneg.trainer.loop import Parts, Trainer
from hardneg.trainer.recipes.in_batch import InBatch


def blobs(path: Path, per_class: int, seed: int) -> str:
    centres = np.random.default_rng(0).normal(size=(6, 10))
    y = np.repeat(np.arange(6), per_class)
    x = centres[y] + 0.8 * np.random.default_rng(seed).normal(size=(len(y), 10))
    np.savez(path, x=x.astype(np.float32), y=y)
    return f"npz:{path}"


def config(tmp_path: Path, name: str, **changes: object) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": blobs(tmp_path / "train.npz", 10, 1), "eval_data": blobs(tmp_path / "eval.npz", 4, 2),
        "recipe": "in-batch", "batch_size": 16, "per_class": 4, "epochs": 2, "embedding_dim": 8, "hidden_dim": 16,
        "store": str(tmp_path / f"store_{name}"), "run_dir": str(tmp_path / name), **changes})


class Counting:
    """A miner that counts its calls and delegates to ``inner``."""

    def __init__(self, inner: SemiHardMiner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        self.calls += 1
        return self.inner(embeddings, labels)


def results(trainer: Trainer) -> list[tuple]:
    return [(r["epoch"], r["step"], r["loss"], r["metrics"], r["train"]) for r in trainer.state.history]


def test_a_miner_object_replaces_the_named_one(tmp_path: Path) -> None:
    named = Trainer.create(config(tmp_path, "named"))
    named.run()
    miner = Counting(SemiHardMiner(0.2))
    given = Trainer.create(config(tmp_path, "given"), parts=Parts(miner=miner))
    given.run()
    assert miner.calls == given.state.step == named.state.step > 0  # one call per step, none left to the default
    assert results(given) == results(named)


def test_a_loss_and_a_recipe_object_replace_the_named_ones(tmp_path: Path) -> None:
    named = Trainer.create(config(tmp_path, "named", loss="contrastive"))
    named.run()
    miner = Counting(SemiHardMiner(0.2))
    parts = Parts(recipe=functools.partial(InBatch, miner=miner), loss=ContrastiveLoss(0.2))
    given = Trainer.create(config(tmp_path, "given"), parts=parts)  # the config names the triplet loss
    given.run()
    assert isinstance(given.recipe, InBatch) and miner.calls == given.state.step
    assert results(given) == results(named)
