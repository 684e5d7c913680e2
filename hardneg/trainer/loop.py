"""The training loop: warm-up, periodic snapshot refresh with global mining, evaluation, checkpoints.

One epoch ``e`` (1-based) of :class:`Trainer`:

1. if ``cfg.is_refresh_epoch(e)``: embed the training set, publish a snapshot, and (mining ``global``)
   mine the tuples for epochs ``e .. e + refresh_every - 1`` from it (:mod:`hardneg.trainer.refresh`);
2. train on the epoch's tuples (:func:`train_on_tuples`, optionally mixed with in-batch mining over each
   batch's items) or with in-batch mining over item batches (:func:`train_in_batch`: random, P x K, or, for
   global mining with ``global_batches = "classes"``, composed of confusable classes from the snapshot,
   :mod:`hardneg.trainer.batching`); before the first snapshot, global mining warms up on random tuples or
   in-batch mining;
3. evaluate retrieval on the evaluation split, append a line to ``metrics.jsonl``, save ``last.pt``
   (and ``best.pt`` when MAP@R improves), redraw ``plot.png``.

Epoch 0 evaluates the untrained model. Every random choice of epoch ``e`` comes from a generator seeded by
(seed, e), so a run resumed from ``last.pt`` draws what the uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hardneg.miner.errors import ValidationError
from hardneg.miner.store import SnapshotStore
from hardneg.trainer import tuples as tp
from hardneg.trainer.batching import (
    BatchSampler, ConfusableClassBatches, RandomBatches, check_class_batches, composition_stats, confusable_classes,
    make_batch_sampler,
)
from hardneg.trainer.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import ArrayDataset, DataSplits, load_splits
from hardneg.trainer.distributed import LOCAL, DistContext, check_world
from hardneg.trainer.evaluate import evaluate
from hardneg.trainer.inbatch import InBatchMiner, make_inbatch_miner
from hardneg.trainer.losses import contrastive_loss, triplet_loss
from hardneg.trainer.models import build_model
from hardneg.trainer.plots import plot_history
from hardneg.trainer.refresh import RefreshResult, SnapshotPublisher, mining_config, refresh, seed_for
from hardneg.trainer.selfsup import SelfSupervised
from hardneg.trainer.sharded_refresh import refresh_sharded

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plot.png"
CONFIG_FILE = "config.json"
_SHUFFLE, _RANDOM_TUPLES = 0, 1  # purposes of the per-epoch generators (2 is the miner's seed)


# ------------------------------------------------------------------ epochs
@dataclass
class EpochStats:
    """Running totals of one epoch: mean loss and the share of tuples with a non-zero loss."""

    loss_sum: float = 0.0
    tuples: int = 0
    active: int = 0
    steps: int = 0

    def add(self, terms: torch.Tensor) -> None:
        self.loss_sum += float(terms.detach().sum())
        self.tuples += int(terms.numel())
        self.active += int((terms.detach() > 0).sum())
        self.steps += 1

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.tuples if self.tuples else None

    def to_dict(self) -> dict[str, Any]:
        return {"tuples": self.tuples, "active_fraction": self.active / self.tuples if self.tuples else None,
                "steps": self.steps}


def tuple_items(batch: tp.TupleSet) -> np.ndarray:
    """The dataset indices a batch of tuples embeds: (3m,) anchors, positives, negatives, or (2m,) pair members."""
    parts = [batch.first, batch.second, batch.third] if batch.kind == "triplet" else [batch.first, batch.second]
    return np.concatenate(parts)


def tuple_terms(emb: torch.Tensor, batch: tp.TupleSet, margin: float) -> torch.Tensor:
    """Per-tuple loss terms (m,) from the embeddings (len(tuple_items(batch)), D) of the batch's items, in order."""
    if batch.kind == "triplet":
        a, p, n = emb.chunk(3)
        return triplet_loss(a, p, n, margin, reduction="none")
    e1, e2 = emb.chunk(2)
    return contrastive_loss(e1, e2, torch.from_numpy(batch.third).to(emb.device), margin, reduction="none")


def tuple_loss_terms(model: nn.Module, x: torch.Tensor, batch: tp.TupleSet, margin: float) -> torch.Tensor:
    """Per-tuple loss terms (m,) of a batch of triplets (triplet loss) or pairs (contrastive loss)."""
    idx = torch.from_numpy(tuple_items(batch)).to(x.device)
    return tuple_terms(model(x[idx]), batch, margin)


