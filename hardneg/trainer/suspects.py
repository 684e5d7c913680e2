"""``exclude_suspects`` in training: leave a snapshot's suspected label errors out of what the recipes train on.

A mislabelled training item does harm in every role: as a negative it is the "nearest wrong-label item" of
the anchors of its true class (a false negative), as an anchor or positive it pulls its true class towards the
given one. At each refresh the label audit (:func:`hardneg.miner.audit.audit_labels`) ranks the snapshot's
items by how little their neighbours support their label; the top ``exclude_suspects`` fraction is left out
until the next refresh:

* ``mined-tuples`` mines from the snapshot's index without them (:func:`without_suspects`), so they are
  never anchors, positives or negatives, and every anchor still gets its hardest admissible negative;
* ``class-batches`` composes its batches from the other items only (:class:`KeptItems`), and its class
  neighbours from their centroids.

The audit runs on rank 0 of a distributed run and every rank gets its result, so all ranks leave out the same
items. The count is recorded in ``metrics.jsonl`` as the refresh's ``suspects_excluded``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hardneg.miner.audit import audit_labels
from hardneg.miner.index import VectorIndex, stored_vectors
from hardneg.miner.mining.miner import suspect_k
from hardneg.trainer.batching import BatchSampler
from hardneg.trainer.distributed import LOCAL, DistContext


@dataclass(frozen=True)
class CleanView:
    """A snapshot's index without its suspects.

    Attributes:
        index: the kept items' stored vectors, labels and ids (item indices), indexed like the snapshot.
        kept: (n',) int64 the kept item indices, ascending.
        excluded: (s,) int64 the left-out item indices, most suspicious first.
    """

    index: VectorIndex
    kept: np.ndarray
    excluded: np.ndarray


def suspects_of(index: VectorIndex, fraction: float, dist: DistContext = LOCAL) -> np.ndarray:
    """Ids (s,) int64 of the top ``fraction`` of ``index``'s label-noise suspects (``ceil(fraction * n)``), most
    suspicious first; audited on rank 0, the same ids on every rank."""

    def audit() -> list[int]:
        return audit_labels(index, suspect_k(index)).top(fraction).tolist() if index.count >= 2 else []

    return np.asarray(dist.from_main(audit), dtype=np.int64)


def without_suspects(index: VectorIndex, fraction: float, dist: DistContext = LOCAL, seed: int = 0) -> CleanView:
    """``index`` rebuilt (same metric and kind, seeded by ``seed``) from the items that are not among its top
    ``fraction`` of suspects (:func:`suspects_of`)."""
    excluded = suspects_of(index, fraction, dist)
    keep = ~np.isin(index.ids, excluded)
    kind = index.spec.factory if index.spec.kind == "factory" else index.spec.kind
    clean = VectorIndex.build(stored_vectors(index)[keep], index.labels[keep], index.ids[keep], metric=index.metric,
                              index=kind, seed=seed)
    return CleanView(clean, np.sort(index.ids[keep]).astype(np.int64), excluded)


class KeptItems(BatchSampler):
    """``sampler``'s batches over the kept items only: ``sampler`` was built on ``labels[kept]`` (``labels`` (n,):
    every training item's) and its positions are mapped back to item indices."""

    def __init__(self, sampler: BatchSampler, kept: np.ndarray, labels: np.ndarray) -> None:
        super().__init__(labels, sampler.batch_size)
        self.sampler, self.kept = sampler, np.asarray(kept, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sampler)

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return [self.kept[b] for b in self.sampler.batches(rng)]
