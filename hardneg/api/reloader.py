"""Hot reload: watch ``LATEST`` and swap to each new snapshot once it has loaded and verified.

Polling rather than inotify: it works the same on a shared volume (NFS, a compose
volume, object-store mounts), and reading a one-line file every second costs nothing.
"""

from __future__ import annotations

import logging
import os
import time

import anyio
import anyio.to_thread

from hardneg.api.metrics import ApiMetrics
from hardneg.api.state import SnapshotState
from hardneg.miner.errors import SnapshotError
from hardneg.miner.store import LATEST

log = logging.getLogger(__name__)

# What LATEST said and when it was written: a failed snapshot is retried when this changes.
_Stamp = tuple[str, int, int]


class Reloader:
    """Polls ``STORE/LATEST`` every ``poll_seconds`` and serves each new snapshot it names.

    A snapshot that fails to verify or load is not served (the previous one stays), the failure is logged
    and counted, and it is retried only when ``LATEST`` is written again or ``retry_seconds`` have passed.
    """

    def __init__(self, state: SnapshotState, metrics: ApiMetrics, poll_seconds: float, retry_seconds: float) -> None:
        self.state = state
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self._failed: _Stamp | None = None
        self._retry_at = 0.0

    def _read_latest(self) -> _Stamp | None:
        """(name, mtime_ns, inode) of LATEST, or None while the store has no snapshot."""
        path = self.state.store.root / LATEST
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        # Publishing replaces LATEST with os.replace, so a rewrite changes its inode even within one mtime tick.
        with open(path, "rb") as f:  # a name is at most 128 characters; never read a planted huge file whole
            name = f.read(256).decode("utf-8", "replace").strip()
        return name, st.st_mtime_ns, st.st_ino

    async def check_once(self) -> bool:
        """Look at LATEST once and swap to the snapshot it names if that is new; True when a swap happened."""
        try:
            stamp = await anyio.to_thread.run_sync(self._read_latest)
        except OSError as e:  # e.g. the store's volume went away; keep serving and look again next poll
            log.warning("cannot read %s/%s: %s", self.state.store.root, LATEST, e)
            return False
        if stamp is None:
            return False
        name = stamp[0]
        current = self.state.current
        if current is not None and current.name == name:
            return False
        if stamp == self._failed and time.monotonic() < self._retry_at:
            return False
        try:
            snap = await anyio.to_thread.run_sync(self.state.load, name)
        except Exception as e:  # noqa: BLE001 - any failure must leave the old snapshot served, not kill the watcher
            self._failed, self._retry_at = stamp, time.monotonic() + self.retry_seconds
            self.metrics.reloads.labels(result="failure").inc()
            level = logging.ERROR if isinstance(e, (SnapshotError, KeyError, ValueError, OSError)) else logging.CRITICAL
            log.log(level, "snapshot %r from LATEST was not loaded, still serving %s: %s (retry in %.0f s or when "
                    "LATEST changes)", name, current.name if current else "nothing", e, self.retry_seconds,
                    exc_info=level == logging.CRITICAL)
            return False
        self._failed = None
        self.state.swap(snap)
        self.metrics.reloads.labels(result="success").inc()
        self.metrics.served(snap.name, snap.index.count, snap.created_at)
        log.info("serving snapshot %s (%d items, dim %d, %s)%s", snap.name, snap.index.count, snap.index.dim,
                 snap.index.spec.factory, f", replacing {current.name}" if current else "")
        return True

    async def run(self) -> None:
        """Poll forever (until cancelled at shutdown)."""
        while True:
            await anyio.sleep(self.poll_seconds)
            await self.check_once()
