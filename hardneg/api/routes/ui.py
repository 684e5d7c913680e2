"""``GET /ui``: a page to look at the data (plain HTML, CSS and JavaScript; no build step).

The page holds no data: it calls the same JSON routes as any client (``/snapshot``, ``/snapshots``,
``/items``, ``/neighbors``, ``/audit``, ``/drift``), so it is served without the API key, and when the
service has one the page asks for it and sends it with every call (``X-API-Key``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(tags=["ui"])

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_ASSETS = {"ui.js": "text/javascript", "ui.css": "text/css"}  # the only files served besides the page
UI_PATHS = frozenset({"/ui", *(f"/ui/{name}" for name in _ASSETS)})  # open: the API-key middleware lets them by


@router.get("/ui", response_class=FileResponse, summary="The data-inspection page", include_in_schema=False)
async def ui_page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html")


@router.get("/ui/{asset}", response_class=FileResponse, include_in_schema=False)
async def ui_asset(asset: str) -> FileResponse:
    if asset not in _ASSETS:
        raise HTTPException(404, f"no such file: {asset!r}; the page's files are {sorted(_ASSETS)}")
    return FileResponse(UI_DIR / asset, media_type=_ASSETS[asset])
