"""The recipe interface, and the two kinds of batch every supervised recipe trains on.

A :class:`Recipe` decides *what* an epoch trains on; the loop (:mod:`hardneg.trainer.loop`) decides *when*
(the refresh schedule) and runs every step the same way. Per run:

* ``refresh(model, snapshot)``: after the loop has embedded the training set and published a snapshot, take
  from it what the next epochs need (mined tuples, a class-neighbour table, mined negatives); returns the
  statistics recorded for the epoch. In one process that is ``compute_refresh(snapshot)`` (what the refresh
  computes, as plain data, which an asynchronous refresh computes in its worker process) loaded with
  ``load_state_dict``;
* ``refresh_items(epoch)``: the training items a refresh that publishes no snapshot (``publish_every``) must
  embed for ``refresh``: None (the default): every item, in an index; an empty array (recipes that read no
  snapshot): no refresh at all; a sample (class-batches: ``centroid_sample`` items
  per class): only those, handed to ``refresh`` as a :class:`Snapshot` without an index;
* ``batches(epoch, rng)``: the epoch's global batches, arrays of indices (into the training items, or into the
  recipe's tuples); under torchrun the loop gives each rank its share of every batch;
* ``loss(model, batch)``: ``(loss, terms)`` of one batch (a rank's share): ``terms`` (t,) feed the epoch's
  statistics, and ``loss`` is what to minimise (None: the mean of ``terms``);
* ``state_dict()`` / ``load_state_dict()``: what a checkpoint must hold to resume mid-window.

Most supervised epochs are one of two kinds, shared by the recipes: :class:`ItemBatches` (batches of items,
triplets mined inside each) and :class:`TupleBatches` (shuffled batches of tuples, optionally with in-batch
mining over their items mixed in).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hardneg.miner.index import VectorIndex
from hardneg.trainer import tuples as tp
from hardneg.trainer.batching import BatchSampler, RandomBatches
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.distributed import LOCAL, DistContext
from hardneg.trainer.inbatch import TripletMiner
from hardneg.trainer.losses import TupleLoss
from hardneg.trainer.timing import NO_TIMER, PhaseTimer

# Purposes of the per-epoch random streams (hardneg.trainer.refresh.seed_for): the loop's shuffle (passed to
# Recipe.batches), random tuples, the global miner's seed, self-supervised views and batches.
SHUFFLE, RANDOM_TUPLES, MINING, AUGMENT, SSL_BATCHES = range(5)
CENTROIDS = 5  # the items a refresh without a snapshot embeds for class centroids


@dataclass(frozen=True)
class Snapshot:
    """A snapshot the loop has just published, for the epochs from ``epoch`` on, or a sample's embeddings.

    ``index`` is its index (on every rank); ``embeddings`` (n, d) the training items' embeddings as the model
    gave them, row ``i`` = item ``i`` (in one process and on rank 0; None on the other ranks). With a sharded
    index (``--shard-index``), ``shard`` is this rank's :class:`~hardneg.trainer.sharded_index.IndexShard`,
    ``index`` holds this rank's items only and ``embeddings`` is None: a recipe mines through the shard.

    A refresh that publishes nothing (:meth:`Recipe.refresh_items` gave a sample) has no ``name`` and no
    ``index``; ``embeddings`` (m, d) are then those of the training items ``items`` (m,), on every rank.
    """

    name: str | None
    index: VectorIndex | None
    embeddings: np.ndarray | None
    epoch: int
    shard: Any = None
    items: np.ndarray | None = None  # None: every item (row i = item i)


@dataclass(frozen=True)
class TrainData:
    """The training items on the training device: ``x`` (n, ...) and ``y`` (n,), and ``labels`` (n,) in numpy."""

    x: torch.Tensor
    y: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe is built with: the run's config, data, loss, ranks and clocks."""

    cfg: TrainConfig
    data: TrainData
    loss: TupleLoss
    dist: DistContext = LOCAL
    timer: PhaseTimer = NO_TIMER


class Epoch(ABC):
    """One epoch's batches and how a batch's loss is computed."""

    @abstractmethod
    def batches(self, rng: np.random.Generator) -> Sequence[np.ndarray]: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]: ...


