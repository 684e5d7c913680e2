"""``--refresh async``: the worker process, the hand-over at step boundaries, a dying worker, SIGKILL + resume.

References: the neighbour table the recipe holds at each step (every batch is planned from the table in force,
and its classes are one of that table's rows), the refresh steps the run recorded, the store's own check of
every snapshot it holds, and a run that a real ``kill -9`` interrupts and ``--resume`` finishes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.async_refresh import RefreshRequest, RefreshWorker, RefreshWorkerDied, WorkerInputs, clone_weights
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import load_splits
from hardneg.trainer.refresh import embed_items, training_thumbs
from hardneg.trainer.loop import Parts, Trainer
from hardneg.trainer.losses import make_loss
from hardneg.trainer.models import build_model
from hardneg.trainer.recipes import recipe_class
from hardneg.trainer.recipes.base import RecipeContext, Snapshot, TrainData
from hardneg.trainer.recipes.class_batches import ClassBatches

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EPOCHS = 80  # the killed run's: more than it trains before its first refresh is taken over


class WatchedClassBatches(ClassBatches):
    """Class batches that check, at every batch, that the batch was planned from the table in force now.

    Until the third take-over each step sleeps a little, so that the worker (whose start imports torch and
    FAISS) finishes a few refreshes within the run even on a busy machine.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.planned_from: np.ndarray | None = None
        self.batches_checked = 0
        self.mismatches: list[str] = []
        self.take_overs = 0
        self.tables: list[np.ndarray] = []  # every class table loaded, in order

    def plan(self, epoch: int) -> Any:
        self.planned_from = self.neighbours
        return super().plan(epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.take_overs += 1
        self.tables.append(self.neighbours)

    def loss(self, model: torch.nn.Module, batch: np.ndarray) -> Any:
        if self.take_overs < 3:
            time.sleep(0.05)
        if self.neighbours is not None:
            self.batches_checked += 1
            if self.planned_from is not self.neighbours:
                self.mismatches.append("a batch planned from an older table trained after the take-over")
            classes = set(self.ctx.data.labels[batch].tolist())
            rows = {frozenset(row.tolist()) for row in self.neighbours[:, :len(classes)]}
            if frozenset(classes) not in rows:
                self.mismatches.append(f"batch classes {sorted(classes)} are no row of the table in force")
        return super().loss(model, batch)


def _watched_run(cfg: TrainConfig) -> tuple[Trainer, WatchedClassBatches]:
    """Train ``cfg`` (an async class-batches run) with :class:`WatchedClassBatches`; the trainer and its recipe."""
    recipes: list[WatchedClassBatches] = []

    def factory(ctx: Any, **kw: Any) -> WatchedClassBatches:
        recipes.append(WatchedClassBatches(ctx, **kw))
        return recipes[-1]

    factory.name = "class-batches"  # type: ignore[attr-defined]
    trainer = Trainer.create(cfg, parts=Parts(recipe=factory))
    trainer.run()
    return trainer, recipes[0]


def test_async_take_over_at_step_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker still starting when the first refresh falls due (as in a small run: seconds of imports against
    # a warm-up epoch of about one second here), pinned so that the test does not depend on the machine's speed.
    monkeypatch.setattr(RefreshWorker, "ready", property(lambda self: False))
    cfg = TrainConfig.from_dict({"epochs": 6, "refresh": "async", "refresh_every_steps": 5, "batch_size": 32,
                                 "per_class": 8, "seed": 1, "threads": 1, "store": str(tmp_path / "store"),
                                 "run_dir": str(tmp_path / "run")})
    trainer, recipe = _watched_run(cfg)
    assert recipe.mismatches == []
    history = trainer.state.history
    spans = [s for r in history[1:] for s in r["refresh"]["spans"]]
    assert recipe.take_overs == len(spans) >= 2, spans
    assert recipe.batches_checked > 0
    epoch_starts = {r["step"] for r in history}
    assert any(end not in epoch_starts for _, end in spans), f"no take-over inside an epoch: {spans}"
    # the first refresh ran in the training process, before the first step after the warm-up (nothing mined yet),
    # and its weights went to the worker, which published their snapshot; every later one ran in the worker
    first = history[1]["step"]  # the warm-up is one epoch
    assert spans[0] == [first, first] and spans[1][0] == first, spans
    assert history[2]["refresh"]["spans"][0] == [first, first] and history[2]["mining"] is not None
    assert history[2]["staleness"]["batches"] == history[2]["train"]["steps"]  # no warm-up batch after the warm-up
    assert history[2]["timing"]["embed_s"] > 0  # this process embedded the training set for it
    # both computed the same table from the same weights (this process's embeddings, and the worker's)
    np.testing.assert_array_equal(recipe.tables[0], recipe.tables[1])
    for (start, end), (next_start, _) in zip(spans[1:], spans[2:]):
        assert start < end <= next_start  # one refresh in flight; the weights are older than the take-over
    # staleness: each batch's step minus the step of the weights its table came from
    for r in history[1:]:
        st = r["staleness"]
        if st["batches"]:
            assert 0 <= st["mean"] <= st["max"]
    # the worker published every refresh it finished, and the store checks out, with the training images'
    # thumbnails in every snapshot, as a synchronous refresh publishes them
    store = SnapshotStore(cfg.store)
    thumbs = training_thumbs(load_splits(cfg).train.x)
    for name in store.names():
        store.verify(name)
        snap = store.open(name)
        np.testing.assert_array_equal(store.load_thumbs(snap), thumbs[snap.index.ids])
    assert trainer.state.snapshot == store.latest_name()


def _worker(tmp_path: Path, **changes: Any) -> tuple[RefreshWorker, dict[str, torch.Tensor], Any]:
    """A refresh worker for the digits, the weights of an untrained model, and the in-process reference: the
    state and statistics the recipe computes in this process from a snapshot of those weights."""
    cfg = TrainConfig.from_dict({"store": str(tmp_path / "store"), "threads": 1, **changes})
    splits = load_splits(cfg)
    torch.manual_seed(0)
    model, spec = build_model(cfg, splits.train.input_shape)
    x, y = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    worker = RefreshWorker(WorkerInputs(cfg.to_dict(), spec, x, y, splits.train.y))

    def reference() -> tuple[dict[str, Any], Any]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the worker embeds
        try:
            emb = embed_items(model, x, cfg.eval_batch_size)
        finally:
            torch.set_num_threads(threads)
        index = VectorIndex.build(emb, splits.train.y, np.arange(len(emb)), metric="cosine", index=cfg.index,
                                  seed=cfg.seed)
        recipe = recipe_class(cfg.recipe.name)(RecipeContext(cfg, TrainData(x, y, splits.train.y),
                                                             make_loss(cfg.loss, cfg.margin)))
        return recipe.compute_refresh(Snapshot("reference", index, emb, 2))

    return worker, clone_weights(model), reference


def test_a_ready_worker_does_the_first_refresh_while_training_goes_on(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that has started by the time the first refresh falls due (a large training set's warm-up outlasts
    its start; here the run waits for it) takes that refresh too: the training process embeds nothing, keeps
    training on the warm-up's batches, and takes the worker's table over at a later step boundary."""
    start = RefreshWorker._start

    def start_and_wait(self: RefreshWorker) -> None:
        start(self)
        assert self._ready.wait(timeout=600), "the refresh worker did not start"

    monkeypatch.setattr(RefreshWorker, "_start", start_and_wait)
    cfg = TrainConfig.from_dict({"epochs": 4, "refresh": "async", "refresh_every_steps": 5, "batch_size": 32,
                                 "per_class": 8, "seed": 1, "threads": 1, "keep_snapshots": 50,
                                 "store": str(tmp_path / "store"), "run_dir": str(tmp_path / "run")})
    trainer, recipe = _watched_run(cfg)
    assert recipe.mismatches == []
    history = trainer.state.history
    spans = [sp for r in history[1:] for sp in r["refresh"]["spans"]]
    first = history[1]["step"]  # the warm-up is one epoch
    assert spans[0][0] == first and spans[0][1] > first, spans  # the worker's, taken over later
    assert history[2]["timing"].get("embed_s", 0.0) == 0.0  # this process embedded nothing for it (cf. above)
    assert history[2]["staleness"]["batches"] < history[2]["train"]["steps"]  # warm-up batches went on meanwhile
    assert recipe.take_overs == len(spans) and len(recipe.tables) == len(spans)
    store = SnapshotStore(cfg.store)
    metas = [store.verify(n)["meta"] for n in store.names()]
    assert min(m["step"] for m in metas if m["reason"] == "refresh") == first  # the worker published the first


def test_an_unpublished_refresh_stores_nothing_and_samples_as_sync_does(tmp_path: Path) -> None:
    worker, weights, reference = _worker(tmp_path, centroid_sample=3)
    cfg = TrainConfig.from_dict({"store": str(tmp_path / "store"), "threads": 1, "centroid_sample": 3})
    splits = load_splits(cfg)
    x, y = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    try:
        worker.submit(RefreshRequest(5, 2, weights, {"epoch": 1}, publish=False))
        result = worker.wait()
        assert result is not None and result.snapshot is None
        assert SnapshotStore(tmp_path / "store").names() == []  # no export, nothing stored
        # reference: this process's recipe on the same sample (3 items of each class, seeded by the epoch)
        model, _ = build_model(cfg, splits.train.input_shape)
        model.load_state_dict(weights)
        recipe = ClassBatches(RecipeContext(cfg, TrainData(x, y, splits.train.y), make_loss(cfg.loss, cfg.margin)))
        items = recipe.refresh_items(2)
        assert items is not None and len(items) == 30
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            emb = embed_items(model, x, cfg.eval_batch_size, items)
        finally:
            torch.set_num_threads(threads)
        state, stats = recipe.compute_refresh(Snapshot(None, None, emb, 2, items=items))
        assert _same_state(result.state, state) and result.stats == stats and stats["centroid_items"] == 30
        # a refresh that publishes: the whole set, in a snapshot with the exported model
        worker.submit(RefreshRequest(6, 2, weights, {"epoch": 1}))
        result = worker.wait()
        assert result is not None
        state, stats = reference()
        assert _same_state(result.state, state) and result.stats == stats
        store = SnapshotStore(tmp_path / "store")
        assert store.names() == [result.snapshot] and store.open(result.snapshot).model_path is not None
    finally:
        worker.close()


def test_an_async_run_publishes_its_first_and_final_snapshots(tmp_path: Path) -> None:
    """publish_every above the run's refreshes: the worker's other refreshes store nothing."""
    # epochs: room for a slow worker start (each step sleeps until the third take-over)
    cfg = TrainConfig.from_dict({"epochs": 8, "refresh": "async", "refresh_every_steps": 3, "batch_size": 32,
                                 "per_class": 8, "seed": 2, "threads": 1, "publish_every": 1000,
                                 "keep_snapshots": 50, "store": str(tmp_path / "store"),
                                 "run_dir": str(tmp_path / "run")})
    trainer, recipe = _watched_run(cfg)
    assert recipe.mismatches == [] and recipe.take_overs >= 3  # the first, its copy, then unpublished ones
    history = trainer.state.history
    store = SnapshotStore(cfg.store)
    metas = [store.verify(n)["meta"] for n in store.names()]
    assert [(m["step"], m["reason"]) for m in metas] == [(history[1]["step"], "refresh"),
                                                          (history[-1]["step"], "final")]
    assert all(store.open(n).model_path is not None for n in store.names())
    assert trainer.state.snapshot == store.latest_name()


def _same_state(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_dead_worker_is_restarted_once_then_training_stops(tmp_path: Path) -> None:
    worker, weights, reference = _worker(tmp_path)
    try:
        worker.submit(RefreshRequest(7, 2, weights, {"epoch": 1}))
        os.kill(worker.process.pid, signal.SIGKILL)
        result = worker.wait()  # the restarted worker does the refresh it was doing
        assert worker.restarts == 1 and result is not None and result.step == 7
        state, stats = reference()  # rows: each class, then the others nearest first
        assert _same_state(result.state, state) and result.stats == stats
        assert SnapshotStore(tmp_path / "store").verify(result.snapshot)["meta"]["epoch"] == 1
        worker.submit(RefreshRequest(9, 2, weights, {"epoch": 1}))
        os.kill(worker.process.pid, signal.SIGKILL)
        with pytest.raises(RefreshWorkerDied, match="died again .* training stops"):
            worker.wait()
    finally:
        worker.close(wait=False)


def test_the_worker_mines_self_supervised_negatives_as_the_recipe_does(tmp_path: Path) -> None:
    worker, weights, reference = _worker(tmp_path, recipe="simclr", ssl_skip=2)
    try:
        worker.submit(RefreshRequest(4, 2, weights, {"epoch": 1}))
        result = worker.wait()
        assert result is not None
        state, stats = reference()
        assert _same_state(result.state, state) and result.stats == stats
        assert state["negatives"].shape[0] == 1347  # one row per training image
    finally:
        worker.close()


def test_a_failing_refresh_stops_training_with_its_error(tmp_path: Path) -> None:
    worker, weights, _ = _worker(tmp_path)
    try:
        worker.submit(RefreshRequest(3, 2, {"no such weight": weights[next(iter(weights))]}, {"epoch": 1}))
        with pytest.raises(RefreshWorkerDied, match="(?s)step 3 failed.*Unexpected key"):
            worker.wait()
        assert worker.restarts == 0
    finally:
        worker.close(wait=False)


def _history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.timeout(900)  # a busy machine starts the worker slowly (7 minutes at load 20 on 2 cores)
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc for the worker's pid")
def test_sigkill_during_a_background_refresh_then_resume(tmp_path: Path) -> None:
    args = ["train", "--run-dir", "run", "--store", "store", "--refresh", "async", "--refresh-every-steps", "2",
            "--epochs", str(EPOCHS), "--seed", "2", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "hardneg.cli", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        # wait for a refresh taken over and the next in flight (every 2 steps one falls due)
        while not any(r.get("refresh") and r["refresh"]["finished"] for r in _history(tmp_path / "run")):
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no refresh was taken over in time"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert workers, "no refresh worker process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_after = _history(tmp_path / "run")[-1]["epoch"]
    assert killed_after < EPOCHS
    # the kernel kills the worker with its parent: no second writer behind the resumed run
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
              for w in workers):
        assert time.monotonic() < deadline, "the refresh worker outlived its training process"
        time.sleep(0.1)
    store = SnapshotStore(tmp_path / "store")
    for name in store.names():
        store.verify(name)
    # two more epochs than the checkpoint's (fewer than the killed run's: a resumed run may change epochs)
    end = killed_after + 2
    resumed = subprocess.run([sys.executable, "-m", "hardneg.cli", "train", "--resume", "run", "--epochs", str(end)],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = _history(tmp_path / "run")
    assert [r["epoch"] for r in history] == list(range(end + 1))
    done = int(re.search(r"resuming run after epoch (\d+)", resumed.stderr).group(1))  # last.pt's epoch
    assert history[done + 1]["refresh"]["started"] >= 1  # the refresh the kill cut short starts again
    for name in store.names():
        store.verify(name)
    assert store.verify()["meta"]["reason"] == "final"
