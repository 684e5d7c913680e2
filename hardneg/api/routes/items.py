"""``GET /snapshots`` (the store's history), ``GET /items/{id}`` and ``GET /items/{id}/thumb.png``."""

from __future__ import annotations

import io
from typing import Annotated

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Path, Query, Response
from PIL import Image

from hardneg.api.audit_schemas import ItemResponse, SnapshotHistory, SnapshotQuery
from hardneg.api.deps import ServedDep, StateDep
from hardneg.api.routes.errors import error_responses
from hardneg.miner.errors import NotFoundError

router = APIRouter(tags=["items"], responses=error_responses(400, 401, 404, 409, 503))

ItemId = Annotated[int, Path(ge=-(2**63), le=2**63 - 1, description="id of a stored item")]
InSnapshot = Annotated[SnapshotQuery, Query()]


@router.get("/snapshots", response_model=SnapshotHistory, summary="The store's snapshots, newest first")
async def get_snapshots(state: StateDep, served: ServedDep) -> dict:
    infos = await anyio.to_thread.run_sync(state.store.list)
    return {"served": served.name,
            "snapshots": [{**info.__dict__, "served": info.name == served.name} for info in infos]}


@router.get("/items/{item_id}", response_model=ItemResponse, summary="One stored item's label")
async def get_item(item_id: ItemId, q: InSnapshot, state: StateDep) -> dict:
    snap = await state.resolve(q.snapshot)
    row = int(snap.index.rows_of([item_id])[0])  # NotFoundError (404) names an unknown id
    return {"snapshot": snap.name, "id": item_id, "label": int(snap.index.labels[row]), "thumb": snap.thumbs is not None}


@router.get("/items/{item_id}/thumb.png", response_class=Response, summary="One stored item's thumbnail",
            responses={200: {"content": {"image/png": {}}, "description": "the thumbnail as a PNG"}})
async def get_thumb(item_id: ItemId, q: InSnapshot, state: StateDep) -> Response:
    snap = await state.resolve(q.snapshot)
    if snap.thumbs is None:
        raise NotFoundError(f"snapshot {snap.name} has no thumbnails (thumbs.npy)")
    row = int(snap.index.rows_of([item_id])[0])
    # A named snapshot never changes; without a name the answer follows the served one.
    cache = "private, max-age=3600" if q.snapshot is not None else "no-cache"
    return Response(png(np.asarray(snap.thumbs[row])), media_type="image/png", headers={"Cache-Control": cache})


def png(image: np.ndarray) -> bytes:
    """PNG bytes of one (H, W) or (H, W, C) uint8 thumbnail (C 1, 3 or 4)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
