"""The documented error responses of each route group (OpenAPI ``responses=``)."""

from __future__ import annotations

from typing import Any

from hardneg.api.schemas import ErrorResponse

_WHY = {
    400: "a value the JSON shape allows but the service does not: wrong dimension, NaN or inf, k out of range, "
         "not exactly one of vectors/ids/inputs, an empty or too large batch, inputs for a snapshot without a model",
    401: "HARDNEG_API_KEY is set and the request has no key or a wrong one",
    404: "an unknown item id or snapshot name",
    409: "the pinned snapshot exists but fails verification (a corrupt file, a missing or wrong signature), "
         "so it is not served",
    413: "the request body is larger than HARDNEG_MAX_BODY_BYTES, or k x queries is larger than HARDNEG_MAX_RESULTS",
    503: "no snapshot has been loaded yet",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for ``codes``, each with the :class:`ErrorResponse` body."""
    return {code: {"model": ErrorResponse, "description": _WHY[code]} for code in codes}
