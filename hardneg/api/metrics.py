"""Prometheus metrics of one app, in a registry of its own.

A per-app :class:`~prometheus_client.CollectorRegistry` (never the global one) lets
several apps live in one process, as they do in the tests.
"""

from __future__ import annotations

import datetime as _dt
import time

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Search latency spans ~0.2 ms (one HNSW query) to seconds (a 1024-query flat batch).
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "<unmatched>"  # one label for every path no route matches, so scanners cannot blow up cardinality


class ApiMetrics:
    """The service's metrics: requests by route template and status, served snapshot, reloads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("hardneg_http_requests", "HTTP requests answered",
                                ("method", "route", "status"), registry=self.registry)
        self.latency = Histogram("hardneg_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ("method", "route", "status"), buckets=_BUCKETS, registry=self.registry)
        self.snapshot = Gauge("hardneg_snapshot_info", "1 for the snapshot being served, by name",
                              ("name",), registry=self.registry)
        self.snapshot_items = Gauge("hardneg_snapshot_items", "Items in the snapshot being served",
                                    registry=self.registry)
        self.snapshot_age = Gauge("hardneg_snapshot_age_seconds",
                                  "Seconds since the served snapshot was published (NaN before the first)",
                                  registry=self.registry)
        self.reloads = Counter("hardneg_snapshot_reloads", "Attempts to load a new LATEST snapshot",
                               ("result",), registry=self.registry)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)  # export zeros before the first reload
        self._created_at: float | None = None
        self.snapshot_age.set_function(self._age)

    def _age(self) -> float:
        return float("nan") if self._created_at is None else time.time() - self._created_at

    def served(self, name: str, count: int, created_at: str) -> None:
        """Record that snapshot ``name`` (published at ISO time ``created_at``) is now served."""
        self.snapshot.clear()
        self.snapshot.labels(name=name).set(1)
        self.snapshot_items.set(count)
        try:
            self._created_at = _dt.datetime.fromisoformat(created_at).timestamp()
        except (TypeError, ValueError):
            self._created_at = None

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Count and time every HTTP request by method, route template (``/neighbors/{item_id}``) and status.

    A plain ASGI middleware rather than ``BaseHTTPMiddleware``: it adds no task per request
    and sees the route FastAPI matched, which it stores in ``scope["route"]``.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the API's routes, to name requests answered before routing (413s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before it answers

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            labels = (scope["method"], self._route_of(scope), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)

    def _route_of(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
        return getattr(route, "path", UNMATCHED)
