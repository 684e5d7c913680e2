"""The losses, exactly as the seed defines them, plus NT-Xent.

Conventions (the seed's): ``Y = 0`` for a similar pair, ``Y = 1`` for a dissimilar one; ``d`` is the
Euclidean distance between two embeddings, so every margin ``m`` is in squared-distance (d²) units, the
same units the miner and the snapshot store report.

* contrastive (Hadsell, Chopra & LeCun 2006, in the seed's squared form):
  ``L = (1 - Y)·d² + Y·max(0, m - d²)``
* triplet (Schroff et al. 2015, FaceNet): ``L = max(0, d(a, p)² - d(a, n)² + m)``
* NT-Xent (Chen et al. 2020, SimCLR): cross-entropy over temperature-scaled cosine similarities, where the
  positive of each view is the other view of the same item and the other 2N - 2 views are negatives.

Each returns the mean over the batch. The tuple losses are also registered in :data:`LOSSES` as
:class:`TupleLoss` objects: what the recipes call, whatever the loss (a new loss: a class here and its name in
``hardneg.trainer.config.LOSSES``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from hardneg.miner.errors import ValidationError

if TYPE_CHECKING:
    from hardneg.trainer.tuples import TupleSet


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise squared Euclidean distance of (N, D) ``x`` and ``y``: (N,)."""
    return (x - y).pow(2).sum(dim=1)


def contrastive_loss(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, margin: float,
                     reduction: str = "mean") -> torch.Tensor:
    """``(1 - Y)·d² + Y·max(0, m - d²)`` per pair: ``x1``, ``x2`` (N, D), ``y`` (N,) in {0, 1}.

    Returns the mean (a scalar), or the (N,) per-pair terms with ``reduction="none"``.
    """
    _check_rows(x1, x2)
    if y.shape != (x1.shape[0],):
        raise ValidationError(f"y must have shape ({x1.shape[0]},), got {tuple(y.shape)}")
    d2 = squared_distances(x1, x2)
    y = y.to(d2.dtype)
    return _reduce((1 - y) * d2 + y * torch.clamp(margin - d2, min=0), reduction)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float,
                 reduction: str = "mean") -> torch.Tensor:
    """``max(0, d(a, p)² - d(a, n)² + m)`` per triplet; each input (N, D).

    Returns the mean (a scalar), or the (N,) per-triplet terms with ``reduction="none"``.
    """
    _check_rows(anchor, positive)
    _check_rows(anchor, negative)
    return _reduce(torch.clamp(squared_distances(anchor, positive) - squared_distances(anchor, negative) + margin,
                               min=0), reduction)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                 reduction: str = "mean") -> torch.Tensor:
    """NT-Xent (SimCLR) of two views ``z1``, ``z2`` (N, D) of the same N items; mean over all 2N views.

    ``l(i, j) = -log( exp(sim(i, j)/t) / sum_{k != i} exp(sim(i, k)/t) )`` with ``sim`` the cosine similarity.
    Returns the mean (a scalar), or with ``reduction="none"`` the (2N,) per-view terms: views of ``z1`` first.
    """
    _check_rows(z1, z2)
    if not temperature > 0:
        raise ValidationError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return _reduce(F.cross_entropy(logits, targets, reduction="none"), reduction)


class TupleLoss(ABC):
    """A loss over mined tuples and over in-batch triplets, as the recipes use it.

    ``kind`` is the tuple kind it trains on (:mod:`hardneg.trainer.tuples`): ``triplet`` or ``pair``; mined and
    random triplets are turned into that kind with :meth:`tuples`.
    """

    name: ClassVar[str]
    kind: ClassVar[str]

    def __init__(self, margin: float) -> None:
        if not margin > 0:
            raise ValidationError(f"margin must be > 0, got {margin}")
        self.margin = margin

    def tuples(self, t: TupleSet) -> TupleSet:
        """``t`` as the tuples this loss trains on (triplets become pairs for a pair loss)."""
        from hardneg.trainer import tuples as tp

        return tp.for_kind(t, self.kind)

    @abstractmethod
    def tuple_terms(self, emb: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
        """Terms (m,) of m tuples whose items' embeddings ``emb`` are stacked by role: (3m, D) anchors, positives,
        negatives, or (2m, D) first and second members; ``labels`` (m,) are a pair batch's y (unused for triplets)."""

    @abstractmethod
    def triplet_terms(self, emb: torch.Tensor, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Terms of the triplets (a, p, n) (T,) of row indices into ``emb`` (B, D), as this loss trains on them."""


class TripletLoss(TupleLoss):
    """:func:`triplet_loss` per triplet."""

    name, kind = "triplet", "triplet"

    def tuple_terms(self, emb: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
        a, p, n = emb.chunk(3)
        return triplet_loss(a, p, n, self.margin, reduction="none")

    def triplet_terms(self, emb: torch.Tensor, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return triplet_loss(emb[a], emb[p], emb[n], self.margin, reduction="none")


class ContrastiveLoss(TupleLoss):
    """:func:`contrastive_loss` per pair; a triplet (a, p, n) trains as the pairs (a, p, 0) and (a, n, 1)."""

    name, kind = "contrastive", "pair"

    def tuple_terms(self, emb: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
        e1, e2 = emb.chunk(2)
        return contrastive_loss(e1, e2, torch.from_numpy(labels).to(emb.device), self.margin, reduction="none")

    def triplet_terms(self, emb: torch.Tensor, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        first, second = torch.cat([a, a]), torch.cat([p, n])
        target = torch.cat([torch.zeros_like(a), torch.ones_like(a)])
        return contrastive_loss(emb[first], emb[second], target, self.margin, reduction="none")


LOSSES: dict[str, type[TupleLoss]] = {c.name: c for c in (TripletLoss, ContrastiveLoss)}


def make_loss(name: str, margin: float) -> TupleLoss:
    """The registered loss ``name`` with ``margin``."""
    if name not in LOSSES:
        raise ValidationError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return LOSSES[name](margin)


def _reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return terms.mean()
    if reduction == "none":
        return terms
    raise ValidationError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValidationError(f"embeddings must be two (N, D) tensors of the same shape, got {tuple(a.shape)} "
                              f"and {tuple(b.shape)}")
