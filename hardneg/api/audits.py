"""Running audits and drift for the api: once per snapshot and parameters, off the event loop, cached.

An audit is a full pass over a snapshot (every item against every other on flat snapshots), so its result
is kept in a small LRU keyed by the snapshot's name (snapshots are immutable) and the parameters; concurrent
requests for the same key wait for one computation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request

from hardneg.api.search import SearchLanes
from hardneg.api.settings import Settings
from hardneg.api.state import ServedSnapshot
from hardneg.miner.errors import ValidationError

T = TypeVar("T")


class AuditCache:
    """The last ``size`` audit results, by key; each computed at most once at a time, in a search lane."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._results: OrderedDict[Hashable, Any] = OrderedDict()
        self._locks: dict[Hashable, anyio.Lock] = {}

    async def get(self, key: Hashable, compute: Callable[[], T], lanes: SearchLanes) -> T:
        """The cached result for ``key``, else ``compute()`` run in one of ``lanes``."""
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:
            if key not in self._results:
                self._results[key] = await lanes.run(compute)
                while len(self._results) > self.size:
                    self._results.popitem(last=False)
            result = self._results[key]
        self._locks.pop(key, None)
        return result


def check_auditable(snap: ServedSnapshot, settings: Settings) -> None:
    """400 when ``snap`` is larger than ``HARDNEG_AUDIT_MAX_ITEMS``: an audit would hold a lane for too long."""
    if snap.index.count > settings.audit_max_items:
        raise ValidationError(f"snapshot {snap.name} holds {snap.index.count} items; the api audits at most "
                              f"{settings.audit_max_items} (HARDNEG_AUDIT_MAX_ITEMS): run `hardneg audit` or "
                              "`hardneg drift` on the store instead")


async def get_audit_cache(request: Request) -> AuditCache:
    return request.app.state.audit_cache


AuditCacheDep = Annotated[AuditCache, Depends(get_audit_cache)]
