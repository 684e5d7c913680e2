"""``POST /mine``: hard negatives for a batch of anchors, from the served (or a pinned) snapshot."""

from __future__ import annotations

from fastapi import APIRouter, Response

from hardneg.api.deps import LanesDep, SettingsDep, StateDep
from hardneg.api.mine_schemas import MineRequest, MineResponse
from hardneg.api.mining import check_mine_request, mine_request
from hardneg.api.routes.errors import error_responses
from hardneg.api.routing import FastJSONRoute

router = APIRouter(tags=["mining"], responses=error_responses(400, 401, 404, 409, 413, 503),
                   route_class=FastJSONRoute)


@router.post("/mine", response_model=MineResponse, summary="Hard negatives of a batch of anchors")
async def post_mine(body: MineRequest, settings: SettingsDep, state: StateDep, lanes: LanesDep) -> Response:
    """Each anchor's negatives, nearest first, mined with the strategy and guards of ``hardneg mine``."""
    config = check_mine_request(body, settings)
    snap = await state.resolve(body.snapshot)  # grabbed once: a reload meanwhile does not touch this request
    return Response(await lanes.run(mine_request, snap, body, config), media_type="application/json")
