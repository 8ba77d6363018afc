"""schemathesis against the service's own OpenAPI schema: generated requests, valid and not, never get a 5xx,
and every answer matches the schema it documents (status codes, content types, bodies).

Driven through hypothesis directly: schemathesis' pytest plugin does not load under this pytest.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from indexing import IndexConfig, SnapshotClient, build_snapshot, publish
from indexing.service import create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, run):
    root = str(tmp_path_factory.mktemp("schema"))
    publish(root, build_snapshot(run, root, IndexConfig(queries=50))["snapshot_id"])
    client = SnapshotClient(root)
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(client, max_body_bytes=64 * 1024))
    client.close()


def test_the_api_holds_to_its_schema(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {"GET /similar/{item_id}", "POST /similar"}
    for operation in operations:
        # A query vector's length is the served snapshot's dimension, which changes with hot swaps and so
        # cannot be in a static schema: a wrong length is a documented 422 (test_service.py), not a schema bug.
        _check(operation, [positive_data_acceptance] if operation.method.upper() == "POST" else [])


def _check(operation, excluded: list) -> None:
    @given(operation.as_strategy())
    @settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(excluded_checks=excluded)

    check()
