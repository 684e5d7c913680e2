"""Asynchronous refresh: a worker process embeds, publishes and mines while the training process goes on.

``hardneg train --refresh async``. The loop (:mod:`hardneg.trainer.loop`) owns the schedule: at a step
boundary it hands the worker a copy of the model's weights (:meth:`RefreshWorker.submit`), and at each later
boundary it asks whether the refresh is done (:meth:`RefreshWorker.poll`); when it is, the recipe loads what
the worker computed and the rest of the epoch is planned from it. The recipe owns the content: the worker
runs the run's own recipe's :meth:`~hardneg.trainer.recipes.base.Recipe.compute_refresh` on the snapshot it
published (mined tuples, a class-neighbour table, mined negatives) and sends back plain tensors and values.

The worker is a separate process (``torch.multiprocessing``, spawn), so that the GIL and the optimiser's
threads do not slow each other. It is started once per run with the training items (shared memory, not
copied per refresh), builds the model from the run's config, and then, per request: loads the weights,
embeds every training item, publishes the snapshot (the store's atomic publish; while the worker runs it is
the run's only writer) and computes the recipe's refresh. A request that publishes nothing (``publish_every``)
embeds only the recipe's ``refresh_items`` and exports and stores nothing, as a sync refresh does. One request
is in flight at a time. The loop starts the worker with the run; when the run's first refresh falls due before
the worker is ready (its start: importing torch and FAISS, a first export; seconds, several epochs of a small
run), the loop does that refresh itself (:meth:`hardneg.trainer.loop.Trainer._refresh_first`) and the worker
publishes its snapshot; a worker that is ready by then does it all, and training goes on meanwhile.

Failure handling: a worker that raises sends its traceback, and training stops with it (the error would
recur). A worker that dies (killed, out of memory) is reported and restarted once, with the refresh it was
doing; a second death stops training with an error rather than let it train on ever older tuples. A worker
whose training process dies is killed by the kernel (``PR_SET_PDEATHSIG`` on Linux), and checks before
publishing that its parent lives, so that a killed run leaves no second writer behind.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.multiprocessing as mp

if TYPE_CHECKING:
    from hardneg.trainer.recipes.base import Snapshot
    from hardneg.trainer.refresh import SnapshotPublisher

log = logging.getLogger(__name__)

# How long close() waits for a refresh in flight, and for the worker to exit, before it is terminated.
CLOSE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RefreshRequest:
    """One refresh: the weights taken at optimizer step ``step`` of ``epoch``, and the snapshot's metadata;
    ``publish`` False: publish nothing (``publish_every``), embed only the recipe's ``refresh_items``."""

    step: int
    epoch: int
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any]
    publish: bool = True


@dataclass(frozen=True)
class RefreshResult:
    """What the worker sends back: the snapshot's name, the recipe's state and statistics, and the worker's
    per-phase clocks (``embed_s``, ``embed_cpu_s``, ... as in :class:`~hardneg.trainer.timing.PhaseTimer`)."""

    step: int
    epoch: int
    snapshot: str | None  # None: the refresh published nothing
    state: dict[str, Any]
    stats: dict[str, Any] | None
    timing: dict[str, float]
    error: str | None = None  # the worker's traceback, when the refresh raised


@dataclass(frozen=True)
class WorkerInputs:
    """What the worker is started with: the run's config (its dict) and model spec, and the training items
    (``x`` (n, ...) and ``y`` (n,) tensors, in shared memory on CPU; ``labels`` (n,) numpy) and their
    thumbnails (:func:`~hardneg.trainer.refresh.training_thumbs`, or None)."""

    config: dict[str, Any]
    model_spec: dict[str, Any]
    x: torch.Tensor
    y: torch.Tensor
    labels: np.ndarray
    thumbs: np.ndarray | None = None  # the snapshots' thumbnails, as the training process publishes them
    parent: int = field(default_factory=os.getpid)


class RefreshWorkerDied(RuntimeError):
    """The refresh worker failed: it raised, or it died twice."""


