"""Self-supervised mode (``hardneg train --mode self-supervised``): SimCLR with index-mined hard negatives.

No label is read here. Positives are two random views of the same image (:mod:`hardneg.trainer.augment`)
and the loss is NT-Xent (Chen et al. 2020, SimCLR; :func:`hardneg.trainer.losses.nt_xent_loss`): each view
must pick its partner view out of the 2B - 1 other views of the batch, so every other image of the batch is
a negative.

The training itself is the ``simclr`` recipe (:mod:`hardneg.trainer.recipes.simclr`); this module holds its
label-free mining and batch composition, plain functions over numpy arrays.

Hard negatives from the index (``ssl_negatives = "mined"``). At each refresh the trainer embeds the training
set and publishes a snapshot as in supervised mode; :func:`mine_negatives` then searches the embeddings in a
label-free index (every label 0, so no label can steer the search) for every image's nearest other images,
and keeps, as that image's candidate negatives, those that pass three false-negative guards (in a label-free
setting the nearest images are often the same object class, i.e. false negatives):

* skip the nearest ``ssl_skip`` neighbours (the rank-window guard of sentence-transformers / FlagEmbedding);
  about the size of the groups of images that belong together: on digits (~135 training images per digit)
  the nearest 16 are 86 % the same digit, the ranks after 128 18 %;
* a similarity ceiling: drop candidates with cosine similarity above ``ssl_max_similarity``;
* near-duplicates: drop candidates within d² ``ssl_near_duplicate`` of the image (the miner's guard).

The mined negatives act through the *composition of the batches* (:func:`compose_batches`), not through extra
terms in the loss: each epoch, a seed image and ``ssl_per_anchor`` of its candidates form a group, groups
fill the batches, and NT-Xent is computed over the batch as usual. Why composition rather than adding the
mined negatives' embeddings to the NT-Xent denominator:

* the mined negatives are embedded fresh, with gradients, by the model being trained; the snapshot's
  embeddings are up to ``refresh_every`` epochs old, and stale negatives without gradient are what MoCo
  (He et al. 2020) needed a momentum encoder to make consistent;
* a step costs exactly what a plain SimCLR step costs (the same number of views), so the only extra cost is
  the refresh, and an epoch still shows every image once;
* every image of a group is a hard negative of every other (they are neighbours of one seed), so hardness
  reaches all 2B views, not only the anchors; the loss stays the standard NT-Xent.

This is the proximity-graph batch sampling of Yang et al. 2023 ("BatchSampler: Sampling Mini-Batches for
Contrastive Learning in Vision, Language, and Graphs"), with the kNN graph read from hardneg's snapshot.
Before the first refresh (``warmup_epochs``) and with ``ssl_negatives = "in-batch"``, batches are a seeded
permutation: plain SimCLR.

The snapshot carries the data's labels (for serving and filtered search; placeholder ones for unlabelled
data); mining reads only the embeddings. Evaluation (P@1, MAP@R) uses the evaluation split's labels, as in
supervised mode; training never does. On digits the mined batches tie with plain SimCLR at equal wall-clock
time and lead slightly, within the spread, at equal epochs (docs/benchmarks.md, "Self-supervised").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.mining.base import first_true
from hardneg.miner.mining.guards import Candidates, Guard, MaxScoreGuard, NearDuplicateGuard, apply_guards
from hardneg.miner.mining.search import padded
from hardneg.trainer.recipes.settings import SimCLRSettings


# ------------------------------------------------------------------ mining
@dataclass(frozen=True)
class NegativeMining:
    """How candidate negatives are mined without labels (see the module docstring for the guards)."""

    candidates: int  # neighbours kept per image after the skip, before the guards
    skip: int  # nearest neighbours never used as negatives
    max_similarity: float | None  # cosine ceiling
    near_duplicate: float | None  # d² floor

    def __post_init__(self) -> None:  # the recipe's settings check the same values under these names
        SimCLRSettings(candidates=self.candidates, skip=self.skip, max_similarity=self.max_similarity,
                       near_duplicate=self.near_duplicate)

    @classmethod
    def of(cls, settings: SimCLRSettings) -> NegativeMining:
        return cls(settings.candidates, settings.skip, settings.max_similarity, settings.near_duplicate)


@dataclass(frozen=True)
class SimilarityCeilingGuard(MaxScoreGuard):
    """Drop candidates whose cosine similarity to the image, ``1 - d²/2``, exceeds the ceiling."""

    name: ClassVar[str] = "max_similarity"


@dataclass(frozen=True)
class MinedNegatives:
    """Candidate negatives per image: ``table`` (n, C) int64 image indices, nearest first, ``-1``-padded."""

    table: np.ndarray
    stats: dict[str, Any]


def mine_negatives(vectors: np.ndarray, mining: NegativeMining, index: str = "flat",
                   seed: int = 0) -> MinedNegatives:
    """Each image's nearest other images that pass the guards, searched in a label-free index.

    Args:
        vectors: (n, d) embeddings of the training images, row ``i`` = image ``i``.
        mining: the search depth and the guards.
        index: the FAISS index kind (``flat``: exact).
        seed: IVF's k-means seed.

    Returns:
        :class:`MinedNegatives` with ``table`` (n, mining.candidates) and statistics: how many candidates
        the skip and each guard removed, how many images kept none, and the mean d² of those kept.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValidationError(f"mining negatives needs (n, d) embeddings of n >= 2 images, got shape "
                              f"{vectors.shape}")
    n = len(vectors)
    ids = np.arange(n, dtype=np.int64)
    # Every label 0: the search sees no label, and the rows hold the images in id order.
    idx = VectorIndex.build(vectors, np.zeros(n, np.int64), ids, metric="cosine", index=index, seed=seed)
    k = min(mining.skip + mining.candidates, n - 1)
    rows, d2 = padded(idx.search(vectors, k, exclude_self=ids), k)
    found = rows >= 0
    rows, d2, valid = rows[:, mining.skip:], d2[:, mining.skip:], found[:, mining.skip:]
    guards: list[Guard] = []
    if mining.near_duplicate is not None:
        guards.append(NearDuplicateGuard(mining.near_duplicate))
    if mining.max_similarity is not None:
        guards.append(SimilarityCeilingGuard(mining.max_similarity, "cosine"))
    keep, dropped = apply_guards(guards, Candidates(d2, rows, np.zeros(n, np.float32), np.arange(n)), valid)
    # Kept candidates move left in their order (nearest first), -1 after them.
    cols = first_true(keep, mining.candidates)
    table = np.full((n, mining.candidates), -1, np.int64)
    hit = cols >= 0
    table[hit] = idx.ids[rows[np.nonzero(hit)[0], cols[hit]]]
    kept = keep.sum(1)
    stats = {
        "images": n, "searched": int(found.sum()), "skipped": int(found[:, :mining.skip].sum()),
        "dropped": {name: int(v.sum()) for name, v in dropped.items()},
        "kept": int(kept.sum()), "images_without_negatives": int((kept == 0).sum()),
        "mean_d2_kept": float(d2[keep].mean()) if keep.any() else None,
    }
    return MinedNegatives(table, stats)


