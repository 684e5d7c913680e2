"""``mined-tuples``: global mining of tuples from each snapshot (:func:`hardneg.miner.mining.mine`).

Each refresh mines the triplets (pairs for a pair loss) the coming epochs train on, with the recipe's
:class:`~hardneg.miner.mining.MiningConfig` (its margin is the loss's, its seed drawn per refresh); under
torchrun every rank mines its share of the anchors (:mod:`hardneg.trainer.sharded_refresh`). With
``inbatch_mix > 0`` each batch also mines its items in-batch. Before the first snapshot the warm-up trains.
With ``exclude_suspects`` each refresh mines from the snapshot without its suspected label errors, so they are
never anchors, positives or negatives (:mod:`hardneg.trainer.suspects`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hardneg.trainer import tuples as tp
from hardneg.trainer.inbatch import TripletMiner
from hardneg.trainer.recipes.base import Epoch, RecipeContext, Snapshot, TupleBatches
from hardneg.trainer.recipes.settings import MinedTuplesSettings
from hardneg.trainer.recipes.warmup import SnapshotRecipe, random_tuples
from hardneg.trainer.refresh import mine_tuples
from hardneg.trainer.sharded_index import mine_shards
from hardneg.trainer.sharded_refresh import mine_sharded
from hardneg.trainer.suspects import without_suspects

log = logging.getLogger(__name__)


class MinedTuples(SnapshotRecipe):
    """Tuples mined from the latest snapshot; with ``inbatch_mix > 0`` each batch's items are mined in-batch too
    (``inbatch_strategy``, or the given ``miner``)."""

    name = "mined-tuples"

    def __init__(self, ctx: RecipeContext, miner: TripletMiner | None = None,
                 warmup_miner: TripletMiner | None = None) -> None:
        super().__init__(ctx, miner, warmup_miner)
        self.settings: MinedTuplesSettings  # type: ignore[assignment]
        mixes = self.settings.inbatch_mix > 0
        self.miner = self.inbatch_miner(self.settings.inbatch_strategy) if mixes else None
        self.tuples: tp.TupleSet | None = None  # the tuples of the current refresh window

    def refresh(self, model: nn.Module, snapshot: Snapshot) -> dict[str, Any] | None:
        ctx = self.ctx
        if snapshot.shard is None and not ctx.dist.enabled:
            return super().refresh(model, snapshot)
        index, excluded = self._mining_index(snapshot)
        if snapshot.shard is not None:  # a sharded index: every rank mines its block against every shard
            self.tuples, stats = mine_shards(snapshot.shard, ctx.cfg, snapshot.epoch)
        else:
            self.tuples, stats = mine_sharded(index, ctx.cfg, snapshot.epoch, ctx.dist)
        if excluded is not None:  # never anchors, positives or negatives (the miner's count: as negatives only)
            stats["suspects_excluded"] = excluded
        if ctx.dist.is_main:
            _report(snapshot, self.tuples, f" on {ctx.dist.world_size} ranks")
        return stats

    def compute_refresh(self, snapshot: Snapshot) -> tuple[dict[str, Any], dict[str, Any]]:
        index, excluded = self._mining_index(snapshot)
        tuples, stats = mine_tuples(index, self.ctx.cfg, snapshot.epoch)
        if excluded is not None:
            stats["suspects_excluded"] = excluded
        _report(snapshot, tuples)
        return {"tuples": tuples.to_state()}, stats

    def _mining_index(self, snapshot: Snapshot) -> tuple[Any, int | None]:
        """The snapshot's index, without its suspected label errors with ``exclude_suspects`` (and their count)."""
        cfg = self.ctx.cfg
        if cfg.exclude_suspects is None:
            return snapshot.index, None
        view = without_suspects(snapshot.index, cfg.exclude_suspects, self.ctx.dist, cfg.seed)
        return view.index, len(view.excluded)

    def plan(self, epoch: int) -> Epoch:
        if self.tuples is None:
            return self.warmup.plan(epoch)
        if not len(self.tuples):
            log.warning("epoch %d: the miner found no tuples; training on random ones instead", epoch)
            return random_tuples(self.ctx, epoch)
        return TupleBatches(self.ctx, self.tuples, self.miner, self.settings.inbatch_mix)

    def state_dict(self) -> dict[str, Any]:
        return {"tuples": None if self.tuples is None else self.tuples.to_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state.get("tuples")
        self.tuples = None if t is None else tp.TupleSet.from_state(t)


def _report(snapshot: Snapshot, tuples: tp.TupleSet, where: str = "") -> None:
    log.info("snapshot %s: mined %d %ss for epoch %d%s", snapshot.name, len(tuples), tuples.kind, snapshot.epoch,
             where)
