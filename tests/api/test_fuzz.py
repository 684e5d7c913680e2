"""Schema-driven fuzzing (schemathesis, on hypothesis) of the real uvicorn process: no input may give a 5xx.

Every operation of the service's own OpenAPI schema is called with generated requests, valid and invalid,
and every answer must be below 500 and conform to the schema: a documented status code, the documented
content type and a body that validates against its response model. Bounded: ``FUZZ_EXAMPLES`` cases per
operation (default 60), seeded so that a run is repeatable; the number of cases and of 5xx answers
is printed at the end of the run (tests/api/conftest.py).
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from api_support import API_KEY, FUZZ_STATUSES, LIMITS, ApiServer
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from hardneg.api.main import create_app
from hardneg.api.settings import Settings

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _app_schema() -> dict:
    """The OpenAPI schema of an app with the live server's settings (built here: parametrizing needs it at import).

    schemathesis' lazy loader from a fixture reads a private pytest attribute that pytest 9 no longer has;
    test_the_fuzzed_schema_is_the_servers shows this is the schema the server serves.
    """
    return create_app(Settings(store="unused", api_key=API_KEY, **LIMITS)).openapi()


schema = schemathesis.openapi.from_dict(_app_schema())
schema.config.seed = 12  # each operation draws from a seed derived from this one: runs repeat


def test_the_fuzzed_schema_is_the_servers(live_server: ApiServer) -> None:
    served = httpx.get(f"{live_server.url}/openapi.json", headers=AUTH).json()
    assert served == _app_schema()
    assert {"/neighbors", "/neighbors/{item_id}", "/snapshot", "/healthz", "/readyz", "/metrics"} <= set(served["paths"])


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_no_generated_request_gives_a_5xx_or_breaks_the_schema(case, live_server: ApiServer) -> None:
    response = case.call(base_url=live_server.url, headers=AUTH, timeout=30)
    FUZZ_STATUSES[response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


def test_every_operation_was_fuzzed_with_many_cases() -> None:
    """Runs after the fuzz cases (pytest keeps the module's order): they really ran, and none answered 5xx."""
    if not FUZZ_STATUSES:
        pytest.skip("the fuzz cases were deselected")
    assert sum(FUZZ_STATUSES.values()) >= 6 * min(EXAMPLES, 20)
    assert not [s for s in FUZZ_STATUSES if s >= 500]
