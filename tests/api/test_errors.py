"""Every documented error returns its status and a message that says what was wrong and what is accepted."""

from __future__ import annotations

import httpx
import pytest
from api_support import API_KEY, LIMITS, ApiServer, ApiStore


def _vectors(api_store: ApiStore, n: int = 2, dim: int | None = None) -> list[list[float]]:
    p = api_store.latest
    d = dim or p.vectors.shape[1]
    return [[0.5] * d for _ in range(n)]


@pytest.mark.parametrize(("body", "fragments"), [
    ({"vectors": [[0.5] * 7]}, ["must each have 8 numbers", "query 0 has 7"]),
    ({"vectors": [[0.5] * 8, [0.5] * 9]}, ["must each have 8 numbers", "query 1 has 9"]),
    ({"vectors": [[0.5] * 8], "k": 0}, ["k must be between 1 and 50", "got 0"]),
    ({"vectors": [[0.5] * 8], "k": 51}, ["k must be between 1 and 50", "got 51"]),
    ({"vectors": [[0.5] * 8], "ids": [1000]}, ["exactly one of vectors, ids or inputs", "got vectors, ids"]),
    ({"k": 3}, ["exactly one of vectors, ids or inputs", "got none"]),
    ({"vectors": []}, ["vectors is empty", "between 1 and 64"]),
    ({"ids": list(range(65))}, ["holds 65 queries", "at most 64"]),
    ({"vectors": [[0.5] * 8], "labels": [1, 2]}, ["labels has 2 entries", "one label per query"]),
    ({"vectors": [[0.5] * 8], "different_label": True}, ["different_label needs labels"]),
    ({"ids": [1000], "labels": [1]}, ["queries by ids use the stored labels"]),
    ({"inputs": [[[1.0, 2.0], [3.0, 4.0]]]}, ["must each have shape [2, 3]", "got [2, 2]"]),
    ({"inputs": [[[1.0, 2.0, 3.0], [4.0]]]}, ["nested lists of numbers", "ragged"]),
    ({"inputs": [[[1.0] * 3] * 2], "snapshot": "cos-1"}, ["snapshot cos-1 has no exported model", "vectors or ids"]),
    ({"ids": [1000], "snapshot": "../etc"}, ["invalid snapshot name", "letters, digits"]),
], ids=lambda v: None if isinstance(v, dict) else v[0][:24])
def test_400_says_what_is_accepted(client: httpx.Client, body: dict, fragments: list[str]) -> None:
    r = client.post("/neighbors", json=body)
    assert r.status_code == 400, r.text
    for fragment in fragments:
        assert fragment in r.json()["detail"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_json_literals_are_400_not_a_crash(client: httpx.Client, literal: str) -> None:
    """Python's json accepts NaN/Infinity (and 1e999 overflows to inf); they must be refused cleanly."""
    body = '{"vectors": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.1, %s, 0, 0, 0, 0, 0, 0]]}' % literal
    r = client.post("/neighbors", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "NaN or inf (queries [1])" in r.json()["detail"] and "only finite" in r.json()["detail"]
    raw = '{"inputs": [[[0, 0, 0], [0, %s, 0]]]}' % literal
    r = client.post("/neighbors", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "NaN or inf" in r.json()["detail"], r.text


@pytest.mark.parametrize(("content", "where"), [
    ('{"vectors": [[0.1, 0.2]', "json_invalid"),
    ('{"vectors": "a string"}', "vectors"),
    ('{"vectors": [[0.5, "x"]]}', "vectors"),
    ('{"ids": [1000], "k": "many"}', "k"),
    ('{"ids": [1000], "different_labels": true}', "different_labels"),  # typo of an option: refused, not ignored
])
def test_malformed_body_is_422(client: httpx.Client, content: str, where: str) -> None:
    r = client.post("/neighbors", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(where in map(str, e["loc"]) or e["type"] == where for e in errors), errors


def test_unknown_ids_and_snapshots_are_404(client: httpx.Client, api_store: ApiStore) -> None:
    known = int(api_store.latest.ids[0])
    r = client.post("/neighbors", json={"ids": [known, 999_999]})
    assert r.status_code == 404 and "unknown id(s) [999999]" in r.json()["detail"], r.text
    r = client.get("/neighbors/999998")
    assert r.status_code == 404 and "unknown id(s) [999998]" in r.json()["detail"], r.text
    r = client.post("/neighbors", json={"ids": [known], "snapshot": "no-such-snapshot"})
    assert r.status_code == 404, r.text
    assert "'no-such-snapshot' does not exist" in r.json()["detail"] and "available" in r.json()["detail"]
    # An id present only in another snapshot is unknown in the one searched.
    other = int(api_store.snapshots["cos-1"].ids[0])
    if other not in set(api_store.latest.ids.tolist()):
        assert client.get(f"/neighbors/{other}").status_code == 404


def test_oversized_bodies_are_413_before_parsing(http_client: httpx.Client, asgi_client) -> None:
    too_big = b'{"vectors": [[' + b"0," * (LIMITS["max_body_bytes"] // 2) + b"0]]}"  # just over the limit
    assert len(too_big) > LIMITS["max_body_bytes"]
    for c in (http_client, asgi_client):
        r = c.post("/neighbors", content=too_big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert f"at most {LIMITS['max_body_bytes']} bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the server must count the streamed bytes
        yield b'{"vectors": [['
        for _ in range(LIMITS["max_body_bytes"] // 1000 + 2):
            yield b"0," * 500
        yield b"0]]}"

    r = http_client.post("/neighbors", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    assert f"more than {LIMITS['max_body_bytes']} bytes" in r.json()["detail"]


def test_api_key_is_required_except_on_health(live_server: ApiServer, api_store: ApiStore) -> None:
    body = {"ids": [int(api_store.latest.ids[0])], "k": 2}
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        for path in ("/healthz", "/readyz"):
            assert c.get(path).status_code == 200
        r = c.post("/neighbors", json=body)
        assert r.status_code == 401 and "missing API key" in r.json()["detail"], r.text
        assert "Bearer" in r.headers["www-authenticate"]
        for headers in ({"Authorization": "Bearer wrong"}, {"X-API-Key": API_KEY + "x"}, {"X-API-Key": ""}):
            r = c.post("/neighbors", json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert "API key" in r.json()["detail"] and "X-API-Key" in r.json()["detail"]
        for path in ("/snapshot", "/metrics", "/neighbors/1000"):
            assert c.get(path).status_code == 401, path
        for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
            assert c.post("/neighbors", json=body, headers=headers).status_code == 200
            assert c.get("/metrics", headers=headers).status_code == 200
