"""Reading qrels and texts, and writing mined negatives in the layouts other trainers read.

Formats of :data:`FORMATS` (``rows`` per query ``q`` with positives ``P`` and negatives ``N``, nearest first):

* ``triplet``: columns ``anchor, positive, negative``, one row per (q, p in P, n in N): sentence-transformers'
  (anchor, positive, negative) triplets;
* ``n-tuple``: ``anchor, positive, negative_1 .. negative_k``, one row per (q, p) whose query got all ``k``
  negatives (sentence-transformers drops the others too);
* ``labeled-pair``: ``anchor, positive, label``, the pairs (q, p, 1) then (q, n, 0), for sentence-transformers'
  cross-encoder losses such as ``BinaryCrossEntropyLoss`` (its own output names the document column ``positive``);
* ``labeled-list``: ``anchor, positive, labels``, one row per (q, p): ``positive`` is ``[p] + N`` and ``labels`` is
  ``[1] + [0] * len(N)`` (e.g. ``LambdaLoss``);
* ``flagembedding``: FlagEmbedding's fine-tuning JSONL, one object per query: ``{"query", "pos": P, "neg": N}``;
* ``pml``: pytorch-metric-learning index tuples, the int64 id arrays ``anchor, positive, negative`` of the
  triplets in an ``.npz`` (``torch.from_numpy`` each for a loss's ``indices_tuple``).

Cells hold ids unless texts are given (then the id's text). JSONL always; Parquet (``.parquet``) where pyarrow
is installed (``pip install 'hardneg[parquet]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.mining.queries import PositiveSets, QueryMiningResult

FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list", "flagembedding", "pml")
TABLE_SUFFIXES = (".jsonl", ".parquet")


def read_qrels(path: str | os.PathLike, query_ids: np.ndarray) -> tuple[PositiveSets, int]:
    """Positives of each of ``query_ids`` (m,) from a qrels file, and how many qrels lines named other queries.

    The file is the BEIR / MS MARCO layout: one ``query_id doc_id [relevance]`` per line, tab- or
    space-separated, integer ids; an optional header line (``query-id corpus-id score``) is skipped;
    TREC's four columns ``query_id 0 doc_id relevance`` are read too. A pair is positive when its
    relevance is above 0 (1 when the column is missing).
    """
    index = {int(q): i for i, q in enumerate(np.asarray(query_ids).tolist())}
    lists: list[list[int]] = [[] for _ in index]
    other = 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValidationError(f"--qrels file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValidationError(f"--qrels file {path} is not UTF-8 text") from None
    for no, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) == 4:
                q, doc, rel = int(parts[0]), int(parts[2]), float(parts[3])
            elif len(parts) in (2, 3):
                q, doc, rel = int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else 1.0
            else:
                raise ValueError
        except ValueError:
            if no == 1:
                continue  # a header
            raise ValidationError(f"{path} line {no}: expected 'query_id doc_id [relevance]' with integer ids, "
                                  f"got {line[:80]!r}") from None
        if q not in index:
            other += 1
        elif rel > 0:
            lists[index[q]].append(doc)
    return PositiveSets.from_lists(lists), other


def read_texts(path: str | os.PathLike) -> dict[int, str]:
    """An id -> text map from ``path``: JSON lines ``{"_id" or "id": int, "text": str[, "title": str]}`` (BEIR's
    corpus.jsonl; a title is put before the text) or, for any other suffix, TSV lines ``id<TAB>text``."""
    out: dict[int, str] = {}
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValidationError(f"texts file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValidationError(f"texts file {path} is not UTF-8 text") from None
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            if p.suffix == ".jsonl":
                obj = json.loads(line)
                key = obj["_id"] if "_id" in obj else obj["id"]
                text = obj["text"]
                if not isinstance(text, str):
                    raise TypeError
                title = obj.get("title")
                out[int(key)] = f"{title} {text}" if isinstance(title, str) and title else text
            else:
                key, text = line.split("\t", 1)
                out[int(key)] = text
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValidationError(f"{path} line {no}: expected "
                                  + ('{"_id": <int>, "text": <str>}' if p.suffix == ".jsonl" else "'<int id>\\t<text>'")
                                  + f", got {line[:80]!r}") from None
    return out


class Cells:
    """Turns ids into cells: the ids themselves, or their texts when an id -> text map is given."""

    def __init__(self, texts: Mapping[int, str] | None, what: str) -> None:
        self.texts, self.what = texts, what

    def __call__(self, i: int) -> Any:
        if self.texts is None:
            return int(i)
        try:
            return self.texts[int(i)]
        except KeyError:
            raise ValidationError(f"no text for {self.what} id {int(i)} in the {self.what} texts file") from None


def build_rows(res: QueryMiningResult, fmt: str, query_texts: Mapping[int, str] | None = None,
               doc_texts: Mapping[int, str] | None = None) -> dict[str, list]:
    """The columns of ``fmt`` (one of :data:`FORMATS` but ``pml``) for ``res``: column name -> values."""
    q_cell, d_cell = Cells(query_texts, "query"), Cells(doc_texts, "document")
    k = res.negatives.shape[1]
    cols: dict[str, list] = {}
    if fmt in ("triplet", "labeled-pair", "labeled-list"):
        cols = {"anchor": [], "positive": [], {"triplet": "negative", "labeled-pair": "label",
                                               "labeled-list": "labels"}[fmt]: []}
    elif fmt == "n-tuple":
        cols = {"anchor": [], "positive": [], **{f"negative_{j}": [] for j in range(1, k + 1)}}
    elif fmt == "flagembedding":
        cols = {"query": [], "pos": [], "neg": []}
    else:
        raise ValidationError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    for i in range(len(res)):
        negs = [d_cell(n) for n in res.negatives[i] if n >= 0]
        pos = [d_cell(p) for p in res.positives[i]]
        if not negs or not pos:
            continue
        a = q_cell(res.query_ids[i])
        if fmt == "triplet":
            for p in pos:
                for n in negs:
                    cols["anchor"].append(a), cols["positive"].append(p), cols["negative"].append(n)
        elif fmt == "n-tuple" and len(negs) == k:
            for p in pos:
                cols["anchor"].append(a), cols["positive"].append(p)
                for j, n in enumerate(negs, start=1):
                    cols[f"negative_{j}"].append(n)
        elif fmt == "labeled-pair":
            for doc, label in [(p, 1) for p in pos] + [(n, 0) for n in negs]:
                cols["anchor"].append(a), cols["positive"].append(doc), cols["label"].append(label)
        elif fmt == "labeled-list":
            for p in pos:
                cols["anchor"].append(a), cols["positive"].append([p] + negs)
                cols["labels"].append([1] + [0] * len(negs))
        elif fmt == "flagembedding":
            cols["query"].append(a), cols["pos"].append(pos), cols["neg"].append(negs)
    return cols


def triplet_ids(res: QueryMiningResult) -> dict[str, np.ndarray]:
    """The (query, positive, negative) id triplets of ``res`` as int64 arrays ``anchor, positive, negative``."""
    rows = build_rows(res, "triplet")
    return {name: np.asarray(rows[col], dtype=np.int64) for name, col in
            (("anchor", "anchor"), ("positive", "positive"), ("negative", "negative"))}


def write_mined(res: QueryMiningResult, fmt: str, path: str | os.PathLike,
                query_texts: Mapping[int, str] | None = None, doc_texts: Mapping[int, str] | None = None) -> int:
    """Write ``res`` in ``fmt`` to ``path`` (``pml``: ``.npz``; others: ``.jsonl`` or ``.parquet``); returns the rows."""
    path = Path(path)
    if fmt == "pml":
        if path.suffix != ".npz":
            raise ValidationError(f"format pml writes an .npz of id arrays; got --out {path}")
        arrays = triplet_ids(res)
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
            np.savez(f, **arrays)
        return len(arrays["anchor"])
    if path.suffix not in TABLE_SUFFIXES:
        raise ValidationError(f"format {fmt} writes {' or '.join(TABLE_SUFFIXES)} files; got --out {path}")
    cols = build_rows(res, fmt, query_texts, doc_texts)
    n = len(next(iter(cols.values())))
    if path.suffix == ".parquet":
        _write_parquet(cols, path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            names = list(cols)
            for values in zip(*(cols[c] for c in names)):
                f.write(json.dumps(dict(zip(names, values)), ensure_ascii=False) + "\n")
    return n


def _write_parquet(cols: dict[str, list], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValidationError("writing Parquet needs pyarrow: pip install 'hardneg[parquet]', or write .jsonl") from None
    pq.write_table(pa.Table.from_pydict(cols), path)
