"""Item batches for in-batch mining: random, class-balanced (P x K), or composed from the snapshot.

An in-batch miner only finds what a batch holds. With many classes a random batch holds few positives
(100 classes, 128 items: about 0.3 other items of an anchor's class) and mostly easy negatives, so how a
batch is formed decides what in-batch mining can find:

* ``random``: a seeded permutation of the items in chunks (every item once per epoch);
* ``pk``: P = batch_size // K classes drawn uniformly, K items of each (Hermans, Beyer & Leibe 2017,
  "In Defense of the Triplet Loss"): every anchor has K - 1 positives and (P - 1)·K negatives;
* class batches (``global_batches = "classes"``): index-composed P x K batches whose classes lie close
  together in the latest snapshot: a seed
  class drawn uniformly and its P - 1 nearest classes by centroid distance (class-level hard mining: Suh et
  al. 2019, "Stochastic Class-based Hard Example Mining for Deep Metric Learning"; batches built from an
  index of the whole training set: Harwood et al. 2017, "Smart Mining for Deep Metric Learning"). Every
  batch then holds the classes its anchors are most easily confused with.

An epoch of class batches has as many batches as a ``random`` epoch (ceil(n / batch_size)), so epochs cost
the same number of forward passes whichever batching is used. With fewer classes than batch_size // K,
every class is in every batch and K grows to fill the batch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.trainer.recipes.settings import BATCHINGS

# Class counts up to which confusable_classes searches class centroids exactly (above: an IVF index).
EXACT_CLASSES = 20_000


@dataclass(frozen=True)
class ClassGroups:
    """Training items grouped by class.

    Attributes:
        classes: (C,) int64 sorted labels of the classes with at least two items (the only ones that can
            give an anchor a positive).
        order: (n',) int64 item indices of those classes, sorted by label.
        starts, counts: (C,) int64 where each class's items start in ``order``, and how many there are.
    """

    classes: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray) -> ClassGroups:
        """Group the items of ``labels`` (n,) by class, leaving out classes with a single item."""
        labels = np.asarray(labels, dtype=np.int64)
        classes, counts = np.unique(labels, return_counts=True)
        keep = counts >= 2
        order = np.argsort(labels, kind="stable")
        order = order[np.isin(labels[order], classes[keep])]
        counts = counts[keep]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(classes[keep], order, starts, counts)

    def positions(self, labels: np.ndarray) -> np.ndarray:
        """Positions in ``classes`` of ``labels`` (any shape); ValidationError for a class not held."""
        pos = np.searchsorted(self.classes, labels)
        ok = pos < len(self.classes)
        ok[ok] = self.classes[pos[ok]] == np.asarray(labels)[ok]
        if not ok.all():
            raise ValidationError(f"classes {np.unique(np.asarray(labels)[~ok])[:10].tolist()} have fewer than "
                                  f"two training items; composed batches accept classes with two or more")
        return pos

    def draw(self, class_pos: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """``k`` items of each class at positions ``class_pos`` (m,): (m, k) item indices.

        Distinct items when the class has ``k`` or more; otherwise all of them, then repeats drawn uniformly.
        O(m·k²) time and O(m·k) memory, whatever the class sizes.
        """
        size = self.counts[class_pos]
        cols = distinct_draws(size, k, rng)
        short = cols < 0
        cols = np.where(short, (rng.random(cols.shape) * size[:, None]).astype(np.int64), cols)
        return self.order[self.starts[class_pos][:, None] + cols]


def distinct_draws(size: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, a uniform ``min(k, size)``-subset of ``range(size)``: (m, k) int64, ``-1``-padded on the right.

    Floyd's algorithm (Bentley & Floyd 1987, "Programming pearls: a sample of brilliance"), run for all rows at
    once: step ``j`` draws ``t`` uniform in ``[0, s - k + j]`` and takes ``s - k + j`` instead when ``t`` is
    taken already. O(m·k²) time, O(m·k) memory: independent of how large the sets are.

    Args:
        size: (m,) int64 set sizes, >= 0.
        k: items per row, >= 0.
    """
    size = np.asarray(size, dtype=np.int64)
    m = len(size)
    out = np.full((m, k), -1, np.int64)
    take = np.minimum(size, k)
    for j in range(k):
        active = j < take
        top = size - take + j  # this step draws from [0, top]
        t = (rng.random(m) * (top + 1)).astype(np.int64)
        taken = (out[:, :j] == t[:, None]).any(axis=1)
        out[:, j] = np.where(active, np.where(taken, top, t), -1)
    return out


def class_sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_class`` distinct items of each class of ``labels`` (n,) with 2 or more items, drawn uniformly:
    (m,) int64 sorted item indices. Every such class keeps ``min(per_class, size)`` items, so with ``per_class``
    >= 2 the sample has the classes :func:`class_centroids` would have had (and their centroids' estimates)."""
    groups = ClassGroups.of(labels)
    cols = distinct_draws(groups.counts, per_class, rng)
    rows = np.broadcast_to(groups.starts[:, None], cols.shape)
    return np.sort(groups.order[(rows + cols)[cols >= 0]])


def check_class_batches(labels: np.ndarray, batch_size: int, per_class: int) -> ClassGroups:
    """Refuse P x K class batches that ``labels`` (n,) cannot fill; return the classes grouped.

    Called before training starts (:class:`~hardneg.trainer.loop.Trainer`), not first in the epoch that
    needs the batches. Refused: ``per_class`` (K) < 2, ``batch_size`` below 2 classes of K, fewer than 2
    classes with 2 or more items, and a K larger than every class (each batch would then repeat items of
    every class it holds).
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 2:
        raise ValidationError(f"per_class must be an integer >= 2 (an anchor and a positive), got {per_class!r}")
    if batch_size < 2 * per_class:
        raise ValidationError(f"batch_size ({batch_size}) must hold at least 2 classes of per_class "
                              f"({per_class}) items, so that anchors have negatives; accepted: batch_size >= "
                              f"{2 * per_class}")
    groups = ClassGroups.of(labels)
    if len(groups.classes) < 2:
        raise ValidationError(f"class batches need at least 2 classes with 2 or more items, got "
                              f"{len(groups.classes)}")
    largest = int(groups.counts.max())
    if per_class > largest:
        raise ValidationError(f"per_class ({per_class}) is larger than every class (the largest holds {largest} "
                              f"items), so P x K batches would repeat items of every class; accepted: per_class "
                              f"between 2 and {largest}")
    return groups


class BatchSampler(ABC):
    """An epoch of item batches: arrays of indices into the training items.

    Args:
        labels: (n,) int labels of the training items.
        batch_size: items per batch.
    """

    def __init__(self, labels: np.ndarray, batch_size: int) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValidationError(f"labels must be a non-empty 1-D integer array (n,), got shape {labels.shape} "
                                  f"and dtype {labels.dtype}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValidationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.labels = labels.astype(np.int64)
        self.batch_size = batch_size

    def __len__(self) -> int:
        """Batches per epoch: as many as a pass over every item takes."""
        return math.ceil(len(self.labels) / self.batch_size)

    @abstractmethod
    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch: ``len(self)`` arrays of item indices, drawn with ``rng``."""


class RandomBatches(BatchSampler):
    """A seeded permutation of all items in chunks of ``batch_size``."""

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return self.chunks(len(self.labels), self.batch_size, rng)

    @staticmethod
    def chunks(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """A seeded permutation of range(n) cut into chunks of ``batch_size`` (the last may be shorter)."""
        perm = rng.permutation(n)
        return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


class ClassBatches(BatchSampler):
    """Batches of P classes x K items: P = min(batch_size // per_class, C) for the C classes with 2 or more
    items, K = batch_size // P (``per_class``, or more when C is small, so that batches stay full)."""

    def __init__(self, labels: np.ndarray, batch_size: int, per_class: int) -> None:
        super().__init__(labels, batch_size)
        self.groups = check_class_batches(self.labels, batch_size, per_class)
        self.classes_per_batch = min(batch_size // per_class, len(self.groups.classes))
        self.per_class = batch_size // self.classes_per_batch

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        chosen = self.choose_classes(len(self), rng)  # (batches, P) positions in groups.classes
        items = self.groups.draw(chosen.reshape(-1), self.per_class, rng)
        return list(items.reshape(len(chosen), -1))

    @abstractmethod
    def choose_classes(self, n_batches: int, rng: np.random.Generator) -> np.ndarray:
        """(n_batches, P) positions in ``groups.classes`` of each batch's classes."""


class PKBatches(ClassBatches):
    """P classes drawn uniformly without replacement per batch, K items of each (Hermans et al. 2017)."""

    def choose_classes(self, n_batches: int, rng: np.random.Generator) -> np.ndarray:
        # O(batches·P²), not O(batches·C): product datasets have 10^4-10^5 classes
        sizes = np.full(n_batches, len(self.groups.classes), np.int64)
        return distinct_draws(sizes, self.classes_per_batch, rng)


class ConfusableClassBatches(ClassBatches):
    """A seed class, drawn uniformly or by ``seed_weights``, and its P - 1 nearest classes in the snapshot, K
    items of each.

    Args:
        neighbours: (C', P') int labels: row ``i`` is a class followed by its nearest classes, nearest
            first (:func:`confusable_classes`); every class in the training labels with 2 or more items must
            have a row, and ``P' >= P``.
        seed_weights: (C',) non-negative weights of the rows' classes as seed classes (:func:`seed_weights`);
            None: uniform.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, per_class: int, neighbours: np.ndarray,
                 seed_weights: np.ndarray | None = None) -> None:
        super().__init__(labels, batch_size, per_class)
        neighbours = np.asarray(neighbours)
        p = self.classes_per_batch
        if neighbours.ndim != 2 or neighbours.shape[1] < p:
            raise ValidationError(f"neighbours must be a (classes, >= {p}) table of class labels, got shape "
                                  f"{neighbours.shape}")
        rows = self.groups.positions(neighbours[:, 0])
        table = np.full((len(self.groups.classes), p), -1, np.int64)
        table[rows] = self.groups.positions(neighbours[:, :p])
        if (table[:, 0] < 0).any():
            missing = self.groups.classes[table[:, 0] < 0][:10].tolist()
            raise ValidationError(f"neighbours has no row for classes {missing}; it needs one per training class "
                                  f"with 2 or more items")
        self.table = table
        self.seed_p: np.ndarray | None = None
        if seed_weights is not None:
            w = np.asarray(seed_weights, dtype=np.float64)
            if w.shape != (len(neighbours),) or not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
                raise ValidationError(f"seed_weights must be ({len(neighbours)},) finite weights >= 0, not all 0, "
                                      f"one per row of neighbours; got shape {w.shape}")
            p_table = np.zeros(len(table))
            p_table[rows] = w
            self.seed_p = p_table / p_table.sum()

    def choose_classes(self, n_batches: int, rng: np.random.Generator) -> np.ndarray:
        if self.seed_p is None:
            return self.table[rng.integers(0, len(self.table), size=n_batches)]
        return self.table[rng.choice(len(self.table), size=n_batches, p=self.seed_p)]


def seed_weights(vectors: np.ndarray, labels: np.ndarray, neighbours: np.ndarray, hardness: float) -> np.ndarray:
    """How often each row's class of ``neighbours`` (C, P) should seed a batch: ``(mean squared centroid distance
    to the row's other classes) ** -hardness``, so that classes whose batch neighbours lie close (confusable
    classes) seed more batches (hardness-aware class sampling: Suh et al. 2019). (C,) float64; ``hardness`` 0
    gives equal weights.
    """
    return centroid_seed_weights(*class_centroids(vectors, labels), neighbours, hardness)


def centroid_seed_weights(classes: np.ndarray, centroids: np.ndarray, neighbours: np.ndarray,
                          hardness: float) -> np.ndarray:
    """:func:`seed_weights` from the class centroids (C, d) of ``classes`` (C,) sorted (e.g. reduced over ranks)."""
    rows = np.searchsorted(classes, neighbours)
    if neighbours.shape[1] < 2:
        return np.ones(len(neighbours))
    c = centroids.astype(np.float64)
    d2 = ((c[rows[:, :1]] - c[rows[:, 1:]]) ** 2).sum(axis=2).mean(axis=1)  # (C,)
    d2 = np.maximum(d2, 1e-12)  # coinciding centroids: the most confusable, not infinitely likely
    return (d2 / d2.mean()) ** -hardness


def confusable_classes(vectors: np.ndarray, labels: np.ndarray, p: int) -> np.ndarray:
    """Each class with 2 or more items followed by its ``p - 1`` nearest such classes by centroid distance.

    Args:
        vectors: (n, d) embeddings of the training items (e.g. a snapshot's stored vectors).
        labels: (n,) int labels.
        p: classes per row (clipped to the number of classes).

    Returns:
        (C, min(p, C)) int64 class labels, one row per class (sorted), the class itself first, then its
        neighbours nearest first (squared Euclidean distance between class means); exact up to
        ``EXACT_CLASSES`` classes, from an IVF index (approximate) beyond.
    """
    return class_neighbours(*class_centroids(vectors, labels), p)


def class_neighbours(classes: np.ndarray, centroids: np.ndarray, p: int) -> np.ndarray:
    """:func:`confusable_classes` from the classes (C,) and their centroids (C, d) float32 (e.g. reduced over the
    ranks of a sharded index): (C, min(p, C)) int64 labels, each class first, then its nearest classes."""
    p = min(p, len(classes))
    if p == 1:
        return classes[:, None].copy()
    # Exact search costs O(C²·d): 2 s of CPU at 20,000 classes, 45 s at 100,000 (d = 16). Beyond EXACT_CLASSES an
    # IVF index (O(C^1.5·d), seeded, so runs stay reproducible) finds nearly the same neighbours: a batch needs
    # confusable classes, not provably the nearest ones.
    kind = "flat" if len(classes) <= EXACT_CLASSES else "ivf"
    index = VectorIndex.build(centroids, classes, classes, metric="l2", index=kind)
    near = index.search(centroids, p - 1, exclude_self=classes)
    return np.concatenate([classes[:, None], near.ids.reshape(len(classes), p - 1)], axis=1)


def make_batch_sampler(batching: str, labels: np.ndarray, batch_size: int, per_class: int) -> BatchSampler:
    """The sampler of in-batch mining named ``batching`` (random or pk)."""
    if batching == "random":
        return RandomBatches(labels, batch_size)
    if batching == "pk":
        return PKBatches(labels, batch_size, per_class)
    raise ValidationError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")


def class_centroids(vectors: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes with 2 or more items (C,) and the means of their ``vectors`` (C, d) float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValidationError(f"vectors must be (n, d) with n = len(labels) = {len(labels)}, got {vectors.shape}")
    groups = ClassGroups.of(labels)
    if len(groups.classes) == 0:
        raise ValidationError("no class has 2 or more items; class centroids need them")
    sums = np.add.reduceat(vectors[groups.order], groups.starts, axis=0)
    return groups.classes, (sums / groups.counts[:, None]).astype(np.float32)


def composition_stats(vectors: np.ndarray, labels: np.ndarray, neighbours: np.ndarray) -> dict[str, float]:
    """How much closer each class's batch neighbours are than classes at large: mean squared centroid distance
    to the neighbours in its row of ``neighbours`` (C, P) against the mean over all pairs of distinct classes.

    The second mean has a closed form: over the C(C - 1) ordered pairs of centroids c_i, the sum of
    |c_i - c_j|² is 2C·Σ|c_i|² - 2|Σc_i|². O(C·P·d) time and O(C·(d + P)) memory (no C x C array).
    """
    return centroid_stats(*class_centroids(vectors, labels), neighbours)


def centroid_stats(classes: np.ndarray, centroids: np.ndarray, neighbours: np.ndarray) -> dict[str, float]:
    """:func:`composition_stats` from the classes (C,) and their centroids (C, d)."""
    c = centroids.astype(np.float64)
    n_classes, p = len(classes), neighbours.shape[1]
    rows = np.searchsorted(classes, neighbours)
    near = float("nan")
    if p > 1:  # one neighbour column at a time: (C, d) temporaries
        own = c[rows[:, 0]]
        near = sum(float(np.einsum("ij,ij->", d, d)) for d in (own - c[rows[:, j]] for j in range(1, p)))
        near /= len(rows) * (p - 1)
    if n_classes > 1:
        centred = c - c.mean(0)  # the pair sum is translation-invariant; centring keeps it accurate
        others = 2.0 * n_classes * float(np.einsum("ij,ij->", centred, centred)) / (n_classes * (n_classes - 1))
    else:
        others = float("nan")
    return {"classes": n_classes, "classes_per_batch": int(p), "neighbour_centroid_d2": near,
            "centroid_d2": others}
