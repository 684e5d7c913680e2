"""The snapshot refresh, as its own unit: embed the training set -> publish a snapshot -> mine from it.

Kept apart from the epoch loop because a distributed run splits it differently (each rank embeds its
shard with :func:`embed_items`, one rank publishes with :meth:`SnapshotPublisher.publish`, every rank mines
or receives the mined tuples), and a self-supervised mode mines without labels.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hardneg.miner.index import VectorIndex
from hardneg.miner.model_io import export_model
from hardneg.miner.store import MODEL_FILE, SnapshotStore
from hardneg.trainer import tuples as tp
from hardneg.trainer.config import TrainConfig

log = logging.getLogger(__name__)


def embed_items(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """Embed ``x`` (n, *input_shape), already on the model's device, in eval mode without gradients: (n, d) float32."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [model(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy()


def seed_for(seed: int, epoch: int, purpose: int) -> np.random.SeedSequence:
    """The seed of one epoch's randomness for one purpose: runs and resumed runs draw the same numbers."""
    return np.random.SeedSequence([seed, epoch, purpose])


def mining_seed(seed: int, epoch: int, shard: int = 0) -> int:
    """The miner's seed for ``epoch``; shard (rank) ``k > 0`` of a distributed run draws from its own stream."""
    if shard:
        return int(np.random.SeedSequence([seed, epoch, 2, shard]).generate_state(1)[0])
    return int(seed_for(seed, epoch, 2).generate_state(1)[0])


@dataclass(frozen=True)
class Published:
    """A published snapshot and the index it holds (reused for mining: no re-read from disk)."""

    name: str
    index: VectorIndex


class SnapshotPublisher:
    """Publishes the training set's embeddings, ids (dataset indices), labels and the exported model."""

    def __init__(self, store: SnapshotStore, cfg: TrainConfig, model_spec: Mapping[str, Any]) -> None:
        self.store = store
        self.cfg = cfg
        self.model_spec = dict(model_spec)

    def publish(self, model: nn.Module, embeddings: np.ndarray, labels: np.ndarray,
                meta: Mapping[str, Any]) -> Published:
        """Index ``embeddings`` (n, d) with ``labels`` (n,) and ids 0..n-1 and publish them with ``model.pt2``."""
        index = VectorIndex.build(embeddings, labels, np.arange(len(labels)), metric="cosine", index=self.cfg.index,
                                  seed=self.cfg.seed)
        with self.store.staging("export") as tmp:  # removed in finally; swept by retention if the process dies
            path = tmp / MODEL_FILE
            # Exported on CPU: the api embeds on CPU, and export wants the example and weights on one device.
            exported = export_model(copy.deepcopy(model).cpu(), self.model_spec["input_shape"], path)
            name = self.store.publish(index, meta={"config": self.cfg.to_dict(), **meta}, model=self.model_spec,
                                      extra_files={MODEL_FILE: path} if exported else None)
        return Published(name, index)


def mine_tuples(index: VectorIndex, cfg: TrainConfig, epoch: int, anchors: np.ndarray | None = None,
                shard: int = 0) -> tuple[tp.TupleSet, dict[str, Any]]:
    """Mine the tuples for the loss (triplets, or pairs for contrastive) from a snapshot's index, and the stats.

    ``anchors`` (m,) ids (default: every item) and ``shard`` (the rank, for its own seed) mine one rank's share
    of a distributed run (:mod:`hardneg.trainer.sharded_refresh`).
    """
    from hardneg.miner.mining import mine  # the miner part; imported when first needed

    result = mine(index, mining_config(cfg, epoch, shard), anchors=anchors)
    if cfg.loss == "contrastive":
        tuples = tp.pairs(result.pair_i, result.pair_j, result.pair_y)
    else:
        tuples = tp.triplets(result.anchor, result.positive, result.negative)
    return tuples, _plain(result.stats.to_dict())


def mining_config(cfg: TrainConfig, epoch: int = 0, shard: int = 0) -> Any:
    """The miner's :class:`MiningConfig` for ``cfg``, seeded by (seed, epoch, shard); validates the miner's options."""
    from hardneg.miner.mining import MiningConfig

    return MiningConfig(
        strategy=cfg.resolved_strategy, per_anchor=cfg.per_anchor, margin=cfg.margin, positive=cfg.positive,
        semihard_fallback=cfg.semihard_fallback, window_skip=cfg.window_skip, window_width=cfg.window_width,
        dw_cutoff=cfg.dw_cutoff, dw_nonzero_loss_cutoff=cfg.dw_nonzero_loss_cutoff,
        positive_aware=cfg.positive_aware, near_duplicate=cfg.near_duplicate, candidates=cfg.candidates,
        seed=mining_seed(cfg.seed, epoch, shard))


@dataclass(frozen=True)
class RefreshResult:
    """What one refresh produced: the snapshot's name, and for global mining the tuples and their stats.

    ``index`` is the published snapshot's index (in memory), for what else a refresh feeds, such as the class
    neighbours of composed batches."""

    snapshot: str
    tuples: tp.TupleSet | None
    stats: dict[str, Any] | None
    index: VectorIndex | None = None


def refresh(model: nn.Module, x: torch.Tensor, labels: np.ndarray, publisher: SnapshotPublisher,
            meta: Mapping[str, Any], mine_for_epoch: int | None) -> RefreshResult:
    """Embed the training items ``x`` (n, ...) -> publish -> mine (when ``mine_for_epoch`` is given)."""
    cfg = publisher.cfg
    embeddings = embed_items(model, x, cfg.eval_batch_size)
    published = publisher.publish(model, embeddings, labels, meta)
    if mine_for_epoch is None:
        return RefreshResult(published.name, None, None, published.index)
    tuples, stats = mine_tuples(published.index, cfg, mine_for_epoch)
    log.info("snapshot %s: mined %d %ss for epoch %d", published.name, len(tuples), tuples.kind, mine_for_epoch)
    return RefreshResult(published.name, tuples, stats, published.index)


def _plain(value: Any) -> Any:
    """JSON- and weights_only-safe copy: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
