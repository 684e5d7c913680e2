"""``GET /metrics``: Prometheus text exposition of this app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from hardneg.api.deps import MetricsDep
from hardneg.api.routes.errors import error_responses

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_model=str, response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format 0.0.4"}, **error_responses(401)})
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
