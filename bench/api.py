"""Benchmark: hardneg's HTTP /neighbors against the same search run in-process, side by side.

For a 100k x 64 ``flat`` and a 100k x 64 ``hnsw`` snapshot it starts ``hardneg serve`` in a
subprocess and measures, for batches of 1 and of 256 query vectors (k = 10):

* HTTP latency: one keep-alive client sending requests one after another (an unloaded server),
  p50/p99 per request;
* HTTP throughput: several concurrent keep-alive clients (threads) for a fixed time, queries per
  second, and the server process's CPU time per request (from ``/proc``);
* in-process: one loop calling ``VectorIndex.search`` on the same snapshot, loaded here: p50/p99,
  queries per second and CPU time per call.

It prints the ratio HTTP throughput / in-process throughput (goal at batch 256: >= 0.8) and the
HTTP p50 latency over the in-process p50 (goal at batch 1: <= +1 ms). The clients use the
standard library's ``http.client`` with request bodies encoded before timing, and do not decode
responses inside the timed loop, so that their own work competes with the server for the cores as
little as possible.

Usage: ``python bench/api.py [--quick] [--seconds S] [--clients C]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import httpx
import numpy as np

from hardneg.api.settings import available_cores
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore

K = 10


@dataclass
class Measure:
    """Latencies (s) of each request/call and the queries answered in ``elapsed`` seconds."""

    latencies: list[float]
    queries: int
    elapsed: float
    cpu: float = float("nan")  # CPU seconds spent (by the server for HTTP, by this process in-process)

    @property
    def qps(self) -> float:
        return self.queries / self.elapsed

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per request (or call)."""
        return self.cpu / len(self.latencies) * 1e3


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    """One keep-alive HTTP/1.1 connection that POSTs pre-encoded JSON bodies to /neighbors."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request("POST", "/neighbors", body, {"content-type": "application/json"})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # The server closes connections idle past its keep-alive time (e.g. while the other clients
                # warm up on a slow batch); open a new one once.
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def make_data(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` points around 100 Gaussian centres: vectors (n, dim), labels (n,), and 4096 queries (4096, dim)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, dim))
    labels = rng.integers(0, 100, size=n)
    x = (centres[labels] + 0.7 * rng.normal(size=(n, dim))).astype(np.float32)
    q = (centres[rng.integers(0, 100, size=4096)] + 0.7 * rng.normal(size=(4096, dim))).astype(np.float32)
    return x, labels.astype(np.int64), q


class Server:
    """``hardneg serve`` on a free port in a subprocess (stopped by :meth:`close`)."""

    def __init__(self, store: Path, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HARDNEG_")}
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "hardneg.cli", "serve", "--store", str(store),
                                      "--port", str(port), "--no-access-log"], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"hardneg serve did not become ready:\n{log.read_text()}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def bench_latency(server: "Server", bodies: list[bytes], batch: int, seconds: float) -> Measure:
    """One client sending ``bodies`` round-robin, one request at a time, for ``seconds``: unloaded latency."""
    c = Client(server.url)
    try:
        c.post(bodies[0])  # connect + warm up
        lat = []
        cpu0, t_start = process_cpu(server.proc.pid), time.perf_counter()
        while time.perf_counter() - t_start < seconds:
            t0 = time.perf_counter()
            status, text = c.post(bodies[len(lat) % len(bodies)])
            lat.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"HTTP {status} during the benchmark: {text[:200]!r}")
        elapsed = time.perf_counter() - t_start
        return Measure(lat, len(lat) * batch, elapsed, process_cpu(server.proc.pid) - cpu0)
    finally:
        c.close()


def bench_http(server: "Server", bodies: list[bytes], batch: int, clients: int, seconds: float) -> Measure:
    """``clients`` threads POST pre-encoded ``bodies`` round-robin for ``seconds``."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_gate = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        c = Client(server.url)
        try:
            c.post(bodies[i % len(bodies)])  # connect + warm up
            start_gate.wait()
            j = i
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                status, text = c.post(bodies[j % len(bodies)])
                lat[i].append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(f"{status} {text[:200]!r}")
                    return
                j += clients
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = float("inf")
    start_gate.wait()
    cpu0, t0 = process_cpu(server.proc.pid), time.perf_counter()
    deadline = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = process_cpu(server.proc.pid) - cpu0
    if errors:
        raise RuntimeError(f"HTTP errors during the benchmark: {errors[:3]}")
    flat = [x for per in lat for x in per]
    return Measure(flat, len(flat) * batch, elapsed, cpu)


