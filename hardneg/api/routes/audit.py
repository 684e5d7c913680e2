"""``GET /audit/labels`` (label-noise suspects) and ``GET /audit/duplicates`` (near-duplicate groups)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from hardneg.api.audit_schemas import DuplicatesQuery, DuplicatesResponse, LabelAuditQuery, LabelAuditResponse
from hardneg.api.audits import AuditCacheDep, check_auditable
from hardneg.api.deps import LanesDep, ResultCapDep, SettingsDep, StateDep
from hardneg.api.routes.errors import error_responses
from hardneg.miner.audit import audit_labels, find_duplicates

router = APIRouter(tags=["audit"], responses=error_responses(400, 401, 404, 409, 413, 503))

MAX_PAIRS = 100_000  # a threshold linking more pairs is not a near-duplicate test (400)


@router.get("/audit/labels", response_model=LabelAuditResponse, summary="Suspected label errors, most suspicious first")
async def get_label_audit(q: Annotated[LabelAuditQuery, Query()], state: StateDep, lanes: LanesDep,
                          settings: SettingsDep, cache: AuditCacheDep, cap: ResultCapDep) -> dict:
    """Every item scored by how well its embedding supports its label (the share of its ``k`` nearest other
    items that carry it and a class-mean confidence; exact on flat snapshots), with the label its neighbours
    suggest; computed once per snapshot and ``k``."""
    cap.check(1, q.limit)
    snap = await state.resolve(q.snapshot)
    check_auditable(snap, settings)
    audit = await cache.get(("labels", snap.name, q.k), lambda: audit_labels(snap.index, q.k), lanes)
    return {"snapshot": snap.name, "k": audit.k, "count": len(audit), "disagreeing": int((audit.p_given < 1).sum()),
            "suspects": audit.rows(q.limit)}


@router.get("/audit/duplicates", response_model=DuplicatesResponse, summary="Groups of near-duplicate items")
async def get_duplicates(q: Annotated[DuplicatesQuery, Query()], state: StateDep, lanes: LanesDep,
                         settings: SettingsDep, cache: AuditCacheDep, cap: ResultCapDep) -> dict:
    """Items linked by pairs within ``d² <= threshold`` (transitively), largest group first, split into groups of
    one label (redundant copies) and of several labels (conflicts)."""
    cap.check(2, q.limit)  # two lists of up to `limit` groups
    snap = await state.resolve(q.snapshot)
    check_auditable(snap, settings)
    dup = await cache.get(("duplicates", snap.name, q.threshold),
                          lambda: find_duplicates(snap.index, q.threshold, MAX_PAIRS), lanes)
    same, conflicts = dup.same_label, dup.conflicts
    return {"snapshot": snap.name, "threshold": dup.threshold, "pairs": dup.pairs, "same_label_groups": len(same),
            "different_label_groups": len(conflicts), "same_label": [dup.group_dict(i) for i in same[:q.limit]],
            "different_label": [dup.group_dict(i) for i in conflicts[:q.limit]]}
