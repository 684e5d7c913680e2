"""``simclr``: self-supervised SimCLR (Chen et al. 2020), plain or with batches composed from mined negatives.

Two augmented views of an image are a positive pair, every other view of the batch a negative, and the loss
is NT-Xent (:func:`~hardneg.trainer.losses.nt_xent_loss`); no training label is read. With ``negatives =
"mined"`` each refresh mines every image's nearest other images in a label-free index, and the following
epochs' batches are composed so that each seed image meets some of them (:mod:`hardneg.trainer.selfsup`).

Under torchrun rank 0 mines and every rank receives its table, so the batches are the single-process ones;
each rank computes NT-Xent over its share of every batch (its views' negatives are the share's other views).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.trainer.augment import augment
from hardneg.trainer.batching import RandomBatches
from hardneg.trainer.losses import nt_xent_loss
from hardneg.trainer.recipes.base import AUGMENT, SSL_BATCHES, Recipe, RecipeContext, Snapshot
from hardneg.trainer.recipes.settings import SimCLRSettings
from hardneg.trainer.refresh import seed_for
from hardneg.trainer.selfsup import NegativeMining, compose_batches, mine_negatives

log = logging.getLogger(__name__)


class SimCLR(Recipe):
    """One kind of epoch: NT-Xent over batches of images, random or composed from the mined negatives."""

    name = "simclr"

    def __init__(self, ctx: RecipeContext) -> None:
        super().__init__(ctx)
        self.settings: SimCLRSettings = ctx.cfg.recipe  # type: ignore[assignment]
        x = ctx.data.x
        if x.ndim != 4:
            raise ValidationError(f"recipe 'simclr' augments images (C, H, W), but the training items have shape "
                                  f"{tuple(x.shape[1:])}; use a supervised recipe for feature vectors")
        if len(x) < 2:
            raise ValidationError(f"recipe 'simclr' needs at least 2 training images (one image has no negative), "
                                  f"got {len(x)}")
        self.negatives: np.ndarray | None = None  # (n, C) mined negatives of the current refresh window
        self.generator = torch.Generator(device=x.device)

    # ------------------------------------------------------------ refresh
    def refresh(self, model: nn.Module, snapshot: Snapshot) -> dict[str, Any] | None:
        dist = self.ctx.dist
        if not dist.enabled or self.settings.negatives != "mined":
            return super().refresh(model, snapshot)

        def mine() -> dict[str, Any] | None:
            state, stats = self.compute_refresh(snapshot)
            self.load_state_dict(state)
            return stats

        stats = dist.from_main(mine)
        # every rank composes the same batches from rank 0's table
        self.negatives = dist.broadcast_arrays([self.negatives] if dist.is_main else None)[0]
        return stats

    def compute_refresh(self, snapshot: Snapshot) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.settings.negatives != "mined":
            return {}, None
        assert snapshot.embeddings is not None  # in one process and on rank 0
        mined = mine_negatives(snapshot.embeddings, NegativeMining.of(self.settings), self.ctx.cfg.index,
                               self.ctx.cfg.seed)
        _report(snapshot.name, mined.stats, self.settings)
        return {"negatives": torch.from_numpy(mined.table)}, mined.stats

    # ------------------------------------------------------------ epochs
    def batches(self, epoch: int, rng: np.random.Generator) -> Sequence[np.ndarray]:
        """Composed from the mined negatives (random without them), from the epoch's own stream; the views are
        drawn from a generator seeded by (seed, epoch): a resumed run draws what the uninterrupted one drew."""
        self.generator.manual_seed(int(seed_for(self.ctx.cfg.seed, epoch, AUGMENT).generate_state(1)[0]))
        own = np.random.default_rng(seed_for(self.ctx.cfg.seed, epoch, SSL_BATCHES))
        n = len(self.ctx.data)
        if self.negatives is None:
            return RandomBatches.chunks(n, self.ctx.cfg.batch_size, own)
        if self.negatives.shape[0] != n:
            raise ValidationError(f"mined negatives cover {self.negatives.shape[0]} images but the training set "
                                  f"has {n}")
        return compose_batches(self.negatives, self.settings.per_anchor, self.ctx.cfg.batch_size, own)

    def loss(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
        """NT-Xent terms (2B,) of two random views of each image of the batch, embedded in one pass; none for a
        batch of fewer than 2 images (one image has no negative)."""
        x = self.ctx.data.x
        with self.ctx.timer.phase("data"):
            images = x[torch.from_numpy(batch).to(x.device)]
        if len(batch) < 2:  # under DDP this rank still joins the step, with zero gradients
            return None, model(images)[:0, 0] if len(batch) else x.new_zeros(0).requires_grad_()
        with self.ctx.timer.phase("data"):
            views = torch.cat([augment(images, self.settings.augment, self.generator) for _ in range(2)])
        z1, z2 = model(views).chunk(2)
        return None, nt_xent_loss(z1, z2, self.settings.temperature, reduction="none")

    def state_dict(self) -> dict[str, Any]:
        return {"negatives": None if self.negatives is None else torch.from_numpy(self.negatives)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state.get("negatives")
        self.negatives = None if t is None else t.numpy()


def _report(name: str, st: dict[str, Any], settings: SimCLRSettings) -> None:
    if st["images_without_negatives"] == st["images"]:
        log.warning("snapshot %s: no image kept a mined negative (%d images; ssl_skip %d, guards %s), so the "
                    "batches are random; lower ssl_skip or loosen the guards", name, st["images"], settings.skip,
                    st["dropped"])
    else:
        log.info("snapshot %s: mined negatives for %d of %d images", name,
                 st["images"] - st["images_without_negatives"], st["images"])
