"""In-batch miners: triplets chosen among the items of one training batch (baselines for global mining).

* batch-hard (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss"): for every anchor, its
  farthest positive and its nearest negative in the batch.
* semi-hard (Schroff et al. 2015, FaceNet): for every anchor-positive pair, the nearest negative that is
  farther than the positive but inside the margin, ``d(a,p)² < d(a,n)² < d(a,p)² + m``; pairs without one
  are dropped.

Miners look at detached embeddings and return indices into the batch; the loss is then computed on the
embeddings with gradients. Distances are squared Euclidean, like every margin in hardneg.

Miners are registered by name in :data:`MINERS` (a new one: a class here and its name in
``hardneg.trainer.recipes.settings.INBATCH_STRATEGIES``); any callable ``(embeddings, labels) -> (a, p, n)``
can also be handed to a recipe as an object (``bench/quality.py`` does that with pytorch-metric-learning's).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from hardneg.miner.errors import ValidationError

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TripletMiner(Protocol):
    """What a recipe mines a batch with: ``(embeddings (B, D), labels (B,)) -> (anchor, positive, negative)``,
    index tensors (T,) into the batch."""

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets: ...


class InBatchMiner:
    """Base class: validates inputs, computes the batch's (B, B) squared distances, defers the choice."""

    name: ClassVar[str] = ""

    @classmethod
    def create(cls, margin: float) -> InBatchMiner:
        """The miner for a run with triplet ``margin`` (used by the miners that need it)."""
        return cls()

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        """Mine ``embeddings`` (B, D) with ``labels`` (B,); returns (anchor, positive, negative) index tensors (T,)."""
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise ValidationError(f"in-batch mining needs embeddings (B, D) and labels (B,), got "
                                  f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
        with torch.no_grad():
            e = embeddings.detach()
            d2 = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
            same = labels[:, None] == labels[None, :]
            eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            return self.mine(d2, same & ~eye, ~same)

    def mine(self, d2: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> Triplets:
        """Choose triplets from (B, B) squared distances and boolean positive/negative masks."""
        raise NotImplementedError


class BatchHardMiner(InBatchMiner):
    """Each anchor with a positive and a negative in the batch: hardest positive, hardest negative."""

    name = "batch-hard"

    def mine(self, d2: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> Triplets:
        valid = pos_mask.any(1) & neg_mask.any(1)
        positive = d2.masked_fill(~pos_mask, float("-inf")).argmax(1)
        negative = d2.masked_fill(~neg_mask, float("inf")).argmin(1)
        anchor = torch.nonzero(valid).squeeze(1)
        return anchor, positive[anchor], negative[anchor]


class SemiHardMiner(InBatchMiner):
    """Every anchor-positive pair with its nearest semi-hard negative, ``d_ap < d_an < d_ap + margin``."""

    name = "semihard"

    @classmethod
    def create(cls, margin: float) -> InBatchMiner:
        return cls(margin)

    def __init__(self, margin: float) -> None:
        if not margin > 0:
            raise ValidationError(f"margin must be > 0, got {margin}")
        self.margin = margin

    def mine(self, d2: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> Triplets:
        anchor, positive = torch.nonzero(pos_mask, as_tuple=True)
        d_ap = d2[anchor, positive][:, None]
        d_an = d2[anchor]
        semi = neg_mask[anchor] & (d_an > d_ap) & (d_an < d_ap + self.margin)
        keep = semi.any(1)
        negative = d_an.masked_fill(~semi, float("inf")).argmin(1)
        return anchor[keep], positive[keep], negative[keep]


MINERS: dict[str, type[InBatchMiner]] = {c.name: c for c in (BatchHardMiner, SemiHardMiner)}


def make_inbatch_miner(strategy: str, margin: float) -> InBatchMiner:
    """The registered in-batch miner named ``strategy``."""
    if strategy not in MINERS:
        raise ValidationError(f"in-batch strategy must be one of {', '.join(MINERS)}, got {strategy!r}")
    return MINERS[strategy].create(margin)
