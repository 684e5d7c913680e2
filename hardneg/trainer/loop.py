"""The training loop: one loop for every recipe, with the refresh schedule, DDP, evaluation and checkpoints.

One epoch ``e`` (1-based) of :class:`Trainer`:

1. if ``cfg.is_refresh_epoch(e)``: embed the training set and publish a snapshot (under torchrun: each rank
   embeds its block, rank 0 publishes), then hand it to the recipe (``recipe.refresh``), which takes from it
   what the next epochs train on (mined tuples, confusable classes, mined negatives); a refresh that
   ``cfg.is_publish_epoch(e)`` leaves unpublished embeds only what ``recipe.refresh_items(e)`` asks for (nothing,
   or a sample; None: every item, published as above);
2. train: the recipe's batches for the epoch (``recipe.batches``; under torchrun each rank gets its share of
   every batch), one :func:`_step` each on the recipe's loss (``recipe.loss``);
3. evaluate retrieval on the evaluation split (every ``cfg.eval_every`` epochs and the last; the other epochs'
   lines hold ``"metrics": {}``), append a line to ``metrics.jsonl``, save ``last.pt`` (and ``best.pt`` when
   MAP@R improves), redraw ``plot.png``.

With ``refresh_every_steps`` the refreshes fall at step boundaries instead (the first after the warm-up epochs),
and the rest of the epoch is planned anew from what the recipe took (``recipe.batches`` with a generator seeded
by (seed, epoch, step)). With ``refresh = "async"`` a worker process refreshes while training goes on
(:mod:`hardneg.trainer.async_refresh`, started with the run): at a boundary where a refresh is due the loop
hands it a copy of the weights (or, while one is in flight, skips it and counts that), and at the first boundary
after it is done the recipe loads what it computed and the rest of the epoch is planned from it; the run's first
refresh runs in this process while the worker is still starting (nothing to train on but the warm-up until
then), and the worker publishes it.
Every batch records the step of the weights its mined data came from: each epoch's line holds that staleness
and the refreshes' timings.

Epoch 0 evaluates the untrained model. Every random choice of epoch ``e`` comes from a generator seeded by
(seed, e), so a run resumed from ``last.pt`` draws what the uninterrupted run drew. Every phase of an epoch is
timed (:mod:`hardneg.trainer.timing`) and recorded in its ``timing``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hardneg.miner.errors import ValidationError
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.async_refresh import RefreshRequest, RefreshResult, RefreshWorker, WorkerInputs, clone_weights
from hardneg.trainer.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import ArrayDataset, DataSplits, load_splits
from hardneg.trainer.distributed import LOCAL, DistContext, check_world
from hardneg.trainer.drift import DriftMonitor
from hardneg.trainer.evaluate import evaluate
from hardneg.trainer.inbatch import TripletMiner
from hardneg.trainer.losses import TupleLoss, make_loss
from hardneg.trainer.models import build_model
from hardneg.trainer.plots import plot_history
from hardneg.trainer.recipes import recipe_class
from hardneg.trainer.recipes.base import SHUFFLE, Recipe, RecipeContext, Snapshot, TrainData
from hardneg.trainer.refresh import SnapshotPublisher, embed_items, publish_local, seed_for, training_thumbs
from hardneg.trainer.runtime import keep_freed_memory, set_threads
from hardneg.trainer.sharded_index import publish_shards, shard_index_enabled
from hardneg.trainer.sharded_refresh import publish_sharded
from hardneg.trainer.timing import PhaseTimer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plot.png"
CONFIG_FILE = "config.json"
RecipeFactory = Callable[..., Recipe]  # (RecipeContext, **parts) -> Recipe: a Recipe class, or a partial of one


# ------------------------------------------------------------------ epochs
@dataclass
class EpochStats:
    """Running totals of one epoch: mean loss and the share of terms with a non-zero loss."""

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


def _progress(batches: Iterable[np.ndarray], desc: str, show: bool = True, total: int | None = None
              ) -> Iterator[np.ndarray]:
    """``batches`` with a progress bar on a terminal only (and, in a distributed run, on rank 0 only); ``total``:
    their number, when ``batches`` is a generator."""
    yield from tqdm(batches, desc=desc, total=total, leave=False, disable=not (show and sys.stderr.isatty()))


def _step(optimizer: torch.optim.Optimizer, terms: torch.Tensor, stats: EpochStats,
          loss: torch.Tensor | None = None, dist: DistContext = LOCAL, timer: PhaseTimer | None = None) -> None:
    """One update on ``loss`` (default: the mean of ``terms``); ``terms`` feed the epoch's statistics.

    Under DDP every rank holds a share of the batch and all must run backward together (the gradients are
    all-reduced there): they skip only when no rank has a term, and the default loss is each rank's sum over
    the global count, so that DDP's average of the ranks' gradients is the gradient of the batch's mean.
    """
    timer = timer or PhaseTimer()
    count = dist.total(terms.numel())
    if count == 0:
        return  # nothing mined in this batch: no gradient to follow
    optimizer.zero_grad(set_to_none=True)
    with timer.phase("backward"):
        if not dist.enabled:
            (terms.mean() if loss is None else loss).backward()
        elif loss is None:
            (terms.sum() * (dist.world_size / count)).backward()
        else:  # a rank without terms still joins the all-reduce, with zero gradients
            (loss if terms.numel() else terms.sum()).backward()
    with timer.phase("step"):
        optimizer.step()
    stats.add(terms)


# ------------------------------------------------------------------- state
@dataclass
class RunState:
    """What a checkpoint restores besides the model, optimiser and recipe: progress and the metrics history."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    snapshot: str | None = None  # the newest snapshot this run published
    snapshot_epoch: int | None = None  # the epoch whose model that snapshot holds
    best_map_at_r: float = -math.inf
    mined_step: int | None = None  # the step of the weights the recipe's current mined data came from
    refresh_due_step: int | None = None  # refresh_every_steps: the step at which the last refresh fell due
    refresh_pending: bool = False  # async: a refresh was in flight (a resumed run starts it again)
    refresh_count: int = 0  # refreshes started (async: handed to the worker), for publish_every


