"""Answering ``POST /mine``: check the request, mine the anchors on a snapshot, shape the answer.

Three forms of anchor share the miner's core (:mod:`hardneg.miner.mining.core`): stored ``ids`` alone
(label mode, :func:`~hardneg.miner.mining.mine`), and any anchors with ``positives`` or ``labels``
(:func:`~hardneg.miner.mining.queries.mine_queries`).
"""

from __future__ import annotations

import numpy as np
import pydantic_core

from hardneg.api.limits import check_result_count
from hardneg.api.mine_schemas import MineRequest
from hardneg.api.search import _embed, _vectors  # the /neighbors query parsing, shared
from hardneg.api.settings import Settings
from hardneg.api.state import ServedSnapshot
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import SearchParams, VectorIndex
from hardneg.miner.audit import LabelAudit
from hardneg.miner.mining import MiningConfig, MiningResult, mine
from hardneg.miner.mining.guards import similarity
from hardneg.miner.mining.queries import PositiveSets, mine_queries
from hardneg.miner.mining.stats import MiningStats

ANCHOR_FIELDS = ("vectors", "ids", "inputs")


def check_mine_request(req: MineRequest, settings: Settings) -> MiningConfig:
    """Check what does not depend on the snapshot and build the mining config (ValidationError: 400)."""
    given = [f for f in ANCHOR_FIELDS if getattr(req, f) is not None]
    if len(given) != 1:
        raise ValidationError(f"give exactly one of vectors, ids or inputs; got {', '.join(given) or 'none'}")
    n = len(getattr(req, given[0]))
    if not 1 <= n <= settings.max_batch:
        raise ValidationError(f"{given[0]} holds {n} anchors; send between 1 and {settings.max_batch} "
                              "(HARDNEG_MAX_BATCH)")
    check_result_count(n, req.num_negatives, settings.max_results)  # 413 above HARDNEG_MAX_RESULTS
    if req.positives is not None and req.labels is not None:
        raise ValidationError("give positives or labels, not both")
    for name, values in (("positives", req.positives), ("labels", req.labels)):
        if values is not None and len(values) != n:
            raise ValidationError(f"{name} has {len(values)} entries but there are {n} anchors; give one per anchor")
    if req.positives is not None and sum(map(len, req.positives)) > settings.max_results:
        raise ValidationError(f"positives name more than {settings.max_results} ids in all (HARDNEG_MAX_RESULTS)")
    if req.ids is not None and req.labels is not None:
        raise ValidationError("labels are only accepted with vectors or inputs; anchors by ids use the stored labels")
    if req.ids is None and req.positives is None and req.labels is None:
        raise ValidationError(f"{given[0]} anchors need positives (one list of stored ids each) or labels")
    if req.exclude_suspects is not None and (req.ids is None or req.positives is not None):
        raise ValidationError("exclude_suspects is for label mode (anchors by ids, without positives or labels): "
                              "it audits the snapshot's own labels")
    range_max = req.range_min + req.num_negatives if req.range_max is None else req.range_max
    for name, value in (("num_negatives", req.num_negatives), ("range_max", range_max)):
        if value > settings.max_k:
            raise ValidationError(f"{name} must be at most {settings.max_k} (HARDNEG_MAX_K), got {value}")
    if req.strategy != "window" and (req.range_min or req.range_max is not None or req.sampling != "top"):
        raise ValidationError("range_min, range_max and sampling belong to strategy 'window'")
    if range_max - req.range_min < req.num_negatives:
        raise ValidationError(f"the window [range_min {req.range_min}, range_max {range_max}) must hold at least "
                              f"num_negatives ({req.num_negatives}) ranks")
    return MiningConfig(
        strategy=req.strategy, per_anchor=req.num_negatives, margin=req.margin, positive=req.positive,
        semihard_fallback=req.semihard_fallback, window_skip=req.range_min, window_width=range_max - req.range_min,
        window_sampling=req.sampling, positive_aware=req.positive_aware, near_duplicate=req.near_duplicate,
        absolute_margin=req.absolute_margin, relative_margin=req.relative_margin, max_score=req.max_score,
        candidates=req.candidates, seed=req.seed, exclude_suspects=req.exclude_suspects)


def mine_request(snap: ServedSnapshot, req: MineRequest, config: MiningConfig, audit: LabelAudit | None = None) -> bytes:
    """Mine ``req``'s anchors on ``snap`` and return the JSON body (blocking; run it in a search lane).

    ``audit``: ``snap``'s label audit, for ``exclude_suspects`` (:func:`label_audit`)."""
    index = snap.index
    params = SearchParams(nprobe=req.nprobe, ef_search=req.ef_search)
    if req.ids is not None and req.positives is None:
        res = mine(index, config, np.asarray(req.ids, dtype=np.int64), params=params, audit=audit)
        results = _label_results(index, res, len(req.ids), req.include_vectors)
        return _body(snap.name, results, res.stats)
    if req.ids is not None:
        queries, exclude = index.vectors_of(req.ids), np.asarray(req.ids, dtype=np.int64)
    else:
        queries, exclude = (_vectors(req.vectors, index.dim, snap.name) if req.vectors is not None
                            else _embed(snap, req.inputs)), None
    res = mine_queries(index, queries, config, params=params, exclude_ids=exclude,
                       positives=PositiveSets.from_lists(req.positives) if req.positives is not None else None,
                       labels=None if req.labels is None else np.asarray(req.labels, dtype=np.int64))
    found = res.negatives >= 0
    flat = _negatives(index, res.negatives[found], res.negative_d2[found], req.include_vectors)
    per = (res.negatives >= 0).sum(1).tolist()
    ends = np.cumsum([0] + per).tolist()
    results = [{"positive": None, "negatives": flat[ends[i]:ends[i + 1]]} for i in range(len(res))]
    return _body(snap.name, results, res.stats)


def _label_results(index: VectorIndex, res: MiningResult, m: int, include_vectors: bool) -> list[dict]:
    """Label-mode triplets as one entry per asked anchor (an anchor alone in its class gets none)."""
    d2 = ((index.vectors_of(res.anchor).astype(np.float64) - index.vectors_of(res.negative)) ** 2).sum(1) \
        if len(res) else np.empty(0)
    flat = _negatives(index, res.negative, d2, include_vectors)
    ends = np.searchsorted(res.anchor_pos, np.arange(m + 1)).tolist()
    return [{"positive": int(res.positive[ends[i]]) if ends[i + 1] > ends[i] else None,
             "negatives": flat[ends[i]:ends[i + 1]]} for i in range(m)]


def _negatives(index: VectorIndex, ids: np.ndarray, d2: np.ndarray, include_vectors: bool) -> list[dict]:
    """``{id, label, distance, score[, vector]}`` of each of the stored ``ids`` (t,) at squared distances ``d2``."""
    rows = index.rows_of(ids) if len(ids) else np.empty(0, np.int64)
    score = similarity(np.asarray(d2, np.float64), index.metric).tolist()
    out = [{"id": i, "label": lab, "distance": d, "score": s} for i, lab, d, s in
           zip(index.ids[rows].tolist(), index.labels[rows].tolist(), np.asarray(d2, np.float64).tolist(), score)]
    if include_vectors and len(ids):
        for item, v in zip(out, index.vectors_of(ids).tolist()):
            item["vector"] = v
    return out


def _body(name: str, results: list[dict], stats: MiningStats) -> bytes:
    return pydantic_core.to_json({"snapshot": name, "results": results, "stats": stats.to_dict()})
