"""``in-batch``: a miner chooses triplets inside each batch of items (P x K or shuffled); no snapshot is read."""

from __future__ import annotations

import numpy as np

from hardneg.trainer.inbatch import TripletMiner, make_inbatch_miner
from hardneg.trainer.recipes.base import Epoch, Recipe, RecipeContext
from hardneg.trainer.recipes.settings import InBatchSettings
from hardneg.trainer.recipes.warmup import item_batches


class InBatch(Recipe):
    """``miner`` (default: the settings' ``strategy``) mines every batch of items."""

    name = "in-batch"

    def __init__(self, ctx: RecipeContext, miner: TripletMiner | None = None) -> None:
        super().__init__(ctx)
        settings: InBatchSettings = ctx.cfg.recipe  # type: ignore[assignment]
        miner = miner if miner is not None else make_inbatch_miner(settings.strategy, ctx.cfg.margin)
        self.batches_ = item_batches(ctx, settings, miner)

    def plan(self, epoch: int) -> Epoch:
        return self.batches_

    def refresh_items(self, epoch: int) -> np.ndarray:
        return np.empty(0, np.int64)  # reads no snapshot: a refresh that publishes none has nothing to do
