"""Write a FAISS flat index file block by block, never holding all of its vectors in memory.

``faiss.write_index`` needs the whole index in memory. A trainer whose ranks each hold a shard of the
embeddings (:mod:`hardneg.trainer.sharded_index`) instead streams the rows to one writer in blocks. The
file is exactly what ``faiss.write_index`` writes for an ``IndexFlat`` of the same rows: the layout (a
header holding the dimension, the row count and the metric, then the count of floats and the floats) is
taken from FAISS itself, by serialising an empty index, and checked against ``faiss.serialize_index`` of a
small index before anything is written, so that a FAISS release with another layout is refused with a clear
error instead of producing a file FAISS cannot read.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import faiss
import numpy as np

from hardneg.miner.distances import get_distance
from hardneg.miner.errors import ValidationError

_NTOTAL_AT = 8  # after the fourcc (4 bytes) and the dimension (int32): the row count, int64
_SIZE_BYTES = 8  # the float count before the vectors, uint64


def flat_header(dim: int, metric: str, count: int) -> bytes:
    """The bytes ``faiss.write_index`` writes for an ``IndexFlat`` of ``count`` rows of ``dim`` floats on
    ``metric`` ("cosine": inner product, "l2") before the row data."""
    empty = bytearray(faiss.serialize_index(faiss.IndexFlat(dim, get_distance(metric).faiss_metric)).tobytes())
    empty[_NTOTAL_AT:_NTOTAL_AT + 8] = np.int64(count).tobytes()
    empty[-_SIZE_BYTES:] = np.uint64(count * dim).tobytes()
    return bytes(empty)


def check_layout(dim: int, metric: str) -> None:
    """ValidationError unless :func:`flat_header` plus the rows is byte for byte what FAISS writes."""
    x = np.arange(3 * dim, dtype=np.float32).reshape(3, dim) / (3 * dim)
    index = faiss.IndexFlat(dim, get_distance(metric).faiss_metric)
    index.add(x)
    if faiss.serialize_index(index).tobytes() != flat_header(dim, metric, 3) + x.tobytes():
        raise ValidationError(f"this FAISS release ({faiss.__version__}) writes flat indexes in a layout hardneg "
                              "cannot stream; publish the snapshot from one process (without --shard-index)")


class FlatIndexWriter:
    """Writes ``count`` rows of ``dim`` float32 (prepared: unit-norm for cosine) to ``path`` as a FAISS flat index.

    ::

        with FlatIndexWriter(path, dim=64, metric="cosine", count=n) as w:
            for block in blocks:          # (b, dim) float32 each, rows in order
                w.write(block)

    Closing checks that exactly ``count`` rows were written; a writer left by an error removes its file.
    """

    def __init__(self, path: str | os.PathLike, dim: int, metric: str, count: int) -> None:
        if count < 0 or dim < 1:
            raise ValidationError(f"a flat index needs dim >= 1 and count >= 0, got dim {dim}, count {count}")
        check_layout(dim, metric)
        self.path, self.dim, self.count, self.written = Path(path), dim, count, 0
        self._file = open(self.path, "wb")
        self._file.write(flat_header(dim, metric, count))

    def write(self, block: np.ndarray) -> None:
        """Append rows ``block`` (b, dim) float32."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValidationError(f"rows must be (b, {self.dim}), got {block.shape}")
        if self.written + len(block) > self.count:
            raise ValidationError(f"{self.written + len(block)} rows written to a flat index of {self.count}")
        self._file.write(block.data)
        self.written += len(block)

    def abort(self) -> None:
        """Close and remove the file (after an error); returns None, for ``writer = writer.abort()``."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush and close; ValidationError (and the file removed) unless every row was written."""
        self._file.close()
        if self.written != self.count:
            self.path.unlink(missing_ok=True)
            raise ValidationError(f"{self.written} of {self.count} rows were written to {self.path.name}")

    def __enter__(self) -> FlatIndexWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