def mixed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: tp.TupleSet, miner: InBatchMiner,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mined tuples mixed with in-batch mining over the same batch's items.

    The batch's distinct items are embedded once; ``miner`` then mines triplets among them, so each mined
    anchor also meets the negatives mined for the other anchors of the batch. Returns ``(loss, terms)``:
    ``loss = mean(mined terms) + cfg.inbatch_mix * mean(in-batch terms)`` (the second mean is 0 when the
    miner finds nothing), and ``terms`` (m + t,), the mined terms followed by the in-batch ones.
    """
    items = tuple_items(batch)
    distinct, where = np.unique(items, return_inverse=True)
    idx = torch.from_numpy(distinct).to(x.device)
    emb = model(x[idx])
    mined = tuple_terms(emb[torch.from_numpy(where).to(x.device)], batch, cfg.margin)
    inbatch = inbatch_terms(emb, y[idx], miner, cfg.loss, cfg.margin)
    loss = mined.mean() + cfg.inbatch_mix * inbatch.mean() if inbatch.numel() else mined.mean()
    return loss, torch.cat([mined, inbatch])


def inbatch_loss_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, miner: InBatchMiner, loss: str,
                       margin: float) -> torch.Tensor:
    """Embed a batch of items ``x`` (B, ...) with labels ``y`` (B,), mine triplets inside it, return loss terms."""
    return inbatch_terms(model(x), y, miner, loss, margin)


def inbatch_terms(emb: torch.Tensor, y: torch.Tensor, miner: InBatchMiner, loss: str,
                  margin: float) -> torch.Tensor:
    """Loss terms (t,) of the triplets ``miner`` finds among embeddings ``emb`` (B, D) with labels ``y`` (B,)."""
    a, p, n = miner(emb, y)
    if loss == "triplet":
        return triplet_loss(emb[a], emb[p], emb[n], margin, reduction="none")
    first, second = torch.cat([a, a]), torch.cat([p, n])
    target = torch.cat([torch.zeros_like(a), torch.ones_like(a)])
    return contrastive_loss(emb[first], emb[second], target, margin, reduction="none")


def _progress(batches: Iterable[np.ndarray], desc: str, show: bool = True) -> Iterator[np.ndarray]:
    """``batches`` with a progress bar on a terminal only (and, in a distributed run, on rank 0 only)."""
    yield from tqdm(batches, desc=desc, leave=False, disable=not (show and sys.stderr.isatty()))


def _step(optimizer: torch.optim.Optimizer, terms: torch.Tensor, stats: EpochStats,
          loss: torch.Tensor | None = None, dist: DistContext = LOCAL) -> None:
    """One update on ``loss`` (default: the mean of ``terms``); ``terms`` feed the epoch's statistics.

    Under DDP every rank holds a share of the batch and all must run backward together (the gradients are
    all-reduced there): they skip only when no rank has a term, and the default loss is each rank's sum over
    the global count, so that DDP's average of the ranks' gradients is the gradient of the batch's mean.
    """
    count = dist.total(terms.numel())
    if count == 0:
        return  # nothing mined in this batch: no gradient to follow
    optimizer.zero_grad(set_to_none=True)
    if not dist.enabled:
        (terms.mean() if loss is None else loss).backward()
    elif loss is None:
        (terms.sum() * (dist.world_size / count)).backward()
    else:  # a rank without terms still joins the all-reduce, with zero gradients
        (loss if terms.numel() else terms.sum()).backward()
    optimizer.step()
    stats.add(terms)


def train_on_tuples(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, tuples: tp.TupleSet,
                    cfg: TrainConfig, rng: np.random.Generator, desc: str, miner: InBatchMiner | None = None,
                    y: torch.Tensor | None = None, dist: DistContext = LOCAL) -> EpochStats:
    """One pass over ``tuples`` (indices into ``x``) in shuffled batches of ``cfg.batch_size``.

    With ``miner`` (and the labels ``y`` (n,)), each batch's loss is :func:`mixed_loss`. Under DDP each rank
    trains on its share of every batch (:func:`hardneg.trainer.distributed.shard_batches`).
    """
    stats = EpochStats()
    model.train()
    for sel in _progress(dist.batches(RandomBatches.chunks(len(tuples), cfg.batch_size, rng)), desc, dist.is_main):
        batch = tuples.take(sel)
        if miner is None:
            _step(optimizer, tuple_loss_terms(model, x, batch, cfg.margin), stats, None, dist)
        else:
            assert y is not None, "mixing in-batch mining needs the labels"
            loss, terms = mixed_loss(model, x, y, batch, miner, cfg)
            _step(optimizer, terms, stats, loss, dist)
    return stats


def train_in_batch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   miner: InBatchMiner, cfg: TrainConfig, rng: np.random.Generator, desc: str,
                   sampler: BatchSampler | None = None, dist: DistContext = LOCAL) -> EpochStats:
    """One pass of in-batch mining over the items ``x`` (n, ...): ``sampler``'s batches (default: shuffled).

    Under DDP each rank mines inside its share of every batch.
    """
    stats = EpochStats()
    model.train()
    batches = sampler.batches(rng) if sampler is not None else RandomBatches.chunks(len(x), cfg.batch_size, rng)
    for sel in _progress(dist.batches(batches), desc, dist.is_main):
        idx = torch.from_numpy(sel).to(x.device)
        _step(optimizer, inbatch_loss_terms(model, x[idx], y[idx], miner, cfg.loss, cfg.margin), stats, None, dist)
    return stats


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains on: ``tuples`` in shuffled batches (mixed with ``miner`` over each batch's items
    when ``miner`` is set), or, without tuples, ``miner`` over the item batches of ``sampler``."""

    tuples: tp.TupleSet | None = None
    miner: InBatchMiner | None = None
    sampler: BatchSampler | None = None


