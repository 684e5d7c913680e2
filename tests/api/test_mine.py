"""``POST /mine`` through :class:`hardneg.client.Client` against a real uvicorn process, checked by brute force.

Every answer is compared with an exact float64 ranking of the snapshot's stored vectors: query mode
(positives never negatives, the window, the relative margin), label mode on stored ids and on outside
vectors with labels (also with the stored vectors returned), and raw inputs embedded by the snapshot's
model. Refusals (strict types, int64 ids, the result cap, auth) and the 503 retry are checked too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from api_support import API_KEY, LIMITS, STORE_KEY, ApiStore, Published, TestClient, embed

from hardneg.api.main import create_app
from hardneg.api.settings import Settings
from hardneg.client import AsyncClient, Client, HardnegError, NotReadyError
from hardneg.miner.audit import audit_labels
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore


def prepared(p: Published) -> np.ndarray:
    x = p.vectors.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if p.metric == "cosine" else x


def ranking(p: Published, q: np.ndarray, blocked: set[int]) -> tuple[list[int], np.ndarray]:
    """Stored ids by exact d² to the query ``q`` (raw), leaving out ``blocked``; and their d²."""
    x = prepared(p)
    qq = q.astype(np.float64)
    if p.metric == "cosine":
        qq = qq / np.linalg.norm(qq)
    d2 = ((x - qq) ** 2).sum(1)
    order = [r for r in np.argsort(d2, kind="stable") if int(p.ids[r]) not in blocked]
    return [int(p.ids[r]) for r in order], d2[order]


def score(d2: np.ndarray, metric: str) -> np.ndarray:
    return 1 - d2 / 2 if metric == "cosine" else -d2


@pytest.fixture(scope="module")
def hn(live_server):
    with Client(live_server.url, api_key=API_KEY, ready_timeout=5) as c:
        yield c


def test_query_mode_window_and_relative_margin(hn: Client, api_store: ApiStore) -> None:
    p = api_store.snapshots["cos-1"]
    q, _ = p.near(6, seed=21)
    rng = np.random.default_rng(21)
    positives = [rng.choice(p.ids, 2, replace=False).tolist() for _ in range(6)]
    res = hn.mine(vectors=q, positives=positives, strategy="window", num_negatives=3, range_min=1, range_max=10,
                  relative_margin=0.05, snapshot="cos-1")
    assert res["snapshot"] == "cos-1" and len(res["results"]) == 6
    x = prepared(p)
    for qi, pos, got in zip(q, positives, res["results"]):
        ids, d2 = ranking(p, qi, set(pos))
        qn = qi / np.linalg.norm(qi)
        s_p = min(float(x[np.flatnonzero(p.ids == j)[0]] @ qn) for j in pos)
        keep = score(d2, "cosine") <= s_p - abs(s_p) * 0.05
        want = [i for i, k in zip(ids, keep) if k][1:4]
        assert [n["id"] for n in got["negatives"]] == want
        for n in got["negatives"]:
            assert n["score"] == pytest.approx(1 - n["distance"] / 2, abs=1e-9)
    assert res["stats"]["guard_dropped"]["relative_margin"] >= 0


def test_label_mode_on_stored_ids(hn: Client, api_store: ApiStore) -> None:
    p = api_store.snapshots["cos-1"]
    anchors = p.ids[[0, 5, 9]].tolist()
    res = hn.mine(ids=anchors, strategy="hardest", num_negatives=4, snapshot="cos-1")
    for a, got in zip(anchors, res["results"]):
        row = int(np.flatnonzero(p.ids == a)[0])
        same = set(p.ids[p.labels == p.labels[row]].tolist())
        ids, _ = ranking(p, p.vectors[row], same)
        assert [n["id"] for n in got["negatives"]] == ids[:4]
        assert got["positive"] in same and got["positive"] != a


def test_label_mode_on_vectors_returns_stored_vectors(hn: Client, api_store: ApiStore) -> None:
    p = api_store.snapshots["hnsw-1"]  # approximate: the answer must still hold only wrong-label items
    q, labels = p.near(4, seed=22)
    res = hn.mine(vectors=q, labels=labels, num_negatives=3, include_vectors=True, snapshot="hnsw-1")
    by_id = {int(i): (int(lab), v) for i, lab, v in zip(p.ids, p.labels, p.vectors)}
    for lab, got in zip(labels, res["results"]):
        assert len(got["negatives"]) == 3
        for n in got["negatives"]:
            assert n["label"] != lab and by_id[n["id"]][0] == n["label"]
            np.testing.assert_allclose(n["vector"], by_id[n["id"]][1], rtol=1e-6)


def test_inputs_are_embedded_by_the_snapshot_model(hn: Client, api_store: ApiStore) -> None:
    p = api_store.latest
    inputs = p.extra["inputs"][:3]
    vectors = embed(p.model, inputs)
    positives = [[int(p.ids[0])], [int(p.ids[1])], [int(p.ids[2])]]
    res = hn.mine(inputs=inputs, positives=positives, num_negatives=2)
    for v, pos, got in zip(vectors, positives, res["results"]):
        ids, _ = ranking(p, v, set(pos))
        assert [n["id"] for n in got["negatives"]] == ids[:2]


def test_async_client_gives_the_same_answer(live_server, hn: Client, api_store: ApiStore) -> None:
    p = api_store.snapshots["cos-1"]
    q, labels = p.near(3, seed=23)

    async def go() -> dict:
        async with AsyncClient(live_server.url, api_key=API_KEY) as c:
            return await c.mine(vectors=q, labels=labels, num_negatives=2, snapshot="cos-1")

    assert asyncio.run(go())["results"] == hn.mine(vectors=q, labels=labels, num_negatives=2,
                                                   snapshot="cos-1")["results"]


@pytest.mark.parametrize("body,status,message", [
    ({"ids": [1], "num_negatives": "5"}, 422, "num_negatives"),
    ({"ids": [1], "num_negatives": True}, 422, "num_negatives"),
    ({"ids": [2**63]}, 422, "ids.0"),
    ({"vectors": [[0.1] * 8], "positives": [[1]], "include_vectors": 1}, 422, "include_vectors"),
    ({"vectors": [[0.1] * 8]}, 400, "need positives"),
    ({"ids": [1], "num_negatives": 51}, 400, "HARDNEG_MAX_K"),
    ({"ids": [1], "range_max": 9}, 400, "belong to strategy 'window'"),
    ({"vectors": [[0.1] * 8], "labels": [1], "relative_margin": 0.05}, 400, "needs each anchor's positive"),
    ({"vectors": [[0.1] * 8], "positives": [[1], [2]]}, 400, "one per anchor"),
    ({"vectors": [[0.1] * 8], "positives": [[123456789]], "snapshot": "cos-1"}, 404, "123456789"),
    ({"ids": [1], "exclude_suspects": 1.0}, 422, "exclude_suspects"),
    ({"ids": [1], "exclude_suspects": "0.1"}, 422, "exclude_suspects"),
    ({"vectors": [[0.1] * 8], "positives": [[1]], "exclude_suspects": 0.1}, 400, "exclude_suspects is for label mode"),
    ({"vectors": [[0.1] * 8], "labels": [1], "exclude_suspects": 0.1}, 400, "exclude_suspects is for label mode"),
])
def test_refusals(hn: Client, body: dict, status: int, message: str) -> None:
    body = {"snapshot": "cos-1", **body}
    with pytest.raises(HardnegError) as e:
        hn.mine(**body)
    assert e.value.status == status
    assert message in str(e.value)


def test_label_mode_excludes_suspects_as_the_cli_does(hn: Client, api_store: ApiStore, tmp_path) -> None:
    p = api_store.snapshots["cos-1"]
    anchors = p.ids[::3]
    res = hn.mine(ids=anchors.tolist(), strategy="hardest", num_negatives=3, exclude_suspects=0.1, snapshot="cos-1")
    # the same mining by `hardneg mine` on the store
    np.save(tmp_path / "anchors.npy", anchors)
    done = subprocess.run([sys.executable, "-m", "hardneg.cli", "mine", "--store", str(api_store.root), "--snapshot",
                           "cos-1", "--strategy", "hardest", "--per-anchor", "3", "--exclude-suspects", "0.1",
                           "--anchors", str(tmp_path / "anchors.npy"), "--out", str(tmp_path / "mined.npz"), "--json"],
                          capture_output=True, text=True, env={**os.environ, "HARDNEG_STORE_KEY": STORE_KEY})
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "mined.npz") as z:
        cli_anchor, cli_negative = z["anchor"], z["negative"]
    cli_stats = json.loads(done.stdout)["stats"]
    for a, got in zip(anchors, res["results"]):
        assert [n["id"] for n in got["negatives"]] == cli_negative[cli_anchor == a].tolist()
    assert res["stats"]["suspects_excluded"] == cli_stats["suspects_excluded"] == np.ceil(0.1 * len(p.ids))
    assert res["stats"]["guard_dropped"] == cli_stats["guard_dropped"]
    # brute force: each anchor's 3 nearest wrong-label items that are not among the audit's top 10%
    index = VectorIndex.build(p.vectors, p.labels, p.ids, metric=p.metric)
    suspects = set(audit_labels(index).top(0.1).tolist())
    for a, got in zip(anchors, res["results"]):
        row = int(np.flatnonzero(p.ids == a)[0])
        blocked = set(p.ids[p.labels == p.labels[row]].tolist()) | suspects
        assert [n["id"] for n in got["negatives"]] == ranking(p, p.vectors[row], blocked)[0][:3]
    plain = hn.mine(ids=anchors.tolist(), strategy="hardest", num_negatives=3, snapshot="cos-1")
    assert {n["id"] for r in plain["results"] for n in r["negatives"]} & suspects  # the option changes the answer


def test_missing_key_is_401(live_server) -> None:
    with Client(live_server.url) as c, pytest.raises(HardnegError, match="401"):
        c.mine(ids=[1])


def test_result_cap(api_store: ApiStore) -> None:
    settings = Settings(store=api_store.root, max_results=10, **LIMITS)
    p = api_store.snapshots["cos-1"]
    with TestClient(create_app(settings)) as http:
        r = http.post("/mine", json={"ids": p.ids[:4].tolist(), "num_negatives": 3, "snapshot": "cos-1"})
        assert r.status_code == 413 and "HARDNEG_MAX_RESULTS" in r.json()["detail"] and "12 neighbours" in r.json()["detail"]
        r = http.post("/mine", json={"ids": p.ids[:5].tolist(), "num_negatives": 2, "snapshot": "cos-1"})
        assert r.status_code == 200 and len(r.json()["results"]) == 5


def test_exclude_suspects_is_bounded_by_the_audit_limit(api_store: ApiStore) -> None:
    settings = Settings(store=api_store.root, audit_max_items=100, **LIMITS)  # cos-1 holds 180 items
    with TestClient(create_app(settings)) as http:
        body = {"ids": [int(api_store.snapshots["cos-1"].ids[0])], "snapshot": "cos-1"}
        r = http.post("/mine", json={**body, "exclude_suspects": 0.1})
        assert r.status_code == 400 and "HARDNEG_AUDIT_MAX_ITEMS" in r.json()["detail"]
        assert http.post("/mine", json=body).status_code == 200  # without it, nothing is audited


def test_client_retries_503_then_gives_up_clearly() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            return httpx.Response(503, json={"detail": "no snapshot loaded yet"}, headers={"Retry-After": "1"})
        return httpx.Response(200, json={"snapshot": "s", "results": [], "stats": {}})

    hn = Client("http://x", transport=httpx.MockTransport(handler), retry_interval=0.01)
    assert hn.mine(ids=[1])["snapshot"] == "s" and calls["n"] == 3
    never = Client("http://x", transport=httpx.MockTransport(lambda r: httpx.Response(503, json={"detail": "none"})),
                   ready_timeout=0.05, retry_interval=0.01)
    with pytest.raises(NotReadyError, match="503: none"):
        never.neighbors(ids=[1])


@pytest.mark.slow
def test_client_waits_for_the_first_snapshot(tmp_path, start_server, clusters) -> None:
    """A real service on an empty store answers 503; the client keeps asking until a snapshot is published."""
    root = tmp_path / "store"
    root.mkdir()
    server = start_server(root, {}, "--poll-seconds", "0.1", "--lanes", "1")
    data = clusters(60, 4, 3, seed=24)

    def publish_later() -> None:
        time.sleep(1.0)
        SnapshotStore(root).publish(VectorIndex.build(data.vectors, data.labels, data.ids), name="first")

    t = threading.Thread(target=publish_later)
    t.start()
    with Client(server.url, ready_timeout=60, retry_interval=0.2) as c:
        res = c.mine(ids=data.ids[:2].tolist(), num_negatives=2)
    t.join()
    assert res["snapshot"] == "first" and all(len(r["negatives"]) == 2 for r in res["results"])


def test_pml_adapter_over_the_service_equals_the_local_one(hn: Client, api_store: ApiStore) -> None:
    """SnapshotMiner through the client mines what it mines on the same snapshot opened locally."""
    import torch

    from hardneg.integrations.pml import SnapshotMiner

    p = api_store.snapshots["cos-1"]
    q, labels = p.near(8, seed=25)
    emb, y = torch.from_numpy(q), torch.from_numpy(labels)
    remote = SnapshotMiner(hn, num_negatives=3, snapshot="cos-1")(emb, y)
    local = SnapshotMiner(SnapshotStore(api_store.root), num_negatives=3, snapshot="cos-1")(emb, y)
    assert torch.equal(remote.negative_ids, local.negative_ids)
    for r, loc in zip(remote.indices_tuple, local.indices_tuple):
        assert torch.equal(r, loc)
    torch.testing.assert_close(remote.ref_emb, local.ref_emb)
    assert torch.equal(remote.ref_labels, local.ref_labels)
