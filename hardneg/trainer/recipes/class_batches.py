"""``class-batches``: global mining at the class level (Suh et al. 2019; Harwood et al. 2017).

Each refresh finds every class's nearest classes by centroid distance in the snapshot
(:func:`~hardneg.trainer.batching.confusable_classes`), or, in a refresh that publishes no snapshot
(``publish_every``), in the embeddings of ``centroid_sample`` items of each class, drawn per refresh from the
seeded stream of (seed, epoch); until the next one, every batch is a class drawn
uniformly (or, with ``seed_hardness`` > 0, the more often the closer its nearest classes lie) and its P - 1
nearest classes, K items of each, mined in-batch (semi-hard by default). Before the first snapshot the
warm-up trains (:class:`~hardneg.trainer.recipes.warmup.Warmup`). With ``exclude_suspects`` each refresh
leaves the snapshot's suspected label errors out of the batches and the class centroids
(:mod:`hardneg.trainer.suspects`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hardneg.miner.distances import COSINE
from hardneg.trainer.batching import (
    ConfusableClassBatches, centroid_seed_weights, centroid_stats, check_class_batches, class_neighbours,
    class_sample, composition_stats, confusable_classes, seed_weights,
)
from hardneg.trainer.inbatch import TripletMiner
from hardneg.trainer.recipes.base import CENTROIDS, Epoch, ItemBatches, RecipeContext, Snapshot
from hardneg.trainer.recipes.settings import ClassBatchesSettings
from hardneg.trainer.recipes.warmup import SnapshotRecipe
from hardneg.trainer.refresh import seed_for
from hardneg.trainer.suspects import KeptItems, suspects_of


class ClassBatches(SnapshotRecipe):
    """Class batches from the latest snapshot, mined in-batch (``inbatch_strategy``, or the given ``miner``)."""

    name = "class-batches"

    def __init__(self, ctx: RecipeContext, miner: TripletMiner | None = None,
                 warmup_miner: TripletMiner | None = None) -> None:
        super().__init__(ctx, miner, warmup_miner)
        self.settings: ClassBatchesSettings  # type: ignore[assignment]
        self.miner = self.inbatch_miner(self.settings.inbatch_strategy)
        # the class batches are composed after the first refresh: refuse impossible P x K settings now
        check_class_batches(ctx.data.labels, ctx.cfg.batch_size, self.settings.per_class)
        self.neighbours: np.ndarray | None = None  # (C, P) class table of the current refresh window
        self.kept: np.ndarray | None = None  # exclude_suspects: the item indices the window's batches draw from
        self.seed_weights: np.ndarray | None = None  # (C,) seed-class weights of its rows (None: uniform)

    def compute_refresh(self, snapshot: Snapshot) -> tuple[dict[str, Any], dict[str, Any]]:
        from hardneg.miner.mining.miner import stored_vectors

        p, hardness = self.ctx.cfg.batch_size // self.settings.per_class, self.settings.seed_hardness
        state: dict[str, Any] = {}
        if snapshot.shard is not None:  # a sharded index: centroids from the ranks' per-class sums
            classes, centroids = snapshot.shard.class_centroids()
            neighbours = class_neighbours(classes, centroids, p)
            if hardness > 0:
                state["seed_weights"] = torch.from_numpy(centroid_seed_weights(classes, centroids, neighbours,
                                                                               hardness))
            return {"neighbours": torch.from_numpy(neighbours), **state}, centroid_stats(classes, centroids, neighbours)
        if snapshot.index is None:  # a sample's embeddings (refresh_items), prepared as a cosine snapshot stores them
            assert snapshot.embeddings is not None and snapshot.items is not None
            vectors, labels = COSINE.prepare(snapshot.embeddings), self.ctx.data.labels[snapshot.items]
            neighbours = confusable_classes(vectors, labels, p)
            stats = {**composition_stats(vectors, labels, neighbours), "centroid_items": len(snapshot.items)}
            return self._table_state(vectors, labels, neighbours, state), stats
        index, fraction = snapshot.index, self.ctx.cfg.exclude_suspects
        vectors, labels = stored_vectors(index), index.labels
        if fraction is not None:
            excluded = suspects_of(index, fraction, self.ctx.dist)
            keep = ~np.isin(index.ids, excluded)
            vectors, labels, state["kept"] = vectors[keep], labels[keep], torch.from_numpy(np.sort(index.ids[keep]))
        neighbours = confusable_classes(vectors, labels, p)
        stats = composition_stats(vectors, labels, neighbours)
        state = self._table_state(vectors, labels, neighbours, state)
        return state, stats if fraction is None else {**stats, "suspects_excluded": len(excluded)}

    def refresh_items(self, epoch: int) -> np.ndarray | None:
        """``centroid_sample`` items of each class, seeded by (seed, epoch); None (every item, in a snapshot)
        without a sample or when suspects are excluded (they come from the snapshot's index)."""
        if self.settings.centroid_sample is None or self.ctx.cfg.exclude_suspects is not None:
            return None
        rng = np.random.default_rng(seed_for(self.ctx.cfg.seed, epoch, CENTROIDS))
        return class_sample(self.ctx.data.labels, self.settings.centroid_sample, rng)

    def _table_state(self, vectors: np.ndarray, labels: np.ndarray, neighbours: np.ndarray,
                     state: dict[str, Any]) -> dict[str, Any]:
        """The class table ``neighbours`` found in ``vectors`` (m, d) of ``labels`` (m,), with its seed weights
        (``seed_hardness`` > 0) and what ``state`` already holds, as :meth:`load_state_dict` takes them."""
        if self.settings.seed_hardness > 0:
            state["seed_weights"] = torch.from_numpy(seed_weights(vectors, labels, neighbours,
                                                                  self.settings.seed_hardness))
        return {"neighbours": torch.from_numpy(neighbours), **state}

    def plan(self, epoch: int) -> Epoch:
        if self.neighbours is None:
            return self.warmup.plan(epoch)
        labels, kept = self.ctx.data.labels, self.kept
        sampler = ConfusableClassBatches(labels if kept is None else labels[kept], self.ctx.cfg.batch_size,
                                         self.settings.per_class, self.neighbours, self.seed_weights)
        return ItemBatches(self.ctx, sampler if kept is None else KeptItems(sampler, kept, labels), self.miner)

    def state_dict(self) -> dict[str, Any]:
        state = {"neighbours": None if self.neighbours is None else torch.from_numpy(self.neighbours)}
        if self.seed_weights is not None:
            state["seed_weights"] = torch.from_numpy(self.seed_weights)
        return state if self.kept is None else {**state, "kept": torch.from_numpy(self.kept)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t, kept, w = state.get("neighbours"), state.get("kept"), state.get("seed_weights")
        self.neighbours = None if t is None else t.numpy().astype(np.int64)
        self.kept = None if kept is None else kept.numpy().astype(np.int64)
        self.seed_weights = None if w is None else w.numpy()
