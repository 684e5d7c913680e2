"""pytorch-metric-learning baselines behind hardneg's interfaces, for bench/quality.py.

* :class:`PMLMiner`: PML's ``TripletMarginMiner(type_of_triplets="semihard")`` or ``BatchHardMiner`` as the
  in-batch miner of hardneg's ``in-batch`` recipe (passed in through ``Parts(miner=...)``).
* :class:`CrossBatchMemoryRecipe`: the cross-batch memory (XBM; Wang, Zhang, Huang & Scott 2020, "Cross-Batch
  Memory for Embedding Learning") as PML implements it, ``losses.CrossBatchMemory``, as a training recipe
  (passed in through ``Parts(recipe=...)``).

Both use squared Euclidean distances (``LpDistance(power=2)``), so that the margin means what it means in
hardneg. pytorch-metric-learning is an optional benchmark dependency (``pip install -e .[bench]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hardneg.trainer.batching import BatchSampler, make_batch_sampler
from hardneg.trainer.inbatch import InBatchMiner, Triplets
from hardneg.trainer.recipes.base import Epoch, ItemBatches, Recipe, RecipeContext
from hardneg.trainer.recipes.settings import InBatchSettings

PML_MINERS = ("semihard", "batch-hard", "multi-similarity")


def pml_miner(kind: str, margin: float) -> Any:
    """PML's miner ``kind``: ``semihard`` is ``TripletMarginMiner`` (every (a, p, n) with ``0 < d²(a,n) - d²(a,p)
    <= margin``) and ``batch-hard`` is ``BatchHardMiner`` (each anchor's farthest positive and nearest negative),
    both over squared Euclidean distances; ``multi-similarity`` is ``MultiSimilarityMiner(epsilon=0.1)`` (Wang et
    al. 2019: negatives more similar than the anchor's least similar positive - 0.1, positives less similar than
    its most similar negative + 0.1, in cosine similarity, which orders unit vectors as d² does), the miner PML's
    documentation puts inside ``CrossBatchMemory``; the loss turns its pairs into every (a, p, n) they form."""
    from pytorch_metric_learning import distances, miners

    if kind not in PML_MINERS:
        raise ValueError(f"PML miner must be one of {', '.join(PML_MINERS)}, got {kind!r}")
    d2 = distances.LpDistance(power=2, normalize_embeddings=False)  # hardneg's embeddings are unit vectors
    if kind == "semihard":
        return miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=d2)
    if kind == "multi-similarity":
        return miners.MultiSimilarityMiner(epsilon=0.1)
    return miners.BatchHardMiner(distance=d2)


class PMLMiner(InBatchMiner):
    """A pytorch-metric-learning miner (:func:`pml_miner`) behind hardneg's in-batch miner interface."""

    def __init__(self, kind: str, margin: float) -> None:
        self.miner = pml_miner(kind, margin)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        """Triplets (anchor, positive, negative) of batch positions among ``embeddings`` (B, D), ``labels`` (B,);
        a pair miner's pairs become every (a, p, n) they form, as PML's triplet loss makes them."""
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        mined = self.miner(embeddings.detach(), labels)
        a, p, n = lmu.convert_to_triplets(mined, labels) if len(mined) == 4 else mined
        return a, p, n


def cross_batch_memory(kind: str, margin: float, embedding_dim: int, memory_size: int) -> Any:
    """PML's ``CrossBatchMemory`` with hardneg's triplet loss and the miner ``kind`` inside it.

    The loss is ``TripletMarginLoss(margin)`` over squared Euclidean distances with a ``MeanReducer``: the mean
    over the mined triplets of ``max(0, d²(a,p) - d²(a,n) + margin)``, hardneg's triplet loss (PML's default
    reducer would average the non-zero terms only).
    """
    from pytorch_metric_learning import distances, losses, reducers

    d2 = distances.LpDistance(power=2, normalize_embeddings=False)
    loss = losses.TripletMarginLoss(margin=margin, distance=d2, reducer=reducers.DoNothingReducer())
    return losses.CrossBatchMemory(loss, embedding_dim, memory_size=memory_size, miner=pml_miner(kind, margin))


class MemoryBatches(ItemBatches):
    """P x K batches whose anchors meet the cross-batch memory (PML's ``CrossBatchMemory.forward``).

    Each step: the batch's embeddings (B, D) are enqueued into the memory (detached, replacing the oldest), the
    miner mines triplets with anchors in the batch and positives and negatives in the memory (which now holds
    the batch too; an anchor's own copy is never its positive), and the loss is the mean of the triplets'
    terms. Gradients flow through the anchors only: the memory's rows, the batch's copies included, are
    constants (as in Wang et al. 2020, whose memory holds features without gradients).
    """

    def __init__(self, ctx: RecipeContext, sampler: BatchSampler, memory: Any) -> None:
        super().__init__(ctx, sampler, miner=memory.miner)
        self.memory = memory

    def loss(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
        x, y = self.take(batch)
        emb = model(x)
        with self.ctx.timer.phase("inbatch_mine"):
            out = self.memory(emb, y)["loss"]
        terms = out["losses"]
        if not torch.is_tensor(terms) or terms.ndim == 0:  # no triplet mined: PML's zero, no gradient to follow
            return None, emb.new_zeros(0)
        return terms.mean(), terms


class CrossBatchMemoryRecipe(Recipe):
    """XBM over the ``in-batch`` recipe's batches (P x K), with PML's miner ``miner`` inside the memory.

    ``start_epoch``: epochs up to it train on the batch alone (the same PML miner, hardneg's triplet loss, no
    memory): Wang et al. start the memory once the embedding drifts slowly (after 1k iterations on SOP, from a
    pretrained network); 0 starts at once.
    """

    name = "xbm"

    def __init__(self, ctx: RecipeContext, miner: str, memory_size: int, start_epoch: int = 1, **_: Any) -> None:
        super().__init__(ctx)
        settings: InBatchSettings = ctx.cfg.recipe  # type: ignore[assignment]
        if memory_size < ctx.cfg.batch_size:
            raise ValueError(f"memory_size ({memory_size}) must hold at least one batch ({ctx.cfg.batch_size})")
        sampler = make_batch_sampler(settings.batching, ctx.data.labels, ctx.cfg.batch_size, settings.per_class)
        self.start_epoch = start_epoch
        self.inbatch = ItemBatches(ctx, sampler, PMLMiner(miner, ctx.cfg.margin))
        self.with_memory = MemoryBatches(ctx, sampler, cross_batch_memory(
            miner, ctx.cfg.margin, ctx.cfg.embedding_dim, memory_size))

    def plan(self, epoch: int) -> Epoch:
        return self.inbatch if epoch <= self.start_epoch else self.with_memory
