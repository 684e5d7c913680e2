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
from hardneg.api.limits import BodyLimitMiddleware
from hardneg.api.metrics import ApiMetrics, MetricsMiddleware
from hardneg.api.reloader import Reloader
from hardneg.api.routes import health, neighbors, snapshot
from hardneg.api.routes import metrics as metrics_route
from hardneg.api.search import SearchLanes
from hardneg.api.settings import Settings
from hardneg.api.state import NotReadyError, SnapshotState
from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError
from hardneg.miner.store import SnapshotStore

log = logging.getLogger(__name__)

# Library errors -> HTTP status; each message already says what is accepted.
_STATUS = ((ValidationError, 400), (NotFoundError, 404), (SnapshotError, 409), (NotReadyError, 503))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    reloader: Reloader = app.state.reloader
    log.info("hardneg api: store %s, %d search lanes x %d FAISS threads, polling every %.2f s",
             settings.store, settings.search_lanes, settings.faiss_threads, settings.poll_seconds)
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
    app.state.snapshots = SnapshotState(SnapshotStore(settings.store), settings.pin_cache, settings.faiss_threads)
    app.state.reloader = Reloader(app.state.snapshots, metrics, settings.poll_seconds, settings.retry_seconds)

    protected = [Depends(require_api_key)]
    routers = [(health.router, []), (neighbors.router, protected), (snapshot.router, protected),
               (metrics_route.router, [] if settings.metrics_open else protected)]
    for router, dependencies in routers:
        app.include_router(router, dependencies=dependencies)

    for exc_type, code in _STATUS:
        app.add_exception_handler(exc_type, _error_handler(code))
    # Added last = outermost: metrics also count the 413s the body limit answers.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=[r for router, _ in routers for r in router.routes])
    return app


def _error_handler(code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """An exception handler answering ``code`` with ``{"detail": message}``."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": "1"} if code == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

    return handler
