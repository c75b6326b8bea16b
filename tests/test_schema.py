"""The server held to its own OpenAPI schema (issue 14, part 4): schemathesis generates requests for every
operation in /openapi.json of a running `bgesmall serve` (a subprocess on 127.0.0.1, API key on) and checks
each answer: no 5xx, a documented status code and content type, and a body that matches the documented
schema (errors in OpenAI's {"error": {...}} shape included).

The budget is BGESMALL_SCHEMA_EXAMPLES generated cases per operation and authorization (default 25: a short
fixed budget for CI); the recorded run used 150 (see tests/fuzz/README.md).
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("httpx")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import KEY, NAME, start_serve  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("BGESMALL_SCHEMA_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
CASES: list[tuple[str, int]] = []  # (operation, status) of every case sent


@pytest.fixture(scope="module")
def served():
    proc, base = start_serve(["--model-name", NAME, "--api-key", KEY, "--log-level", "warning",
                              "--max-request-bytes", str(1 << 20)])
    yield base
    proc.terminate()
    output = proc.communicate(timeout=60)[0].decode()
    statuses = sorted({s for _, s in CASES})
    print(f"\nschemathesis: {len(CASES)} cases over {len({op for op, _ in CASES})} operations, statuses {statuses}")
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(served + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _check(case, served, headers):
    response = case.call_and_validate(base_url=served, headers=headers, checks=CHECKS, timeout=120)
    CASES.append((case.operation.label, response.status_code))
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_to_its_schema(case, served):
    _check(case, served, {"Authorization": f"Bearer {KEY}"})


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_to_its_schema_without_the_key(case, served):
    _check(case, served, {})
