"""The snapshot refresh's parts: embed the training set -> publish a snapshot -> mine tuples from it.

The loop embeds and publishes (:func:`publish_local`, or :func:`hardneg.trainer.sharded_refresh.publish_sharded`
under torchrun: each rank embeds its block, rank 0 publishes); the recipe then takes what it needs from the
snapshot (:meth:`hardneg.trainer.recipes.base.Recipe.refresh`), e.g. the tuples of :func:`mine_tuples`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import IndexSpec, VectorIndex
from hardneg.miner.mining.config import MiningConfig
from hardneg.miner.model_io import export_model
from hardneg.miner.store import MODEL_FILE, THUMBS_MAX_BYTES, SnapshotStore, to_thumbs
from hardneg.trainer import tuples as tp
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.timing import NO_TIMER, PhaseTimer

log = logging.getLogger(__name__)


# Input bytes one forward pass of embed_items takes at most on CPU. Larger chunks of large items spill their
# activations out of the caches: 28 x 112 images through a two-conv-layer CNN cost 830 us/item in chunks of
# 1024 and 360 in chunks of 20-60, with bit-identical embeddings. Small items (8 x 8 digits: 256 B) still go
# in chunks of the whole batch_size.
EMBED_CHUNK_BYTES = 1 << 18
# Largest side of the thumbnails a snapshot of image data carries (for the api's /ui page): tiles, not images.
TRAIN_THUMB_SIDE = 64
MIN_THUMB_SIDE = 8  # below this a tile shows nothing; such a training set is published without thumbnails


def embed_chunk(x: torch.Tensor, batch_size: int) -> int:
    """Items of ``x`` (n, ...) per forward pass: ``batch_size``, and on CPU at most ``EMBED_CHUNK_BYTES`` of input."""
    if x.device.type != "cpu" or len(x) == 0:
        return batch_size
    item_bytes = x[0].numel() * x.element_size()
    return max(1, min(batch_size, EMBED_CHUNK_BYTES // max(item_bytes, 1)))


def embed_items(model: nn.Module, x: torch.Tensor, batch_size: int, items: np.ndarray | None = None) -> np.ndarray:
    """Embed ``x`` (n, *input_shape), already on the model's device, in eval mode without gradients: (n, d) float32;
    with ``items`` (m,) indices into ``x``, only those, in that order: (m, d).

    At most ``batch_size`` items per forward pass (fewer for large items on CPU: :func:`embed_chunk`); images on
    CPU in the channels-last layout (:func:`channels_last_copy`).
    """
    chunk = embed_chunk(x, batch_size)
    if items is None:
        chunks: Iterator[torch.Tensor] = (x[i:i + chunk] for i in range(0, len(x), chunk))
    else:
        rows = torch.from_numpy(np.asarray(items, dtype=np.int64)).to(x.device)
        chunks = (x[rows[i:i + chunk]] for i in range(0, len(rows), chunk))  # one chunk's copy at a time
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # inference_mode measured no faster here (docs/benchmarks.md, "Training throughput")
            parts = _embed_chunks(model, chunks, x)
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy()


def _embed_chunks(model: nn.Module, chunks: Iterator[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """``model``'s outputs on ``chunks`` of ``x``, through its channels-last copy where it has one and accepts it."""
    fast = channels_last_copy(model, x)
    first = next(chunks, None)
    if first is None:
        return []
    if fast is not None:
        try:
            out = [fast(first.contiguous(memory_format=torch.channels_last)).float().cpu()]
        except RuntimeError as e:  # e.g. a .view() of the input, which only a contiguous layout allows
            log.warning("embedding in the channels-last layout failed (%s); embedding in the contiguous one", e)
        else:
            return out + [fast(c.contiguous(memory_format=torch.channels_last)).float().cpu() for c in chunks]
    return [model(c).float().cpu() for c in itertools.chain([first], chunks)]


