"""Helpers of the hardneg api tests: what a test snapshot holds, a real ``hardneg serve`` process, waiting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette asks for the httpx2 package, which hardneg does not depend on; the TestClient works as it is.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient  # noqa: F401 - re-exported for the test modules
FUZZ_STATUSES: Counter[int] = Counter()  # status -> answers, filled by test_fuzz.py, printed by conftest.py
API_KEY = "test-key-7f3a"
STORE_KEY = "store-key-c41e"
LIMITS = {"max_k": 50, "max_batch": 64, "max_body_bytes": 65536}
INPUT_SHAPE = (2, 3)


@dataclass
class Published:
    """What a test snapshot holds: ``vectors`` (n, d) as given to ``VectorIndex.build``, ``labels``, ``ids`` (n,)."""

    name: str
    metric: str
    vectors: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    model: torch.nn.Module | None = None
    extra: dict = field(default_factory=dict)

    def near(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` query vectors (n, d) near stored items (with noise) and their labels (n,)."""
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, len(self.ids), size=n)
        q = self.vectors[rows] + 0.3 * rng.normal(size=(n, self.vectors.shape[1])).astype(np.float32)
        return q.astype(np.float32), self.labels[rows]


@dataclass
class ApiStore:
    root: Path
    snapshots: dict[str, Published]

    @property
    def latest(self) -> Published:
        return self.snapshots["model-1"]


def linear_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(INPUT_SHAPE)), 8)).eval()


def embed(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    """The eager (not exported) model's embedding of ``inputs`` (n, *INPUT_SHAPE): (n, 8) float32."""
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(inputs, np.float32))).numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """``hardneg serve`` in a subprocess on a free local port; its log goes to ``log_path``."""

    def __init__(self, store: Path, log_path: Path, env: dict[str, str], *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HARDNEG_")}
        cmd = [sys.executable, "-m", "hardneg.cli", "serve", "--store", str(store), "--port", str(self.port),
               "--no-access-log", *flags]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**clean, **env})

    def wait_live(self, timeout: float = 90.0) -> ApiServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hardneg serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"hardneg serve did not answer /healthz within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 50 ms until it holds (a bound on waiting, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")




def metric_value(text: str, sample: str, **labels: str) -> float:
    """The value of Prometheus ``sample`` (e.g. ``hardneg_snapshot_reloads_total``) with exactly ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    raise KeyError(f"no sample {sample}{labels} in /metrics")
