"""The hardneg HTTP service: app factory and lifespan.

``create_app()`` builds an app from :class:`Settings` (the environment by default).
The lifespan loads the snapshot ``LATEST`` names (if any: an empty store starts and
answers /readyz 503 until the first snapshot appears), then polls for new ones.

Run it with ``hardneg serve --store DIR`` or
``uvicorn --factory hardneg.api.main:create_app`` with ``HARDNEG_STORE=DIR``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from hardneg import __version__
from hardneg.api.deps import require_api_key
from hardneg.api.errors import ERROR_STATUS, error_headers
from hardneg.api.fastlane import NeighborsFastLane
from hardneg.api.limits import ApiKeyMiddleware, BodyLimitMiddleware
from hardneg.api.metrics import ApiMetrics, MetricsMiddleware
from hardneg.api.reloader import Reloader
from hardneg.api.audits import AuditCache
from hardneg.api.routes import audit, drift, health, items, mine, neighbors, snapshot, ui
from hardneg.api.routes import metrics as metrics_route
from hardneg.api.search import SearchLanes
from hardneg.api.settings import Settings
from hardneg.api.state import SnapshotState
from hardneg.miner.errors import ValidationError
from hardneg.miner.store import SnapshotStore

log = logging.getLogger(__name__)

# Routes that never need the API key: orchestrators' probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    reloader: Reloader = app.state.reloader
    log.info("hardneg api: store %s, %d search lanes x %d FAISS threads, polling every %.2f s; %s",
             settings.store, settings.search_lanes, settings.faiss_threads, settings.poll_seconds,
             "snapshots must be signed (HARDNEG_STORE_KEY), models are loaded" if settings.store_key else
             "trusted store: models are loaded from unsigned snapshots" if settings.trust_store else
             "unsigned store: models are not loaded, raw inputs are refused")
    await reloader.check_once()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reloader.run)
        yield
        tg.cancel_scope.cancel()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the hardneg API for ``settings`` (default: read from ``HARDNEG_*`` environment variables)."""
    settings = settings or Settings()
    if settings.store is None:
        raise ValidationError("no snapshot store: set HARDNEG_STORE or pass --store DIR")
    app = FastAPI(
        title="hardneg",
        version=__version__,
        summary="Similarity search and hard-negative lookup over the newest hardneg snapshot.",
        lifespan=lifespan,
    )
    metrics = ApiMetrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lanes = SearchLanes(settings.search_lanes, settings.faiss_threads)
    app.state.snapshots = SnapshotState(SnapshotStore(settings.store, key=settings.store_key_bytes), settings.pin_cache,
                                        settings.faiss_threads, load_models=settings.loads_models,
                                        run=app.state.lanes.run)
    app.state.audit_cache = AuditCache()
    app.state.reloader = Reloader(app.state.snapshots, metrics, settings.poll_seconds, settings.retry_seconds)

    protected = [Depends(require_api_key)]
    routers = [(health.router, []), (neighbors.router, protected), (snapshot.router, protected),
               (metrics_route.router, [] if settings.metrics_open else protected), (mine.router, protected),
               (items.router, protected), (audit.router, protected), (drift.router, protected), (ui.router, [])]
    for router, dependencies in routers:
        app.include_router(router, dependencies=dependencies)

    for exc_type, code in ERROR_STATUS:
        app.add_exception_handler(exc_type, _error_handler(code))
    # Each add wraps the previous: metrics (outermost, so they count the 401s and 413s too), then the key,
    # checked before the body limit reads a byte of the body, then the /neighbors fast lane (innermost).
    post_neighbors = next(r for r in neighbors.router.routes if r.path == "/neighbors" and "POST" in r.methods)
    app.add_middleware(NeighborsFastLane, settings=settings, state=app.state.snapshots, lanes=app.state.lanes,
                       route=post_neighbors)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    api_key = settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
    open_paths = OPEN_PATHS | ui.UI_PATHS | ({"/metrics"} if settings.metrics_open else set())
    app.add_middleware(ApiKeyMiddleware, key=api_key, open_paths=frozenset(open_paths))
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=[r for router, _ in routers for r in router.routes])
    return app


def _error_handler(code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """An exception handler answering ``code`` with ``{"detail": message}``."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=error_headers(code))

    return handler
