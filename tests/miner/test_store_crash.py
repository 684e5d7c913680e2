"""A publisher killed with SIGKILL at random moments never leaves LATEST naming a broken snapshot.

A child process publishes snapshots back to back (so it is almost always inside ``publish``); the test kills it
after a seeded random delay, then checks the store from outside, and starts the next publisher on the same store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hardneg.miner.store import SnapshotStore

ROUNDS = 20
REPO = Path(__file__).resolve().parents[2]

PUBLISHER = textwrap.dedent("""
    import sys
    import numpy as np
    from hardneg.miner.index import VectorIndex
    from hardneg.miner.store import SnapshotStore

    store_dir, model_file, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(seed)
    index = VectorIndex.build(rng.normal(size=(3000, 32)).astype(np.float32), rng.integers(0, 10, 3000))
    store = SnapshotStore(store_dir, keep=3)
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        store.publish(index, meta={"seed": seed, "step": step}, extra_files={"model.pt2": model_file})
""")


def _start_publisher(store_dir: Path, model_file: Path, seed: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(store_dir), str(model_file), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"publisher did not start: {line!r} {proc.stderr.read()}")
    return proc


def _interrupted_publishes(root: Path) -> set[str]:
    """Temp folders a killed publisher left mid-write (not the trash of retention, not a LATEST temp file)."""
    return {p.name for p in root.glob(".tmp-*") if p.is_dir() and not p.name.startswith(".tmp-del-")}


@pytest.mark.timeout(120)
def test_sigkill_during_publish_never_breaks_latest(tmp_path):
    root = tmp_path / "store"
    model_file = tmp_path / "model.pt2"
    model_file.write_bytes(np.random.default_rng(20).bytes(2 << 20))  # ~2 MB: writing it takes a while
    store = SnapshotStore(root, keep=3)
    rng = np.random.default_rng(21)
    previous: str | None = None
    mid_write = set()
    for round_ in range(ROUNDS):
        proc = _start_publisher(root, model_file, seed=round_)
        try:
            proc.wait(timeout=float(rng.uniform(0.0, 0.25)))
            pytest.fail(f"publisher exited by itself: {proc.stderr.read()}")
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

        latest = store.latest_name()
        if latest is None:  # killed before its first publish finished: allowed only if nothing was ever published
            assert previous is None
            continue
        assert latest in store.names(), f"round {round_}: LATEST names {latest!r}, which does not exist"
        snap = store.open()  # verifies every checksum before loading
        assert snap.name == latest and snap.index.count == 3000 and snap.manifest["meta"]["seed"] <= round_
        # Every snapshot folder is complete: a half-written one never appears under snapshots/.
        for name in store.names():
            store.verify(name)
        if previous is not None:
            assert int(latest) >= int(previous)  # LATEST never moves back to an older snapshot
            if previous in store.names():
                assert store.open(previous).name == previous
        previous = latest
        mid_write |= _interrupted_publishes(root)

    # The kills did land inside publish: some publishers died with their temp folder half written.
    assert mid_write
    # And the store still works: a clean publish succeeds, retention keeps 3, LATEST is the new one.
    name = store.publish(store.open().index, meta={"after": "crashes"})
    assert store.latest_name() == name and len(store.names()) == 3
    for n in store.names():
        store.verify(n)
