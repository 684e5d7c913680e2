"""The trainer: datasets, embedding models, losses, in-batch miners and the training loop.

The loop trains an embedding model, publishes snapshots of the training set's embeddings to the snapshot
store every ``refresh_every`` epochs, and mines the next epochs' hard pairs or triplets from them with
:mod:`hardneg.miner`. Run it with ``hardneg train`` (:mod:`hardneg.trainer.cli`).
"""

from hardneg.trainer.config import TrainConfig

__all__ = ["TrainConfig"]
