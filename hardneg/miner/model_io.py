"""The embedding model as a self-contained ``torch.export`` program (``model.pt2`` in a snapshot).

The trainer exports its model with :func:`export_model`; the api loads it with
:func:`load_model` and embeds raw inputs without importing any training code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hardneg.miner.errors import SnapshotError, ValidationError

log = logging.getLogger(__name__)


def export_model(model: torch.nn.Module, input_shape: Sequence[int], path: str | os.PathLike) -> bool:
    """Export ``model`` for inputs of shape (batch, *input_shape) with a dynamic batch size.

    Returns False (and logs why) when the model cannot be exported; the snapshot is then published
    without a model, as the store contract allows.
    """
    was_training = model.training
    model.eval()
    try:
        example = (torch.zeros((2, *input_shape), dtype=torch.float32),)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        return True
    except Exception as e:  # torch.export raises many unrelated types for unsupported models
        log.warning("model %s cannot be exported with torch.export (%s); publishing without model.pt2",
                    type(model).__name__, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    finally:
        model.train(was_training)


@dataclass
class ExportedModel:
    """A loaded ``model.pt2``: call :meth:`embed` on raw inputs of shape (n, *input_shape)."""

    module: torch.nn.Module
    input_shape: tuple[int, ...]

    def embed(self, inputs: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Embed ``inputs`` (n, *input_shape) into (n, dim) float32."""
        x = np.asarray(inputs, dtype=np.float32)
        if x.ndim < 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValidationError(f"inputs must have shape (n, {', '.join(map(str, self.input_shape))}), "
                                  f"got {tuple(x.shape)}")
        if len(x) == 0:
            raise ValidationError("inputs must hold at least one item")
        if not np.isfinite(x).all():
            raise ValidationError("inputs contain NaN or inf; only finite values are accepted")
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out.append(self.module(torch.from_numpy(x[i:i + batch_size])).numpy())
        return np.concatenate(out).astype(np.float32)


def load_model(path: str | os.PathLike, input_shape: Sequence[int]) -> ExportedModel:
    """Load an exported program saved by :func:`export_model`."""
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # a corrupt archive surfaces as various torch/zip errors
        raise SnapshotError(f"cannot load exported model {path}: {e}") from None
    return ExportedModel(program.module(), tuple(int(s) for s in input_shape))
