"""The ``POST /neighbors`` fast lane answers exactly what the FastAPI route answers, and hands on what it cannot.

``application/json`` bodies take the fast lane; ``application/vnd.hardneg+json`` bodies (JSON too, which
FastAPI parses the same way) go through the route, so sending one request both ways compares the two paths
byte for byte, in-process and over real HTTP. The inline-search rule is checked against hand-computed work.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from api_support import ApiStore

from hardneg.api.fastlane import NeighborsFastLane
from hardneg.api.schemas import NeighborsRequest
from hardneg.api.search import INLINE_WORK, SearchLanes, runs_inline
from hardneg.api.settings import Settings
from hardneg.miner.index import VectorIndex

ROUTE_JSON = "application/vnd.hardneg+json"  # a +json type: FastAPI parses it, the fast lane leaves it to the route


def bodies(api_store: ApiStore) -> list[dict]:
    """Requests covering answers 200, 400, 404 and 422 (each a different code path)."""
    p = api_store.snapshots["model-1"]
    q = p.vectors[:3].tolist()
    return [
        {"vectors": q, "k": 4},
        {"vectors": q, "k": 4, "labels": [0, 1, 2], "different_label": True, "label_not_in": [3]},
        {"ids": p.ids[:2].tolist(), "k": 5, "exclude_ids": p.ids[5:9].tolist()},
        {"vectors": api_store.snapshots["hnsw-1"].vectors[:2].tolist(), "snapshot": "hnsw-1", "ef_search": 64},
        {"vectors": [[0.5, 0.25]], "k": 3},  # wrong dimension: 400
        {"vectors": q, "k": 51},  # above max_k: 400
        {"vectors": q, "ids": [1]},  # two query forms: 400
        {"ids": [10**12]},  # unknown id: 404
        {"vectors": q, "snapshot": "no-such-snapshot"},  # 404
        {"vectors": q, "k": "4"},  # strict model: 422
        {"vectors": q, "color": "red"},  # unknown field: 422
        {"vectors": [[True] * 8]},  # 422
    ]


def test_fast_lane_answers_as_the_route_does(client, api_store: ApiStore) -> None:
    statuses = set()
    for body in bodies(api_store):
        content = json.dumps(body).encode()
        fast = client.post("/neighbors", content=content, headers={"content-type": "application/json"})
        route = client.post("/neighbors", content=content, headers={"content-type": ROUTE_JSON})
        assert (fast.status_code, fast.content) == (route.status_code, route.content), body
        assert fast.headers["content-type"] == route.headers["content-type"] == "application/json"
        statuses.add(fast.status_code)
    assert statuses == {200, 400, 404, 422}
    # NaN parses (as with Python's json) and is refused with 400 on both paths.
    nan = b'{"vectors": [[NaN, 0, 0, 0, 0, 0]], "snapshot": "hnsw-1"}'
    answers = [client.post("/neighbors", content=nan, headers={"content-type": t}) for t in ("application/json", ROUTE_JSON)]
    assert [a.status_code for a in answers] == [400, 400] and answers[0].content == answers[1].content


def run_lane(lane: NeighborsFastLane, body: bytes, content_type: bytes = b"application/json") -> tuple[list, list]:
    """Drive ``lane`` with one POST /neighbors: what it sent back, and what reached the app behind it."""
    sent, handed_on = [], []

    async def inner(scope, receive, send) -> None:
        handed_on.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"route"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message) -> None:
        sent.append(message)

    lane.app = inner
    scope = {"type": "http", "method": "POST", "path": "/neighbors", "headers": [(b"content-type", content_type)]}
    asyncio.run(lane(scope, receive, send))
    return sent, handed_on


class FakeState:
    """A snapshot state serving one snapshot (``resolve`` only)."""

    def __init__(self, snap) -> None:
        self.snap = snap

    async def resolve(self, name):
        return self.snap


def test_fast_lane_hands_invalid_bodies_and_other_types_to_the_route(api_store: ApiStore) -> None:
    from hardneg.api.state import load_snapshot
    from hardneg.miner.store import SnapshotStore

    p = api_store.snapshots["model-1"]
    snap = load_snapshot(SnapshotStore(api_store.root), "model-1")
    lane = NeighborsFastLane(None, Settings(store=api_store.root), FakeState(snap), SearchLanes(1, 1), route=None)
    valid = json.dumps({"vectors": p.vectors[:2].tolist(), "k": 3}).encode()
    sent, handed_on = run_lane(lane, valid)
    assert handed_on == [] and sent[0]["status"] == 200
    got = json.loads(sent[1]["body"])
    d2 = ((p.vectors[:2, None, :] - p.vectors[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose([[h["distance"] for h in r] for r in got["results"]], np.sort(d2, axis=1)[:, :3],
                               rtol=1e-4, atol=1e-5)
    for body, ctype in ((b'{"vectors": [[1, 2]], "k": "3"}', b"application/json"), (b"{not json", b"application/json"),
                        (valid, b"text/plain"), (valid, ROUTE_JSON.encode())):
        sent, handed_on = run_lane(lane, body, ctype)
        assert handed_on == [body] and sent[0]["status"] == 299 and sent[1]["body"] == b"route"


def test_small_unfiltered_searches_run_inline(api_store: ApiStore) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    y = rng.integers(0, 5, 2000)
    flat = VectorIndex.build(x, y, metric="l2")
    ivf = VectorIndex.build(x, y, metric="l2", index="IVF20,Flat")  # nprobe 1 by default: 20 + 100 rows per query
    per_query = {"flat": 2000 * 16, "ivf": (20 + 100) * 16}
    for name, index in (("flat", flat), ("ivf", ivf)):
        fits = INLINE_WORK // per_query[name]
        assert runs_inline(index, NeighborsRequest(vectors=x[:1].tolist()))
        assert runs_inline(index, NeighborsRequest(ids=list(range(fits))))
        assert not runs_inline(index, NeighborsRequest(ids=list(range(fits + 1))))
    assert not runs_inline(ivf, NeighborsRequest(ids=list(range(INLINE_WORK // per_query["ivf"])), nprobe=2))
    for filtered in ({"different_label": True, "labels": [0]}, {"label_in": [1]}, {"label_not_in": [1]},
                     {"exclude_ids": [3]}):
        assert not runs_inline(flat, NeighborsRequest(vectors=x[:1].tolist(), **filtered))
    assert not runs_inline(flat, NeighborsRequest(inputs=[[0.0] * 16]))


@pytest.mark.parametrize("content_type", ["application/json", ROUTE_JSON])
def test_fast_lane_requests_are_counted_under_their_route(asgi_client, api_store: ApiStore, content_type) -> None:
    from api_support import metric_value

    def count() -> float:
        try:
            return metric_value(asgi_client.get("/metrics").text, "hardneg_http_requests_total", method="POST",
                                route="/neighbors", status="200")
        except KeyError:  # no POST /neighbors answered yet in this process
            return 0.0

    before = count()
    body = json.dumps({"vectors": api_store.snapshots["model-1"].vectors[:1].tolist()}).encode()
    assert asgi_client.post("/neighbors", content=body, headers={"content-type": content_type}).status_code == 200
    assert count() == before + 1
