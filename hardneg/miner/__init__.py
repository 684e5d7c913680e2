"""The core library: snapshot store, filtered index search, mining and retrieval metrics.

``hardneg.miner`` imports neither ``hardneg.trainer`` nor ``hardneg.api``.
"""

from hardneg.miner.distances import Distance, get_distance
from hardneg.miner.errors import SnapshotError, ValidationError
from hardneg.miner.index import IndexSpec, SearchParams, SearchResult, VectorIndex
from hardneg.miner.store import Snapshot, SnapshotInfo, SnapshotStore

__all__ = [
    "Distance",
    "IndexSpec",
    "SearchParams",
    "SearchResult",
    "Snapshot",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotStore",
    "ValidationError",
    "VectorIndex",
    "get_distance",
]
