"""What every request passes before any route sees it, as plain ASGI middlewares (so routes added later are
covered without a line of their own): the API key, checked before the body is read
(:class:`ApiKeyMiddleware`), and the body size (:class:`BodyLimitMiddleware`). Also the cap on results
per request (:func:`check_result_count`), which routes call with their ``k`` and query count.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hardneg.miner.errors import ValidationError


class TooManyResultsError(ValidationError):
    """A request asks for more neighbours than ``HARDNEG_MAX_RESULTS`` (answered with 413)."""


def check_result_count(queries: int, k: int, max_results: int) -> None:
    """Raise :class:`TooManyResultsError` when ``queries`` x ``k`` neighbours exceed ``max_results``.

    The response (and the search's working memory) grows with this product: 1024 queries at k=1000 would
    be a 53 MB answer built from a 5 KB request.
    """
    if queries * k > max_results:
        raise TooManyResultsError(
            f"{queries} queries x k={k} asks for {queries * k} neighbours; at most {max_results} are answered "
            "per request (HARDNEG_MAX_RESULTS): lower k or send fewer queries per request")


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer ``{"detail": detail}`` and ask the client to close (its unread body is never read)."""
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": payload})


class ApiKeyMiddleware:
    """401 unless the request carries the API key (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``).

    Checked from the headers alone, before one byte of the body is read or parsed, for every path but
    ``open_paths`` (exact matches), including the OpenAPI schema and the docs pages. Without a key
    (``key`` None) every request passes.
    """

    def __init__(self, app: ASGIApp, key: bytes | None, open_paths: frozenset[str]) -> None:
        self.app = app
        self.key = key
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        offered = self._offered(scope["headers"])
        # compare_digest against every offered key (not short-circuiting) keeps timing independent of the key.
        if any([hmac.compare_digest(c, self.key) for c in offered]):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        why = "wrong API key" if offered else "missing API key"
        await _send_json(send, 401, f"{why}: send 'Authorization: Bearer <HARDNEG_API_KEY>' or "
                                    "'X-API-Key: <HARDNEG_API_KEY>'", [(b"www-authenticate", b"Bearer")])

    @staticmethod
    def _offered(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        offered = []
        for name, value in headers:
            if name == b"x-api-key":
                offered.append(value.strip())
            elif name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer" and token.strip():
                    offered.append(token.strip())
        return offered


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the whole ``body`` once, then defers to ``receive`` (for the disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimitMiddleware:
    """413 when ``Content-Length`` exceeds ``max_bytes``, or when a streamed (chunked) body grows past it.

    The body is read here, up to the limit, and replayed to the app: JSON parsing never sees an oversized
    body, and a client that lies about ``Content-Length`` (or sends none) is caught by the byte count.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send, f"{int(declared)} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _too_large(self, send: Send, what: str) -> None:
        await _send_json(send, 413, f"request body is {what}; at most {self.max_bytes} bytes are accepted "
                                    "(HARDNEG_MAX_BODY_BYTES): send fewer queries per request")
