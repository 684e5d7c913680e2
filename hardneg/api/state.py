"""The snapshot being served, the older ones pinned by name, and how one is loaded.

The served snapshot is one Python reference, :attr:`SnapshotState.current`. A new
snapshot is fully verified and loaded before that reference is replaced, so a
request that grabbed the reference once keeps a complete, consistent snapshot
(index, ids, labels, model) until it finishes, however many swaps happen meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import numpy as np

from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore, validate_name

if TYPE_CHECKING:  # model_io imports torch; the api imports it only for snapshots that carry a model
    from hardneg.miner.model_io import ExportedModel

log = logging.getLogger(__name__)
_MAX_FAILED = 256  # remembered failed pinned names (a bound, so that random names cannot grow it)


class NotReadyError(RuntimeError):
    """No snapshot has been loaded yet (answered with 503)."""


@dataclass(frozen=True)
class ServedSnapshot:
    """A verified, loaded snapshot: its ``manifest``, its ``index`` and, when it has them, its embedding ``model``
    and its ``thumbs`` (n, H, W[, C]) uint8 in row order."""

    name: str
    manifest: dict
    index: VectorIndex
    model: ExportedModel | None
    has_model_file: bool = False  # model.pt2 is in the snapshot (model is None when the policy refused loading it)
    thumbs: np.ndarray | None = None

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", ""))


def load_snapshot(store: SnapshotStore, name: str, torch_threads: int = 1, load_model: bool = False) -> ServedSnapshot:
    """Verify and load snapshot ``name``, with its model when ``load_model`` (blocking: call it from a worker thread).

    ``load_model`` must be False unless the store is signed (a store key) or trusted: loading ``model.pt2``
    runs whatever code a crafted file holds (:mod:`hardneg.miner.model_io`). Without it the snapshot serves
    vector and id queries, and ``inputs`` queries are refused.

    Raises :class:`SnapshotError` when a file is missing or corrupt, including ``model.pt2``: a snapshot whose
    model cannot be loaded is refused as a whole, so that ``inputs`` queries never meet a half-served snapshot.
    """
    snap = store.open(name)
    model = None
    spec = snap.manifest.get("model") or {}
    if snap.model_path is not None and load_model:
        if not isinstance(spec.get("input_shape"), list):
            raise SnapshotError(f"snapshot {name!r} has {snap.model_path.name} but its manifest gives no "
                                "model.input_shape, so raw inputs cannot be checked")
        data = store.read_file(name, snap.model_path.name, snap.manifest)  # the checked bytes, read once
        # torch is imported only for snapshots that carry a model: a vectors-only service starts faster.
        import torch

        from hardneg.miner.model_io import load_model as load_exported

        torch.set_num_threads(torch_threads)  # same budget as FAISS: lanes x threads <= cores
        model = load_exported(data, spec["input_shape"])
    return ServedSnapshot(snap.name, snap.manifest, snap.index, model, has_model_file=snap.model_path is not None,
                          thumbs=store.load_thumbs(snap))


@dataclass
class _Loading:
    """One pinned name being loaded: the requests that wait for it share one load and its outcome."""

    lock: anyio.Lock
    users: int = 0
    snap: ServedSnapshot | None = None
    error: Exception | None = None


class SnapshotState:
    """Holds the served snapshot and a small LRU of older snapshots that requests pin by name.

    Args:
        store: the snapshot store.
        pin_cache: how many pinned (non-current) snapshots stay loaded.
        torch_threads: intra-op threads for embedding ``inputs``.
        load_models: load ``model.pt2`` files (only for a signed or trusted store).
        run: runs a blocking load; the app passes its search lanes, so pinned loads share their bound.
        failure_ttl: seconds a pinned name that failed to load answers its error again without a new attempt.
        max_loading: most distinct names loading at once; more answer 503.
    """

    def __init__(self, store: SnapshotStore, pin_cache: int, torch_threads: int = 1, load_models: bool = False,
                 run: Callable[..., Awaitable[Any]] | None = None, failure_ttl: float = 5.0,
                 max_loading: int = 8) -> None:
        self.store = store
        self.pin_cache = pin_cache
        self.torch_threads = torch_threads
        self.load_models = load_models
        self.current: ServedSnapshot | None = None
        self.failure_ttl = failure_ttl
        self.max_loading = max_loading
        self._run = run or anyio.to_thread.run_sync
        self._pinned: OrderedDict[str, ServedSnapshot] = OrderedDict()
        self._loading: dict[str, _Loading] = {}
        self._failed: OrderedDict[str, tuple[float, Exception]] = OrderedDict()  # name -> (until, error)

    def load(self, name: str) -> ServedSnapshot:
        """Load ``name`` with this state's model policy (blocking)."""
        return load_snapshot(self.store, name, self.torch_threads, self.load_models)

    def served(self) -> ServedSnapshot:
        """The snapshot being served; raises :class:`NotReadyError` before the first one loads."""
        snap = self.current
        if snap is None:
            raise NotReadyError("no snapshot is loaded yet: waiting for the store's LATEST to name a valid "
                                "snapshot; retry shortly")
        return snap

    def swap(self, snap: ServedSnapshot) -> ServedSnapshot | None:
        """Serve ``snap`` from now on; return the previous snapshot.

        The previous one is not kept loaded: requests still using it hold their own reference, and keeping
        it for possible pins would multiply the service's memory by the pin cache size on every publish.
        """
        old, self.current = self.current, snap
        self._pinned.pop(snap.name, None)
        self._failed.pop(snap.name, None)
        return old

    async def resolve(self, name: str | None) -> ServedSnapshot:
        """The served snapshot when ``name`` is None or names it, else snapshot ``name`` loaded on demand.

        Raises :class:`ValidationError` for an invalid name, :class:`NotFoundError` for a name the store does not
        hold and :class:`SnapshotError` for a corrupt one; a failure is answered again for ``failure_ttl`` seconds
        without another attempt.
        """
        current = self.served()
        if name is None or name == current.name:
            return current
        validate_name(name)
        if name in self._pinned:
            self._pinned.move_to_end(name)
            return self._pinned[name]
        self._raise_if_failed(name)
        # One load per name even when many requests pin it at once; the others wait and share its outcome.
        entry = self._loading.get(name)
        if entry is None:
            if len(self._loading) >= self.max_loading:
                raise NotReadyError(f"{self.max_loading} pinned snapshots are loading already; retry shortly")
            entry = self._loading[name] = _Loading(anyio.Lock())
        entry.users += 1
        try:
            async with entry.lock:
                if entry.snap is None and entry.error is None:
                    await self._load_pinned(name, entry)
            if entry.error is not None:
                raise entry.error
            assert entry.snap is not None
            return entry.snap
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._loading[name]

    async def _load_pinned(self, name: str, entry: _Loading) -> None:
        try:
            entry.snap = await self._run(self.load, name)
        except (SnapshotError, NotFoundError, ValidationError) as e:
            entry.error = e
            self._failed[name] = (time.monotonic() + self.failure_ttl, e)
            while len(self._failed) > _MAX_FAILED:
                self._failed.popitem(last=False)
            return
        log.info("loaded pinned snapshot %s", name)
        self._remember(entry.snap)

    def _raise_if_failed(self, name: str) -> None:
        failed = self._failed.get(name)
        if failed is None:
            return
        until, error = failed
        if time.monotonic() < until:
            raise error
        del self._failed[name]
    def _remember(self, snap: ServedSnapshot) -> None:
        if self.pin_cache < 1:
            return
        self._pinned[snap.name] = snap
        self._pinned.move_to_end(snap.name)
        while len(self._pinned) > self.pin_cache:
            self._pinned.popitem(last=False)