# ----------------------------------------------------------------- batches
def compose_batches(table: np.ndarray, per_anchor: int, batch_size: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Batches in which each seed image meets up to ``per_anchor`` of its mined negatives.

    Seeds are taken in a random order; a seed not yet placed this epoch takes ``per_anchor`` of its
    candidates (``table`` (n, C), ``-1``-padded) not yet placed either, drawn at random, and forms a group
    with them. Groups fill batches in order and are never split, so every image appears exactly once per
    epoch and every batch holds at most ``batch_size`` images.

    Returns the batches as int64 arrays of image indices.
    """
    n, c = table.shape
    if batch_size < per_anchor + 1:
        raise ValidationError(f"batch_size ({batch_size}) must hold a seed and its ssl_per_anchor ({per_anchor}) "
                              f"negatives; accepted: batch_size >= {per_anchor + 1}")
    # Shuffle each row's candidates (padding last) so that the first unplaced ones are a random draw.
    keys = np.where(table >= 0, rng.random((n, c)), np.inf)
    shuffled = np.take_along_axis(table, np.argsort(keys, axis=1, kind="stable"), 1).tolist()
    placed = bytearray(n)
    batches: list[np.ndarray] = []
    current: list[int] = []
    # A Python loop over seeds (a few microseconds each): groups depend on what earlier groups placed.
    for seed in rng.permutation(n).tolist():
        if placed[seed]:
            continue
        group = [seed]
        placed[seed] = 1
        for j in shuffled[seed]:
            if len(group) > per_anchor or j < 0:
                break
            if not placed[j]:
                group.append(j)
                placed[j] = 1
        if len(current) + len(group) > batch_size:
            batches.append(np.asarray(current, np.int64))
            current = []
        current.extend(group)
    if current:
        batches.append(np.asarray(current, np.int64))
    return batches
