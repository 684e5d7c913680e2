"""The HTTP and store checks of ``scripts/compose-smoke.sh``, run against the real Compose stack.

The stack's volumes are read from the host (``podman volume inspect``'s mount point), the api through its
published port on 127.0.0.1. Answers are compared with brute force over the snapshot they name (the check of
``tests/e2e/test_compose_e2e.py`` over ``tests/conftest.py``'s reference). Each check prints ``PASS: ...`` or
exits non-zero with what differed. The API key comes from ``SMOKE_API_KEY``, never from the command line.

    python scripts/compose_smoke_check.py ready     URL TIMEOUT_S
    python scripts/compose_smoke_check.py neighbors URL STORE_DIR
    python scripts/compose_smoke_check.py finished  URL STORE_DIR RUN_DIR EPOCHS TIMEOUT_S
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "e2e")]
# the local-process compose test's exchange and check, over the tests' brute-force reference
from conftest import assert_knn_matches, reference_distances  # noqa: E402
from test_compose_e2e import assert_brute_force, neighbors_exchange, served_name  # noqa: E402

from hardneg.miner.store import SnapshotStore  # noqa: E402


def wait_served(client: httpx.Client, timeout_s: float, want: str | None = None) -> tuple[str, float]:
    """Poll ``/readyz`` until it names a snapshot (``want``, if given): ``(name, seconds waited)``."""
    t0 = time.monotonic()
    name = None
    while time.monotonic() - t0 < timeout_s:
        name = served_name(client)
        if name is not None and (want is None or name == want):
            return name, time.monotonic() - t0
        time.sleep(0.5)
    sys.exit(f"FAIL: /readyz did not name {want or 'a snapshot'} within {timeout_s:.0f} s (last: {name})")


def check_neighbors(client: httpx.Client, store: Path, seed: int) -> str:
    """Hard-negative ``POST /neighbors`` for seeded stored ids equals brute force on the snapshot it names,
    and the same request without the API key is refused: the name of that snapshot."""
    snapshot = served_name(client)
    if snapshot is None:
        sys.exit("FAIL: the api is not ready")
    exchange = neighbors_exchange(client, store, snapshot, seed)
    assert_brute_force(exchange, store, (reference_distances, assert_knn_matches))
    unauthenticated = httpx.post(client.base_url.join("neighbors"), json=exchange["request"], timeout=10)
    if unauthenticated.status_code != 401:
        sys.exit(f"FAIL: POST /neighbors without the API key answered {unauthenticated.status_code}, not 401")
    return exchange["response"]["snapshot"]


def cmd_ready(client: httpx.Client, args: argparse.Namespace) -> None:
    name, waited = wait_served(client, args.timeout_s)
    print(f"PASS: /readyz ready after {waited:.1f} s of polling, serving snapshot {name}")


def cmd_neighbors(client: httpx.Client, args: argparse.Namespace) -> None:
    name = check_neighbors(client, args.store, seed=1)
    print(f"PASS: POST /neighbors (4 stored ids, k=7, different_label) equals brute force on snapshot {name};"
          " 401 without the key")


def cmd_finished(client: httpx.Client, args: argparse.Namespace) -> None:
    epochs = [json.loads(line)["epoch"] for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    if epochs != list(range(args.epochs + 1)):
        sys.exit(f"FAIL: metrics.jsonl holds epochs {epochs}, not 0..{args.epochs} once each")
    store = SnapshotStore(args.store)
    latest = store.latest_name()
    meta = store.read_manifest(latest).get("meta", {})
    if (meta.get("reason"), meta.get("epoch")) != ("final", args.epochs):
        sys.exit(f"FAIL: LATEST snapshot {latest} is not the final one of epoch {args.epochs}: {meta}")
    print(f"PASS: the run holds epochs 0..{args.epochs} once each; LATEST is {latest}, the final snapshot")
    _, waited = wait_served(client, args.timeout_s, want=latest)
    name = check_neighbors(client, args.store, seed=2)
    print(f"PASS: the api switched to {latest} within {waited:.1f} s; POST /neighbors equals brute force on {name}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ready = sub.add_parser("ready")
    ready.add_argument("url")
    ready.add_argument("timeout_s", type=float)
    neighbors = sub.add_parser("neighbors")
    neighbors.add_argument("url")
    neighbors.add_argument("store", type=Path)
    finished = sub.add_parser("finished")
    finished.add_argument("url")
    finished.add_argument("store", type=Path)
    finished.add_argument("run_dir", type=Path)
    finished.add_argument("epochs", type=int)
    finished.add_argument("timeout_s", type=float)
    args = p.parse_args(argv)
    key = os.environ.get("SMOKE_API_KEY", "")
    with httpx.Client(base_url=args.url, headers={"X-API-Key": key} if key else {}, timeout=30) as client:
        {"ready": cmd_ready, "neighbors": cmd_neighbors, "finished": cmd_finished}[args.command](client, args)


if __name__ == "__main__":
    main()