# ------------------------------------------------------------------- state
@dataclass
class RunState:
    """What a checkpoint restores: progress, the current mined tuples, the metrics history."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    mined: tp.TupleSet | None = None  # global mining: the tuples of the current refresh window
    snapshot: str | None = None  # the newest snapshot this run published
    snapshot_epoch: int | None = None  # the epoch whose model that snapshot holds
    class_neighbours: np.ndarray | None = None  # global class batches: (C, P) table of the current refresh window
    best_map_at_r: float = -math.inf
    ssl_negatives: np.ndarray | None = None  # self-supervised: (n, C) mined negatives of the current refresh window


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    store: Path
    plot: Path
    snapshot: str | None
    untrained: dict[str, float]
    final: dict[str, float]
    best: dict[str, float]
    best_epoch: int


class Trainer:
    """Trains ``cfg``'s model on ``splits``; see the module docstring for the schedule.

    Build with :meth:`create` (a new run) or :meth:`resume` (continue from ``RUN_DIR/last.pt``). Under
    torchrun, pass each rank's ``dist`` (:func:`hardneg.trainer.distributed.process_group`): the model trains
    wrapped in DistributedDataParallel, each rank on its share of every batch; rank 0 alone evaluates, writes
    the run folder and publishes snapshots, and every rank keeps the same run state.
    """

    def __init__(self, cfg: TrainConfig, splits: DataSplits, run_dir: Path, state: RunState | None = None,
                 checkpoint: dict[str, Any] | None = None, dist: DistContext = LOCAL) -> None:
        self.cfg = cfg
        self.splits = splits
        self.run_dir = run_dir
        self.state = state or RunState()
        self.dist = dist
        self.device = dist.device_for(cfg.device)
        torch.manual_seed(cfg.seed)  # the model's initial weights
        self.model, self.model_spec = build_model(cfg, splits.train.input_shape)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          foreach=True)  # one fused update for all tensors: ~10x fewer kernel calls
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["rng"])
        # DDP trains (its backward all-reduces the gradients); the plain module embeds, evaluates and is saved
        self.ddp: DistributedDataParallel | None = None
        if dist.enabled:
            gpu = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=gpu)
        if dist.is_main:  # for people to read; a resumed run reads its config from last.pt
            (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.store = SnapshotStore(cfg.store, keep=cfg.keep_snapshots)
        self.publisher = SnapshotPublisher(self.store, cfg, self.model_spec)
        self.x_train, self.y_train = self._to_device(splits.train)
        self.x_eval, _ = self._to_device(splits.eval)
        self.selfsup = SelfSupervised.for_run(cfg, splits.train) if cfg.mode == "self-supervised" else None
        if self.selfsup is not None and dist.enabled:  # its refresh and epochs know nothing of ranks yet
            raise ValidationError("mode 'self-supervised' trains in one process only; run it without torchrun, "
                                  "or use mode 'supervised' for distributed training")
        # in-batch mode mines with its strategy; global mining may warm up with the warm-up strategy
        inbatch_strategy = cfg.resolved_strategy if cfg.mining == "in-batch" else cfg.warmup_strategy
        self.inbatch = make_inbatch_miner(inbatch_strategy, cfg.margin) if cfg.mining != "random" else None
        # item batches of in-batch mining and of an in-batch warm-up
        self.sampler = (make_batch_sampler(cfg.batching, splits.train.y, cfg.batch_size, cfg.per_class)
                        if cfg.mining != "random" and cfg.mode == "supervised" else None)
        # global mining's in-batch miner over class-composed batches, or mixed into mined batches
        composes = cfg.mining == "global" and (cfg.global_batches == "classes" or cfg.inbatch_mix > 0)
        self.batch_miner = make_inbatch_miner(cfg.inbatch_strategy, cfg.margin) if composes else None
        if cfg.mining == "global":
            mining_config(cfg)  # the miner validates its options now, before any training
            if cfg.global_batches == "classes" and cfg.mode == "supervised":  # composed after the first refresh
                check_class_batches(splits.train.y, cfg.batch_size, cfg.per_class)

    # ----------------------------------------------------------- building
    @classmethod
    def create(cls, cfg: TrainConfig, dist: DistContext = LOCAL) -> Trainer:
        """A new run in ``cfg.run_dir`` (default ``runs/<timestamp>``), which must not hold a run yet."""
        _check_device(cfg.device)
        splits = load_splits(cfg)
        check_world(dist, len(splits.train), cfg.batch_size)

        def make_run_dir() -> str:  # on rank 0 only; every rank then uses its name
            run_dir = Path(cfg.run_dir) if cfg.run_dir else _new_run_dir(Path("runs"))
            if (run_dir / LAST).exists():
                raise ValidationError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or "
                                      f"choose another --run-dir")
            run_dir.mkdir(parents=True, exist_ok=True)
            return str(run_dir)

        run_dir = Path(dist.from_main(make_run_dir))
        log.info("data: %s", splits.description)
        return cls(cfg.replace(run_dir=str(run_dir)), splits, run_dir, dist=dist)

    @classmethod
    def resume(cls, run_dir: str | Path, changes: dict[str, Any] | None = None,
               dist: DistContext = LOCAL) -> Trainer:
        """Continue the run in ``run_dir`` from its ``last.pt``; ``changes`` may raise ``epochs`` or set ``device``.

        Under torchrun every rank loads ``last.pt`` (the run folder must be visible to every node).
        """
        run_dir = Path(run_dir)
        ckpt = load_checkpoint(run_dir / LAST)
        cfg = TrainConfig.from_dict(ckpt["config"])
        changes = {k: v for k, v in (changes or {}).items() if getattr(cfg, k) != v}
        fixed = sorted(set(changes) - {"epochs", "device"})
        if fixed:
            raise ValidationError(f"cannot change {', '.join(fixed)} when resuming {run_dir}; only epochs and "
                                  f"device may change (the run's config is in {run_dir / CONFIG_FILE})")
        cfg = cfg.replace(**changes)
        if cfg.epochs < ckpt["epoch"]:
            raise ValidationError(f"epochs must be at least {ckpt['epoch']} (the epochs {run_dir} has done), "
                                  f"got {cfg.epochs}")
        _check_device(cfg.device)
        state = RunState(epoch=ckpt["epoch"], step=ckpt["step"], history=list(ckpt["history"]),
                         mined=tp.TupleSet.from_state(ckpt["mined"]) if ckpt["mined"] is not None else None,
                         snapshot=ckpt["snapshot"], snapshot_epoch=ckpt["snapshot_epoch"],
                         best_map_at_r=ckpt["best_map_at_r"],
                         class_neighbours=_array_or_none(ckpt.get("class_neighbours")))
        log.info("resuming %s after epoch %d of %d", run_dir, state.epoch, cfg.epochs)
        if ckpt.get("ssl_negatives") is not None:
            state.ssl_negatives = ckpt["ssl_negatives"].numpy()
        splits = load_splits(cfg)
        check_world(dist, len(splits.train), cfg.batch_size)
        return cls(cfg, splits, run_dir, state, ckpt, dist)

    def _to_device(self, ds: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.x).to(self.device), torch.from_numpy(ds.y).to(self.device)

    # ---------------------------------------------------------------- run
    def run(self) -> RunSummary:
        """Train until ``cfg.epochs``; publish the final model; return where everything is and the metrics."""
        started = time.monotonic() - (self.state.history[-1]["elapsed_s"] if self.state.history else 0.0)
        self._rewrite_metrics_file()
        if not self.state.history:
            self._finish_epoch(None, None, started)  # epoch 0: the untrained model
        for epoch in range(self.state.epoch + 1, self.cfg.epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            result = self._refresh(epoch) if self.cfg.is_refresh_epoch(epoch) else None
            t1, c1 = time.perf_counter(), time.process_time()
            stats = self._train_epoch(epoch)
            # What trained this epoch, apart from evaluation, checkpoints and plots: wall-clock seconds, and the
            # process's CPU seconds (the same on an idle machine with one thread; steadier on a shared one).
            timing = {"refresh_s": round(t1 - t0, 4), "train_s": round(time.perf_counter() - t1, 4),
                      "refresh_cpu_s": round(c1 - c0, 4), "train_cpu_s": round(time.process_time() - c1, 4)}
            self._finish_epoch(stats, result, started, timing)
        if self.state.snapshot_epoch != self.state.epoch:
            self._refresh(None)
            self._save(LAST)
        return self._summary()

    def _refresh(self, epoch: int | None) -> RefreshResult:
        """Publish the current model's embeddings (before ``epoch``, or the final one), mining for global runs."""
        done = self.state.epoch
        meta = {"epoch": done, "step": self.state.step, "metrics": self.state.history[-1]["metrics"],
                "reason": "final" if epoch is None else "refresh", "run_dir": str(self.run_dir)}
        if self.selfsup is not None:
            return self._refresh_selfsup(epoch, meta)
        cfg = self.cfg
        compose = cfg.mining == "global" and cfg.global_batches == "classes"
        mine_for = epoch if cfg.mining == "global" and not compose and epoch is not None else None
        if self.dist.enabled:  # each rank embeds and mines its share; rank 0 publishes
            result = refresh_sharded(self.model, self.x_train, self.splits.train.y, self.publisher, meta, mine_for,
                                     self.dist)
        else:
            result = refresh(self.model, self.x_train, self.splits.train.y, self.publisher, meta, mine_for)
        self.state.snapshot, self.state.snapshot_epoch = result.snapshot, done
        if result.tuples is not None:
            self.state.mined = result.tuples
        if compose and epoch is not None and result.index is not None:
            from hardneg.miner.mining.miner import stored_vectors

            vectors, labels = stored_vectors(result.index), result.index.labels
            table = confusable_classes(vectors, labels, cfg.batch_size // cfg.per_class)
            self.state.class_neighbours = table
            result = dataclasses.replace(result, stats=composition_stats(vectors, labels, table))
        return result

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        """What ``epoch`` trains on: in-batch mining over item batches (random, P x K, or composed from the
        snapshot), or tuples (mined from the snapshot, optionally mixed with in-batch mining, or random)."""
        cfg, mined, table = self.cfg, self.state.mined, self.state.class_neighbours
        if cfg.mining == "global" and cfg.global_batches == "classes" and table is not None:
            sampler = ConfusableClassBatches(self.splits.train.y, cfg.batch_size, cfg.per_class, table)
            return EpochPlan(miner=self.batch_miner, sampler=sampler)
        warming_up = cfg.mining == "global" and mined is None
        if cfg.mining == "in-batch" or (warming_up and cfg.warmup == "in-batch"):
            assert self.inbatch is not None
            return EpochPlan(miner=self.inbatch, sampler=self.sampler)
        if cfg.mining == "global" and mined is not None:
            if len(mined):
                return EpochPlan(tuples=mined, miner=self.batch_miner)
            log.warning("epoch %d: the miner found no tuples; training on random ones instead", epoch)
        return EpochPlan(tuples=self._random_tuples(epoch))

    def _refresh_selfsup(self, epoch: int | None, meta: dict[str, Any]) -> RefreshResult:
        """Publish (the snapshot carries the data's labels, for serving) and mine negatives without labels."""
        assert self.selfsup is not None
        result, negatives = self.selfsup.refresh(self.model, self.x_train, self.splits.train.y, self.publisher, meta,
                                                 mine=epoch is not None)
        self.state.snapshot, self.state.snapshot_epoch = result.snapshot, self.state.epoch
        if negatives is not None:
            self.state.ssl_negatives = negatives
        return result

    def _train_epoch(self, epoch: int) -> EpochStats:
        if self.selfsup is not None:  # label-free: two views per image, NT-Xent (hardneg.trainer.selfsup)
            desc = f"epoch {epoch}/{self.cfg.epochs}"
            stats = self.selfsup.train_epoch(self.model, self.optimizer, self.x_train, self.state.ssl_negatives,
                                             epoch, EpochStats(), desc)
            self.state.step += stats.steps
            self.state.epoch = epoch
            return stats
        rng = np.random.default_rng(seed_for(self.cfg.seed, epoch, _SHUFFLE))
        desc = f"epoch {epoch}/{self.cfg.epochs}"
        plan = self._epoch_plan(epoch)
        model = self.ddp if self.ddp is not None else self.model
        if plan.tuples is None:
            assert plan.miner is not None
            stats = train_in_batch(model, self.optimizer, self.x_train, self.y_train, plan.miner, self.cfg,
                                   rng, desc, plan.sampler, self.dist)
        else:
            stats = train_on_tuples(model, self.optimizer, self.x_train, plan.tuples, self.cfg, rng, desc,
                                    plan.miner, self.y_train, self.dist)
        if self.dist.enabled:  # the epoch's loss and counts over every rank's share
            stats.loss_sum, tuples, active = self.dist.sums([stats.loss_sum, stats.tuples, stats.active])
            stats.tuples, stats.active = int(tuples), int(active)
        self.state.step += stats.steps
        self.state.epoch = epoch
        return stats

    def _random_tuples(self, epoch: int) -> tp.TupleSet:
        rng = np.random.default_rng(seed_for(self.cfg.seed, epoch, _RANDOM_TUPLES))
        return tp.for_loss(tp.random_triplets(self.splits.train.y, rng), self.cfg.loss)

    def _finish_epoch(self, stats: EpochStats | None, result: RefreshResult | None, started: float,
                      timing: dict[str, float] | None = None) -> None:
        """Evaluate, record, checkpoint and plot the epoch just completed (epoch 0: untrained)."""
        # Rank 0 evaluates; every rank keeps rank 0's record (its metrics, its clock): one history everywhere.
        metrics = (evaluate(self.model, self.x_eval, self.splits.eval.y, self.cfg.eval_batch_size)
                   if self.dist.is_main else {})
        record = {
            "epoch": self.state.epoch, "step": self.state.step,
            "loss": stats.loss if stats is not None else None,
            "metrics": metrics,
            "train": stats.to_dict() if stats is not None else None,
            "snapshot": result.snapshot if result is not None else None,
            "mining": result.stats if result is not None else None,
            "timing": timing,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        record = self.dist.from_main(lambda: record)
        metrics = record["metrics"]
        self.state.history.append(record)
        if self.dist.is_main:  # rank 0 alone writes the run folder
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if metrics["map_at_r"] > self.state.best_map_at_r:
            self.state.best_map_at_r = metrics["map_at_r"]
            self._save(BEST)  # before last.pt: a kill in between redoes this epoch and saves best.pt again
        self._save(LAST)
        if not self.dist.is_main:
            return
        plot_history(self.state.history, self.run_dir / PLOT_FILE)
        loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
        log.info("epoch %d/%d: loss %s, MAP@R %.4f, P@1 %.4f (%.1f s)", self.state.epoch, self.cfg.epochs, loss,
                 metrics["map_at_r"], metrics["precision_at_1"], record["elapsed_s"])

    def _save(self, name: str) -> None:
        if not self.dist.is_main:
            return  # every rank holds the same state; rank 0 alone writes it
        s = self.state
        save_checkpoint(self.run_dir / name, {
            "config": self.cfg.to_dict(), "model_spec": self.model_spec, "epoch": s.epoch, "step": s.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
            "mined": s.mined.to_state() if s.mined is not None else None,
            "snapshot": s.snapshot, "snapshot_epoch": s.snapshot_epoch,
            "class_neighbours": torch.from_numpy(s.class_neighbours) if s.class_neighbours is not None else None,
            "ssl_negatives": torch.from_numpy(s.ssl_negatives) if s.ssl_negatives is not None else None,
            "history": s.history, "best_map_at_r": s.best_map_at_r,
        })

    def _rewrite_metrics_file(self) -> None:
        """metrics.jsonl holds exactly the checkpoint's history (a killed run may have written one line more)."""
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS_FILE, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.state.history)

    def _summary(self) -> RunSummary:
        h = self.state.history
        best = max(h, key=lambda r: r["metrics"]["map_at_r"])
        return RunSummary(self.run_dir, Path(self.cfg.store), self.run_dir / PLOT_FILE, self.state.snapshot,
                          h[0]["metrics"], h[-1]["metrics"], best["metrics"], best["epoch"])


def _array_or_none(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.numpy().astype(np.int64)


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")


def _new_run_dir(parent: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = parent / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = parent / f"{stamp}-{n}"
    return run_dir
