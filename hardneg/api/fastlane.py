"""``POST /neighbors`` without FastAPI's per-request machinery, for well-formed JSON bodies.

FastAPI answers a request by solving the route's dependency tree (the API-key schemes, settings,
state, lanes: ~0.3 ms per request here), and validates the body in two passes (JSON to Python
objects, then the model). For a single query that was more than the search. This plain ASGI
middleware, inside the API-key and body-size middlewares (so the key is checked before the body is
read, and the body is bounded, exactly as for every route), answers ``POST /neighbors`` with an
``application/json`` body itself: one pydantic-core pass from JSON bytes to :class:`NeighborsRequest`
(the same strict model), then the route's own code (:func:`~hardneg.api.search.answer_neighbors`),
with library errors answered as the app's exception handlers answer them. A body that does not
validate is handed on to the FastAPI route unchanged, which answers it as before (422 with its
errors), so the API and its error answers are the same whichever path serves a request.
"""

from __future__ import annotations

import pydantic
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from hardneg.api.errors import HANDLED, error_body, error_headers, status_of
from hardneg.api.limits import replay_body
from hardneg.api.schemas import NeighborsRequest
from hardneg.api.search import SearchLanes, answer_neighbors
from hardneg.api.settings import Settings
from hardneg.api.state import SnapshotState

PATH = "/neighbors"


class NeighborsFastLane:
    """Answers ``POST /neighbors`` with a valid JSON body; hands every other request to ``app``.

    ``route`` is the FastAPI route it stands in for: it is put in ``scope["route"]``, where the metrics
    middleware reads the route template of a request.
    """

    def __init__(self, app: ASGIApp, settings: Settings, state: SnapshotState, lanes: SearchLanes,
                 route: APIRoute) -> None:
        self.app = app
        self.settings = settings
        self.state = state
        self.lanes = lanes
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PATH
                and _is_json(scope["headers"])):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client went away: nobody to answer
            return
        try:
            req = NeighborsRequest.model_validate_json(body)
        except pydantic.ValidationError:
            await self.app(scope, replay_body(body, receive), send)  # the route answers 422 with FastAPI's errors
            return
        scope["route"] = self.route
        try:
            payload = await answer_neighbors(req, self.settings, self.state, self.lanes)
            status, headers = 200, None
        except HANDLED as e:
            status = status_of(e)
            payload, headers = error_body(e), error_headers(status)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json"),
            *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]})
        await send({"type": "http.response.body", "body": payload})


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the first ``Content-Type`` header is ``application/json`` (parameters such as charset allowed)."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (already bounded by the body-size middleware), or None if the client disconnected."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)

