"""``GET /snapshot``: the manifest of the snapshot being served."""

from __future__ import annotations

from fastapi import APIRouter

from hardneg.api.deps import ServedDep
from hardneg.api.routes.errors import error_responses
from hardneg.api.schemas import SnapshotManifest

router = APIRouter(tags=["snapshot"], responses=error_responses(401, 503))


@router.get("/snapshot", response_model=SnapshotManifest, summary="Manifest of the served snapshot")
async def get_snapshot(snap: ServedDep) -> dict:
    return snap.manifest
