"""Training tuples in dataset indices: triplets (anchor, positive, negative) or pairs (i, j, y).

Pairs follow the seed's convention: ``y = 0`` similar, ``y = 1`` dissimilar. The global miner returns both
forms; random and in-batch mining produce triplets, turned into pairs for the contrastive loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hardneg.miner.errors import ValidationError


@dataclass(frozen=True)
class TupleSet:
    """``kind`` "triplet": ``first, second, third`` = anchor, positive, negative (m,) int64 dataset indices.
    ``kind`` "pair": ``first, second`` (m,) indices and ``third`` (m,) labels y (0 similar, 1 dissimilar)."""

    kind: str
    first: np.ndarray
    second: np.ndarray
    third: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in ("triplet", "pair"):
            raise ValidationError(f"tuple kind must be 'triplet' or 'pair', got {self.kind!r}")
        if not self.first.shape == self.second.shape == self.third.shape or self.first.ndim != 1:
            raise ValidationError("tuple arrays must be 1-D and of equal length")

    def __len__(self) -> int:
        return len(self.first)

    def take(self, idx: np.ndarray) -> TupleSet:
        return TupleSet(self.kind, self.first[idx], self.second[idx], self.third[idx])

    def to_state(self) -> dict[str, Any]:
        """Checkpoint form: plain tensors and a string."""
        return {"kind": self.kind, "first": torch.from_numpy(self.first), "second": torch.from_numpy(self.second),
                "third": torch.from_numpy(self.third)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TupleSet:
        return cls(state["kind"], *(state[k].numpy().astype(np.int64) for k in ("first", "second", "third")))


def triplets(anchor: Any, positive: Any, negative: Any) -> TupleSet:
    return TupleSet("triplet", *(np.asarray(a, dtype=np.int64).reshape(-1) for a in (anchor, positive, negative)))


def pairs(i: Any, j: Any, y: Any) -> TupleSet:
    return TupleSet("pair", *(np.asarray(a, dtype=np.int64).reshape(-1) for a in (i, j, y)))


def triplets_to_pairs(t: TupleSet) -> TupleSet:
    """Each triplet (a, p, n) gives two pairs, (a, p, 0) and (a, n, 1): 2m pairs, interleaved."""
    if t.kind != "triplet":
        raise ValidationError(f"expected triplets, got {t.kind}s")
    m = len(t)
    i = np.repeat(t.first, 2)
    j = np.stack([t.second, t.third], axis=1).reshape(-1)
    y = np.tile(np.array([0, 1], dtype=np.int64), m)
    return pairs(i, j, y)


def for_kind(t: TupleSet, kind: str) -> TupleSet:
    """``t`` as tuples of ``kind``: triplets become pairs (:func:`triplets_to_pairs`); pairs cannot become triplets."""
    if kind == "pair" and t.kind == "triplet":
        return triplets_to_pairs(t)
    if kind == "triplet" and t.kind == "pair":
        raise ValidationError("a triplet loss needs triplets, not pairs")
    return t


def items(t: TupleSet) -> np.ndarray:
    """The dataset indices a batch of tuples embeds, stacked by role: (3m,) anchors, positives, negatives, or
    (2m,) first and second pair members."""
    parts = [t.first, t.second, t.third] if t.kind == "triplet" else [t.first, t.second]
    return np.concatenate(parts)


def random_triplets(labels: np.ndarray, rng: np.random.Generator) -> TupleSet:
    """One triplet per item whose class has another item: a uniform positive (not itself), a uniform negative.

    ``labels`` (n,) int; returns triplets of indices into ``labels``. Vectorised: items are grouped by class so
    that "another item of my class" and "an item of another class" are offsets into contiguous runs.
    """
    labels = np.asarray(labels)
    n = len(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    _, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    cls = np.searchsorted(starts, np.arange(n), side="right") - 1  # class block of each sorted position
    lo, size = starts[cls], counts[cls]
    ok = size >= 2
    pos_in_block = np.arange(n) - lo
    # positive: an offset among the other size-1 members of the block, skipping the anchor itself
    r = (rng.random(n) * np.maximum(size - 1, 1)).astype(np.int64)
    r = np.where(r >= pos_in_block, r + 1, r)
    positive = lo + np.minimum(r, size - 1)
    # negative: an offset among the n-size items outside the block, skipping over the block
    s = (rng.random(n) * (n - size)).astype(np.int64)
    negative = np.where(s >= lo, s + size, s)
    keep = ok & (size < n)
    return triplets(order[keep], order[positive[keep]], order[negative[keep]])