@dataclass
class EpochRefreshes:
    """One epoch's refreshes and staleness: counts, spans ``[weights' step, step it took over]``, the worker's
    per-phase clocks (async), the training process's time spent on them, and each batch's staleness (its step
    minus the step of the weights its mined data came from)."""

    mode: str = "sync"
    started: int = 0
    finished: int = 0
    skipped: int = 0  # fell due while one was in flight
    restarts: int = 0
    spans: list[list[int]] = field(default_factory=list)
    worker: dict[str, float] = field(default_factory=dict)
    wait_s: float = 0.0
    wait_cpu_s: float = 0.0
    stale_sum: int = 0
    stale_max: int | None = None
    stale_batches: int = 0
    last: tuple[str, dict[str, Any] | None] | None = None  # the last snapshot taken over and its statistics

    def batch(self, step: int, mined_step: int | None) -> None:
        if mined_step is None:
            return  # warm-up batches: nothing mined yet
        self.stale_sum += step - mined_step
        self.stale_max = max(self.stale_max or 0, step - mined_step)
        self.stale_batches += 1

    def add_worker(self, timing: dict[str, float]) -> None:
        for k, v in timing.items():
            self.worker[k] = round(self.worker.get(k, 0.0) + v, 4)

    def staleness(self) -> dict[str, Any]:
        mean = round(self.stale_sum / self.stale_batches, 4) if self.stale_batches else None
        return {"mean": mean, "max": self.stale_max, "batches": self.stale_batches}

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "started": self.started, "finished": self.finished, "skipped": self.skipped,
                "restarts": self.restarts, "spans": self.spans, "worker": self.worker,
                "wait_s": round(self.wait_s, 4), "wait_cpu_s": round(self.wait_cpu_s, 4)}


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


@dataclass(frozen=True)
class Parts:
    """Objects that replace what ``cfg`` names: the recipe (a class or factory called with the context), the
    loss, and the recipe's in-batch miner (any ``(embeddings, labels) -> (a, p, n)`` callable)."""

    recipe: RecipeFactory | None = None
    loss: TupleLoss | None = None
    miner: TripletMiner | None = None

    def build(self, ctx: RecipeContext) -> Recipe:
        factory = self.recipe or recipe_class(ctx.cfg.recipe.name)
        return factory(ctx, **({"miner": self.miner} if self.miner is not None else {}))


