"""``POST /mine``: hard negatives for a batch of anchors, from the served (or a pinned) snapshot."""

from __future__ import annotations

from fastapi import APIRouter, Response

from hardneg.api.audits import AuditCacheDep, check_auditable
from hardneg.api.deps import LanesDep, SettingsDep, StateDep
from hardneg.api.mine_schemas import MineRequest, MineResponse
from hardneg.api.mining import check_mine_request, mine_request
from hardneg.miner.audit import audit_labels
from hardneg.miner.mining.miner import suspect_k
from hardneg.api.routes.errors import error_responses
from hardneg.api.routing import FastJSONRoute

router = APIRouter(tags=["mining"], responses=error_responses(400, 401, 404, 409, 413, 503),
                   route_class=FastJSONRoute)


@router.post("/mine", response_model=MineResponse, summary="Hard negatives of a batch of anchors")
async def post_mine(body: MineRequest, settings: SettingsDep, state: StateDep, lanes: LanesDep,
                    cache: AuditCacheDep) -> Response:
    """Each anchor's negatives, nearest first, mined with the strategy and guards of ``hardneg mine``; with
    ``exclude_suspects``, the snapshot's label audit is computed once (shared with ``GET /audit/labels``)."""
    config = check_mine_request(body, settings)
    snap = await state.resolve(body.snapshot)  # grabbed once: a reload meanwhile does not touch this request
    audit = None
    if body.exclude_suspects is not None and snap.index.count >= 2:
        check_auditable(snap, settings)
        k = suspect_k(snap.index)
        audit = await cache.get(("labels", snap.name, k), lambda: audit_labels(snap.index, k), lanes)
    return Response(await lanes.run(mine_request, snap, body, config, audit), media_type="application/json")
