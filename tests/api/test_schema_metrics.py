"""/openapi.json describes every route with its models; /metrics counts requests by route template and status."""

from __future__ import annotations

import subprocess
import sys

import pytest
from api_support import API_KEY, ApiStore, TestClient, metric_value

from hardneg.api.main import create_app
from hardneg.api.settings import Settings

ROUTES = {
    ("post", "/neighbors"): "NeighborsResponse",
    ("post", "/mine"): "MineResponse",
    ("get", "/neighbors/{item_id}"): "NeighborsResponse",
    ("get", "/snapshot"): "SnapshotManifest",
    ("get", "/healthz"): "HealthResponse",
    ("get", "/readyz"): "ReadyResponse",
    ("get", "/snapshots"): "SnapshotHistory",
    ("get", "/items/{item_id}"): "ItemResponse",
    ("get", "/audit/labels"): "LabelAuditResponse",
    ("get", "/audit/duplicates"): "DuplicatesResponse",
    ("get", "/drift"): "DriftResponse",
}
NOT_JSON = {("get", "/metrics"), ("get", "/items/{item_id}/thumb.png")}
PROTECTED = {("post", "/neighbors"), ("post", "/mine"), ("get", "/neighbors/{item_id}"), ("get", "/snapshot"), ("get", "/metrics"),
             ("get", "/snapshots"), ("get", "/items/{item_id}"), ("get", "/items/{item_id}/thumb.png"),
             ("get", "/audit/labels"), ("get", "/audit/duplicates"), ("get", "/drift")}


def test_openapi_lists_every_route_with_its_models(asgi_client) -> None:
    spec = asgi_client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {(m, p) for p, ops in paths.items() for m in ops} == set(ROUTES) | NOT_JSON
    for (method, path), model in ROUTES.items():
        ok = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}, (path, ok)
    metrics_ok = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics_ok == {"text/plain": {"schema": {"type": "string"}}}
    assert "image/png" in paths["/items/{item_id}/thumb.png"]["get"]["responses"]["200"]["content"]

    post = paths["/neighbors"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/NeighborsRequest"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["NeighborsRequest"]["properties"]) == {
        "vectors", "ids", "inputs", "labels", "k", "different_label", "label_in", "label_not_in", "exclude_ids",
        "snapshot", "nprobe", "ef_search"}
    assert set(schemas["Neighbor"]["properties"]) == {"id", "label", "distance"}
    query = {p["name"] for p in paths["/neighbors/{item_id}"]["get"]["parameters"]}
    assert query == {"item_id", "k", "different_label", "label_in", "label_not_in", "exclude_ids", "snapshot",
                     "nprobe", "ef_search"}

    for method, path in (("post", "/neighbors"), ("get", "/neighbors/{item_id}"), ("post", "/mine")):
        responses = paths[path][method]["responses"]
        for code in ("400", "401", "404", "409", "413", "503"):
            assert responses[code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}, (path, code)
            assert responses[code]["description"]
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("HTTPValidationError")
    assert "503" in paths["/readyz"]["get"]["responses"] and "503" in paths["/snapshot"]["get"]["responses"]

    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    for path, ops in paths.items():
        for method, op in ops.items():
            assert bool(op.get("security")) == ((method, path) in PROTECTED), (method, path)


@pytest.fixture(scope="module")
def fresh_client(api_store: ApiStore):
    """A new app (fresh counters) with a key, /metrics open and a tiny body limit."""
    settings = Settings(store=api_store.root, api_key=API_KEY, metrics_open=True, max_body_bytes=2048)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as c:
        yield c


def test_metrics_count_requests_by_route_template_and_status(fresh_client, api_store: ApiStore) -> None:
    c = fresh_client
    ids = api_store.latest.ids[:3].tolist()
    for i in ids:
        assert c.get(f"/neighbors/{i}", params={"k": 2}).status_code == 200
    for i in (999_991, 999_992):
        assert c.get(f"/neighbors/{i}").status_code == 404
    assert c.post("/neighbors", json={"ids": ids, "k": 0}).status_code == 400
    assert c.post("/neighbors", content=b"[" + b"1," * 2048 + b"1]").status_code == 413
    assert c.get("/no/such/path").status_code == 404
    assert c.get("/metrics", headers={"X-API-Key": ""}).status_code == 200  # open, as configured

    m = c.get("/metrics").text
    def count(method: str, route: str, status: str) -> float:
        return metric_value(m, "hardneg_http_requests_total", method=method, route=route, status=status)

    assert count("GET", "/neighbors/{item_id}", "200") == 3
    assert count("GET", "/neighbors/{item_id}", "404") == 2
    assert count("POST", "/neighbors", "400") == 1
    assert count("POST", "/neighbors", "413") == 1  # answered before routing, still named by its route
    assert count("GET", "<unmatched>", "404") == 1
    assert metric_value(m, "hardneg_http_request_duration_seconds_count", method="GET",
                        route="/neighbors/{item_id}", status="200") == 3
    assert metric_value(m, "hardneg_http_request_duration_seconds_bucket", method="GET",
                        route="/neighbors/{item_id}", status="200", le="+Inf") == 3
    assert metric_value(m, "hardneg_snapshot_info", name=api_store.latest.name) == 1
    assert metric_value(m, "hardneg_snapshot_items") == len(api_store.latest.ids)
    assert 0 <= metric_value(m, "hardneg_snapshot_age_seconds") < 3600
    assert metric_value(m, "hardneg_snapshot_reloads_total", result="success") == 1
    assert metric_value(m, "hardneg_snapshot_reloads_total", result="failure") == 0


def test_key_still_guards_search_when_metrics_are_open(fresh_client) -> None:
    r = fresh_client.get("/snapshot", headers={"X-API-Key": "nope"})
    assert r.status_code == 401 and "wrong API key" in r.json()["detail"]
    assert fresh_client.get("/snapshot").json()["name"] == "model-1"


def test_api_never_imports_the_trainer() -> None:
    code = ("import sys, hardneg.api.main, hardneg.api.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('hardneg.trainer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
