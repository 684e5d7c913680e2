"""Training recipes: what each epoch trains on (see :mod:`hardneg.trainer.recipes.base` for the interface).

======================  ==================================================================================
``class-batches``       global mining at the class level: batches of a class and its nearest classes in the
                        latest snapshot, mined in-batch (the default; :mod:`.class_batches`)
``mined-tuples``        global mining of tuples: the miner's triplets/pairs from each snapshot (:mod:`.mined_tuples`)
``in-batch``            in-batch mining over P x K or shuffled batches (:mod:`.in_batch`)
``random-tuples``       random triplets/pairs, the baseline without mining (:mod:`.random_tuples`)
``simclr``              self-supervised SimCLR, plain or with batches composed from mined negatives (:mod:`.simclr`)
======================  ==================================================================================

Each recipe's settings live in :mod:`.settings` (torch-free, so configs are read without torch); the
classes here are imported only when a run builds its recipe. A new recipe: its module here, its name below,
and its settings class in :mod:`.settings`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hardneg.trainer.recipes.base import Recipe

RECIPES: dict[str, str] = {
    "class-batches": "hardneg.trainer.recipes.class_batches:ClassBatches",
    "mined-tuples": "hardneg.trainer.recipes.mined_tuples:MinedTuples",
    "in-batch": "hardneg.trainer.recipes.in_batch:InBatch",
    "random-tuples": "hardneg.trainer.recipes.random_tuples:RandomTuples",
    "simclr": "hardneg.trainer.recipes.simclr:SimCLR",
}


def recipe_class(name: str) -> type[Recipe]:
    """The recipe class registered as ``name`` (imported now)."""
    module, attr = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), attr)
