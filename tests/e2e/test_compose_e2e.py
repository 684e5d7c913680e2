"""docker-compose.yml end to end without a Docker engine: each service's exact command and environment run as
local processes over shared temporary volumes (the mapping is in compose_support's docstring).

Scenario 1: the api starts first, on the empty store; then the trainer publishes a snapshot after each epoch.
The api turns ready with the first one, follows each newer one, answers ``/neighbors`` like brute force over
the served snapshot's stored vectors, and serves the trainer's final snapshot once it finishes; it exits
promptly and cleanly on SIGTERM, never having written to its read-only store.
Scenario 2: the trainer gets SIGTERM midway and is started again with the same command, as
``restart: on-failure`` does; it resumes and ends exactly where scenario 1's uninterrupted run ended.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from compose_support import (READONLY_HOOK, READONLY_MARKER, LocalContainer, ServiceProcess, load_compose,
                             read_image, wait_for)

from hardneg.miner.store import SnapshotStore
from hardneg.trainer.checkpoint import LAST, load_checkpoint

pytestmark = pytest.mark.slow

KEY = "e2e-key-5b1c"
# What a user would put in .env for a small, fast run: 4 epochs with a snapshot after each, an api that
# looks for new snapshots often enough to see several of them, an API key and a store key (the trainer signs,
# the api verifies).
VARIABLES = {"HARDNEG_EPOCHS": "4", "HARDNEG_REFRESH_EVERY": "1", "HARDNEG_POLL_SECONDS": "0.2",
             "HARDNEG_API_KEY": KEY, "HARDNEG_STORE_KEY": "e2e-store-key-90d2"}
K = 7
STOP_TIMEOUT_S = 10.0  # `docker stop` waits 10 s before it sends SIGKILL


@dataclass
class Stack:
    containers: dict[str, LocalContainer]
    store: Path  # the local folder of the volume the trainer writes and the api reads
    run_dir: Path  # the trainer's --run-dir, mapped


def make_stack(root: Path) -> Stack:
    services, doc = load_compose(VARIABLES)
    image = read_image()
    volumes = {name: root / "volumes" / name for name in doc["volumes"]}
    for folder in volumes.values():
        folder.mkdir(parents=True)  # Docker creates a new named volume empty
    containers = {name: LocalContainer(s, image, volumes, root / "containers" / name) for name, s in services.items()}
    trainer = containers["trainer"]
    flag = trainer.service.command.index
    return Stack(containers, Path(trainer.host_path(trainer.service.command[flag("--store") + 1])),
                 Path(trainer.host_path(trainer.service.command[flag("--run-dir") + 1])))


def results(run_dir: Path) -> list[tuple]:
    """Per epoch, what a deterministic run reproduces: step count, loss, retrieval metrics, training counts."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["step"], r["loss"], r["metrics"], r["train"]) for r in history]


def stop_all(*procs: ServiceProcess | None) -> None:
    for p in procs:
        if p is not None:
            p.kill()


# ------------------------------------------------------------------ scenario 1
@dataclass
class Observed:
    stack: Stack
    readyz_before: int
    healthcheck_before: int
    seen: list[tuple[str, bool]]  # names /readyz reported, in order, each with: did the store hold it right then
    during: dict  # a /neighbors exchange while the trainer ran
    trainer_rc: int
    trainer_output: str
    latest: str
    final: dict  # a /neighbors exchange after the trainer finished
    without_key: int
    healthcheck_after: int
    api_rc: int
    api_output: str


def served_name(client: httpx.Client) -> str | None:
    """The snapshot /readyz names, or None while it answers 503 (or the server is not up yet)."""
    try:
        r = client.get("/readyz")
    except httpx.TransportError:
        return None
    return r.json()["snapshot"] if r.status_code == 200 else None


def latest_name(store: Path) -> str | None:
    return SnapshotStore(store).latest_name()


