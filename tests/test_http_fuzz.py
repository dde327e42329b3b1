"""Property-based fuzzing of the HTTP API from its published OpenAPI document (schemathesis).

Every operation gets generated paths, queries and bodies, sent over loopback HTTP with a
valid key: no answer may be a 5xx, and every answer must match the document (status,
content type, headers, body schema). The budget is small so the suite stays fast.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pml.http.app import openapi_document
from tests.conftest import Stack
from tests.test_http_api import labelled_config

MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
    response_schema_conformance, ignored_auth,
]


@pytest.fixture(scope="module")
def fuzz_headers(stack: Stack, http_base: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fresh account with one model, so list calls answer real items too."""
    client = stack.new_account(tmp_path_factory.mktemp("fuzz-records"))
    client.close()
    headers = {"Authorization": f"Bearer {client.api_key}", "LifeOmic-Account": client.account}
    created = httpx.post(f"{http_base}/v1/patient-ml/models", json=labelled_config(["a", "b"]), headers=headers)
    assert created.status_code == 200, created.text
    return headers


@pytest.fixture(scope="module")
def published_schema(http_base: str) -> Any:
    """The document as a client gets it: fetched from the running server."""
    return schemathesis.openapi.from_url(f"{http_base}/v1/patient-ml/openapi.json")


# One test per operation, listed from the document itself (no server needed to collect them).
# schemathesis's own pytest plugin (`from_fixture`) does not run on pytest 9, so the cases
# come from its Hypothesis strategies under a plain @given.
OPERATIONS = [
    (method.upper(), path) for path, methods in openapi_document()["paths"].items() for method in methods
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p.removeprefix('/v1/patient-ml')}" for m, p in OPERATIONS])
def test_no_call_answers_5xx_and_every_answer_matches_the_document(
    published_schema: Any, http_base: str, fuzz_headers: dict[str, str], method: str, path: str, mode: GenerationMode
) -> None:
    operation = published_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def call(case: Any) -> None:
        case.call_and_validate(base_url=http_base, headers=fuzz_headers, checks=CHECKS)

    call()
