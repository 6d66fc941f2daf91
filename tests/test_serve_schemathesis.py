"""Property-based requests generated from the daemon's own OpenAPI schema: never a 5xx."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

import edge_runtime  # noqa: E402
from edge_runtime.pack.convert import convert  # noqa: E402
from edge_runtime.serve.app import create_app  # noqa: E402
from tests.helpers import make_llama  # noqa: E402

CASES = {"run": 0, "by_status": {}}


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
    CASES["run"] += 1
    CASES["by_status"][response.status_code] = CASES["by_status"].get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])


def test_report_cases():
    """Prints how many generated cases ran (pytest -s shows it); runs after the property tests."""
    print(f"schemathesis cases run: {CASES['run']}, by status: {CASES['by_status']}")
    assert CASES["run"] >= 40
