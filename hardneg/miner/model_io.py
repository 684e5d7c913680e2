"""The embedding model as a self-contained ``torch.export`` program (``model.pt2`` in a snapshot).

The trainer exports its model with :func:`export_model`; the api loads it with
:func:`load_model` and embeds raw inputs without importing any training code.

**Loading runs code.** ``torch.export.load`` (torch 2.13) unpickles: its archive loader calls
``torch.load(weights_only=False)`` on every weight or constant whose payload config says
``use_pickle``, ``pickle.loads`` on opaque objects and ``torch._C._pickle_load_obj`` on custom
objects, so a crafted ``model.pt2`` runs code when loaded. Only load a model whose bytes are
trusted: from a signed snapshot (``SnapshotStore.read_file`` with a store key) or a store the
operator trusts. :func:`load_model` also refuses, before torch sees them, archives whose payload
configs ask for any of those pickled entries (:func:`export_model` never writes one for plain
tensors); that is defence in depth, not the guarantee.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def check_archive(data: bytes) -> None:
    """Refuse (:class:`SnapshotError`) a ``.pt2`` archive whose payloads ``torch.export.load`` would unpickle.

    Reads only the zip directory and the JSON payload configs (``*_weights_config.json``,
    ``*_constants_config.json``) with the standard library. Refused: any entry with ``use_pickle``, custom or
    opaque object constants, legacy pickled weight/constant files and archives without payload configs.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
            configs = [n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))]
            if not configs:
                raise SnapshotError("model.pt2 has no payload configs (not a torch 2.13 export archive)")
            for n in configs:
                for fqn, meta in json.loads(z.read(n)).get("config", {}).items():
                    path = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or not path.startswith(("weight_", "tensor_constant")):
                        raise SnapshotError(f"model.pt2 holds a pickled payload ({fqn!r} in {n.rsplit('/', 1)[-1]}), "
                                            "which loading would execute; refused")
    except (zipfile.BadZipFile, ValueError, AttributeError, KeyError) as e:
        raise SnapshotError(f"model.pt2 is not a valid export archive ({e})") from None


def load_model(source: bytes | str | os.PathLike, input_shape: Sequence[int]) -> ExportedModel:
    """Load an exported program saved by :func:`export_model`, from its bytes or its path.

    Loading executes code from a crafted archive (see the module docstring): pass only trusted bytes.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    check_archive(data)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # a corrupt archive surfaces as various torch/zip errors
        raise SnapshotError(f"cannot load exported model: {e}") from None
    return ExportedModel(program.module(), tuple(int(s) for s in input_shape))
