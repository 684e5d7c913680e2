"""``hardneg serve``: run the HTTP API on a snapshot store with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pydantic

from hardneg.api.settings import Settings
from hardneg.miner.errors import ValidationError

# flag -> Settings field; each given flag is written to HARDNEG_<FIELD>, so flags override the environment
# and uvicorn's worker processes (which re-import the app) see the same settings.
_FLAG_FIELDS = ("store", "max_k", "max_batch", "max_body_bytes", "poll_seconds", "retry_seconds", "search_lanes",
                "omp_threads", "workers", "pin_cache", "metrics_open", "access_log", "max_results", "trust_store",
                "request_timeout_seconds", "keepalive_seconds")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve", help="serve /neighbors search over the newest snapshot of a store, reloading as new ones appear",
        description="Serve the hardneg HTTP API. Every flag can also be given as a HARDNEG_* environment variable "
                    "(e.g. HARDNEG_MAX_K); a flag wins over the environment. The API key and the store key are "
                    "read only from HARDNEG_API_KEY and HARDNEG_STORE_KEY, never from a flag, so that they do not "
                    "show in the process list.")
    s.add_argument("--store", type=Path, help="snapshot store folder (env HARDNEG_STORE)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, help="uvicorn worker processes, each with its own snapshot copy (default 1)")
    s.add_argument("--lanes", dest="search_lanes", type=int, metavar="N", help="searches run at once per worker (default: cores)")
    s.add_argument("--omp-threads", type=int, help="FAISS threads per search (default: cores // (lanes x workers))")
    s.add_argument("--max-k", type=int, help="largest k accepted (default 1000)")
    s.add_argument("--max-batch", type=int, help="most queries per request (default 1024)")
    s.add_argument("--max-body-bytes", type=int, help="largest request body (default 32 MiB)")
    s.add_argument("--max-results", type=int, help="most neighbours per request, k x queries (default 100000)")
    s.add_argument("--request-timeout", dest="request_timeout_seconds", type=float, metavar="SECONDS",
                   help="a request's headers and body must arrive within this long (default 30)")
    s.add_argument("--keepalive", dest="keepalive_seconds", type=int, metavar="SECONDS",
                   help="idle keep-alive connections are closed after this long (default 5)")
    s.add_argument("--trust-store", action="store_const", const=True,
                   help="load model.pt2 files from an unsigned store (loading a model runs code from the store)")
    s.add_argument("--poll-seconds", type=float, help="how often LATEST is checked (default 1.0)")
    s.add_argument("--retry-seconds", type=float, help="back-off before retrying a failed snapshot (default 30)")
    s.add_argument("--pin-cache", type=int, help="older snapshots kept loaded for pinned requests (default 2)")
    s.add_argument("--metrics-open", action="store_const", const=True, help="serve /metrics without the API key")
    s.add_argument("--no-access-log", dest="access_log", action="store_const", const=False,
                   help="do not log one line per request")
    s.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Write the given flags into ``HARDNEG_*`` variables and read the settings back (flags win)."""
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"HARDNEG_{name.upper()}"] = str(value)
    try:
        settings = Settings()
    except pydantic.ValidationError as e:
        problems = "; ".join(f"HARDNEG_{'.'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors())
        raise ValidationError(f"invalid settings: {problems}") from None
    if settings.store is None:
        raise ValidationError("no snapshot store: pass --store DIR or set HARDNEG_STORE")
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from_args(args)
    # The factory string (not an app object) lets uvicorn start several workers.
    from hardneg.api.server import PROTOCOL

    uvicorn.run("hardneg.api.main:create_app", factory=True, host=args.host, port=args.port,
                workers=settings.workers, access_log=settings.access_log, http=PROTOCOL,
                timeout_keep_alive=settings.keepalive_seconds,
                log_config=_log_config(logging.getLogger().getEffectiveLevel()))
    return 0


def _log_config(level: int) -> dict:
    """One stderr format for hardneg and uvicorn, applied again in every worker process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": logging.getLevelName(level)},
    }