class Recipe(ABC):
    """Base class of the training recipes; see the module docstring. ``name`` is its registry name."""

    name: ClassVar[str] = ""

    def __init__(self, ctx: RecipeContext) -> None:
        self.ctx = ctx
        self.epoch: Epoch | None = None

    def refresh(self, model: nn.Module, snapshot: Snapshot) -> dict[str, Any] | None:
        """Take what the coming epochs need from ``snapshot``; the statistics to record (default: nothing).

        In one process: :meth:`compute_refresh`, then :meth:`load_state_dict` of what it computed.
        """
        state, stats = self.compute_refresh(snapshot)
        if state:
            self.load_state_dict(state)
        return stats

    def compute_refresh(self, snapshot: Snapshot) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """What a refresh takes from ``snapshot``, as data, leaving this recipe unchanged: the part of
        :meth:`state_dict` it replaces (plain tensors and values; empty: nothing) and the statistics to record.

        An asynchronous refresh runs this in its worker process (:mod:`hardneg.trainer.async_refresh`), and the
        loop loads the state into the training process's recipe at a step boundary.
        """
        return {}, None

    def refresh_items(self, epoch: int) -> np.ndarray | None:
        """The training items (m,) whose embeddings :meth:`refresh` needs before ``epoch`` when no snapshot is
        published: None: every item, in a snapshot's index; empty: none (no refresh). See the module docstring."""
        return None

    def batches(self, epoch: int, rng: np.random.Generator) -> Sequence[np.ndarray]:
        """The global batches of ``epoch`` (1-based), shuffled with ``rng``; sets the epoch's loss."""
        self.epoch = self.plan(epoch)
        return self.epoch.batches(rng)

    def plan(self, epoch: int) -> Epoch:
        """What ``epoch`` trains on (a recipe overrides this, or :meth:`batches` and :meth:`loss` both)."""
        raise NotImplementedError(f"recipe {self.name!r} plans no epochs")

    def loss(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(loss or None, terms)`` of this rank's share ``batch`` of one of the epoch's batches."""
        assert self.epoch is not None, "batches() plans the epoch first"
        return self.epoch.loss(model, batch)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and values (checkpoints are loaded with ``weights_only``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""


# ------------------------------------------------------------------ the two kinds of supervised epoch
class ItemBatches(Epoch):
    """Batches of items from ``sampler``; ``miner`` chooses triplets inside each, trained with the loss."""

    def __init__(self, ctx: RecipeContext, sampler: BatchSampler, miner: TripletMiner) -> None:
        self.ctx, self.sampler, self.miner = ctx, sampler, miner

    def batches(self, rng: np.random.Generator) -> Sequence[np.ndarray]:
        return self.sampler.batches(rng)

    def take(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's items (B, ...) and labels (B,) on the training device."""
        data = self.ctx.data
        with self.ctx.timer.phase("data"):
            idx = torch.from_numpy(batch).to(data.x.device)
            return data.x[idx], data.y[idx]

    def loss(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
        x, y = self.take(batch)
        return None, inbatch_terms(model(x), y, self.miner, self.ctx.loss, self.ctx.timer)


class TupleBatches(Epoch):
    """Shuffled batches of ``tuples`` (indices into the training items), of the loss's kind.

    With ``miner`` and ``mix > 0`` each batch's loss is :func:`mixed_loss`: the tuples' terms plus ``mix`` x the
    terms ``miner`` finds among the batch's items.
    """

    def __init__(self, ctx: RecipeContext, tuples: tp.TupleSet, miner: TripletMiner | None = None,
                 mix: float = 0.0) -> None:
        self.ctx, self.tuples, self.miner, self.mix = ctx, tuples, miner, mix

    def batches(self, rng: np.random.Generator) -> Sequence[np.ndarray]:
        return RandomBatches.chunks(len(self.tuples), self.ctx.cfg.batch_size, rng)

    def loss(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
        data, timer = self.ctx.data, self.ctx.timer
        with timer.phase("data"):
            tuples = self.tuples.take(batch)
        if self.miner is not None:
            return mixed_loss(model, data.x, data.y, tuples, self.miner, self.ctx.loss, self.mix, timer)
        with timer.phase("data"):
            x = data.x[torch.from_numpy(tp.items(tuples)).to(data.x.device)]
        return None, self.ctx.loss.tuple_terms(model(x), tuples.third)


def inbatch_terms(emb: torch.Tensor, y: torch.Tensor, miner: TripletMiner, loss: TupleLoss,
                  timer: PhaseTimer = NO_TIMER) -> torch.Tensor:
    """Loss terms of the triplets ``miner`` finds among embeddings ``emb`` (B, D) with labels ``y`` (B,)."""
    with timer.phase("inbatch_mine"):
        a, p, n = miner(emb, y)
    return loss.triplet_terms(emb, a, p, n)


def mixed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: tp.TupleSet, miner: TripletMiner,
               loss: TupleLoss, mix: float, timer: PhaseTimer = NO_TIMER) -> tuple[torch.Tensor, torch.Tensor]:
    """Mined tuples mixed with in-batch mining over the same batch's items.

    The batch's distinct items are embedded once; ``miner`` then mines triplets among them, so each mined
    anchor also meets the negatives mined for the other anchors of the batch. Returns ``(loss, terms)``:
    ``loss = mean(tuple terms) + mix * mean(in-batch terms)`` (the second mean is 0 when the miner finds
    nothing), and ``terms`` (m + t,), the tuple terms followed by the in-batch ones.
    """
    with timer.phase("data"):
        distinct, where = np.unique(tp.items(batch), return_inverse=True)
        idx = torch.from_numpy(distinct).to(x.device)
        xb, yb = x[idx], y[idx]
    emb = model(xb)
    mined = loss.tuple_terms(emb[torch.from_numpy(where).to(x.device)], batch.third)
    inbatch = inbatch_terms(emb, yb, miner, loss, timer)
    total = mined.mean() + mix * inbatch.mean() if inbatch.numel() else mined.mean()
    return total, torch.cat([mined, inbatch])
