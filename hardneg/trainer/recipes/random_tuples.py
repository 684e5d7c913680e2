"""``random-tuples``: a random triplet per item each epoch (pairs for the contrastive loss); no mining."""

from __future__ import annotations

import numpy as np

from hardneg.trainer.recipes.base import Epoch, Recipe
from hardneg.trainer.recipes.warmup import random_tuples


class RandomTuples(Recipe):
    name = "random-tuples"

    def plan(self, epoch: int) -> Epoch:
        return random_tuples(self.ctx, epoch)

    def refresh_items(self, epoch: int) -> np.ndarray:
        return np.empty(0, np.int64)  # reads no snapshot: a refresh that publishes none has nothing to do
