"""``GET /drift?from=A&to=B``: how much the embedding moved between two snapshots."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from hardneg.api.audit_schemas import DriftResponse
from hardneg.api.audits import AuditCacheDep, check_auditable
from hardneg.api.deps import LanesDep, SettingsDep, StateDep
from hardneg.api.routes.errors import error_responses
from hardneg.miner.drift import DEFAULT_SAMPLE, snapshot_drift

router = APIRouter(tags=["audit"], responses=error_responses(400, 401, 404, 409, 503))

MAX_DRIFT_K = 100
MAX_SAMPLE = 10_000  # anchors: each costs one row of distances to every common item


@router.get("/drift", response_model=DriftResponse, response_model_by_alias=True,
            summary="Drift between two snapshots over the items both hold")
async def get_drift(
    state: StateDep, lanes: LanesDep, settings: SettingsDep, cache: AuditCacheDep,
    from_: Annotated[str, Query(alias="from", max_length=128, description="the older snapshot")],
    to: Annotated[str | None, Query(max_length=128, description="the newer snapshot (default: the served one)")] = None,
    k: Annotated[int, Query(ge=1, le=MAX_DRIFT_K, description="neighbours compared per anchor")] = 10,
    sample: Annotated[int, Query(ge=1, le=MAX_SAMPLE, description="anchors drawn from the common items")] = DEFAULT_SAMPLE,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1)] = 0,
) -> dict:
    """Neighbour overlap at ``k`` (mean and per class), centroid shift per class and the share of anchors whose
    hardest negative changed, over a seeded sample of the ids both snapshots hold."""
    a = await state.resolve(from_)
    b = await state.resolve(to)
    check_auditable(a, settings)
    check_auditable(b, settings)
    drift = await cache.get(("drift", a.name, b.name, k, sample, seed),
                            lambda: snapshot_drift(a.index, b.index, k=k, sample=sample, seed=seed), lanes)
    return {"from": a.name, "to": b.name, **drift.to_dict()}
