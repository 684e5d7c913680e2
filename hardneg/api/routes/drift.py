"""``GET /drift?from=A&to=B``: how much the embedding moved between two snapshots."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from hardneg.api.audit_schemas import DriftQuery, DriftResponse
from hardneg.api.audits import AuditCacheDep, check_auditable
from hardneg.api.deps import LanesDep, SettingsDep, StateDep
from hardneg.api.routes.errors import error_responses
from hardneg.miner.drift import snapshot_drift

router = APIRouter(tags=["audit"], responses=error_responses(400, 401, 404, 409, 503))


@router.get("/drift", response_model=DriftResponse, response_model_by_alias=True,
            summary="Drift between two snapshots over the items both hold")
async def get_drift(q: Annotated[DriftQuery, Query()], state: StateDep, lanes: LanesDep, settings: SettingsDep,
                    cache: AuditCacheDep) -> dict:
    """Neighbour overlap at ``k`` (mean and per class), centroid shift per class and the share of anchors whose
    hardest negative changed, over a seeded sample of the ids both snapshots hold."""
    a = await state.resolve(q.from_)
    b = await state.resolve(q.to)
    check_auditable(a, settings)
    check_auditable(b, settings)
    drift = await cache.get(("drift", a.name, b.name, q.k, q.sample, q.seed),
                            lambda: snapshot_drift(a.index, b.index, k=q.k, sample=q.sample, seed=q.seed), lanes)
    return {"from": a.name, "to": b.name, **drift.to_dict()}
