"""schemathesis against every route of the app's OpenAPI schema (issue 18).

The schema is ``openherd.server.schema.openapi(app)``: FastAPI's paths and parameters
plus every request body (protocol.py's models, the web/persona/job bodies). Each of its
~50 operations gets positive (schema-valid) and negative (schema-violating) cases, run
in-process against an app serving the tiny generated model, with these properties:

* no 5xx, for any input;
* no traceback and no filesystem path in any response body;
* every response within RESPONSE_SECONDS;
* afterwards, /health and a normal chat still work.

A stateful phase follows the schema's links (create a persona or a conversation, then
use, rename, export and delete it by the id the create returned).

Bounded by default (CI): ``derandomize=True`` (a fixed seed) and EXAMPLES examples per
operation, about a minute in all. The long run, for developers::

    HERD_FUZZ_EXAMPLES=500 pytest -m fuzz_long tests/test_fuzz_schemathesis.py

(``-m fuzz_long`` selects ``test_fuzz_long``, which runs the same checks with
HERD_FUZZ_EXAMPLES examples per operation, 300 unless set, and a random seed.)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from server_helpers import MODEL, register_model
from starlette.testclient import TestClient

from openherd.server.app import build_app
from openherd.server.schema import openapi
from openherd.settings import Settings

pytestmark = pytest.mark.timeout(900)

EXAMPLES = 12  # per operation, in CI: 50 operations x 12 = 600 requests, about a minute
STATEFUL_EXAMPLES = 15  # scenarios of up to 6 linked calls
LONG_EXAMPLES = int(os.environ.get("HERD_FUZZ_EXAMPLES", "300"))
RESPONSE_SECONDS = 20.0  # the slowest case seen, n=8 chats to the 256-token context, took ~4 s
# A path on this machine (the test's HERD_HOME, the checkout, site-packages) in a body.
_PATH = re.compile(r"(/tmp/|/home/|/root/|/usr/|site-packages|\.py\b)")


@pytest.fixture(scope="session")
def fuzz_app(tmp_path_factory, serve_gguf):
    home = tmp_path_factory.mktemp("fuzz-http") / "home"
    register_model(home, serve_gguf)
    # Pulls must fail fast and offline: no index, no hub.
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
    settings_ = Settings(
        home=home, threads=1, allowed_origins=("testserver",), pypi_index="http://127.0.0.1:9/simple",
        num_ctx=256, num_parallel=2,  # small: a fuzzed n=8, max_tokens=huge chat stays quick
    )
    app = build_app(settings_)
    app.state.fuzz_home = home
    return app


def _schema() -> schemathesis.schemas.BaseSchema:
    # The operations do not depend on HERD_HOME, so the schema comes from an app over an
    # empty one; the requests go to fuzz_app. (schemathesis.pytest.from_fixture would
    # defer this, but fails under pytest 9: it reads Function._nodeid.)
    home = Path(tempfile.mkdtemp(prefix="herd-schema-"))
    try:
        return schemathesis.openapi.from_dict(openapi(build_app(Settings(home=home))))
    finally:
        shutil.rmtree(home, ignore_errors=True)


schema = _schema()


def check_response(case, app) -> None:
    t0 = time.monotonic()
    response = case.call(app=app)
    check(case, response, time.monotonic() - t0, app.state.fuzz_home)


def check(case, response, elapsed: float, home: Path) -> None:
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:500]}"
    text = response.text if "event-stream" not in response.headers.get("content-type", "") else response.text[:20000]
    assert "Traceback" not in text, f"{where}: {text[:500]}"
    assert str(home) not in text and not _PATH.search(text), f"{where} leaks a path: {text[:500]}"
    assert elapsed < RESPONSE_SECONDS, f"{where} took {elapsed:.1f}s"


_SETTINGS = dict(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    database=None,
)


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, **_SETTINGS)
def test_fuzz(case, fuzz_app):
    check_response(case, fuzz_app)


@pytest.mark.fuzz_long
@schema.parametrize()
@settings(max_examples=LONG_EXAMPLES, **_SETTINGS)
def test_fuzz_long(case, fuzz_app):
    check_response(case, fuzz_app)


def _stateful(fuzz_app, examples: int, derandomize: bool) -> None:
    """create -> use -> delete chains over the schema's links (personas, conversations)."""
    home = fuzz_app.state.fuzz_home

    class Workflow(schema.as_state_machine()):
        def call(self, case, **kwargs):
            t0 = time.monotonic()
            response = case.call(app=fuzz_app, **kwargs)
            self.elapsed = time.monotonic() - t0
            return response

        def validate_response(self, response, case, **kwargs):
            check(case, response, self.elapsed, home)

    Workflow.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=6, derandomize=derandomize, **_SETTINGS
    )
    Workflow.TestCase().runTest()


def test_fuzz_stateful(fuzz_app):
    _stateful(fuzz_app, STATEFUL_EXAMPLES, derandomize=True)


@pytest.mark.fuzz_long
def test_fuzz_stateful_long(fuzz_app):
    _stateful(fuzz_app, LONG_EXAMPLES, derandomize=False)


def test_health_and_chat_still_work_after_fuzzing(fuzz_app):
    """Runs after the fuzz tests in this module (pytest keeps file order)."""
    c = TestClient(fuzz_app, base_url="http://127.0.0.1:11435")  # no lifespan: the fuzz run started it
    assert c.get("/health").json()["status"] == "ok"
    r = c.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    assert c.get("/v1/personas").status_code == 200
    assert c.get("/v1/conversations").status_code == 200