class RefreshWorker:
    """The training process's handle on the refresh worker: start, submit, poll, close (see the module docs)."""

    def __init__(self, inputs: WorkerInputs, max_restarts: int = 1) -> None:
        self.inputs = inputs
        self.max_restarts = max_restarts
        self.restarts = 0
        self.pending: RefreshRequest | None = None
        self._ctx = mp.get_context("spawn")
        self._requests: Any = None
        self._results: Any = None
        self._ready: Any = None
        self.process: Any = None
        self._start()

    def _start(self) -> None:
        self._requests, self._results, self._ready = self._ctx.Queue(), self._ctx.Queue(), self._ctx.Event()
        self.process = self._ctx.Process(target=worker_main,
                                         args=(self.inputs, self._requests, self._results, self._ready),
                                         name="hardneg-refresh", daemon=True)
        self.process.start()

    @property
    def busy(self) -> bool:
        """True while a refresh is in flight."""
        return self.pending is not None

    @property
    def ready(self) -> bool:
        """True once the worker has started (imports, model, the export's warm-up) and would take a request now."""
        return self._ready.is_set()

    def submit(self, request: RefreshRequest) -> None:
        """Start ``request`` in the worker; one refresh at a time."""
        if self.pending is not None:
            raise RuntimeError("a refresh is already in flight")
        self.pending = request
        self._requests.put(request)

    def poll(self, timeout: float = 0.0) -> RefreshResult | None:
        """The finished refresh, or None while it runs (waiting at most ``timeout`` seconds).

        Raises :class:`RefreshWorkerDied` when the refresh raised, or when the worker died more than
        ``max_restarts`` times; a first death restarts the worker with the refresh it was doing.
        """
        if self.pending is None:
            return None
        try:
            result: RefreshResult = self._results.get(timeout=timeout) if timeout > 0 else self._results.get_nowait()
        except queue.Empty:
            if not self.process.is_alive():
                self._restart()
            return None
        self.pending = None
        if result.error is not None:
            raise RefreshWorkerDied(f"the refresh of the weights of step {result.step} failed in the refresh "
                                    f"worker; training stops:\n{result.error}")
        return result

    def wait(self) -> RefreshResult | None:
        """Block until the refresh in flight is done (restarting a dead worker as :meth:`poll` does)."""
        while self.pending is not None:
            result = self.poll(timeout=0.5)
            if result is not None:
                return result
        return None

    def _restart(self) -> None:
        code = self.process.exitcode
        if self.restarts >= self.max_restarts:
            raise RefreshWorkerDied(f"the refresh worker died again (exit code {code}) after {self.restarts} "
                                    f"restart(s); training stops rather than train on ever older tuples")
        self.restarts += 1
        log.warning("the refresh worker died (exit code %s) during the refresh of step %d; restarting it (%d of "
                    "at most %d)", code, self.pending.step if self.pending else -1, self.restarts, self.max_restarts)
        self._start()
        if self.pending is not None:
            self._requests.put(self.pending)

    def close(self, wait: bool = True) -> None:
        """Finish (``wait``) or abandon the refresh in flight, then stop the worker."""
        if self.process is None:
            return
        if wait and self.pending is not None and self.process.is_alive():
            try:
                self.poll(timeout=CLOSE_TIMEOUT_S)
            except RefreshWorkerDied as e:
                log.warning("%s", e)
        self.pending = None
        if self.process.is_alive():
            self._requests.put(None)
            self.process.join(timeout=CLOSE_TIMEOUT_S if wait else 5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        for q in (self._requests, self._results):
            q.close()
            q.cancel_join_thread()
        self.process = None


# ---------------------------------------------------------------------------------------- the worker's side
def worker_main(inputs: WorkerInputs, requests: Any, results: Any, ready: Any = None) -> None:
    """The worker process: build the model, publisher and recipe once, say so (``ready``, an event), then serve
    requests until ``None``."""
    _die_with_parent(inputs.parent)
    from hardneg.miner.store import SnapshotStore
    from hardneg.trainer.config import TrainConfig
    from hardneg.trainer.losses import make_loss
    from hardneg.trainer.models import build_model
    from hardneg.trainer.recipes import recipe_class
    from hardneg.trainer.recipes.base import RecipeContext, TrainData
    from hardneg.trainer.refresh import SnapshotPublisher
    from hardneg.trainer.runtime import set_threads
    from hardneg.trainer.timing import PhaseTimer

    cfg = TrainConfig.from_dict(inputs.config)
    set_threads(cfg.threads or 1)  # the training process keeps the other cores
    torch.use_deterministic_algorithms(True, warn_only=True)
    model, _ = build_model(cfg, inputs.model_spec["input_shape"])
    model.to(inputs.x.device)
    timer = PhaseTimer()
    publisher = SnapshotPublisher(SnapshotStore(cfg.store, keep=cfg.keep_snapshots), cfg, inputs.model_spec, timer,
                                  inputs.thumbs)
    data = TrainData(inputs.x, inputs.y, inputs.labels)
    recipe = recipe_class(cfg.recipe.name)(RecipeContext(cfg, data, make_loss(cfg.loss, cfg.margin), timer=timer))
    _warm_up_export(model, inputs.model_spec)
    if ready is not None:
        ready.set()
    while (request := requests.get()) is not None:
        try:
            model.load_state_dict(request.weights)
            snapshot = _embed_and_publish(request, model, inputs, publisher, recipe.refresh_items)
            if snapshot is None:
                return  # the training process is gone: publish nothing behind a resumed run's back
            with timer.phase("mine"):
                state, stats = recipe.compute_refresh(snapshot) if snapshot.embeddings is not None else ({}, None)
            results.put(RefreshResult(request.step, request.epoch, snapshot.name, state, stats, timer.take()))
        except Exception:  # sent to the training process, which stops with it
            timer.take()
            results.put(RefreshResult(request.step, request.epoch, "", {}, None, {}, traceback.format_exc()))


def _embed_and_publish(request: RefreshRequest, model: torch.nn.Module, inputs: WorkerInputs,
                       publisher: SnapshotPublisher, refresh_items: Callable[[int], np.ndarray | None]
                       ) -> Snapshot | None:
    """The snapshot the recipe refreshes from: every item embedded and published (``request.publish``, or a
    recipe whose ``refresh_items`` wants every item in an index), else, as a sync refresh that publishes
    nothing, the recipe's sample (no index, no export, nothing stored; no embeddings when it asks for none).
    None when the training process is gone (nothing is published then)."""
    from hardneg.trainer.recipes.base import Snapshot
    from hardneg.trainer.refresh import embed_items

    batch_size, timer = publisher.cfg.eval_batch_size, publisher.timer
    items = None if request.publish else refresh_items(request.epoch)
    if items is not None:
        with timer.phase("embed"):
            sample = embed_items(model, inputs.x, batch_size, items) if len(items) else None
        return Snapshot(None, None, sample, request.epoch, items=items)
    with timer.phase("embed"):
        embeddings = embed_items(model, inputs.x, batch_size)
    if os.getppid() != inputs.parent:
        return None
    published = publisher.publish(model, embeddings, inputs.labels, request.meta)
    return Snapshot(published.name, published.index, embeddings, request.epoch)


def _warm_up_export(model: torch.nn.Module, model_spec: dict[str, Any]) -> None:
    """Export the model once before the first request: torch.export's first call in a process costs a few
    times the later ones (2.5 s against 0.7 s for the digits CNN), and the warm-up epochs can pay it."""
    import copy
    import tempfile
    from pathlib import Path

    from hardneg.miner.model_io import export_model

    with tempfile.TemporaryDirectory(prefix="hardneg-refresh-") as tmp:
        export_model(copy.deepcopy(model).cpu(), model_spec["input_shape"], Path(tmp) / "model.pt2")


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent check before each publish remains
        log.debug("PR_SET_PDEATHSIG is not available; the worker checks its parent before publishing")
    if os.getppid() != parent:
        os._exit(0)


def clone_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict, taken now (the queue moves it to shared memory, not the model's own)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