def neighbors_exchange(client: httpx.Client, store: Path, snapshot: str, seed: int) -> dict:
    """Ask for the K nearest different-label neighbours of 4 seeded stored ids of ``snapshot``."""
    ids = np.random.default_rng(seed).choice(SnapshotStore(store).open(snapshot).index.ids, 4, replace=False)
    body = {"ids": ids.tolist(), "k": K, "different_label": True}
    r = client.post("/neighbors", json=body)
    return {"request": body, "status": r.status_code, "response": r.json()}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Observed:
    stack = make_stack(tmp_path_factory.mktemp("compose"))
    api_c, trainer_c = stack.containers["api"], stack.containers["trainer"]
    (port,) = api_c.ports.values()
    api = api_c.start()
    trainer = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=30) as client:
            def live() -> bool:
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    assert api.proc.poll() is None, f"the api exited:\n{api.output()[-3000:]}"
                    return False

            wait_for(live, 90, "the api to answer /healthz")
            readyz_before = client.get("/readyz").status_code
            healthcheck_before = api_c.run_healthcheck()
            trainer = trainer_c.start()
            seen: list[tuple[str, bool]] = []

            def record() -> str | None:
                name = served_name(client)
                if name is not None and (not seen or seen[-1][0] != name):
                    seen.append((name, (stack.store / "snapshots" / name).is_dir()))
                return name

            during = None
            deadline = time.monotonic() + 240
            while trainer.proc.poll() is None and time.monotonic() < deadline:
                if latest_name(stack.store) not in (None, seen[-1][0] if seen else None):
                    # Hold the trainer until the api serves its new snapshot: the api's first load imports
                    # torch and can take longer than the epochs left, which would make what it sees a race.
                    trainer.proc.send_signal(signal.SIGSTOP)
                    try:
                        newest = latest_name(stack.store)
                        wait_for(lambda: record() == newest, 60, f"the api to serve {newest}")
                        if during is None:
                            during = neighbors_exchange(client, stack.store, newest, seed=1)
                    finally:
                        trainer.proc.send_signal(signal.SIGCONT)
                record()
                time.sleep(0.02)
            trainer_rc = trainer.wait(5)
            latest = (stack.store / "LATEST").read_text().strip()
            wait_for(lambda: record() == latest, 30, f"the api to serve {latest}")
            final = neighbors_exchange(client, stack.store, latest, seed=2)
            without_key = httpx.post(f"http://127.0.0.1:{port}/neighbors", json=final["request"]).status_code
            healthcheck_after = api_c.run_healthcheck()
        api_rc = api.terminate(STOP_TIMEOUT_S)
    finally:
        stop_all(api, trainer)
    assert during is not None, "the api never became ready while the trainer ran"
    return Observed(stack, readyz_before, healthcheck_before, seen, during, trainer_rc, trainer.output(), latest,
                    final, without_key, healthcheck_after, api_rc, api.output())


def assert_brute_force(exchange: dict, store: Path, knn_reference) -> None:
    """The answer equals brute force over the stored vectors of the snapshot the answer names."""
    reference_distances, assert_knn_matches = knn_reference
    assert exchange["status"] == 200, exchange["response"]
    answer = exchange["response"]
    index = SnapshotStore(store).open(answer["snapshot"]).index
    qids = np.asarray(exchange["request"]["ids"])
    qlabels = index.labels[index.rows_of(qids)]
    admissible = index.labels[None, :] != qlabels[:, None]  # hard-negative mode: other labels only
    d2 = reference_distances(index.vectors_of(index.ids), index.vectors_of(qids), index.metric, admissible)
    hits = [([h["id"] for h in r], [h["label"] for h in r], [h["distance"] for h in r]) for r in answer["results"]]
    assert_knn_matches(hits, d2, index.ids, index.labels, K)


def test_api_turns_ready_with_the_first_snapshot(scenario: Observed) -> None:
    assert scenario.readyz_before == 503
    assert scenario.healthcheck_before != 0  # the compose healthcheck fails on the empty store ...
    assert scenario.healthcheck_after == 0  # ... and passes once a snapshot is served
    assert "serving snapshot" in scenario.api_output


def test_api_follows_each_newer_snapshot_the_trainer_publishes(scenario: Observed) -> None:
    assert scenario.trainer_rc == 0, scenario.trainer_output[-3000:]
    published = SnapshotStore(scenario.stack.store).names()  # oldest first; 4 snapshots, within retention
    history = [json.loads(line) for line in (scenario.stack.run_dir / "metrics.jsonl").read_text().splitlines()]
    by_trainer = [r["snapshot"] for r in history if r["snapshot"]] + [scenario.latest]
    assert published == by_trainer
    names = [name for name, _ in scenario.seen]
    assert all(existed for _, existed in scenario.seen), scenario.seen
    assert set(names) <= set(published), (names, published)
    assert len(set(names)) > 1, f"the api served only {names} of {published}"
    order = [published.index(n) for n in names]
    assert order == sorted(set(order)), f"served out of order: {names}"  # only ever forwards, each once


def test_api_serves_the_final_snapshot_when_the_trainer_finishes(scenario: Observed) -> None:
    assert scenario.seen[-1][0] == scenario.latest == SnapshotStore(scenario.stack.store).latest_name()
    assert f"newest snapshot {scenario.latest} in {scenario.stack.store}" in scenario.trainer_output
    manifest = SnapshotStore(scenario.stack.store).read_manifest(scenario.latest)
    assert manifest["meta"]["reason"] == "final" and manifest["meta"]["epoch"] == int(VARIABLES["HARDNEG_EPOCHS"])
    assert scenario.final["response"]["snapshot"] == scenario.latest


def test_neighbors_match_brute_force_while_training_and_after(scenario: Observed, knn_reference) -> None:
    assert_brute_force(scenario.during, scenario.stack.store, knn_reference)
    assert_brute_force(scenario.final, scenario.stack.store, knn_reference)


def test_api_key_from_the_compose_environment_is_enforced(scenario: Observed) -> None:
    assert scenario.without_key == 401


