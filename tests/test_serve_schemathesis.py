"""Property-based requests generated from the daemon's own OpenAPI schema: never a 5xx."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edge_runtime  # noqa: E402
from edge_runtime.pack.convert import convert  # noqa: E402
from edge_runtime.serve.app import create_app  # noqa: E402
from tests.helpers import make_llama  # noqa: E402


def _app():
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="schemathesis-"))
    make_llama(root / "hf", act="relu", seed=41)
    convert(root / "hf", root / "p", "int8", progress=False)
    rt = edge_runtime.load(root / "p", backend="cpu", max_context=128)
    rt.set_sparsity(1.05)
    return create_app(rt, max_queue=4, max_tokens_limit=24)


pytest.importorskip("torch")
schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])


def test_report_cases():
    """Its own 60 generated cases over every operation: counts them by status (pytest -s prints it) and
    checks that generation reached both the success and the refusal paths, with no 5xx."""
    operations = [result.ok() for result in schema.get_all_operations()]
    by_status: dict[int, int] = {}

    @given(case=st.one_of([op.as_strategy() for op in operations]))
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        status = case.call().status_code
        by_status[status] = by_status.get(status, 0) + 1

    run()
    print(f"schemathesis cases run: {sum(by_status.values())}, by status: {by_status}")
    assert sum(by_status.values()) >= 60
    assert max(by_status) < 500
    assert any(200 <= s < 300 for s in by_status) and any(400 <= s < 500 for s in by_status)
