"""Answering ``/neighbors`` requests: validate them against the settings and a snapshot, search, shape the result.

FAISS releases the GIL, so searches run on worker threads, at most ``search_lanes``
at a time, each with ``faiss_threads`` OpenMP threads: lanes x threads stays within
the cores instead of every request spawning a full OpenMP team (oversubscription
makes p99 latency collapse under concurrent load).

A small search (:func:`runs_inline`: one unfiltered query on 100k x 64 flat, or a few on HNSW) runs on the
event loop instead: the two thread hand-offs of a lane (there and back) cost more than it does, and on a
busy machine each waits for the scheduler, which made most of a single query's latency over HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import faiss
import numpy as np
import pydantic_core

from hardneg.api.limits import check_result_count
from hardneg.api.schemas import NeighborsRequest
from hardneg.api.settings import Settings
from hardneg.api.state import ServedSnapshot, SnapshotState
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import SearchParams, SearchResult, VectorIndex

T = TypeVar("T")
QUERY_FIELDS = ("vectors", "ids", "inputs")
# Most multiply-adds a search may take to run on the event loop (~1 ms on one core here): one query on a
# 100k x 64 flat index (6.4M) runs inline, a batch of 256 on a lane. Blocking the loop that long costs
# other connections less than the hand-offs of a lane cost the query.
INLINE_WORK = 1 << 23
# HNSW: vectors compared per query, per unit of efSearch (level 0 links of HNSW32: 2 x 32).
_HNSW_VISITS_PER_EF = 64


class SearchLanes:
    """Runs blocking search work on at most ``lanes`` threads at once, each FAISS call with ``omp_threads`` threads."""

    def __init__(self, lanes: int, omp_threads: int) -> None:
        self.limiter = anyio.CapacityLimiter(lanes)
        self.omp_threads = omp_threads

    async def run(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """``fn(*args)`` on a lane thread, or on the calling (event loop) thread when ``inline`` (small work only)."""
        if inline:
            return self._in_lane(fn, *args)
        return await anyio.to_thread.run_sync(self._in_lane, fn, *args, limiter=self.limiter)

    def _in_lane(self, fn: Callable[..., T], *args: Any) -> T:
        # OpenMP's thread count is per calling thread: a worker thread starts from the process default
        # (all cores), not from what the main thread set, so each lane sets it itself (a cheap call).
        faiss.omp_set_num_threads(self.omp_threads)
        return fn(*args)


def check_request(req: NeighborsRequest, settings: Settings) -> None:
    """Check what does not depend on the snapshot: one query form, batch size, ``k``. Raises ValidationError (400)."""
    given = [f for f in QUERY_FIELDS if getattr(req, f) is not None]
    if len(given) != 1:
        raise ValidationError(f"give exactly one of vectors, ids or inputs; got {', '.join(given) or 'none'}")
    n = len(getattr(req, given[0]))
    if n == 0:
        raise ValidationError(f"{given[0]} is empty; send between 1 and {settings.max_batch} queries")
    if n > settings.max_batch:
        raise ValidationError(f"{given[0]} holds {n} queries; at most {settings.max_batch} are accepted per "
                              "request (HARDNEG_MAX_BATCH)")
    if not 1 <= req.k <= settings.max_k:
        raise ValidationError(f"k must be between 1 and {settings.max_k} (HARDNEG_MAX_K), got {req.k}")
    check_result_count(n, req.k, settings.max_results)
    if req.ids is not None and req.labels is not None:
        raise ValidationError("labels are only accepted with vectors or inputs; queries by ids use the stored labels")
    if req.labels is not None and len(req.labels) != n:
        raise ValidationError(f"labels has {len(req.labels)} entries but there are {n} queries; give one label "
                              "per query")


async def answer_neighbors(req: NeighborsRequest, settings: Settings, state: SnapshotState, lanes: SearchLanes) -> bytes:
    """The JSON body answering ``POST /neighbors`` with ``req``; library errors propagate (see hardneg.api.errors)."""
    check_request(req, settings)
    snap = await state.resolve(req.snapshot)  # grabbed once: a reload meanwhile does not touch this request
    return await lanes.run(search_neighbors, snap, req, inline=runs_inline(snap.index, req))


def runs_inline(index: VectorIndex, req: NeighborsRequest) -> bool:
    """Whether ``req`` is small enough to search on the event loop: at most :data:`INLINE_WORK` estimated
    multiply-adds, queries by vectors or ids (not model inputs) and no filter (filters can widen a search)."""
    if req.inputs is not None or req.different_label or req.label_in or req.label_not_in or req.exclude_ids:
        return False
    n = len(req.vectors if req.vectors is not None else req.ids or ())
    return n * _work_per_query(index, req) <= INLINE_WORK


def _work_per_query(index: VectorIndex, req: NeighborsRequest) -> int:
    """Estimated multiply-adds of one unfiltered query: every vector on flat (and unknown kinds), the probed lists
    plus the coarse quantizer on IVF, efSearch x the level-0 links on HNSW."""
    visited = index.count
    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        nprobe = min(req.nprobe or index.spec.nprobe or ivf.nprobe, ivf.nlist)
        visited = ivf.nlist + math.ceil(index.count * nprobe / ivf.nlist)
    elif isinstance(index.index, faiss.IndexHNSW):
        visited = min(index.count, _HNSW_VISITS_PER_EF * (req.ef_search or index.spec.ef_search or
                                                          index.index.hnsw.efSearch))
    return visited * index.dim


def search_neighbors(snap: ServedSnapshot, req: NeighborsRequest) -> bytes:
    """Resolve the queries of ``req`` on ``snap``, search, and return the JSON response body (blocking; run in a lane).

    The body is serialised here, off the event loop, by pydantic-core's Rust encoder. It is not validated
    against :class:`NeighborsResponse` again: it is built from typed arrays, and re-validating the 2,560
    neighbours of a 256-query batch took longer (~6 ms) than encoding them.
    """
    index = snap.index
    exclude_self = None
    labels = req.labels
    if req.ids is not None:
        rows = index.rows_of(req.ids)  # NotFoundError (404) names unknown ids
        queries = index.vectors_of(req.ids)
        labels = index.labels[rows]
        exclude_self = req.ids
    elif req.vectors is not None:
        queries = _vectors(req.vectors, index.dim, snap.name)
    else:
        queries = _embed(snap, req.inputs)
    if req.different_label and labels is None:
        raise ValidationError("different_label needs labels: give `labels` (one per query) with vectors or "
                              "inputs, or query by ids")
    result = index.search(
        queries, req.k, query_labels=labels, different_label=req.different_label, label_in=req.label_in,
        label_not_in=req.label_not_in, exclude_ids=req.exclude_ids, exclude_self=exclude_self,
        params=SearchParams(nprobe=req.nprobe, ef_search=req.ef_search))
    return pydantic_core.to_json({"snapshot": snap.name, "results": neighbor_lists(result)})


def neighbor_lists(result: SearchResult) -> list[list[dict]]:
    """The compressed-row ``result`` as one list of ``{id, label, distance}`` per query, nearest first."""
    ids, labels, dist = result.ids.tolist(), result.labels.tolist(), result.distances.tolist()
    off = result.offsets.tolist()
    return [[{"id": ids[j], "label": labels[j], "distance": dist[j]} for j in range(off[i], off[i + 1])]
            for i in range(len(off) - 1)]


def _vectors(vectors: list[list[float]], dim: int, name: str) -> np.ndarray:
    """(n, dim) float32 queries; 400 for a wrong dimension or a non-finite value."""
    wrong = [i for i, v in enumerate(vectors) if len(v) != dim]
    if wrong:
        raise ValidationError(f"vectors must each have {dim} numbers (the dimension of snapshot {name}); "
                              f"query {wrong[0]} has {len(vectors[wrong[0]])}")
    x = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        # Python's json accepts NaN and Infinity literals, and 1e999 parses as inf.
        raise ValidationError(f"vectors contain NaN or inf (queries {np.flatnonzero(~finite)[:10].tolist()}); "
                              "only finite numbers are accepted")
    return x


def _embed(snap: ServedSnapshot, inputs: list) -> np.ndarray:
    """Embed raw ``inputs`` with the snapshot's own model: (n, dim) float32."""
    if snap.model is None and snap.has_model_file:
        raise ValidationError(f"raw inputs are disabled: this service does not load models (model.pt2 of snapshot "
                              f"{snap.name}) from an unsigned store, because loading one runs code from the store. "
                              "To enable them, set HARDNEG_STORE_KEY to the key the publisher signs snapshots with, "
                              "or HARDNEG_TRUST_STORE=1 if only trusted processes can write the store; or query by "
                              "vectors or ids")
    if snap.model is None:
        raise ValidationError(f"snapshot {snap.name} has no exported model (model.pt2), so it cannot embed inputs; "
                              "query by vectors or ids instead")
    shape = snap.model.input_shape
    try:
        x = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError):
        raise ValidationError(f"inputs must be nested lists of numbers, each of shape {list(shape)} "
                              f"(the model's input_shape of snapshot {snap.name}); they are ragged") from None
    if x.shape[1:] != shape:
        raise ValidationError(f"inputs must each have shape {list(shape)} (the model's input_shape of snapshot "
                              f"{snap.name}); got {list(x.shape[1:])}")
    return snap.model.embed(x)
