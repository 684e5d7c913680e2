"""The snapshot being served, the older ones pinned by name, and how one is loaded.

The served snapshot is one Python reference, :attr:`SnapshotState.current`. A new
snapshot is fully verified and loaded before that reference is replaced, so a
request that grabbed the reference once keeps a complete, consistent snapshot
(index, ids, labels, model) until it finishes, however many swaps happen meanwhile.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from hardneg.miner.errors import SnapshotError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore

if TYPE_CHECKING:  # model_io imports torch; the api imports it only for snapshots that carry a model
    from hardneg.miner.model_io import ExportedModel

log = logging.getLogger(__name__)


class NotReadyError(RuntimeError):
    """No snapshot has been loaded yet (answered with 503)."""


@dataclass(frozen=True)
class ServedSnapshot:
    """A verified, loaded snapshot: its ``manifest``, its ``index`` and, when it has one, its embedding ``model``."""

    name: str
    manifest: dict
    index: VectorIndex
    model: ExportedModel | None

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", ""))


def load_snapshot(store: SnapshotStore, name: str, torch_threads: int = 1) -> ServedSnapshot:
    """Verify and load snapshot ``name`` with its model (blocking: call it from a worker thread).

    Raises :class:`SnapshotError` when a file is missing or corrupt, including ``model.pt2``: a snapshot whose
    model cannot be loaded is refused as a whole, so that ``inputs`` queries never meet a half-served snapshot.
    """
    snap = store.open(name)
    model = None
    spec = snap.manifest.get("model") or {}
    if snap.model_path is not None:
        if not isinstance(spec.get("input_shape"), list):
            raise SnapshotError(f"snapshot {name!r} has {snap.model_path.name} but its manifest gives no "
                                "model.input_shape, so raw inputs cannot be checked")
        # torch is imported only for snapshots that carry a model: a vectors-only service starts faster.
        import torch

        from hardneg.miner.model_io import load_model

        torch.set_num_threads(torch_threads)  # same budget as FAISS: lanes x threads <= cores
        model = load_model(snap.model_path, spec["input_shape"])
    return ServedSnapshot(snap.name, snap.manifest, snap.index, model)


class SnapshotState:
    """Holds the served snapshot and a small LRU of older snapshots that requests pin by name.

    Args:
        store: the snapshot store.
        pin_cache: how many pinned (non-current) snapshots stay loaded.
        torch_threads: intra-op threads for embedding ``inputs``.
    """

    def __init__(self, store: SnapshotStore, pin_cache: int, torch_threads: int = 1) -> None:
        self.store = store
        self.pin_cache = pin_cache
        self.torch_threads = torch_threads
        self.current: ServedSnapshot | None = None
        self._pinned: OrderedDict[str, ServedSnapshot] = OrderedDict()
        self._loading: dict[str, anyio.Lock] = {}

    def served(self) -> ServedSnapshot:
        """The snapshot being served; raises :class:`NotReadyError` before the first one loads."""
        snap = self.current
        if snap is None:
            raise NotReadyError(f"no snapshot is loaded yet: waiting for {self.store.root}/LATEST to name a "
                                "valid snapshot; retry shortly")
        return snap

    def swap(self, snap: ServedSnapshot) -> ServedSnapshot | None:
        """Serve ``snap`` from now on; return the previous snapshot.

        The previous one is not kept loaded: requests still using it hold their own reference, and keeping
        it for possible pins would multiply the service's memory by the pin cache size on every publish.
        """
        old, self.current = self.current, snap
        self._pinned.pop(snap.name, None)
        return old

    async def resolve(self, name: str | None) -> ServedSnapshot:
        """The served snapshot when ``name`` is None or names it, else snapshot ``name`` loaded on demand.

        Raises :class:`NotFoundError` for a name the store does not hold and :class:`SnapshotError` for a corrupt one.
        """
        current = self.served()
        if name is None or name == current.name:
            return current
        if name in self._pinned:
            self._pinned.move_to_end(name)
            return self._pinned[name]
        # One load per name even when many requests pin it at once; the others wait and reuse it.
        lock = self._loading.setdefault(name, anyio.Lock())
        async with lock:
            snap = self._pinned.get(name)
            if snap is None:
                snap = await anyio.to_thread.run_sync(load_snapshot, self.store, name, self.torch_threads)
                log.info("loaded pinned snapshot %s", name)
                self._remember(snap)
        self._loading.pop(name, None)
        return snap

    def _remember(self, snap: ServedSnapshot) -> None:
        if self.pin_cache < 1:
            return
        self._pinned[snap.name] = snap
        self._pinned.move_to_end(snap.name)
        while len(self._pinned) > self.pin_cache:
            self._pinned.popitem(last=False)
