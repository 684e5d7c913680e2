"""Settings of the hardneg HTTP service, read from ``HARDNEG_*`` environment variables.

``hardneg serve`` writes its command-line flags into the same variables before it
starts uvicorn, so a flag overrides the environment and every uvicorn worker
process reads one consistent configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Configuration of one api process. Every field is read from ``HARDNEG_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="HARDNEG_", extra="ignore", frozen=True)

    store: Path | None = Field(None, description="snapshot store folder; required to serve")
    api_key: SecretStr | None = Field(
        None, description="when set, every route except /healthz and /readyz needs this key "
                          "(Authorization: Bearer KEY or X-API-Key: KEY)")
    metrics_open: bool = Field(
        False, description="serve /metrics without the API key (for a scraper that cannot send one); "
                           "off by default because metrics name snapshots and routes")
    store_key: SecretStr | None = Field(
        None, description="the store key the publisher signs snapshots with (HMAC-SHA256 of each manifest); "
                          "with it, unsigned or badly signed snapshots are refused before any file is parsed")
    trust_store: bool = Field(
        False, description="load model.pt2 (which can run code) from an unsigned store; without a store key "
                           "and without this, raw `inputs` queries are refused and models are never loaded")
    max_k: int = Field(1000, ge=1, description="largest k a request may ask for")
    # 100k neighbours are ~5 MB of JSON; 1024 queries x k=1000 would be ~53 MB and +315 MB of peak RSS.
    max_results: int = Field(100_000, ge=1, description="most neighbours one request may ask for (k x queries; POST /mine: anchors x num_negatives)")
    max_batch: int = Field(1024, ge=1, description="most queries in one POST /neighbors")
    # 1024 queries of 768 floats as JSON text is ~15 MiB; 32 MiB leaves room without
    # letting one client make the server buffer arbitrary amounts.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest request body, in bytes")
    poll_seconds: float = Field(1.0, gt=0, description="how often LATEST is checked for a new snapshot")
    # A snapshot that fails validation is retried when LATEST changes or after this long,
    # never in a hot loop (a corrupt 1 GB index would otherwise be hashed every poll).
    retry_seconds: float = Field(30.0, gt=0, description="back-off before retrying a snapshot that failed to load")
    search_lanes: int = Field(default_factory=available_cores, ge=1,
                              description="searches that may run at once, each on its own thread")
    omp_threads: int | None = Field(
        None, ge=1, description="FAISS OpenMP threads per search; default cores // (lanes x workers)")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each holds its own copy of the snapshot)")
    pin_cache: int = Field(2, ge=0, description="older snapshots kept loaded for requests that pin one by name")
    access_log: bool = Field(True, description="log one line per request")
    # uvicorn closes idle keep-alive connections after timeout_keep_alive, but has no limit on a new connection
    # that sends nothing or trickles its headers or body; hardneg serve adds this one (see hardneg.api.server).
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="a client must send a whole request (headers and body) within this long "
                                "of connecting or of its previous response")
    keepalive_seconds: int = Field(5, ge=1, description="idle keep-alive connections are closed after this long")
    # An audit or drift request is a full pass over the snapshot (all-pairs on flat): ~1 s per 20k items here.
    audit_max_items: int = Field(200_000, ge=2, description="largest snapshot the /audit and /drift routes audit")

    @field_validator("api_key", "store_key")
    @classmethod
    def _empty_key_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        # HARDNEG_API_KEY= (empty) in a compose file means "no key", not "the empty key".
        return v if v is not None and v.get_secret_value() else None

    @property
    def faiss_threads(self) -> int:
        """OpenMP threads for each FAISS call, so that lanes x threads x workers does not exceed the cores."""
        if self.omp_threads is not None:
            return self.omp_threads
        return max(1, available_cores() // (self.search_lanes * self.workers))

    @property
    def store_key_bytes(self) -> bytes | None:
        return self.store_key.get_secret_value().encode() if self.store_key is not None else None

    @property
    def loads_models(self) -> bool:
        """Whether model.pt2 may be loaded: signed snapshots (a store key) or a store the operator trusts."""
        return self.store_key is not None or self.trust_store
