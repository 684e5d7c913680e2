"""The data-inspection routes (``/snapshots``, ``/items``, ``/audit``, ``/drift``, ``/ui``) over real HTTP.

A real ``hardneg serve`` with an API key serves the digits store of :mod:`inspect_support`; every answer must
equal what the library computes in-process on the same snapshot (the library itself is checked against brute
force in tests/miner), every client-controlled size is bounded, and nothing answers 500.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from api_support import API_KEY, STORE_KEY, TestClient, wait_for
from inspect_support import COPY_FROM, COPY_TO, FLIPPED, InspectStore, build_inspect_store
from PIL import Image

from hardneg.api.main import create_app
from hardneg.api.settings import Settings
from hardneg.miner.audit import audit_labels, find_duplicates
from hardneg.miner.drift import snapshot_drift
from hardneg.miner.store import SnapshotStore


@pytest.fixture(scope="module")
def inspect_store(tmp_path_factory) -> InspectStore:
    return build_inspect_store(tmp_path_factory.mktemp("inspect") / "store")


@pytest.fixture(scope="module")
def server(inspect_store, start_server):
    s = start_server(inspect_store.root, {"HARDNEG_API_KEY": API_KEY, "HARDNEG_STORE_KEY": STORE_KEY})
    wait_for(lambda: httpx.get(f"{s.url}/readyz").status_code == 200, what="/readyz")
    return s


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


def test_snapshots_lists_the_history(http, inspect_store):
    body = http.get("/snapshots").json()
    want = SnapshotStore(inspect_store.root).list()
    assert body["served"] == "pixels-b"
    assert [s["name"] for s in body["snapshots"]] == [w.name for w in want] == ["pixels-b", "pixels-a"]
    assert [(s["count"], s["latest"], s["served"]) for s in body["snapshots"]] == [(300, True, True), (300, False, False)]


def test_items_give_the_stored_label_and_thumbnail(http, inspect_store):
    index = inspect_store.indexes["pixels-b"]
    for pos in (0, int(FLIPPED[0]), COPY_TO, 299):
        id_ = int(inspect_store.ids[pos])
        body = http.get(f"/items/{id_}").json()
        assert body == {"snapshot": "pixels-b", "id": id_, "label": int(index.labels[index.rows_of([id_])[0]]),
                        "thumb": True}
        r = http.get(f"/items/{id_}/thumb.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), inspect_store.thumbs[pos])
    old = http.get(f"/items/{inspect_store.ids[COPY_TO]}/thumb.png", params={"snapshot": "pixels-a"})
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(old.content))), inspect_store.thumbs[COPY_TO])
    assert old.headers["cache-control"].startswith("private")


def test_audit_labels_equals_the_library(http, inspect_store):
    body = http.get("/audit/labels", params={"limit": 12, "k": 7}).json()
    audit = audit_labels(inspect_store.indexes["pixels-b"], 7)
    assert body["snapshot"] == "pixels-b" and body["k"] == 7 and body["count"] == 300
    assert body["disagreeing"] == int((audit.p_given < 1).sum())
    assert body["suspects"] == audit.rows(12)
    flipped_ids = set(inspect_store.ids[FLIPPED].tolist())
    assert len(flipped_ids & {s["id"] for s in body["suspects"]}) >= 4  # the flips are found
    older = http.get("/audit/labels", params={"snapshot": "pixels-a", "limit": 5}).json()
    assert older["suspects"] == audit_labels(inspect_store.indexes["pixels-a"]).rows(5)


def test_audit_duplicates_equals_the_library(http, inspect_store):
    body = http.get("/audit/duplicates", params={"threshold": 1e-4}).json()
    dup = find_duplicates(inspect_store.indexes["pixels-b"], 1e-4)
    assert body["pairs"] == dup.pairs == 1
    assert body["different_label"] == [dup.group_dict(i) for i in dup.conflicts]
    assert body["different_label"][0]["ids"] == sorted(inspect_store.ids[[COPY_FROM, COPY_TO]].tolist())
    assert body["same_label"] == [] and body["same_label_groups"] == 0 and body["different_label_groups"] == 1


def test_drift_equals_the_library(http, inspect_store):
    body = http.get("/drift", params={"from": "pixels-a", "k": 5, "sample": 100, "seed": 3}).json()
    want = snapshot_drift(inspect_store.indexes["pixels-a"], inspect_store.indexes["pixels-b"], k=5, sample=100,
                          seed=3)
    assert body.pop("from") == "pixels-a" and body.pop("to") == "pixels-b"
    assert body == {**want.to_dict(), "overlap_per_class": {str(c): v for c, v in want.overlap_per_class.items()},
                    "centroid_shift": {str(c): v for c, v in want.centroid_shift.items()}}
    assert 0 < body["overlap_mean"] < 1


@pytest.mark.parametrize("path,params", [
    ("/audit/labels", {"limit": 0}), ("/audit/labels", {"limit": 1001}), ("/audit/labels", {"k": 0}),
    ("/audit/labels", {"k": 101}), ("/audit/labels", {"k": "2.5"}), ("/audit/labels", {"snapshot": "x" * 200}),
    ("/audit/duplicates", {"threshold": "nan"}), ("/audit/duplicates", {"threshold": "inf"}),
    ("/audit/duplicates", {"threshold": -1}),
    ("/drift", {}), ("/drift", {"from": "pixels-a", "sample": 10_001}), ("/drift", {"from": "pixels-a", "k": 0}),
    ("/items/99999999999999999999999", {}), ("/items/abc", {}), ("/audit/labels", {"limt": 5}),
    ("/drift", {"from": "pixels-a", "sampel": 5}), ("/items/100", {"snapshots": "pixels-a"}),
])
def test_out_of_range_sizes_are_422(http, path, params):
    r = http.get(path, params=params)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("path,params,status,fragment", [
    ("/items/7", {}, 404, "unknown id(s) [7]"),
    ("/items/100/thumb.png", {"snapshot": "nope"}, 404, "snapshot 'nope' does not exist"),
    ("/audit/labels", {"snapshot": "../etc"}, 400, "invalid snapshot name"),
    ("/audit/duplicates", {"threshold": 4}, 400, "below 4 for cosine snapshots"),
    ("/drift", {"from": "nope"}, 404, "snapshot 'nope' does not exist"),
    ("/audit/labels", {"k": 100, "snapshot": "pixels-a", "limit": 1}, 200, ""),
])
def test_errors_say_what_is_wrong(http, path, params, status, fragment):
    r = http.get(path, params=params)
    assert r.status_code == status, r.text
    if fragment:
        assert fragment in r.json()["detail"]


@pytest.mark.parametrize("path", ["/snapshots", "/items/100", "/items/100/thumb.png", "/audit/labels",
                                  "/audit/duplicates", "/drift?from=pixels-a"])
def test_data_routes_need_the_key(server, path):
    assert httpx.get(f"{server.url}{path}").status_code == 401
    assert httpx.get(f"{server.url}{path}", headers={"X-API-Key": "wrong"}).status_code == 401


def test_the_page_is_open_but_holds_no_data(server):
    page = httpx.get(f"{server.url}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/ui/ui.js" in page.text and "pixels" not in page.text
    assert httpx.get(f"{server.url}/ui/ui.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{server.url}/ui/ui.css").status_code == 200
    for bad in ("/ui/index.html", "/ui/..%2Fsettings.py", "/ui/ui.py"):  # only the page's own files are open
        assert httpx.get(f"{server.url}{bad}").status_code == 401
        assert httpx.get(f"{server.url}{bad}", headers={"X-API-Key": API_KEY}).status_code == 404


def test_limits_in_process(inspect_store, monkeypatch):
    """What a real server cannot be made to do cheaply: a snapshot over the audit size cap, a threshold linking
    too many pairs."""
    monkeypatch.setattr("hardneg.api.routes.audit.MAX_PAIRS", 5)
    settings = Settings(store=inspect_store.root, audit_max_items=299, search_lanes=1)
    with TestClient(create_app(settings)) as c:
        r = c.get("/audit/labels")
        assert r.status_code == 400 and "at most 299 (HARDNEG_AUDIT_MAX_ITEMS)" in r.json()["detail"]
    settings = Settings(store=inspect_store.root, search_lanes=1, max_results=20)
    with TestClient(create_app(settings)) as c:
        r = c.get("/audit/duplicates", params={"threshold": 3.0, "limit": 5})
        assert r.status_code == 400 and "more than 5 pairs" in r.json()["detail"]
        assert c.get("/audit/labels", params={"limit": 20}).status_code == 200
        for path, limit in (("/audit/labels", 21), ("/audit/duplicates", 11)):  # HARDNEG_MAX_RESULTS
            r = c.get(path, params={"limit": limit})
            assert r.status_code == 413 and "HARDNEG_MAX_RESULTS" in r.json()["detail"], r.text


def test_a_snapshot_without_thumbnails(asgi_client, api_store):
    id_ = int(api_store.latest.ids[0])
    assert asgi_client.get(f"/items/{id_}").json()["thumb"] is False
    r = asgi_client.get(f"/items/{id_}/thumb.png")
    assert r.status_code == 404 and "has no thumbnails" in r.json()["detail"]


def test_audits_of_approximate_snapshots_read_their_reconstructed_vectors(asgi_client, api_store):
    """An hnsw snapshot is audited exactly on the vectors it stores (as the library does)."""
    index = SnapshotStore(api_store.root).open("hnsw-1").index
    body = asgi_client.get("/audit/labels", params={"snapshot": "hnsw-1", "limit": 10, "k": 5}).json()
    assert body["suspects"] == audit_labels(index, 5).rows(10)
    common = set(api_store.snapshots["hnsw-1"].ids.tolist()) & set(api_store.snapshots["cos-1"].ids.tolist())
    drift = asgi_client.get("/drift", params={"from": "hnsw-1", "to": "cos-1", "k": 3})
    assert drift.status_code == 200 and drift.json()["common"] == len(common) > 3
