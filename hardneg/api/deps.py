"""FastAPI dependencies: settings, snapshot state, search lanes and the API-key check.

All are ``async def`` although none awaits: FastAPI runs plain ``def`` dependencies on the
thread pool, a thread hop each (~0.2 ms), which made up most of a small request's time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

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


async def require_api_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key_header)],
) -> None:
    """401 unless HARDNEG_API_KEY is unset or the request carries it (Bearer token or X-API-Key header)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    offered = [c.encode() for c in (bearer.credentials if bearer else None, api_key) if c is not None]
    # compare_digest against every offered key (not short-circuiting) keeps timing independent of the key.
    ok = [hmac.compare_digest(c, expected) for c in offered]
    if not any(ok):
        why = "wrong API key" if offered else "missing API key"
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            f"{why}: send 'Authorization: Bearer <HARDNEG_API_KEY>' or 'X-API-Key: <HARDNEG_API_KEY>'",
                            headers={"WWW-Authenticate": "Bearer"})
