"""The service as an attacker or a careless client meets it: auth before work, bounded sizes, no 500s, no paths.

Each test is one repro of a review of the service, answered as it must be now.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from api_support import API_KEY, LIMITS, ApiStore, TestClient, wait_for

from hardneg.api.deps import ResultCap
from hardneg.api.limits import TooManyResultsError
from hardneg.api.main import create_app
from hardneg.api.settings import Settings
from hardneg.api.state import SnapshotState
from hardneg.miner.errors import NotFoundError, SnapshotError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import MANIFEST, SnapshotStore, _manifest_digest

INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------- auth before work
@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/snapshot", "/metrics", "/nowhere"])
def test_every_route_but_the_probes_needs_the_key(live_server, path):
    r = httpx.get(f"{live_server.url}{path}")
    assert r.status_code == 401, r.text
    assert "missing API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{live_server.url}{path}", headers={"X-API-Key": "wrong"}).json()["detail"].startswith(
        "wrong API key")
    ok = httpx.get(f"{live_server.url}{path}", headers={"X-API-Key": API_KEY})
    assert ok.status_code == (404 if path == "/nowhere" else 200)
    for probe in ("/healthz", "/readyz"):
        assert httpx.get(f"{live_server.url}{probe}").status_code == 200


def _vm_hwm_kb(pid: int) -> int:
    """Peak resident set size of process ``pid`` (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def _post_raw(port: int, headers: dict[str, str], body_size: int, chunk: bytes) -> tuple[bytes, int]:
    """POST ``body_size`` bytes (``chunk`` repeated) on a raw socket, sending the body from a thread while the
    answer is read; returns (the answer's head and body, bytes of the body the server took before it closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /neighbors HTTP/1.1\r\nhost: x\r\ncontent-length: {body_size}\r\n{head}\r\n".encode())
    sent = 0

    def send_body() -> None:
        nonlocal sent
        try:
            while sent < body_size:
                part = chunk[: body_size - sent]
                sock.sendall(part)
                sent += len(part)
        except OSError:  # the server answered and closed: the rest of the body is never read
            pass

    sender = threading.Thread(target=send_body)
    sender.start()
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except OSError:
        pass
    sender.join(60)
    sock.close()
    return answer, sent


@pytest.mark.slow
def test_unauthenticated_near_limit_body_is_401_without_reading_it(api_store: ApiStore, start_server):
    """A body just under the default 32 MiB limit, without the key: 401 at once; the server's peak RSS barely moves.

    The same body with the key is read, buffered and parsed (a control: the measurement sees a body's cost).
    """
    limit = Settings.model_fields["max_body_bytes"].default
    server = start_server(api_store.root, {"HARDNEG_API_KEY": API_KEY}, "--poll-seconds", "60")
    wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, what="/readyz")
    for _ in range(20):  # warm up the request path so that its one-off allocations are not counted
        httpx.post(f"{server.url}/neighbors", json={"ids": [1000], "k": 3}, headers={"X-API-Key": API_KEY})
    before = _vm_hwm_kb(server.proc.pid)
    chunk = (b"[" + b"0.125," * 10_000)[:65536]
    answer, _ = _post_raw(server.port, {"content-type": "application/json"}, limit - 1024, chunk)
    unauth_mb = (_vm_hwm_kb(server.proc.pid) - before) / 1024
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"missing API key" in answer
    print(f"unauthenticated {limit - 1024}-byte body: 401, peak RSS +{unauth_mb:.1f} MB")
    assert unauth_mb < 50

    before = _vm_hwm_kb(server.proc.pid)
    answer, sent = _post_raw(server.port, {"content-type": "application/json", "x-api-key": API_KEY},
                             limit - 1024, chunk)
    auth_mb = (_vm_hwm_kb(server.proc.pid) - before) / 1024
    assert answer.startswith(b"HTTP/1.1 422") and sent == limit - 1024, answer[:200]  # read whole, then refused
    print(f"the same body with the key: read and parsed, peak RSS +{auth_mb:.1f} MB")
    assert auth_mb > unauth_mb + 25


@pytest.mark.slow
@pytest.mark.parametrize("what", ["idle", "partial headers", "partial body"])
def test_slow_clients_get_408_and_are_disconnected(api_store: ApiStore, start_server, what):
    server = start_server(api_store.root, {}, "--request-timeout", "1", "--poll-seconds", "60")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    start = time.monotonic()
    if what == "partial headers":
        sock.sendall(b"POST /neighbors HTTP/1.1\r\nhost: x\r\ncontent-")
    elif what == "partial body":
        sock.sendall(b"POST /neighbors HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"ids\": [")
    answer = b""
    while data := sock.recv(4096):  # recv returns b"" once the server closes; the socket timeout bounds the wait
        answer += data
    waited = time.monotonic() - start
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert waited < 15  # a bound on waiting (the deadline is 1 s), not a speed assertion
    # A client that sends its request in time is unaffected, also on a kept-alive connection.
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/healthz").status_code == 200
        time.sleep(1.5)  # longer than the deadline, shorter than the keep-alive timeout (5 s)
        assert c.get("/healthz").status_code == 200


# ---------------------------------------------------------------- no 500 from any input
@pytest.mark.parametrize("body", [
    {"ids": [INT64_MAX + 1]},
    {"ids": [-(2**63) - 1]},
    {"ids": [1000], "exclude_ids": [2**70]},
    {"vectors": [[0.5] * 8], "labels": [2**64], "different_label": True},
    {"ids": [1000], "label_in": [2**63]},
], ids=["id", "negative id", "exclude_ids", "labels", "label_in"])
def test_numbers_outside_int64_are_422_and_keep_the_connection(http_client: httpx.Client, body):
    r = http_client.post("/neighbors", json=body)
    assert r.status_code == 422, r.text
    assert "less than or equal to" in r.text or "greater than or equal to" in r.text
    assert r.headers.get("connection") != "close"
    assert http_client.post("/neighbors", json={"ids": [1000], "k": 2}).status_code == 200


def test_a_path_id_outside_int64_is_422(client: httpx.Client):
    r = client.get("/neighbors/1180591620717411303424")
    assert r.status_code == 422, r.text
    assert client.get(f"/neighbors/{INT64_MAX}").status_code == 404  # in range but unknown: 404 names it


@pytest.mark.parametrize("body", [
    {"ids": [1000], "k": "5"},
    {"ids": [1000], "k": True},
    {"ids": [1000], "k": 5.0},
    {"ids": ["1000"]},
    {"ids": [1000], "different_label": 1},
    {"vectors": [[True] + [0.5] * 7]},
    {"inputs": [[[True, 0.0, 0.0], [0.0, 0.0, 0.0]]]},
], ids=["k str", "k bool", "k float", "id str", "flag int", "bool in vector", "bool in input"])
def test_json_types_are_strict(client: httpx.Client, body):
    r = client.post("/neighbors", json=body)
    assert r.status_code == 422, r.text


def test_integers_are_still_valid_floats_and_query_strings_still_convert(client: httpx.Client, api_store):
    p = api_store.latest
    r = client.post("/neighbors", json={"vectors": [[int(v) for v in np.round(p.vectors[0])]], "k": 2})
    assert r.status_code == 200, r.text
    assert client.get("/neighbors/1000?k=2&different_label=true").status_code == 200


def test_a_huge_cosine_query_is_answered_as_its_direction(client: httpx.Client, api_store: ApiStore):
    """[1e20]*d overflowed float32 when normalised, and every distance came back 2.0."""
    p = api_store.snapshots["cos-1"]
    direction = p.vectors[7] / np.linalg.norm(p.vectors[7])
    huge = client.post("/neighbors", json={"vectors": [(direction * 1e20).tolist()], "k": 5, "snapshot": "cos-1"})
    plain = client.post("/neighbors", json={"vectors": [direction.tolist()], "k": 5, "snapshot": "cos-1"})
    assert huge.status_code == 200 and plain.status_code == 200, huge.text
    got = [(n["id"], n["distance"]) for n in huge.json()["results"][0]]
    want = [(n["id"], n["distance"]) for n in plain.json()["results"][0]]
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([d for _, d in got], [d for _, d in want], atol=1e-5)
    assert got[0][1] < 1e-4  # the stored item itself: not 2.0


# ---------------------------------------------------------------- result cap
def test_results_per_request_are_capped(api_store: ApiStore):
    settings = Settings(store=api_store.root, max_results=100, search_lanes=1, **LIMITS)
    ids = api_store.latest.ids[:10].tolist()
    with TestClient(create_app(settings)) as c:
        r = c.post("/neighbors", json={"ids": ids, "k": 11})
        assert r.status_code == 413, r.text
        assert "10 queries x k=11 asks for 110 neighbours" in r.json()["detail"]
        assert "HARDNEG_MAX_RESULTS" in r.json()["detail"]
        r = c.post("/neighbors", json={"ids": ids, "k": 10})
        assert r.status_code == 200 and sum(map(len, r.json()["results"])) == 100


def test_the_result_cap_dependency_checks_the_product():
    cap = ResultCap(50)
    cap.check(5, 10)
    with pytest.raises(TooManyResultsError, match="5 queries x k=11 asks for 55"):
        cap.check(5, 11)


# ---------------------------------------------------------------- no paths in answers
def test_readyz_and_snapshot_reveal_no_paths(tmp_path: Path, clusters):
    root = tmp_path / "secret-place"
    settings = Settings(store=root, poll_seconds=0.05, search_lanes=1)
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "secret-place" not in r.text and str(tmp_path) not in r.text
        d = clusters(30, 4, 3, seed=1)
        SnapshotStore(root).publish(VectorIndex.build(d.vectors, d.labels, d.ids),
                                    meta={"config": {"store": str(root), "data": f"npz:{tmp_path}/x.npz", "epochs": 3}})
        wait_for(lambda: c.get("/readyz").status_code == 200, what="the snapshot")
        r = c.get("/snapshot")
        assert r.status_code == 200 and str(tmp_path) not in r.text
        assert r.json()["meta"]["config"] == {"store": "<path>", "data": "<path>", "epochs": 3}
        r = c.post("/neighbors", json={"ids": [0], "snapshot": "missing"})
        assert r.status_code == 404 and str(tmp_path) not in r.text


# ---------------------------------------------------------------- malformed manifests
def _malform(root: Path, name: str, **fields) -> None:
    """Rewrite ``name``'s manifest with ``fields`` and a matching digest (its checksums all still match)."""
    path = root / "snapshots" / name / MANIFEST
    manifest = {**json.loads(path.read_text()), **fields}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("fields", [{"count": "many"}, {"dim": -1}, {"index": "flat"}, {"files": []},
                                    {"model": {"input_shape": "2x3"}}, {"metric": "manhattan"}],
                         ids=lambda f: next(iter(f)))
def test_a_malformed_manifest_with_matching_checksums_is_a_clear_409_on_pin(tmp_path: Path, clusters, fields):
    root = tmp_path / "store"
    d = clusters(30, 4, 3, seed=2)
    store = SnapshotStore(root)
    store.publish(VectorIndex.build(d.vectors, d.labels, d.ids), name="bad")
    store.publish(VectorIndex.build(d.vectors, d.labels, d.ids), name="good")
    _malform(root, "bad", **fields)
    with TestClient(create_app(Settings(store=root, search_lanes=1))) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, what="the good snapshot")
        r = c.post("/neighbors", json={"ids": [0], "snapshot": "bad"})
        assert r.status_code == 409, r.text
        assert "snapshot 'bad'" in r.json()["detail"]


def test_a_malformed_latest_is_never_served_so_get_snapshot_cannot_500(tmp_path: Path, clusters):
    root = tmp_path / "store"
    d = clusters(30, 4, 3, seed=2)
    SnapshotStore(root).publish(VectorIndex.build(d.vectors, d.labels, d.ids), name="bad")
    _malform(root, "bad", created_at=5)  # GET /snapshot's response model once failed on this: a 500
    with TestClient(create_app(Settings(store=root, search_lanes=1, poll_seconds=0.05))) as c:
        for path in ("/snapshot", "/readyz"):
            r = c.get(path)
            assert r.status_code == 503 and "no snapshot is loaded yet" in r.json()["detail"], r.text


# ---------------------------------------------------------------- pinned snapshots
def _state(tmp_path: Path, clusters) -> tuple[SnapshotState, list[str]]:
    """A state serving ``good`` whose loads are counted; ``bad`` has a corrupt index."""
    root = tmp_path / "store"
    d = clusters(30, 4, 3, seed=3)
    store = SnapshotStore(root)
    store.publish(VectorIndex.build(d.vectors, d.labels, d.ids), name="bad")
    store.publish(VectorIndex.build(d.vectors, d.labels, d.ids), name="good")
    index = root / "snapshots" / "bad" / "index.faiss"
    index.write_bytes(b"x" * index.stat().st_size)
    loads: list[str] = []

    async def counted(fn, name):
        loads.append(name)
        await anyio.sleep(0.01)  # long enough that concurrent requests pile up on one load
        return await anyio.to_thread.run_sync(fn, name)

    state = SnapshotState(store, pin_cache=2, run=counted)
    state.swap(state.load("good"))
    return state, loads


def test_failed_pins_are_loaded_once_and_remembered_briefly(tmp_path: Path, clusters):
    state, loads = _state(tmp_path, clusters)

    async def pin_many() -> list[BaseException]:
        errors: list[BaseException] = []

        async def pin() -> None:
            try:
                await state.resolve("bad")
            except SnapshotError as e:
                errors.append(e)

        async with anyio.create_task_group() as tg:
            for _ in range(18):
                tg.start_soon(pin)
        await pin()  # after the load finished: answered from the failure cache
        return errors

    errors = anyio.run(pin_many)
    assert len(errors) == 19 and all("index.faiss is corrupt" in str(e) for e in errors)
    assert loads == ["bad"]
    assert state._loading == {}
    state.failure_ttl = 0.0
    state._failed["bad"] = (0.0, errors[0])  # expired: the next pin tries again
    with pytest.raises(SnapshotError):
        anyio.run(state.resolve, "bad")
    assert loads == ["bad", "bad"]


def test_missing_names_leave_no_lock_behind(tmp_path: Path, clusters):
    state, loads = _state(tmp_path, clusters)

    async def pin_missing() -> int:
        missing = 0
        for i in range(1000):
            try:
                await state.resolve(f"missing-{i}")
            except NotFoundError:
                missing += 1
        return missing

    assert anyio.run(pin_missing) == 1000
    assert state._loading == {} and len(state._failed) <= 256
    assert len(loads) == 1000  # each distinct name once, within the lanes' runner


def test_pinned_loads_run_in_the_search_lanes(tmp_path: Path, clusters):
    """The app's state loads pinned snapshots with its lanes' runner, not the default thread pool."""
    root = tmp_path / "store"
    d = clusters(30, 4, 3, seed=4)
    SnapshotStore(root).publish(VectorIndex.build(d.vectors, d.labels, d.ids), name="one")
    app = create_app(Settings(store=root, search_lanes=1))
    assert app.state.snapshots._run == app.state.lanes.run
