"""``refresh_on_drift``: refresh early when the model has moved away from the last snapshot.

A refresh is worth its cost when what it would mine differs from what the last snapshot gave. On digits the
statistic that tracks this is the class-centroid shift (:func:`hardneg.miner.drift.centroid_shift`): it is
large while training moves the classes and falls as training converges, whereas the neighbour overlap
between consecutive snapshots does not rise with convergence (docs/benchmarks.md, "Drift").

:class:`DriftMonitor` keeps a seeded probe of ``drift_probe`` training items. Before each epoch that the
schedule does not refresh anyway (so, in effect, after each epoch) it embeds the probe with the current model
and compares it with the same items' vectors in the run's newest snapshot: the mean over the probe's classes
of ``d²`` between a class's mean vector then and now, on the snapshot's metric (unit vectors on cosine
snapshots). Above ``refresh_on_drift`` the loop refreshes before the epoch. The probe is embedded on rank 0
only; every rank gets its decision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hardneg.miner.drift import centroid_shift
from hardneg.miner.distances import Distance
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.distributed import LOCAL, DistContext
from hardneg.trainer.refresh import embed_items, seed_for

DRIFT_PROBE = 7  # purpose of the probe's random stream (hardneg.trainer.refresh.seed_for); 0-4 are the recipes'


def probe_items(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of ``min(size, n)`` of ``range(n)``: (m,) int64, ascending."""
    rng = np.random.default_rng(seed_for(seed, 0, DRIFT_PROBE))
    return np.sort(rng.choice(n, size=min(size, n), replace=False)).astype(np.int64)


def mean_centroid_shift(before: np.ndarray, after: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes of ``labels`` (m,) of ``d²`` between the class's mean row of ``before`` (m, d) and of
    ``after`` (m, d); 0.0 for no items."""
    shift = centroid_shift(before, labels, after, labels)
    return float(np.mean(list(shift.values()))) if shift else 0.0


class DriftMonitor:
    """Measures how far the model has drifted from the run's newest snapshot on a probe of training items.

    Args:
        x: (n, ...) the training inputs, on the model's device.
        labels: (n,) their labels.
        threshold: refresh when the mean centroid shift (``d²``) is above this.
        probe: items in the probe; seed: its seed.
        store: where the snapshots are (the reference is read from the snapshot the loop names).
        batch_size: items per forward pass.
    """

    def __init__(self, x: torch.Tensor, labels: np.ndarray, threshold: float, probe: int, seed: int,
                 store: SnapshotStore, batch_size: int, dist: DistContext = LOCAL) -> None:
        self.items = probe_items(len(labels), probe, seed)
        self.x, self.labels = x[torch.from_numpy(self.items).to(x.device)], np.asarray(labels)[self.items]
        self.threshold, self.store, self.batch_size, self.dist = threshold, store, batch_size, dist
        # snapshot name, its distance, the probe's stored vectors (the snapshot's index itself is not kept)
        self._reference: tuple[str, Distance, np.ndarray] | None = None
        self.last: dict[str, Any] | None = None  # the latest check, for metrics.jsonl

    def shift(self, model: nn.Module, snapshot: str) -> float:
        """The probe's mean centroid shift from ``snapshot`` (a name in the store) to ``model`` now."""
        distance, before = self._reference_of(snapshot)
        after = distance.prepare(embed_items(model, self.x, self.batch_size))
        return mean_centroid_shift(before, after, self.labels)

    def due(self, model: nn.Module, snapshot: str | None) -> bool:
        """True when the model has drifted past the threshold since ``snapshot`` (None: no snapshot yet, False).
        Records the check in :attr:`last`."""
        if snapshot is None:
            return False
        value = float(self.dist.from_main(lambda: self.shift(model, snapshot)))
        refresh = value > float(self.threshold)
        self.last = {"centroid_shift": value, "since": snapshot, "threshold": float(self.threshold),
                     "refresh": refresh}
        return refresh

    def take(self) -> dict[str, Any] | None:
        """The latest check since the last call (None when there was none)."""
        last, self.last = self.last, None
        return last

    def _reference_of(self, snapshot: str) -> tuple[Distance, np.ndarray]:
        if self._reference is None or self._reference[0] != snapshot:
            index = self.store.open(snapshot).index
            self._reference = (snapshot, index.distance, index.vectors_of(self.items))
        return self._reference[1], self._reference[2]