def test_api_stops_cleanly_on_sigterm_and_never_wrote_to_its_readonly_store(scenario: Observed) -> None:
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why it ended
    # (under tini: 143, which `restart:` does not act on after `docker stop`)
    assert scenario.api_rc == -signal.SIGTERM, scenario.api_output[-3000:]
    assert "Application shutdown complete" in scenario.api_output
    assert "Traceback" not in scenario.api_output
    assert READONLY_MARKER not in scenario.api_output


# ------------------------------------------------------------------ scenario 2
@dataclass
class Restarted:
    stack: Stack
    running_when_stopped: bool
    stopped_rc: int
    stopped_output: str
    store_error: str | None  # what verifying the store right after the stop found wrong, if anything
    checkpoint_epoch: int
    restarted_rc: int
    restarted_output: str


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> Restarted:
    stack = make_stack(tmp_path_factory.mktemp("compose-restart"))
    trainer_c = stack.containers["trainer"]
    first = second = None
    try:
        first = trainer_c.start()
        wait_for(lambda: (stack.store / "LATEST").exists() or first.proc.poll() is not None, 180,
                 "the trainer's first snapshot")
        running = first.proc.poll() is None
        stopped_rc = first.terminate(STOP_TIMEOUT_S)
        store = SnapshotStore(stack.store)
        try:
            for name in store.names():
                store.verify(name)
            store_error = None
        except Exception as e:  # noqa: BLE001 - recorded for the test to show
            store_error = repr(e)
        checkpoint_epoch = load_checkpoint(stack.run_dir / LAST)["epoch"]
        second = trainer_c.start()  # the same command again, as `restart: on-failure` does
        restarted_rc = second.wait(240)
    finally:
        stop_all(first, second)
    return Restarted(stack, running, stopped_rc, first.output(), store_error, checkpoint_epoch, restarted_rc,
                     second.output())


def test_trainer_stops_promptly_on_sigterm_leaving_a_valid_store(restarted: Restarted) -> None:
    assert restarted.running_when_stopped, restarted.stopped_output[-3000:]
    # No handler of its own: Python's default action for SIGTERM ends it at once (tini then exits 143).
    # Checkpoints and snapshots are written atomically, so that is a clean stop for the trainer.
    assert restarted.stopped_rc == -signal.SIGTERM, restarted.stopped_output[-3000:]
    assert "Traceback" not in restarted.stopped_output
    assert restarted.store_error is None
    assert 0 <= restarted.checkpoint_epoch < int(VARIABLES["HARDNEG_EPOCHS"])


def test_restarted_trainer_resumes_and_ends_like_the_uninterrupted_run(restarted: Restarted,
                                                                       scenario: Observed) -> None:
    assert restarted.restarted_rc == 0, restarted.restarted_output[-3000:]
    assert f"resuming {restarted.stack.run_dir} after epoch {restarted.checkpoint_epoch}" in restarted.restarted_output
    assert results(restarted.stack.run_dir) == results(scenario.stack.run_dir)
    manifest = SnapshotStore(restarted.stack.store).verify()
    assert manifest["meta"]["reason"] == "final" and manifest["meta"]["epoch"] == int(VARIABLES["HARDNEG_EPOCHS"])


# ------------------------------------------------------- the read-only stand-in
WRITES = r"""
import os, sys, tempfile
root = sys.argv[1]
print(open(os.path.join(root, "f")).read())
for what, op in [
    ("append", lambda: open(os.path.join(root, "f"), "a")),
    ("os.open O_CREAT", lambda: os.open(os.path.join(root, "g"), os.O_WRONLY | os.O_CREAT)),
    ("mkdir", lambda: os.mkdir(os.path.join(root, "d"))),
    ("mkdtemp", lambda: tempfile.mkdtemp(dir=root)),
    ("replace", lambda: os.replace(os.path.join(root, "f"), os.path.join(root, "h"))),
    ("remove", lambda: os.remove(os.path.join(root, "g"))),
]:
    try:
        op()
        print(what, "ok")
    except OSError as e:
        print(what, e.errno)
"""


@pytest.mark.parametrize("readonly", [True, False])
def test_the_readonly_mount_stand_in_refuses_writes_only_where_asked(tmp_path: Path, readonly: bool) -> None:
    """The stand-in's refusals are what makes the read-only check above able to fail."""
    (tmp_path / "f").write_text("stored")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(READONLY_HOOK),
           "HARDNEG_E2E_READONLY": str(tmp_path) if readonly else str(tmp_path / "elsewhere")}
    proc = subprocess.run([sys.executable, "-c", WRITES, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0] == "stored", proc.stderr
    outcome = str(errno.EROFS) if readonly else "ok"
    assert [line.rsplit(" ", 1)[1] for line in lines[1:]] == [outcome] * 6, proc.stdout
    assert (READONLY_MARKER in proc.stderr) == readonly
    if readonly:
        assert [p.name for p in tmp_path.iterdir()] == ["f"] and (tmp_path / "f").read_text() == "stored"
