"""FastAPI dependencies: settings, snapshot state, search lanes, the result cap and the API-key schemes.

All are ``async def`` although none awaits: FastAPI runs plain ``def`` dependencies on the
thread pool, a thread hop each (~0.2 ms), which made up most of a small request's time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from hardneg.api.limits import check_result_count
from hardneg.api.metrics import ApiMetrics
from hardneg.api.search import SearchLanes
from hardneg.api.settings import Settings
from hardneg.api.state import ServedSnapshot, SnapshotState

# auto_error=False: a missing key is answered by require_api_key with one 401 message for both schemes.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer HARDNEG_API_KEY")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: HARDNEG_API_KEY")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_state(request: Request) -> SnapshotState:
    return request.app.state.snapshots


async def get_lanes(request: Request) -> SearchLanes:
    return request.app.state.lanes


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StateDep = Annotated[SnapshotState, Depends(get_state)]
LanesDep = Annotated[SearchLanes, Depends(get_lanes)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


async def get_served(state: StateDep) -> ServedSnapshot:
    """The served snapshot, grabbed once for the whole request (503 before the first one loads)."""
    return state.served()


ServedDep = Annotated[ServedSnapshot, Depends(get_served)]


@dataclass(frozen=True)
class ResultCap:
    """``HARDNEG_MAX_RESULTS`` for a route: call :meth:`check` with its query count and ``k`` before searching."""

    max_results: int

    def check(self, queries: int, k: int) -> None:
        """Raise :class:`~hardneg.api.limits.TooManyResultsError` (413) above the cap."""
        check_result_count(queries, k, self.max_results)


async def get_result_cap(settings: SettingsDep) -> ResultCap:
    return ResultCap(settings.max_results)


ResultCapDep = Annotated[ResultCap, Depends(get_result_cap)]


async def require_api_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key_header)],
) -> None:
    """Declares the two API-key schemes in the OpenAPI schema of the routes that need the key.

    The key itself is checked by :class:`~hardneg.api.limits.ApiKeyMiddleware` for every route but the open
    ones, from the headers, before the body is read: a dependency runs only after FastAPI has read and parsed
    the body, which let an unauthenticated client make the server buffer and parse up to the body limit.
    """
