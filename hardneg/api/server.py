"""uvicorn's HTTP protocol with a deadline for receiving each request (``hardneg serve`` uses it).

uvicorn closes a keep-alive connection that stays idle for ``timeout_keep_alive`` seconds after a response,
but sets no limit on a new connection that sends nothing, nor on a client that trickles its headers or
body a byte at a time once it has started (each byte cancels the keep-alive timer). Each such connection
holds a socket and buffers for as long as the client likes. This protocol gives every request a deadline:
its request line, headers and body must all arrive within ``HARDNEG_REQUEST_TIMEOUT_SECONDS`` of the
connection opening or of the previous response; otherwise the connection is answered 408 and closed.
The deadline stops once the request is complete, so slow searches are not affected.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hardneg.api.settings import Settings

PROTOCOL = "hardneg.api.server:DeadlineHttpToolsProtocol"  # uvicorn's ``http=`` setting (imported in each worker)
_TIMEOUT_BODY = b"the request did not arrive whole in time (HARDNEG_REQUEST_TIMEOUT_SECONDS)"
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


@lru_cache(maxsize=1)
def request_timeout() -> float:
    """``HARDNEG_REQUEST_TIMEOUT_SECONDS`` as the app's settings read it (``hardneg serve`` writes its flags there)."""
    return Settings().request_timeout_seconds


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline from connect (or the last response) to the request's end."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets a fresh deadline

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(request_timeout(), self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        if self.cycle is not None:
            self.cycle.keep_alive = False
            self.cycle.disconnected = True  # the app's receive() now sees http.disconnect
            self.cycle.message_event.set()
        self.transport.close()
