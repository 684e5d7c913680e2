"""``random-tuples``: a random triplet per item each epoch (pairs for the contrastive loss); no mining."""

from __future__ import annotations

from hardneg.trainer.recipes.base import Epoch, Recipe
from hardneg.trainer.recipes.warmup import random_tuples


class RandomTuples(Recipe):
    name = "random-tuples"

    def plan(self, epoch: int) -> Epoch:
        return random_tuples(self.ctx, epoch)
