"""Epochs shared by several recipes: the warm-up before the first snapshot, and random tuples."""

from __future__ import annotations

import numpy as np

from hardneg.trainer import tuples as tp
from hardneg.trainer.batching import make_batch_sampler
from hardneg.trainer.inbatch import TripletMiner, make_inbatch_miner
from hardneg.trainer.recipes.base import RANDOM_TUPLES, Epoch, ItemBatches, Recipe, RecipeContext, TupleBatches
from hardneg.trainer.recipes.settings import ItemBatchSettings, WarmupSettings
from hardneg.trainer.refresh import seed_for


def random_tuples(ctx: RecipeContext, epoch: int) -> TupleBatches:
    """One random triplet per item (pairs for a pair loss), drawn from ``epoch``'s own stream."""
    rng = np.random.default_rng(seed_for(ctx.cfg.seed, epoch, RANDOM_TUPLES))
    return TupleBatches(ctx, ctx.loss.tuples(tp.random_triplets(ctx.data.labels, rng)))


def item_batches(ctx: RecipeContext, settings: ItemBatchSettings, miner: TripletMiner) -> ItemBatches:
    """``settings``' item batches (random or P x K) mined in-batch by ``miner``."""
    sampler = make_batch_sampler(settings.batching, ctx.data.labels, ctx.cfg.batch_size, settings.per_class)
    return ItemBatches(ctx, sampler, miner)


class Warmup:
    """What trains before the first snapshot: in-batch mining over item batches, or random tuples."""

    def __init__(self, ctx: RecipeContext, settings: WarmupSettings, miner: TripletMiner) -> None:
        self.ctx = ctx
        self.inbatch = item_batches(ctx, settings, miner) if settings.warmup == "in-batch" else None

    def plan(self, epoch: int) -> Epoch:
        return self.inbatch if self.inbatch is not None else random_tuples(self.ctx, epoch)


class SnapshotRecipe(Recipe):
    """A recipe whose batches come from the latest snapshot, with the warm-up before the first one.

    ``miner`` replaces the in-batch miner the recipe names in its settings (``inbatch_strategy``),
    ``warmup_miner`` the warm-up's (``warmup_strategy``).
    """

    def __init__(self, ctx: RecipeContext, miner: TripletMiner | None = None,
                 warmup_miner: TripletMiner | None = None) -> None:
        super().__init__(ctx)
        self.settings: WarmupSettings = ctx.cfg.recipe  # type: ignore[assignment]
        margin = ctx.cfg.margin
        self.warmup = Warmup(ctx, self.settings, warmup_miner or make_inbatch_miner(self.settings.warmup_strategy,
                                                                                    margin))
        self.given_miner = miner

    def inbatch_miner(self, strategy: str) -> TripletMiner:
        """The given miner, or the registered one named ``strategy``."""
        return self.given_miner or make_inbatch_miner(strategy, self.ctx.cfg.margin)
