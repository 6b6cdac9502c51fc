"""Schemathesis against the running server: >= 1000 generated requests (valid and invalid, every operation of the
OpenAPI schema), not one answered 5xx, and the server still healthy and idle afterwards.

The target is a tiny random Gemma 3 with gemma-3-270m's real tokenizer (text prompts and chat templates go
through the real path); max_tokens is capped at 4 by the server so a case costs milliseconds.
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from test_batch import tiny_model  # noqa: E402
from test_server import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "st-key"
EXAMPLES = {"post": 300, "get": 25}  # per operation and generation mode


@pytest.fixture(scope="module")
def server():
    from tandem.engine import Engine
    from tandem.loading import load
    from tandem.server.app import create_app

    loaded = load("gemma-3-270m")
    tok = loaded.tokenizer
    eng = Engine(tiny_model(vocab=tok.vocab_size), tok, max_len=256, n_slots=4)
    app = create_app(eng, loaded=loaded, api_key=KEY, max_tokens_limit=4, max_body_bytes=256 * 1024)
    with ServerThread(app) as srv:
        yield srv


def test_schemathesis_thousand_cases_no_server_error(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    failures, statuses, n_cases = [], {}, 0
    for op_result in schema.get_all_operations():
        op = op_result.ok()
        method = op.method.lower()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if method == "post":
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=EXAMPLES.get(method, 25), deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=op.as_strategy(mode))
            def run(case):
                nonlocal n_cases
                n_cases += 1
                resp = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                if resp.status_code >= 500:
                    failures.append((case.method, case.path, case.body, resp.status_code, resp.text[:300]))
                case.validate_response(resp, checks=[not_a_server_error])

            run()
    print(f"cases: {n_cases}, statuses: {statuses}")
    assert not failures, failures[:5]
    assert n_cases >= 1000
    assert statuses.get(200, 0) > 50  # valid generations ran, not only rejections
    deadline = time.time() + 30
    while (h := httpx.get(server.url + "/health").json())["slots_processing"] and time.time() < deadline:
        time.sleep(0.2)
    assert h["status"] == "ok" and h["slots_processing"] == 0
