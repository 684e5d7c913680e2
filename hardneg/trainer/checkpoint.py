"""Checkpoints: plain tensors, dicts, lists, strings and numbers, written atomically, read without pickle.

A checkpoint is a dict with keys ``format``, ``config`` (TrainConfig as a dict), ``model_spec``, ``epoch``
(epochs completed), ``step``, ``model`` and ``optimizer`` (state dicts), ``rng`` (torch RNG state),
``recipe`` (the recipe's state: its current mined tuples, class table or negatives), ``snapshot`` (name of
the last published snapshot), ``history`` (one metrics record per epoch, epoch 0 = untrained) and
``best_map_at_r``. It is loaded with ``torch.load(weights_only=True)``, which refuses arbitrary objects.

Format 1 (before recipes) kept the recipe's state in ``mined``, ``class_neighbours`` and ``ssl_negatives`` and
its config flat; it is read as format 2 (:func:`upgrade`), and its config by ``TrainConfig.from_stored``.
"""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch

from hardneg.miner.errors import ValidationError

FORMAT = 2
READABLE = (1, 2)
LAST = "last.pt"
BEST = "best.pt"
REQUIRED = ("format", "config", "model_spec", "epoch", "step", "model", "history")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file and ``os.replace``: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (weights only: no objects are unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValidationError(f"checkpoint {path} cannot be loaded as a hardneg checkpoint ({e})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise ValidationError(f"checkpoint {path} lacks required entries {list(REQUIRED)}")
    if state["format"] not in READABLE:
        raise ValidationError(f"checkpoint {path} has format {state['format']}; this hardneg reads formats "
                              f"{', '.join(map(str, READABLE))}")
    return upgrade(state)


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint as format 2: its per-mode entries become the recipe's state (each recipe reads its
    own key of it: ``tuples``, ``neighbours`` or ``negatives``)."""
    if state["format"] == FORMAT:
        return state
    old = {k: state.pop(k, None) for k in ("mined", "class_neighbours", "ssl_negatives")}
    recipe = {"tuples": old["mined"], "neighbours": old["class_neighbours"], "negatives": old["ssl_negatives"]}
    return {**state, "format": FORMAT, "recipe": recipe}
