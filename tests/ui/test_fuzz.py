"""Schema fuzzing: `schemathesis` against the app's own OpenAPI schema, every operation.

`python -m ui` (the real server and its middlewares) on a fresh migrated database of the
session's real PostgreSQL, answered by the session's real TorchServe. Each operation gets a few
generated requests (bounded: the whole run is well under a minute); every answer must be no
5xx, a documented status, the documented content type and schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from db.migrate import migrate
from tests.ui.fakes import digit_png
from tests.ui.live import RunningApp
from tests.ui.test_outbox_crash import app_process

pytestmark = pytest.mark.slow

EXAMPLES = 15  # per operation
# Not `positive_data_acceptance`: a schema-valid PNG may be blank or not a digit's picture (400),
# which no schema can say. Everything else: no 5xx, documented statuses, types, headers, schemas,
# and schema-invalid requests refused.
CONFIG = SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {"enabled": False}}})
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def served(postgres: Any, torchserve: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    url: str = postgres.create_database()
    migrate(url)  # as `python -m db migrate` does
    tmp = tmp_path_factory.mktemp("fuzz")
    model = {"TORCHSERVE_KEY_FILE": str(torchserve.key_file), "MANAGEMENT_URL": torchserve.management_url}
    with app_process(tmp, url, torchserve.inference_url, **model) as app:
        # A few rows, so that generated ids sometimes hit one (their images, labels, deletions).
        for kind in ("one", "zero", "one"):
            httpx.post(
                f"{app.url}/api/predictions", content=digit_png(kind), headers={"content-type": "image/png"}
            )
        yield app


@pytest.fixture(scope="module")
def api_schema(served: RunningApp) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json", config=CONFIG)


def operations(schema: schemathesis.BaseSchema) -> list[Any]:
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the schema itself is valid
        found.append(result.ok())
    return found


def test_every_operation_answers_as_documented(
    api_schema: schemathesis.BaseSchema, served: RunningApp
) -> None:
    found = operations(api_schema)
    labels = {op.label for op in found}
    assert {
        "POST /api/predictions",
        "PUT /api/predictions/{prediction_id}/label",
        "GET /api/export",
    } <= labels
    for operation in found:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
        )
        def answers_as_documented(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=served.url)

        answers_as_documented()


def test_the_next_good_request_works(served: RunningApp) -> None:
    response = httpx.post(
        f"{served.url}/api/predictions", content=digit_png("one"), headers={"content-type": "image/png"}
    )
    assert response.status_code == 201, response.text