def channels_last_copy(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """A channels-last copy of ``model`` to embed images ``x`` (n, C, H, W) on CPU with; None for other inputs.

    PyTorch's CPU max-pooling and convolutions are vectorised over channels in the channels-last (NHWC) layout,
    not in the contiguous (NCHW) one: 28 x 112 images through a two-conv-layer CNN cost 345 us an item in NCHW
    and 88 in NHWC, 8 x 8 digits through the built-in CNN 20 and 10 (one thread). The embeddings are the same
    up to float rounding (differences of about 1e-7). Training keeps the layout the user's model was given.
    """
    if x.device.type != "cpu" or x.dim() != 4:
        return None
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def seed_for(seed: int, epoch: int, purpose: int) -> np.random.SeedSequence:
    """The seed of one epoch's randomness for one purpose: runs and resumed runs draw the same numbers."""
    return np.random.SeedSequence([seed, epoch, purpose])


def mining_seed(seed: int, epoch: int, shard: int = 0) -> int:
    """The miner's seed for ``epoch``; shard (rank) ``k > 0`` of a distributed run draws from its own stream."""
    if shard:
        return int(np.random.SeedSequence([seed, epoch, 2, shard]).generate_state(1)[0])
    return int(seed_for(seed, epoch, 2).generate_state(1)[0])


@dataclass(frozen=True)
class Published:
    """A published snapshot: its name, its index, and the embeddings it was built from (n, d), row = item."""

    name: str
    index: VectorIndex
    embeddings: np.ndarray | None  # None on the ranks other than 0 of a distributed run
    shard: Any = None  # a sharded index (hardneg.trainer.sharded_index.IndexShard): this rank's; index is its own


def training_thumbs(x: np.ndarray, max_side: int = TRAIN_THUMB_SIDE) -> np.ndarray | None:
    """Thumbnails of the training images ``x`` (n, C, H, W) floats in [0, 1] for every snapshot, as
    :func:`~hardneg.miner.store.to_thumbs` makes them: at most ``max_side`` pixels a side, shrunk further so that
    all fit in the store's ``THUMBS_MAX_BYTES``; None for inputs that are not images, or when even
    ``MIN_THUMB_SIDE``-pixel thumbnails would not fit (a warning says so)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4) or len(x) == 0:
        return None
    n, c = x.shape[:2]
    per_pixel = n * (1 if c == 1 else c)
    fit = int(np.sqrt(THUMBS_MAX_BYTES / per_pixel))  # as if square: the longer side, whatever the aspect
    side = min(max_side, fit)
    if side < MIN_THUMB_SIDE:
        log.warning("snapshots get no thumbnails: %d images would need sides under %d pixels to fit in %d MiB",
                    n, MIN_THUMB_SIDE, THUMBS_MAX_BYTES >> 20)
        return None
    return to_thumbs(x, max_side=side)


class SnapshotPublisher:
    """Publishes the training set's embeddings, ids (dataset indices), labels, the exported model and, given
    them, ``thumbs`` (n, H, W[, C]) uint8 of the training items in item order (:func:`training_thumbs`)."""

    def __init__(self, store: SnapshotStore, cfg: TrainConfig, model_spec: Mapping[str, Any],
                 timer: PhaseTimer = NO_TIMER, thumbs: np.ndarray | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.model_spec = dict(model_spec)
        self.timer = timer
        self.thumbs = thumbs

    def publish(self, model: nn.Module, embeddings: np.ndarray, labels: np.ndarray,
                meta: Mapping[str, Any]) -> Published:
        """Index ``embeddings`` (n, d) with ``labels`` (n,) and ids 0..n-1 and publish them with ``model.pt2``."""
        index = self.index(embeddings, labels)
        with self._exported(model) as extra, self.timer.phase("publish"):
            name = self.store.publish(index, meta={"config": self.cfg.to_dict(), **meta}, model=self.model_spec,
                                      extra_files=extra, thumbs=self.thumbs)
        return Published(name, index, embeddings)

    def index(self, embeddings: np.ndarray, labels: np.ndarray) -> VectorIndex:
        """The index a snapshot of ``embeddings`` (n, d) with ``labels`` (n,) holds (ids 0..n-1), unpublished."""
        with self.timer.phase("index"):
            return VectorIndex.build(embeddings, labels, np.arange(len(labels)), metric="cosine",
                                     index=self.cfg.index, seed=self.cfg.seed)

    def publish_written(self, model: nn.Module, folder: Path, dim: int, meta: Mapping[str, Any]) -> str:
        """Publish the flat index, ids and labels written into ``folder`` (a staging folder of the store, e.g.
        streamed from the shards of a sharded index) with ``model.pt2``; returns the snapshot's name."""
        with self._exported(model) as extra, self.timer.phase("publish"):
            return self.store.publish_prepared(folder, dim=dim, metric="cosine", spec=IndexSpec.resolve("flat", 0),
                                               meta={"config": self.cfg.to_dict(), **meta}, model=self.model_spec,
                                               extra_files=extra)

    @contextmanager
    def _exported(self, model: nn.Module) -> Iterator[dict[str, Path] | None]:
        """``{"model.pt2": path}`` of the model exported into a staging folder (None when it cannot be exported)."""
        with self.store.staging("export") as tmp:  # removed in finally; swept by retention if the process dies
            path = tmp / MODEL_FILE
            with self.timer.phase("export"):
                # On CPU: the api embeds on CPU, and export wants the example and weights on one device.
                exported = export_model(copy.deepcopy(model).cpu(), self.model_spec["input_shape"], path)
            yield {MODEL_FILE: path} if exported else None


def publish_local(model: nn.Module, x: torch.Tensor, labels: np.ndarray, publisher: SnapshotPublisher,
                  meta: Mapping[str, Any]) -> Published:
    """Embed the training items ``x`` (n, ...) in this process and publish them with ``labels`` (n,)."""
    with publisher.timer.phase("embed"):
        embeddings = embed_items(model, x, publisher.cfg.eval_batch_size)
    return publisher.publish(model, embeddings, labels, meta)


def mine_tuples(index: VectorIndex, cfg: TrainConfig, epoch: int, anchors: np.ndarray | None = None,
                shard: int = 0) -> tuple[tp.TupleSet, dict[str, Any]]:
    """Mine the tuples the loss trains on (triplets, or pairs for a pair loss) from a snapshot's index, and the
    statistics; ``cfg``'s recipe must be ``mined-tuples``.

    ``anchors`` (m,) ids (default: every item) and ``shard`` (the rank, for its own seed) mine one rank's share
    of a distributed run (:mod:`hardneg.trainer.sharded_refresh`).
    """
    from hardneg.miner.mining import mine  # the miner part; imported when first needed
    from hardneg.trainer.losses import LOSSES

    result = mine(index, mining_config(cfg, epoch, shard), anchors=anchors)
    if LOSSES[cfg.loss].kind == "pair":
        tuples = tp.pairs(result.pair_i, result.pair_j, result.pair_y)
    else:
        tuples = tp.triplets(result.anchor, result.positive, result.negative)
    return tuples, _plain(result.stats.to_dict())


def mining_config(cfg: TrainConfig, epoch: int = 0, shard: int = 0) -> MiningConfig:
    """The recipe's :class:`MiningConfig` with the loss's margin, seeded by (seed, epoch, shard)."""
    miner = getattr(cfg.recipe, "miner", None)
    if not isinstance(miner, MiningConfig):
        raise ValidationError(f"recipe {cfg.recipe.name!r} runs no global miner; mining tuples needs recipe "
                              f"'mined-tuples'")
    return dataclasses.replace(miner, margin=cfg.margin, seed=mining_seed(cfg.seed, epoch, shard))


def _plain(value: Any) -> Any:
    """JSON- and weights_only-safe copy: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
