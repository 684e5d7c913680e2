"""Reading ``.npy`` files given on the command line: plain arrays only, never pickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hardneg.miner.errors import ValidationError


def load_npy(path: Path, what: str) -> np.ndarray:
    """Load a .npy file without pickle, with an error that names the file (``what``: the flag that named it)."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValidationError(f"{what} file {path} does not exist") from None
    except ValueError as e:
        raise ValidationError(f"{what} file {path} is not a plain .npy array ({e})") from None
