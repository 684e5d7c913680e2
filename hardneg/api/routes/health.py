"""``GET /healthz`` (the process answers) and ``GET /readyz`` (a snapshot is loaded). Never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter

from hardneg.api.deps import ServedDep
from hardneg.api.routes.errors import error_responses
from hardneg.api.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, summary="Readiness", responses=error_responses(503))
async def readyz(snap: ServedDep) -> dict:
    return {"status": "ready", "snapshot": snap.name}
