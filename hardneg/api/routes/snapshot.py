"""``GET /snapshot``: the manifest of the snapshot being served, without filesystem paths."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from hardneg.api.deps import ServedDep
from hardneg.api.routes.errors import error_responses
from hardneg.api.schemas import SnapshotManifest

router = APIRouter(tags=["snapshot"], responses=error_responses(401, 503))
REDACTED = "<path>"


def redact_paths(value: Any) -> Any:
    """``value`` with every string that holds a path separator replaced by ``"<path>"`` (recursively).

    A manifest's training metadata records the publisher's settings (store, run folder, data files); they say
    where things live on the publisher's machine, which is none of a client's business.
    """
    if isinstance(value, str):
        return REDACTED if "/" in value or "\\" in value else value
    if isinstance(value, dict):
        return {k: redact_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_paths(v) for v in value]
    return value


@router.get("/snapshot", response_model=SnapshotManifest, summary="Manifest of the served snapshot")
async def get_snapshot(snap: ServedDep) -> dict:
    """The served snapshot's ``manifest.json``; strings holding a path (in ``meta``) read ``"<path>"``."""
    return redact_paths(snap.manifest)
