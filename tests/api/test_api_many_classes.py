"""The api's hard-negative mode (``different_label``) on a snapshot of 100,000 classes of 2-3 items.

A real ``hardneg serve`` process over real HTTP. Every query of a batch has its own label, so the server
searches once per label; each answer is checked against brute force (numpy over every stored vector, the
query's class left out), and the server's peak resident memory (VmHWM) against a bound from N, C and d.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from api_support import API_KEY, ApiServer
from scale_support import budget_mib, interpreter_mib, many_small_classes, resident_mib

from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore

CLASSES, DIM, K, BATCH = 100_000, 8, 10, 64

pytestmark = pytest.mark.slow


def brute_force_other_labels(xb: np.ndarray, labels: np.ndarray, q: np.ndarray, qlab: np.ndarray,
                             skip_rows: np.ndarray | None = None) -> np.ndarray:
    """d² (m, K) float64 of the K nearest stored vectors whose label differs from each query's, ascending."""
    x64, q64 = xb.astype(np.float64), q.astype(np.float64)
    d2 = (q64 * q64).sum(1)[:, None] + (x64 * x64).sum(1)[None, :] - 2.0 * q64 @ x64.T
    d2[qlab[:, None] == labels[None, :]] = np.inf
    if skip_rows is not None:
        d2[np.arange(len(q)), skip_rows] = np.inf
    return np.sort(d2, axis=1)[:, :K]


def test_different_label_on_100k_classes_is_exact_within_a_memory_bound(tmp_path: Path, start_server) -> None:
    x, y = many_small_classes(CLASSES, DIM, seed=9)
    index = VectorIndex.build(x, y, np.arange(len(y)) + 100, metric="l2", index="flat")
    SnapshotStore(tmp_path / "store").publish(index)
    base = interpreter_mib("hardneg.api.main", "uvicorn")
    env = {"HARDNEG_API_KEY": API_KEY, "HARDNEG_MAX_BATCH": str(BATCH), "HARDNEG_MAX_K": str(K)}
    server: ApiServer = start_server(tmp_path / "store", env)
    xb = index.index.reconstruct_n(0, index.count)
    rng = np.random.default_rng(1)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        for round_ in range(3):
            rows = rng.choice(index.count, size=BATCH, replace=False)  # 64 queries, (almost surely) 64 labels
            by_ids = client.post("/neighbors", json={"ids": index.ids[rows].tolist(), "k": K, "different_label": True})
            assert by_ids.status_code == 200, by_ids.text
            q = xb[rows] + 0.05 * rng.normal(size=(BATCH, DIM)).astype(np.float32)
            by_vectors = client.post("/neighbors", json={"vectors": q.tolist(), "labels": index.labels[rows].tolist(),
                                                         "k": K, "different_label": True})
            assert by_vectors.status_code == 200, by_vectors.text
            for resp, queries, skip in ((by_ids, xb[rows], rows), (by_vectors, q, None)):
                want = brute_force_other_labels(xb, index.labels, queries, index.labels[rows], skip)
                for i, hits in enumerate(resp.json()["results"]):
                    assert len(hits) == K
                    assert all(h["label"] != index.labels[rows[i]] for h in hits)
                    np.testing.assert_allclose([h["distance"] for h in hits], want[i], rtol=1e-4, atol=1e-4)
    peak = resident_mib(server.proc.pid, "VmHWM")
    allowed = budget_mib(index.count, CLASSES, DIM, 1) + 256  # + uvicorn's and FAISS's buffers
    assert peak is not None and peak <= base + allowed, (
        f"hardneg serve on {CLASSES} classes peaked at {peak:.0f} MiB > {base + allowed:.0f} MiB "
        f"(interpreter {base:.0f} + budget {allowed:.0f})")
