"""Library errors as HTTP answers: one mapping for FastAPI's exception handlers and the ``/neighbors`` fast lane."""

from __future__ import annotations

import json

from hardneg.api.limits import TooManyResultsError
from hardneg.api.state import NotReadyError
from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError

# Library errors -> HTTP status; each message already says what is accepted. TooManyResultsError is a
# ValidationError, so it comes first.
ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (TooManyResultsError, 413), (ValidationError, 400), (NotFoundError, 404), (SnapshotError, 409),
    (NotReadyError, 503))
HANDLED = tuple(exc_type for exc_type, _ in ERROR_STATUS)


def status_of(exc: Exception) -> int:
    """The HTTP status of a library error (one of :data:`HANDLED`)."""
    return next(code for exc_type, code in ERROR_STATUS if isinstance(exc, exc_type))


def error_headers(code: int) -> dict[str, str] | None:
    """Extra headers of an error answer: 503 asks the client to retry after a second."""
    return {"Retry-After": "1"} if code == 503 else None


def error_body(exc: Exception) -> bytes:
    """``{"detail": message}`` as JSON bytes, encoded as Starlette's ``JSONResponse`` encodes it."""
    return json.dumps({"detail": str(exc)}, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
