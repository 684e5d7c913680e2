"""The trainer: datasets, embedding models, losses, in-batch miners, training recipes and the training loop.

The loop (:mod:`hardneg.trainer.loop`) trains an embedding model, publishes snapshots of the training set's
embeddings to the snapshot store every ``refresh_every`` epochs, and hands each to the run's recipe
(:mod:`hardneg.trainer.recipes`), which takes the next epochs' batches from it (tuples mined with
:mod:`hardneg.miner`, confusable classes, mined negatives). Run it with ``hardneg train``
(:mod:`hardneg.trainer.cli`); docs/architecture.md shows how the parts fit.
"""

from hardneg.trainer.config import TrainConfig

__all__ = ["TrainConfig"]
