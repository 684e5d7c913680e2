"""Fixtures for the hardneg api tests: a store of tiny snapshots, a real uvicorn process and the in-process client.

The store holds three snapshots whose geometry can be read: ``cos-1`` (cosine, flat), ``hnsw-1`` (l2, HNSW)
and ``model-1`` (l2, flat, with an exported ``Linear`` model so raw ``inputs`` can be embedded), which
``LATEST`` names. Every search result is checked against brute force over the same stored vectors.
The store is signed with ``STORE_KEY``: the uvicorn process verifies signatures (and so loads models), the
in-process app trusts the store instead; tests/api/test_security.py covers the unsigned cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_support import (API_KEY, FUZZ_STATUSES, INPUT_SHAPE, LIMITS, STORE_KEY, ApiServer, ApiStore, Published, TestClient, embed, linear_model,
                         wait_for)

from hardneg.api.main import create_app
from hardneg.api.settings import Settings
from hardneg.miner.index import VectorIndex
from hardneg.miner.model_io import export_model
from hardneg.miner.store import SnapshotStore



@pytest.fixture(scope="session")
def api_store(tmp_path_factory: pytest.TempPathFactory, clusters) -> ApiStore:
    root = tmp_path_factory.mktemp("api-store")
    store = SnapshotStore(root, key=STORE_KEY)
    snaps: dict[str, Published] = {}

    cos = clusters(180, 8, 5, seed=11, label_offset=-2)  # negative labels too
    snaps["cos-1"] = Published("cos-1", "cosine", cos.vectors, cos.labels, cos.ids)
    hn = clusters(150, 6, 4, seed=12)
    snaps["hnsw-1"] = Published("hnsw-1", "l2", hn.vectors, hn.labels, hn.ids)
    for p, kind in ((snaps["cos-1"], "flat"), (snaps["hnsw-1"], "hnsw")):
        store.publish(VectorIndex.build(p.vectors, p.labels, p.ids, metric=p.metric, index=kind), name=p.name)

    raw = clusters(160, int(np.prod(INPUT_SHAPE)), 5, seed=13)
    model = linear_model(seed=13)
    inputs = raw.vectors.reshape(-1, *INPUT_SHAPE)
    pt2 = root.parent / "model.pt2"
    assert export_model(model, INPUT_SHAPE, pt2)
    vectors = embed(model, inputs)
    snaps["model-1"] = Published("model-1", "l2", vectors, raw.labels, raw.ids, model, {"inputs": inputs})
    store.publish(VectorIndex.build(vectors, raw.labels, raw.ids, metric="l2"), name="model-1",
                  model={"class": "Linear", "input_shape": list(INPUT_SHAPE)}, extra_files={"model.pt2": pt2})
    return ApiStore(root, snaps)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ApiServer]]:
    """Factory: ``start_server(store, env, *flags)`` returns a live :class:`ApiServer`; all stop at the end."""
    servers: list[ApiServer] = []

    def start(store: Path, env: dict[str, str] | None = None, *flags: str) -> ApiServer:
        log_path = tmp_path_factory.mktemp("server") / "serve.log"
        server = ApiServer(store, log_path, env or {}, *flags)
        servers.append(server)
        return server.wait_live()

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def live_server(api_store: ApiStore, start_server) -> ApiServer:
    """A real uvicorn process on the test store, with an API key and the small test limits."""
    env = {"HARDNEG_API_KEY": API_KEY, "HARDNEG_STORE_KEY": STORE_KEY,
           **{f"HARDNEG_{k.upper()}": str(v) for k, v in LIMITS.items()}}
    server = start_server(api_store.root, env, "--poll-seconds", "0.1", "--lanes", "2")
    wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, what="/readyz")
    return server


@pytest.fixture(scope="session")
def http_client(live_server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def asgi_client(api_store: ApiStore) -> Iterator[TestClient]:
    """The same app in-process (no API key, no store key but a trusted store), lifespan running."""
    settings = Settings(store=api_store.root, poll_seconds=0.1, search_lanes=2, trust_store=True, **LIMITS)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(params=["asgi", "http"])
def client(request: pytest.FixtureRequest) -> httpx.Client:
    """Each search test runs in-process and against the real uvicorn process."""
    return request.getfixturevalue(f"{request.param}_client")


def pytest_terminal_summary(terminalreporter) -> None:
    """How many schema-fuzzing cases ran (tests/api/test_fuzz.py) and how many answered 5xx."""
    if FUZZ_STATUSES:
        fivexx = sum(n for status, n in FUZZ_STATUSES.items() if status >= 500)
        terminalreporter.write_line(f"api fuzz: {sum(FUZZ_STATUSES.values())} cases against uvicorn, {fivexx} 5xx; "
                                    f"by status {dict(sorted(FUZZ_STATUSES.items()))}")
