"""``POST /neighbors`` and ``GET /neighbors/{item_id}``: k nearest neighbours on the served (or a pinned) snapshot."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from hardneg.api.deps import LanesDep, SettingsDep, StateDep
from hardneg.api.routes.errors import error_responses
from hardneg.api.routing import FastJSONRoute
from hardneg.api.schemas import INT64_MAX, INT64_MIN, NeighborsRequest, NeighborsResponse, SearchOptions
from hardneg.api.search import answer_neighbors

router = APIRouter(tags=["search"], responses=error_responses(400, 401, 404, 409, 413, 503),
                   route_class=FastJSONRoute)


@router.post("/neighbors", response_model=NeighborsResponse, summary="Neighbours of a batch of queries")
async def post_neighbors(body: NeighborsRequest, settings: SettingsDep, state: StateDep, lanes: LanesDep) -> Response:
    """The ``k`` nearest admissible stored items of each query, nearest first, with squared Euclidean distances.

    Well-formed JSON bodies are answered by :class:`~hardneg.api.fastlane.NeighborsFastLane` before they reach
    this route, with the same code; this route answers the rest (its 422s) and documents the API.
    """
    # response_model documents the body; search_neighbors has already encoded it (see its docstring).
    return Response(await answer_neighbors(body, settings, state, lanes), media_type="application/json")


@router.get("/neighbors/{item_id}", response_model=NeighborsResponse, summary="Neighbours of one stored item")
async def get_neighbors(
    item_id: Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX,
                                 description="id of a stored item (int64); it is never its own neighbour")],
    options: Annotated[SearchOptions, Query()],
    settings: SettingsDep,
    state: StateDep,
    lanes: LanesDep,
) -> Response:
    """The same as ``POST /neighbors`` with ``ids=[item_id]``; list options repeat (``?label_in=1&label_in=2``)."""
    body = NeighborsRequest(ids=[item_id], **options.model_dump())
    return await post_neighbors(body, settings, state, lanes)
