"""A planted pickle payload in ``model.pt2`` never runs: not on hot reload, not on pin, not in the CLI readers.

Each case runs with and without ``HARDNEG_STORE_KEY``. With a key, the attacker (who can write the store but
lacks the key) cannot sign, so the snapshot is refused before any file is parsed. Without one, the api never
loads a model from the store unless told the store is trusted, and the CLI readers never load models at all.
A control shows that the planted file does run its payload when torch loads it, so a missing marker means
something.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from api_support import API_KEY, INPUT_SHAPE, STORE_KEY, embed, linear_model, metric_value, wait_for
from planted import plant_snapshot, point_latest

from hardneg.miner.errors import SnapshotError
from hardneg.miner.index import VectorIndex
from hardneg.miner.model_io import export_model, load_model
from hardneg.miner.store import SnapshotStore

REPO = Path(__file__).resolve().parents[2]
KEYS = [pytest.param(None, id="no-key"), pytest.param(STORE_KEY, id="store-key")]


def _store(tmp_path: Path, clusters, key: str | None) -> tuple[Path, Path, np.ndarray]:
    """A store (signed when ``key``) with ``good`` (a real model) and two planted snapshots, ``evil`` (no
    signature) and ``evil-stale`` (the good one's signature); LATEST names ``good``. Returns (root, marker,
    a query vector)."""
    root, marker = tmp_path / "store", tmp_path / "payload-ran"
    data = clusters(60, int(np.prod(INPUT_SHAPE)), 3, seed=5)
    model = linear_model(seed=5)
    inputs = data.vectors.reshape(-1, *INPUT_SHAPE)
    assert export_model(model, INPUT_SHAPE, tmp_path / "model.pt2")
    vectors = embed(model, inputs)
    SnapshotStore(root, key=key).publish(VectorIndex.build(vectors, data.labels, data.ids, metric="l2"), name="good",
                                         model={"input_shape": list(INPUT_SHAPE)},
                                         extra_files={"model.pt2": tmp_path / "model.pt2"})
    plant_snapshot(root, "good", "evil", marker, signature="drop")
    plant_snapshot(root, "good", "evil-stale", marker, signature="keep")
    return root, marker, vectors[:1]


def test_control_the_planted_file_runs_its_payload_when_torch_loads_it(tmp_path, clusters):
    root, marker, _ = _store(tmp_path, clusters, None)
    with pytest.raises(Exception):  # noqa: B017 - torch fails after the payload ran; which error is torch's business
        torch.export.load(str(root / "snapshots" / "evil" / "model.pt2"))
    assert marker.read_text() == "payload ran"


def test_load_model_refuses_pickled_payloads_before_torch_sees_them(tmp_path, clusters):
    root, marker, _ = _store(tmp_path, clusters, None)
    with pytest.raises(SnapshotError, match="holds a pickled payload .*'1.weight'.*refused"):
        load_model((root / "snapshots" / "evil" / "model.pt2").read_bytes(), INPUT_SHAPE)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_serve_never_runs_the_payload_on_pin_or_reload(tmp_path, clusters, start_server, key):
    root, marker, query = _store(tmp_path, clusters, key)
    env = {"HARDNEG_API_KEY": API_KEY, **({"HARDNEG_STORE_KEY": key} if key else {})}
    server = start_server(root, env, "--poll-seconds", "0.1", "--retry-seconds", "600")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, what="/readyz")
        inputs = {"inputs": [[[0.5] * INPUT_SHAPE[1]] * INPUT_SHAPE[0]]}
        for name in ("evil", "evil-stale"):
            r = c.post("/neighbors", json={"vectors": query.tolist(), "snapshot": name})
            if key:  # refused before its files are parsed, with a message naming it
                assert r.status_code == 409, r.text
                assert f"snapshot {name!r} is" in r.json()["detail"]
                assert ("not signed" if name == "evil" else "badly signed") in r.json()["detail"]
            else:  # vector search works; the model is never loaded
                assert r.status_code == 200 and r.json()["snapshot"] == name, r.text
                r = c.post("/neighbors", json={**inputs, "snapshot": name})
                assert r.status_code == 400 and "raw inputs are disabled" in r.json()["detail"], r.text
                assert "HARDNEG_STORE_KEY" in r.json()["detail"] and "HARDNEG_TRUST_STORE" in r.json()["detail"]
        # With the key, the good snapshot's model is loaded and embeds; without, inputs are refused there too.
        r = c.post("/neighbors", json=inputs)
        assert r.status_code == (200 if key else 400), r.text

        point_latest(root, "evil")
        if key:
            wait_for(lambda: metric_value(c.get("/metrics").text, "hardneg_snapshot_reloads_total",
                                          result="failure") >= 1, what="the reload to fail")
            assert c.get("/readyz").json()["snapshot"] == "good"
            assert "snapshot 'evil' is not signed" in server.log()
        else:
            wait_for(lambda: c.get("/readyz").json().get("snapshot") == "evil", what="the reload to evil")
            r = c.post("/neighbors", json=inputs)
            assert r.status_code == 400 and "raw inputs are disabled" in r.json()["detail"]
    assert not marker.exists(), "the planted payload ran"


@pytest.mark.slow
def test_a_trusted_store_still_refuses_pickled_payloads(tmp_path, clusters, start_server):
    """HARDNEG_TRUST_STORE=1 loads models from an unsigned store, but not archives that ask to unpickle."""
    root, marker, query = _store(tmp_path, clusters, None)
    server = start_server(root, {"HARDNEG_TRUST_STORE": "1"}, "--poll-seconds", "0.1")
    wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, what="/readyz")
    r = httpx.post(f"{server.url}/neighbors", json={"vectors": query.tolist(), "snapshot": "evil"})
    assert r.status_code == 409 and "pickled payload" in r.json()["detail"], r.text
    r = httpx.post(f"{server.url}/neighbors", json={"inputs": [[[0.5] * 3] * 2]})  # the good model is loaded
    assert r.status_code == 200, r.text
    assert not marker.exists()


def _hardneg(env_key: str | None, *args: str | Path) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HARDNEG_")}
    if env_key:
        env["HARDNEG_STORE_KEY"] = env_key
    return subprocess.run([sys.executable, "-m", "hardneg.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_cli_readers_never_run_the_payload(tmp_path, clusters, key):
    root, marker, query = _store(tmp_path, clusters, key)
    np.save(tmp_path / "q.npy", query)
    runs = {
        "verify": ("index", "verify", "--store", root, "evil"),
        "search": ("index", "search", "--store", root, "--snapshot", "evil", "--vectors", tmp_path / "q.npy"),
        "mine": ("mine", "--store", root, "--snapshot", "evil", "--strategy", "hardest", "--out", tmp_path / "m.npz"),
    }
    for what, args in runs.items():
        done = _hardneg(key, *args)
        if key:
            assert done.returncode == 2, (what, done.stderr)
            assert "snapshot 'evil' is not signed" in done.stderr and "HARDNEG_STORE_KEY" in done.stderr, what
        else:  # checksums match (the attacker recomputed them); nothing loads the model
            assert done.returncode == 0, (what, done.stderr)
    if key:
        done = _hardneg(key, "index", "verify", "--store", root, "evil-stale")
        assert done.returncode == 2 and "snapshot 'evil-stale' is badly signed" in done.stderr
        assert _hardneg(key, "index", "verify", "--store", root, "good").returncode == 0
    assert not marker.exists(), "the planted payload ran"