class Trainer:
    """Trains ``cfg``'s model on ``splits`` with ``cfg``'s recipe; see the module docstring for the schedule.

    Build with :meth:`create` (a new run) or :meth:`resume` (continue from ``RUN_DIR/last.pt``). Under
    torchrun, pass each rank's ``dist`` (:func:`hardneg.trainer.distributed.process_group`): the model trains
    wrapped in DistributedDataParallel, each rank on its share of every batch; rank 0 alone evaluates, writes
    the run folder and publishes snapshots, and every rank keeps the same run state.
    """

    def __init__(self, cfg: TrainConfig, splits: DataSplits, run_dir: Path, state: RunState | None = None,
                 checkpoint: dict[str, Any] | None = None, dist: DistContext = LOCAL, parts: Parts = Parts()) -> None:
        if cfg.refresh == "async":
            _check_async(cfg, dist, parts)
        self.cfg, self.splits, self.run_dir, self.dist = cfg, splits, run_dir, dist
        self.state = state or RunState()
        self.device = dist.device_for(cfg.device)
        self.timer = PhaseTimer()
        if cfg.threads:
            set_threads(cfg.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(cfg.seed)  # the model's initial weights
        self.model, self.model_spec = build_model(cfg, splits.train.input_shape)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          foreach=True)  # one fused update for all tensors: ~10x fewer kernel calls
        # DDP trains (its backward all-reduces the gradients); the plain module embeds, evaluates and is saved
        self.ddp: DistributedDataParallel | None = None
        if dist.enabled:
            gpu = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=gpu)
        if dist.is_main:  # for people to read; a resumed run reads its config from last.pt
            (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.publisher = SnapshotPublisher(SnapshotStore(cfg.store, keep=cfg.keep_snapshots), cfg, self.model_spec,
                                           self.timer, training_thumbs(splits.train.x) if dist.is_main else None)
        self.x_train, self.y_train = self._to_device(splits.train)
        self.x_eval, _ = self._to_device(splits.eval)
        data = TrainData(self.x_train, self.y_train, splits.train.y)
        ctx = RecipeContext(cfg, data, parts.loss or make_loss(cfg.loss, cfg.margin), dist, self.timer)
        self.recipe = parts.build(ctx)
        self.drift = None if cfg.refresh_on_drift is None else DriftMonitor(
            self.x_train, splits.train.y, cfg.refresh_on_drift, cfg.drift_probe, cfg.seed, self.publisher.store,
            cfg.eval_batch_size, dist)
        self.background: RefreshWorker | None = None  # async: started by run()
        self.refreshes = EpochRefreshes(cfg.refresh)
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["rng"])
            self.recipe.load_state_dict(checkpoint["recipe"])

    # ----------------------------------------------------------- building
    @classmethod
    def create(cls, cfg: TrainConfig, dist: DistContext = LOCAL, parts: Parts = Parts()) -> Trainer:
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
        return cls(cfg.replace(run_dir=str(run_dir)), splits, run_dir, dist=dist, parts=parts)

    @classmethod
    def resume(cls, run_dir: str | Path, changes: dict[str, Any] | None = None, dist: DistContext = LOCAL,
               parts: Parts = Parts()) -> Trainer:
        """Continue the run in ``run_dir`` from its ``last.pt``; ``changes`` may raise ``epochs`` or set ``device``.

        Under torchrun every rank loads ``last.pt`` (the run folder must be visible to every node).
        """
        run_dir = Path(run_dir)
        ckpt = load_checkpoint(run_dir / LAST)
        cfg, fixed = TrainConfig.from_stored(ckpt["config"]).with_changes(changes or {})
        fixed = sorted(set(fixed) - {"epochs", "device"})
        if fixed:
            raise ValidationError(f"cannot change {', '.join(fixed)} when resuming {run_dir}; only epochs and "
                                  f"device may change (the run's config is in {run_dir / CONFIG_FILE})")
        if cfg.epochs < ckpt["epoch"]:
            raise ValidationError(f"epochs must be at least {ckpt['epoch']} (the epochs {run_dir} has done), "
                                  f"got {cfg.epochs}")
        _check_device(cfg.device)
        state = RunState(epoch=ckpt["epoch"], step=ckpt["step"], history=list(ckpt["history"]),
                         snapshot=ckpt["snapshot"], snapshot_epoch=ckpt["snapshot_epoch"],
                         best_map_at_r=ckpt["best_map_at_r"], mined_step=ckpt.get("mined_step"),
                         refresh_due_step=ckpt.get("refresh_due_step"),
                         refresh_pending=bool(ckpt.get("refresh_pending", False)),
                         refresh_count=int(ckpt.get("refresh_count", 0)))
        log.info("resuming %s after epoch %d of %d", run_dir, state.epoch, cfg.epochs)
        splits = load_splits(cfg)
        check_world(dist, len(splits.train), cfg.batch_size)
        return cls(cfg, splits, run_dir, state, ckpt, dist, parts)

    def _to_device(self, ds: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.x).to(self.device), torch.from_numpy(ds.y).to(self.device)

    # ---------------------------------------------------------------- run
    def run(self) -> RunSummary:
        """Train until ``cfg.epochs``; publish the final model; return where everything is and the metrics."""
        started = time.monotonic() - (self.state.history[-1]["elapsed_s"] if self.state.history else 0.0)
        self._rewrite_metrics_file()
        if self.cfg.refresh == "async":  # first: its start (imports) overlaps epoch 0's evaluation and the warm-up
            self.background = RefreshWorker(WorkerInputs(self.cfg.to_dict(), self.model_spec, self.x_train,
                                                         self.y_train, self.splits.train.y,
                                                         self.publisher.thumbs))
        finished = False
        try:
            if not self.state.history:
                self._finish_epoch(None, None, started)  # epoch 0: the untrained model
            self._epochs(started)
            finished = True
        finally:
            if self.background is not None:  # the result of a refresh still in flight is not used
                self.background.close(wait=finished)
                self.background = None
        if self.state.snapshot_epoch != self.state.epoch:
            self._refresh(None)
            self._save(LAST)
        self.timer.take()
        return self._summary()

    def _refresh_due(self, epoch: int) -> bool:
        """Refresh before ``epoch``: on the schedule, or with ``refresh_on_drift`` when the model has drifted past
        it since the newest snapshot (:mod:`hardneg.trainer.drift`)."""
        if self.cfg.is_refresh_epoch(epoch):
            return True
        if self.drift is None:
            return False
        with self.timer.phase("drift"):
            return self.drift.due(self.model, self.state.snapshot)

    def _epochs(self, started: float) -> None:
        for epoch in range(self.state.epoch + 1, self.cfg.epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            sync = self.cfg.refresh == "sync" and self._refresh_due(epoch)
            refresh = self._refresh(epoch) if sync else None
            t1, c1 = time.perf_counter(), time.process_time()
            stats = self._train_epoch(epoch)
            # What trained this epoch, apart from evaluation, checkpoints and plots: wall-clock seconds, and the
            # process's CPU seconds (the same on an idle machine with one thread; steadier on a shared one).
            # Refreshes inside the epoch (by steps, or the async hand-over) count as refresh, not training.
            r = self.refreshes
            timing = {"refresh_s": round(t1 - t0 + r.wait_s, 4),
                      "train_s": round(time.perf_counter() - t1 - r.wait_s, 4),
                      "refresh_cpu_s": round(c1 - c0 + r.wait_cpu_s, 4),
                      "train_cpu_s": round(time.process_time() - c1 - r.wait_cpu_s, 4)}
            self._finish_epoch(stats, refresh or r.last, started, timing)

    def _refresh(self, epoch: int | None, step: int | None = None) -> tuple[str | None, dict[str, Any] | None]:
        """Publish the current model's embeddings before ``epoch`` (None: the final model; ``step``: before that
        step of it, default its first) and, before an epoch, refresh the recipe from them; returns the snapshot's
        name (None: not published) and the recipe's statistics. A refresh that ``cfg.is_publish_epoch`` leaves
        unpublished embeds what the recipe asks."""
        done, step = self.state.epoch, self.state.step if step is None else step
        if epoch is not None:
            publish = self._publishes(epoch)
            self.state.refresh_count += 1
            items = None if publish else self.recipe.refresh_items(epoch)
            if items is not None:
                return None, self._refresh_unpublished(epoch, step, items)
        meta = self._snapshot_meta("final" if epoch is None else "refresh", step)
        publish = publish_sharded if self.dist.enabled else _publish_local
        if shard_index_enabled(self.cfg, self.dist, len(self.splits.train.y)):
            publish = publish_shards  # each rank indexes its block; rank 0 streams one snapshot to the store
        published = publish(self.model, self.x_train, self.splits.train.y, self.publisher, meta, self.dist)
        self.state.snapshot, self.state.snapshot_epoch = published.name, done
        if epoch is None:
            return published.name, None
        with self.timer.phase("mine"):
            snapshot = Snapshot(published.name, published.index, published.embeddings, epoch, shard=published.shard)
            stats = self.recipe.refresh(self.model, snapshot)
        self._refreshed(step, stats)
        return published.name, stats

    def _publishes(self, epoch: int) -> bool:
        """Whether the sync refresh before (a step of) ``epoch`` publishes its snapshot (``publish_every``): by epochs,
        on the schedule's publish epochs (a refresh off the schedule, on drift, always publishes); by steps, every
        ``publish_every``-th refresh of the run."""
        if self.cfg.refresh_every_steps is not None:
            return self.cfg.is_publish_refresh(self.state.refresh_count)
        return not self.cfg.is_refresh_epoch(epoch) or self.cfg.is_publish_epoch(epoch)

    def _refresh_unpublished(self, epoch: int, step: int, items: np.ndarray) -> dict[str, Any] | None:
        """A refresh before ``epoch`` that publishes no snapshot (``publish_every``): embed only the training
        ``items`` (m,) the recipe asks for (none: nothing to do), on every rank alike, and refresh the recipe."""
        if len(items) == 0:
            return None
        with self.timer.phase("embed"):
            embeddings = embed_items(self.model, self.x_train, self.cfg.eval_batch_size, items)
        with self.timer.phase("mine"):
            stats = self.recipe.refresh(self.model, Snapshot(None, None, embeddings, epoch, items=items))
        self._refreshed(step, stats)
        return stats

    def _refresh_first(self, epoch: int, step: int) -> tuple[None, dict[str, Any] | None]:
        """An async run's first refresh, before ``step`` of ``epoch``: the recipe takes its data now, from this
        process's embeddings of the training set and an unpublished index of them, as a sync refresh does but
        without the export and the store; the worker publishes the same weights' snapshot meanwhile (the loop
        hands them over right after), and its result, the same data, is taken over as usual.

        Until then the recipe has nothing but the warm-up to train on, and the worker is still starting (importing
        torch and FAISS: seconds, several epochs of a small run); a worker that is ready does the first refresh
        itself, as every later one, while training goes on (a large training set, whose warm-up outlasts the
        worker's start, then never waits for a full embedding pass)."""
        with self.timer.phase("embed"):
            embeddings = embed_items(self.model, self.x_train, self.cfg.eval_batch_size)
        index = self.publisher.index(embeddings, self.splits.train.y)
        with self.timer.phase("mine"):
            stats = self.recipe.refresh(self.model, Snapshot(None, index, embeddings, epoch))
        self._refreshed(step, stats)
        return None, stats

    def _refreshed(self, step: int, stats: dict[str, Any] | None) -> None:
        """Record a synchronous refresh from the weights before ``step``."""
        if stats is not None:  # the recipe took mined data from it
            self.state.mined_step = step
        self.refreshes.started += 1
        self.refreshes.finished += 1
        self.refreshes.spans.append([step, step])

    # ------------------------------------------------------- step boundaries
    def _boundary(self, epoch: int, step: int, first: bool) -> bool:
        """Before optimizer step ``step`` (``first``: of the epoch): take over a finished async refresh, start a
        refresh that falls due; True when the recipe took new data (the rest of the epoch is then planned anew)."""
        cfg, bg = self.cfg, self.background
        if bg is None and cfg.refresh_every_steps is None:
            return False  # sync by epochs: refreshed before the epoch (run)
        t0, c0 = time.perf_counter(), time.process_time()
        switched = False
        if bg is not None:
            result = bg.poll()
            self.refreshes.restarts = bg.restarts
            if result is not None:
                switched = self._take_over(result, step)
        due = cfg.is_refresh_step(epoch, step, self.state.refresh_due_step) or (
            bg is not None and first and cfg.is_refresh_epoch(epoch))
        if due:
            self.state.refresh_due_step = step
        if bg is None:
            if due:
                self.refreshes.last = self._refresh(epoch, step)
                switched = True
        elif bg.busy:
            self.refreshes.skipped += int(due)
        elif due or self.state.refresh_pending:  # pending: the refresh a killed run had in flight
            if due and self.state.snapshot is None and not self.state.refresh_pending and not bg.ready:
                self.refreshes.last = self._refresh_first(epoch, step)
                switched = True
            self._submit(bg, epoch, step, due)
        # sync: the whole refresh; async: the training process's share (hand-over and bookkeeping)
        self.refreshes.wait_s += time.perf_counter() - t0
        self.refreshes.wait_cpu_s += time.process_time() - c0
        return switched

    def _submit(self, bg: RefreshWorker, epoch: int, step: int, due: bool) -> None:
        """Hand the weights before ``step`` to the worker. A due refresh publishes its snapshot when it is the
        run's first or a ``publish_every``-th (:meth:`TrainConfig.is_publish_refresh`); the others export and
        store nothing and embed only what the recipe asks (``recipe.refresh_items``), as sync ones do. The refresh
        a killed run had in flight (not due) publishes."""
        publish = not due or self.cfg.is_publish_refresh(self.state.refresh_count)
        self.state.refresh_count += int(due)
        bg.submit(RefreshRequest(step, epoch, clone_weights(self.model), self._snapshot_meta("refresh", step),
                                 publish))
        self.state.refresh_pending = True
        self.refreshes.started += 1

    def _take_over(self, result: RefreshResult, step: int) -> bool:
        """The recipe loads what the async refresh of ``result.step``'s weights computed, before step ``step``."""
        if result.state:
            self.recipe.load_state_dict(result.state)
            self.state.mined_step = result.step
        if result.snapshot is not None:  # None: a refresh that published nothing
            self.state.snapshot, self.state.snapshot_epoch = result.snapshot, result.epoch - 1
        self.state.refresh_pending = False
        r = self.refreshes
        r.finished += 1
        r.spans.append([result.step, step])
        r.add_worker(result.timing)
        r.last = (result.snapshot, result.stats)
        return bool(result.state)

    def _planned(self, epoch: int, batches: list[np.ndarray], stats: EpochStats) -> Iterator[np.ndarray]:
        """``batches``, with a step boundary before each: after a refresh the rest is planned anew."""
        i = 0
        while i < len(batches):
            step = self.state.step + stats.steps
            if self._boundary(epoch, step, first=i == 0):
                with self.timer.phase("batches"):
                    rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, epoch, SHUFFLE, step]))
                    batches[i:] = list(self.dist.batches(self.recipe.batches(epoch, rng)))[:len(batches) - i]
                if i >= len(batches):
                    return
            self.refreshes.batch(step, self.state.mined_step)
            yield batches[i]
            i += 1

    def _train_epoch(self, epoch: int) -> EpochStats:
        """One pass over the recipe's batches for ``epoch``; the epoch's loss and counts over every rank's share."""
        with self.timer.phase("batches"):
            batches = list(self.dist.batches(self.recipe.batches(epoch, _epoch_rng(self.cfg.seed, epoch))))
        model = self.ddp if self.ddp is not None else self.model
        model.train()
        stats = EpochStats()
        planned = self._planned(epoch, batches, stats)
        for batch in _progress(planned, f"epoch {epoch}/{self.cfg.epochs}", self.dist.is_main, len(batches)):
            with self.timer.phase("forward"):
                loss, terms = self.recipe.loss(model, batch)
            _step(self.optimizer, terms, stats, loss, self.dist, self.timer)
        if self.dist.enabled:
            stats.loss_sum, tuples, active = self.dist.sums([stats.loss_sum, stats.tuples, stats.active])
            stats.tuples, stats.active = int(tuples), int(active)
        self.state.step += stats.steps
        self.state.epoch = epoch
        return stats

    def _snapshot_meta(self, reason: str, step: int) -> dict[str, Any]:
        return {"epoch": self.state.epoch, "step": step, "metrics": self.state.history[-1]["metrics"],
                "reason": reason, "run_dir": str(self.run_dir)}

    def _finish_epoch(self, stats: EpochStats | None, refresh: tuple[str, dict[str, Any] | None] | None,
                      started: float, timing: dict[str, float] | None = None) -> None:
        """Evaluate, record, checkpoint and plot the epoch just completed (epoch 0: untrained)."""
        record = self._record(stats, refresh, started, timing)
        metrics = record["metrics"]
        self.state.history.append(record)
        if self.dist.is_main:  # rank 0 alone writes the run folder
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if metrics and metrics["map_at_r"] > self.state.best_map_at_r:
            self.state.best_map_at_r = metrics["map_at_r"]
            self._save(BEST)  # before last.pt: a kill in between redoes this epoch and saves best.pt again
        self._save(LAST)
        if not self.dist.is_main:
            return
        plot_history(self.state.history, self.run_dir / PLOT_FILE)
        loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
        scores = (f"MAP@R {metrics['map_at_r']:.4f}, P@1 {metrics['precision_at_1']:.4f}" if metrics else
                  f"not evaluated (eval_every {self.cfg.eval_every})")
        log.info("epoch %d/%d: loss %s, %s (%.1f s)", self.state.epoch, self.cfg.epochs, loss, scores,
                 record["elapsed_s"])

    def _record(self, stats: EpochStats | None, refresh: tuple[str, dict[str, Any] | None] | None, started: float,
                timing: dict[str, float] | None) -> dict[str, Any]:
        """The epoch's line of ``metrics.jsonl``: rank 0 evaluates, and every rank keeps rank 0's record."""
        metrics: dict[str, float] = {}
        if self.dist.is_main and self.cfg.is_eval_epoch(self.state.epoch):
            with self.timer.phase("eval"):
                metrics = evaluate(self.model, self.x_eval, self.splits.eval.y, self.cfg.eval_batch_size,
                                   self.cfg.eval_sample, self.cfg.seed)
        phases = self.timer.take()
        refreshes, self.refreshes = self.refreshes, EpochRefreshes(self.cfg.refresh)
        record = {
            "epoch": self.state.epoch, "step": self.state.step,
            "loss": stats.loss if stats is not None else None,
            "metrics": metrics,
            "train": stats.to_dict() if stats is not None else None,
            "snapshot": refresh[0] if refresh is not None else None,
            "mining": refresh[1] if refresh is not None else None,
            "timing": {**timing, **phases} if timing is not None else None,
            "staleness": refreshes.staleness() if stats is not None else None,
            "refresh": refreshes.to_dict() if stats is not None else None,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        if self.drift is not None:  # the check before this epoch (None when the schedule refreshed anyway)
            record["drift"] = self.drift.take()
        return self.dist.from_main(lambda: record)

    def _save(self, name: str) -> None:
        if not self.dist.is_main:
            return  # every rank holds the same state; rank 0 alone writes it
        s = self.state
        save_checkpoint(self.run_dir / name, {
            "config": self.cfg.to_dict(), "model_spec": self.model_spec, "epoch": s.epoch, "step": s.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
            "recipe": self.recipe.state_dict(), "mined_step": s.mined_step, "refresh_due_step": s.refresh_due_step,
            "refresh_pending": s.refresh_pending, "refresh_count": s.refresh_count,
            "snapshot": s.snapshot, "snapshot_epoch": s.snapshot_epoch,
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
        best = max((r for r in h if r["metrics"]), key=lambda r: r["metrics"]["map_at_r"])
        return RunSummary(self.run_dir, Path(self.cfg.store), self.run_dir / PLOT_FILE, self.state.snapshot,
                          h[0]["metrics"], h[-1]["metrics"], best["metrics"], best["epoch"])


def _publish_local(model: torch.nn.Module, x: torch.Tensor, labels: np.ndarray, publisher: SnapshotPublisher,
                   meta: dict[str, Any], dist: DistContext) -> Any:
    return publish_local(model, x, labels, publisher, meta)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(seed, epoch, SHUFFLE))


def _check_async(cfg: TrainConfig, dist: DistContext, parts: Parts) -> None:
    """Refuse what an asynchronous refresh cannot do: torchrun, and a recipe the worker cannot rebuild."""
    if dist.enabled:
        raise ValidationError("--refresh async is not supported under torchrun (every rank would have to take "
                              "over the new tuples at the same step); use --refresh sync, whose refreshes each "
                              "rank embeds its block of")
    if parts.recipe is not None and getattr(parts.recipe, "name", None) != cfg.recipe.name:
        raise ValidationError(f"--refresh async computes each refresh with the registered recipe "
                              f"{cfg.recipe.name!r} in a worker process; a recipe given as an object must be that "
                              f"recipe (or a subclass keeping its name and compute_refresh)")


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