def bench_inprocess(index: VectorIndex, queries: np.ndarray, batch: int, seconds: float, threads: int) -> Measure:
    """One loop of ``index.search`` with ``threads`` FAISS threads over consecutive batches for ``seconds``."""
    faiss.omp_set_num_threads(threads)
    index.search(queries[:batch], K)  # warm up
    lat = []
    cpu0, t_start = time.process_time(), time.perf_counter()
    i = 0
    while time.perf_counter() - t_start < seconds:
        lo = (i * batch) % (len(queries) - batch + 1)
        t0 = time.perf_counter()
        index.search(queries[lo:lo + batch], K)
        lat.append(time.perf_counter() - t0)
        i += 1
    return Measure(lat, len(lat) * batch, time.perf_counter() - t_start, time.process_time() - cpu0)


def check_same(url: str, index: VectorIndex, queries: np.ndarray) -> None:
    """HTTP and in-process must return the same ids before their speed is compared."""
    r = httpx.post(f"{url}/neighbors", json={"vectors": queries.tolist(), "k": K}, timeout=60)
    r.raise_for_status()
    got = [[h["id"] for h in row] for row in r.json()["results"]]
    want = [hits.ids.tolist() for hits in index.search(queries, K)]
    if got != want:
        raise RuntimeError("HTTP results differ from in-process results on the same snapshot")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k vectors and shorter runs")
    ap.add_argument("--n", type=int, help="stored vectors (default 100000, 20000 with --quick)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seconds", type=float, help="time per measurement (default 3, 1 with --quick)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--indexes", default="flat,hnsw")
    args = ap.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    cores = available_cores()
    x, y, q = make_data(n, args.dim)
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"hardneg api benchmark: n={n} dim={args.dim} k={K}, {args.clients} HTTP clients, {seconds:.1f} s per "
          f"measurement, {cores} cores (server: {cores} lanes x 1 FAISS thread; in-process: the faster of "
          f"1 and {cores} FAISS threads)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hardneg-bench-api-") as tmp:
        for kind in args.indexes.split(","):
            t0 = time.perf_counter()
            store = SnapshotStore(Path(tmp) / kind)
            store.publish(VectorIndex.build(x, y, metric="l2", index=kind), name=kind)
            index = store.open().index
            print(f"built and published {kind} in {time.perf_counter() - t0:.1f} s", flush=True)
            server = Server(store.root, Path(tmp) / f"{kind}.log")
            try:
                check_same(server.url, index, q[:8])
                for batch in (1, 256):
                    bodies = [json.dumps({"vectors": q[i:i + batch].tolist(), "k": K}).encode()
                              for i in range(0, min(len(q), 64 * batch), batch)]
                    latency = bench_latency(server, bodies, batch, seconds)
                    http = bench_http(server, bodies, batch, args.clients, seconds)
                    # The baseline is the faster of 1 FAISS thread and all cores: on a shared machine OpenMP's
                    # spinning threads can make the "obvious" all-cores loop slower, which would flatter HTTP.
                    tries = {t: bench_inprocess(index, q, batch, seconds / 2, t) for t in sorted({1, cores})}
                    best = max(tries, key=lambda t: tries[t].qps)
                    local = tries[best]
                    rows.append((kind, batch, latency, http, local, best))
                    print(f"  {kind} batch {batch}: HTTP {http.qps:,.0f} q/s, in-process "
                          + ", ".join(f"{m.qps:,.0f} q/s with {t} thread(s)" for t, m in tries.items()), flush=True)
            finally:
                server.close()
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print(f"{'':<12} | {'HTTP, 1 client':^23} | {f'HTTP, {args.clients} clients':^21} | {'in-process':^37} |")
    print(f"{'index':<6} {'batch':>5} | {'p50 ms':>7} {'p99 ms':>7} {'CPU ms':>7} | {'queries/s':>10} {'CPU ms':>10} | "
          f"{'p50 ms':>7} {'p99 ms':>7} {'queries/s':>10} {'CPU ms':>6} {'thr':>3} | {'p50 over':>8} {'q/s ratio':>9}")
    for kind, batch, latency, http, local, threads in rows:
        goal = "  (goal >= 0.8)" if batch == 256 else "  (goal <= +1 ms)"
        print(f"{kind:<6} {batch:>5} | {latency.pct(50):>7.2f} {latency.pct(99):>7.2f} {latency.cpu_ms:>7.2f} | "
              f"{http.qps:>10,.0f} {http.cpu_ms:>10.2f} | {local.pct(50):>7.2f} {local.pct(99):>7.2f} "
              f"{local.qps:>10,.0f} {local.cpu_ms:>6.2f} {threads:>3} | {latency.pct(50) - local.pct(50):>+8.2f} "
              f"{http.qps / local.qps:>9.2f}{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
