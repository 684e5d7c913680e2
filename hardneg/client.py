"""A Python client for the hardneg HTTP service: ``/neighbors``, ``/mine`` and ``/snapshot``, sync and async.

::

    from hardneg.client import Client
    with Client("http://localhost:8000", api_key="...") as hn:
        res = hn.mine(vectors=q, positives=[[12, 40], [7]], strategy="window", num_negatives=5,
                      range_min=2, range_max=30, relative_margin=0.05)
        ids = [[n["id"] for n in r["negatives"]] for r in res["results"]]

Arrays (numpy or torch) are sent as lists. A 503 (the service has no snapshot loaded yet) is retried
until ``ready_timeout`` has passed; any other error raises :class:`HardnegError` with the status and the
service's message, which says what was wrong and what is accepted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx


class HardnegError(RuntimeError):
    """The service refused a request: ``status`` is the HTTP status, ``detail`` its message (or 422 error list)."""

    def __init__(self, method: str, path: str, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        if isinstance(detail, list):  # FastAPI's 422 list: one "where: what" per error
            detail = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in detail
                               if isinstance(e, dict)) or str(detail)
        super().__init__(f"{method} {path} answered {status}: {detail}")


class NotReadyError(HardnegError):
    """The service still had no snapshot when ``ready_timeout`` ran out."""


def _plain(value: Any) -> Any:
    """numpy / torch arrays and scalars as JSON-able Python values."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return value.tolist() if hasattr(value, "tolist") else value


def _body(**fields: Any) -> dict:
    return {k: _plain(v) for k, v in fields.items() if v is not None}


def _result(method: str, path: str, r: httpx.Response) -> Any:
    if r.status_code == 200:
        return r.json()
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    cls = NotReadyError if r.status_code == 503 else HardnegError
    raise cls(method, path, r.status_code, detail)


def _wait(r: httpx.Response, interval: float) -> float:
    """Seconds to wait before retrying a 503: its Retry-After (when a number), at most ``interval`` x 4."""
    try:
        return min(float(r.headers.get("retry-after", interval)), 4 * interval)
    except ValueError:
        return interval


class _Base:
    def __init__(self, base_url: str, api_key: str | None, ready_timeout: float, retry_interval: float) -> None:
        if ready_timeout < 0 or retry_interval <= 0:
            raise ValueError(f"ready_timeout must be >= 0 and retry_interval > 0, got {ready_timeout}, {retry_interval}")
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.ready_timeout, self.retry_interval = ready_timeout, retry_interval


class Client(_Base):
    """Blocking client.

    Args:
        base_url: e.g. ``http://localhost:8000``.
        api_key: the service's ``HARDNEG_API_KEY``, when it has one.
        timeout: seconds per HTTP request.
        ready_timeout: how long 503 answers (no snapshot yet) are retried before :class:`NotReadyError`.
        retry_interval: seconds between those retries (the service's Retry-After is honoured up to 4x this).
        transport: an ``httpx`` transport (tests: ``httpx.ASGITransport``/``MockTransport``).
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 ready_timeout: float = 30.0, retry_interval: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, ready_timeout, retry_interval)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport)

    def _call(self, method: str, path: str, json: dict | None = None) -> Any:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            r = self._http.request(method, path, json=json)
            if r.status_code != 503 or time.monotonic() >= deadline:
                return _result(method, path, r)
            time.sleep(min(_wait(r, self.retry_interval), max(0.0, deadline - time.monotonic())))

    def neighbors(self, *, vectors: Any = None, ids: Any = None, inputs: Any = None, labels: Any = None, k: int = 10,
                  **options: Any) -> dict:
        """``POST /neighbors``: ``{"snapshot", "results": [[{id, label, distance}, ...], ...]}``."""
        return self._call("POST", "/neighbors", _body(vectors=vectors, ids=ids, inputs=inputs, labels=labels, k=k,
                                                      **options))

    def mine(self, *, vectors: Any = None, ids: Any = None, inputs: Any = None, positives: Any = None,
             labels: Any = None, **options: Any) -> dict:
        """``POST /mine``: ``{"snapshot", "results": [{"positive", "negatives": [{id, label, distance, score}]}],
        "stats"}``; ``options`` are the request's fields (strategy, num_negatives, range_min, ...)."""
        return self._call("POST", "/mine", _body(vectors=vectors, ids=ids, inputs=inputs, positives=positives,
                                                 labels=labels, **options))

    def snapshot(self) -> dict:
        """``GET /snapshot``: the served snapshot's manifest."""
        return self._call("GET", "/snapshot")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The same as :class:`Client`, with ``async`` methods (``await hn.mine(...)``)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 ready_timeout: float = 30.0, retry_interval: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, ready_timeout, retry_interval)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       transport=transport)

    async def _call(self, method: str, path: str, json: dict | None = None) -> Any:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            r = await self._http.request(method, path, json=json)
            if r.status_code != 503 or time.monotonic() >= deadline:
                return _result(method, path, r)
            await asyncio.sleep(min(_wait(r, self.retry_interval), max(0.0, deadline - time.monotonic())))

    async def neighbors(self, *, vectors: Any = None, ids: Any = None, inputs: Any = None, labels: Any = None,
                        k: int = 10, **options: Any) -> dict:
        """``POST /neighbors`` (see :meth:`Client.neighbors`)."""
        return await self._call("POST", "/neighbors", _body(vectors=vectors, ids=ids, inputs=inputs, labels=labels,
                                                            k=k, **options))

    async def mine(self, *, vectors: Any = None, ids: Any = None, inputs: Any = None, positives: Any = None,
                   labels: Any = None, **options: Any) -> dict:
        """``POST /mine`` (see :meth:`Client.mine`)."""
        return await self._call("POST", "/mine", _body(vectors=vectors, ids=ids, inputs=inputs, positives=positives,
                                                       labels=labels, **options))

    async def snapshot(self) -> dict:
        return await self._call("GET", "/snapshot")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


