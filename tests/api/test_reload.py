"""Hot reload against a real uvicorn process: empty store, continuous publishing under load, corrupt snapshots.

Snapshot ``j`` holds ids ``j * 10_000 + 0..n-1``, so every response shows which snapshot really answered it,
and it is checked against brute force on that snapshot: a request that mixed two snapshots would fail.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_support import ApiServer, metric_value, wait_for

from hardneg.miner.index import VectorIndex
from hardneg.miner.store import LATEST, SnapshotStore

N, DIM, K = 200, 8, 5
QUERY = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)


def snapshot_data(j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectors (N, DIM), labels (N,) and ids (N,) of the j-th published snapshot."""
    rng = np.random.default_rng(100 + j)
    return (rng.normal(size=(N, DIM)).astype(np.float32), rng.integers(0, 4, size=N).astype(np.int64),
            j * 10_000 + np.arange(N, dtype=np.int64))


def publish(store: SnapshotStore, j: int) -> str:
    return store.publish(VectorIndex.build(*snapshot_data(j), metric="l2"), meta={"j": j})


def point_latest(root: Path, name: str) -> None:
    tmp = root / ".tmp-test-LATEST"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory: pytest.TempPathFactory, start_server) -> tuple[ApiServer, SnapshotStore]:
    root = tmp_path_factory.mktemp("reload-store")
    server = start_server(root, {}, "--poll-seconds", "0.1", "--retry-seconds", "600", "--lanes", "2")
    return server, SnapshotStore(root, keep=4)


def test_publishing_under_load(empty_server, knn_reference) -> None:
    reference_distances, assert_knn_matches = knn_reference
    server, store = empty_server
    c = httpx.Client(base_url=server.url, timeout=30)
    body = {"vectors": [QUERY.tolist()], "k": K}

    # Before the first snapshot: alive, not ready, and search says why.
    assert c.get("/healthz").status_code == 200
    for r in (c.get("/readyz"), c.post("/neighbors", json=body), c.get("/snapshot")):
        assert r.status_code == 503 and "no snapshot is loaded yet" in r.json()["detail"], r.text
        assert r.headers["retry-after"] == "1"
    assert math.isnan(metric_value(c.get("/metrics").text, "hardneg_snapshot_age_seconds"))

    published = {publish(store, 0): 0}
    wait_for(lambda: c.get("/readyz").status_code == 200, what="the first snapshot")

    stop = threading.Event()
    seen: list[list[tuple[int, dict]]] = [[] for _ in range(3)]

    def client_loop(out: list[tuple[int, dict]]) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as cc:
            for _ in range(5000):  # bounded even if stop is never set
                if stop.is_set():
                    return
                r = cc.post("/neighbors", json=body)
                out.append((r.status_code, r.json()))

    threads = [threading.Thread(target=client_loop, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    try:
        for j in range(1, 16):
            time.sleep(0.12)  # about one poll interval: most snapshots get served for a while, some are skipped
            published[publish(store, j)] = j
        newest = max(published, key=published.get)
        wait_for(lambda: c.get("/snapshot").json()["name"] == newest, what=f"the newest snapshot {newest}")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    responses = [resp for out in seen for resp in out]
    assert len(responses) > 30 and all(len(out) > 0 for out in seen)
    failed = [(s, b) for s, b in responses if s != 200]
    assert failed == [], failed[:3]
    answered = {b["snapshot"] for _, b in responses}
    assert answered <= set(published), answered - set(published)
    assert len(answered) >= 3 and newest in answered  # requests really spanned several swaps
    for name in answered:  # every response is exactly the brute-force answer of the snapshot it names
        x, y, ids = snapshot_data(published[name])
        hits = [(np.array([h["id"] for h in b["results"][0]]), np.array([h["label"] for h in b["results"][0]]),
                 np.array([h["distance"] for h in b["results"][0]])) for _, b in responses if b["snapshot"] == name]
        d2 = np.repeat(reference_distances(x, QUERY[None, :], "l2"), len(hits), axis=0)
        assert_knn_matches(hits, d2, ids, y, K)

    m = c.get("/metrics").text
    assert metric_value(m, "hardneg_snapshot_info", name=newest) == 1.0
    assert metric_value(m, "hardneg_snapshot_reloads_total", result="failure") == 0
    assert 2 <= metric_value(m, "hardneg_snapshot_reloads_total", result="success") <= len(published)
    assert metric_value(m, "hardneg_http_requests_total", method="POST", route="/neighbors",
                        status="200") == len(responses)
    assert 0 <= metric_value(m, "hardneg_snapshot_age_seconds") < 600
    c.close()


def test_corrupt_newest_snapshot_is_not_served(empty_server, tmp_path: Path) -> None:
    server, store = empty_server
    c = httpx.Client(base_url=server.url, timeout=30)
    wait_for(lambda: c.get("/readyz").status_code == 200, what="a served snapshot")
    good = c.get("/snapshot").json()["name"]
    failures = metric_value(c.get("/metrics").text, "hardneg_snapshot_reloads_total", result="failure")

    # Publish elsewhere, copy in, flip one byte of index.faiss, then point LATEST at it.
    scratch = SnapshotStore(tmp_path / "scratch")
    bad = f"{int(good) + 1:06d}"
    scratch.publish(VectorIndex.build(*snapshot_data(99), metric="l2"), name=bad)
    shutil.copytree(scratch.path_of(bad), store.path_of(bad))
    index_file = store.path_of(bad) / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    point_latest(store.root, bad)

    def failure_count() -> float:
        return metric_value(c.get("/metrics").text, "hardneg_snapshot_reloads_total", result="failure")

    wait_for(lambda: failure_count() == failures + 1, what="the reload failure to be counted")
    assert c.get("/snapshot").json()["name"] == good
    assert c.get("/readyz").json() == {"status": "ready", "snapshot": good}
    r = c.post("/neighbors", json={"vectors": [QUERY.tolist()], "k": 3})
    assert r.status_code == 200 and r.json()["snapshot"] == good
    log = server.log()
    assert f"snapshot '{bad}' from LATEST was not loaded, still serving {good}" in log
    assert "index.faiss is corrupt (sha256 mismatch)" in log
    # Not retried in a hot loop: ten more poll intervals, still one failure.
    time.sleep(1.0)
    assert failure_count() == failures + 1
    # Pinning the corrupt snapshot is refused too, naming the bad file.
    r = c.post("/neighbors", json={"vectors": [QUERY.tolist()], "snapshot": bad})
    assert r.status_code == 409 and "index.faiss is corrupt" in r.json()["detail"], r.text

    # A good snapshot published after it is served again.
    fixed = publish(store, 100)
    wait_for(lambda: c.get("/snapshot").json()["name"] == fixed, what="the next good snapshot")
    assert failure_count() == failures + 1
    c.close()
