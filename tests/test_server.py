"""The OpenAI-compatible server on the embedded gemma-3-270m, started for real on 127.0.0.1.

Talks to it with the official `openai` client (sync, streaming, chat, completions) and plain HTTP (timings,
/metrics, error bodies). One module-scoped server; short max_tokens keep the whole file to about a minute.
The server tests do not use its shipped drafter, so speculation uses test_batch.SelfDrafter (the target drafting for
itself, greedy, every third round spoiled): rounds accept several tokens, and some reject.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
N_CTX = 384
MAX_TOKENS_LIMIT = 64
N_SLOTS = 8


class ServerThread:
    """uvicorn in a daemon thread on an already bound 127.0.0.1 socket (free port, no race)."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def default_engine(n_slots: int, max_len: int):
    from tandem.config import SpecConfig
    from tandem.engine.factory import load_engine

    return load_engine("gemma-3-270m", weight_format="bf16", max_len=max_len, n_slots=n_slots, spec=SpecConfig(enabled=False))


@pytest.fixture(scope="module")
def server():
    from tandem.config import SpecConfig
    from tandem.server.app import create_app
    from test_batch import SelfDrafter

    eng = default_engine(n_slots=N_SLOTS, max_len=N_CTX)
    eng.drafter = SelfDrafter(eng.model, N_SLOTS, N_CTX, dtype=eng.cache.dtype)
    eng.spec = SpecConfig(enabled=True, method="test-self", n_max=3)
    app = create_app(eng, api_key=KEY, max_tokens_limit=MAX_TOKENS_LIMIT)
    with ServerThread(app) as srv:
        srv.engine = eng
        srv.model = app.state.tandem.model_id
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body, key=KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=120)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- basics ----------------------------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == N_SLOTS
    card = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert h["drafter"] == card["meta"]["drafter"] == server.engine.describe_drafter()


def test_chat_sync_and_stream_agree(server, client):
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name three colours of the rainbow."}]
    r = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    timings = r.model_extra["timings"]
    assert timings["predicted_n"] == r.usage.completion_tokens

    stream = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[-1].choices[0].finish_reason == c.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in with_choices[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    assert text == c.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_sync_and_stream_agree(server, client):
    kw = dict(model=server.model, prompt="The three primary colours are", max_tokens=10, temperature=0)
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    pieces = []
    last_reason = None
    for ch in client.completions.create(**kw, stream=True):
        assert ch.object == "text_completion"
        pieces.append(ch.choices[0].text)
        last_reason = ch.choices[0].finish_reason or last_reason
    assert "".join(pieces) == r.choices[0].text
    assert last_reason == "length"


def test_raw_sse_format_and_timings(server):
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "speculative": {"n_max": 2, "p_min": 0.5}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    last = events[-3]
    assert last["choices"][0]["finish_reason"] == "length"
    t = last["timings"]
    for k in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second",
              "draft_n", "draft_n_accepted", "draft_acceptance_per_position"):
        assert k in t, k
    assert t["predicted_n"] == 6 and t["prompt_n"] == usage["usage"]["prompt_tokens"]
    assert last["speculative"] == {"enabled": True, "method": "test-self", "n_max": 2, "n_min": 1, "p_min": 0.5}
    assert t["draft_n"] >= 2 and 0 < t["draft_n_accepted"] <= t["draft_n"]
    assert 1 <= len(t["draft_acceptance_per_position"]) <= 2
    # rounds that accept several tokens still stream one chunk per token
    content = [e for e in events[:-2] if e["choices"][0]["text"]]
    assert len(content) == 6

    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                              "speculative": {"enabled": False}})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["timings"]["predicted_n"] == j["usage"]["completion_tokens"]
    assert j["timings"]["prompt_ms"] > 0 and j["speculative"]["enabled"] is False
    assert j["timings"]["draft_n"] == 0 and j["timings"]["draft_acceptance_per_position"] == []


def test_utf8_multibyte_stream(server, client):
    """Streaming deltas concatenate to exactly the non-streamed text (no split characters)."""
    kw = dict(model=server.model, prompt="Les élèves français écrivent: « Ça", max_tokens=16, temperature=0.9,
              seed=7)
    full = client.completions.create(**kw).choices[0].text
    deltas = [ch.choices[0].text for ch in client.completions.create(**kw, stream=True)]
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in full


# -- continuous batching: results do not depend on the batch ---------------------------------------------------------

PROMPTS = ["The quick brown fox", "In 1492, Columbus", "def fibonacci(n):", "My favourite food is",
           "The mitochondria is", "Once upon a time, in a land far away,", "Water boils at", "1, 2, 3, 4,",
           "Dear Sir or Madam,", "The best way to learn a language", "import numpy as np\n", "Paris is the capital of",
           "A haiku about autumn:", "The square root of 144 is", "To be or not to be,", "Roses are red,"]


def _request(i: int) -> dict:
    kw = dict(prompt=PROMPTS[i], max_tokens=4 + (i * 5) % 13, temperature=0)
    if i % 4 == 3:
        kw.update(temperature=0.8, seed=i, top_p=0.9)
    if i % 5 == 2:
        kw.update(stop=[".", "\n"])
    extra = {"speculative": {"enabled": i % 2 == 0}}
    if i % 3 == 1:
        extra["top_k"] = 20
    kw["extra_body"] = extra
    return kw


def _stream_text(server, kw) -> tuple[str, dict]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    stream = c.completions.create(model=server.model, stream=True, stream_options={"include_usage": True}, **kw)
    text, reason, usage, timings = "", None, None, None
    for ch in stream:
        if ch.choices:
            text += ch.choices[0].text
            reason = ch.choices[0].finish_reason or reason
        if ch.usage:
            usage = ch.usage.completion_tokens
            timings = ch.model_extra["timings"]
    return text, {"reason": reason, "n": usage}, timings


def test_16_concurrent_streams_equal_alone(server, client):
    alone = []
    for i in range(16):
        r = client.completions.create(model=server.model, **_request(i))
        alone.append((r.choices[0].text, {"reason": r.choices[0].finish_reason, "n": r.usage.completion_tokens}))
    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda i: _stream_text(server, _request(i)), range(16)))
    together = [r[:2] for r in results]
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a == b, (i, _request(i), a, b)
    spec_on = [r[2] for i, r in enumerate(results) if i % 2 == 0 and r[1]["n"] > 1]
    assert spec_on and all(t["draft_n"] > 0 for t in spec_on)
    assert sum(t["draft_n_accepted"] for t in spec_on) > 0
    assert all(r[2]["draft_n"] == 0 for i, r in enumerate(results) if i % 2 == 1)
    assert httpx.get(server.url + "/health").json()["slots_processing"] == 0


def test_cancelled_stream_frees_slot(server):
    body = {"model": server.model, "prompt": "Count: 1, 2, 3,", "max_tokens": MAX_TOKENS_LIMIT, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        n = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                n += 1
                if n == 3:
                    break
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["slots_processing"] and time.time() < deadline:
        time.sleep(0.05)
    h = httpx.get(server.url + "/health").json()
    assert h["slots_processing"] == 0 and h["requests_waiting"] == 0


def test_loadtest_over_http(server):
    """bench/loadtest.py drives the server over HTTP only: every request answered, tokens and acceptance counted."""
    from tandem.bench.loadtest import format_table, run_loadtest

    rows = run_loadtest(server.url, clients=(2,), spec_modes=(True, False), max_tokens=4, requests_per_client=1,
                        api_key=KEY, model=server.model)
    assert [(r["speculative_effective"], r["requests"], r["errors"]) for r in rows] == [(True, 2, 0), (False, 2, 0)]
    assert all(r["completion_tokens"] == 8 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["draft_n"] > 0 and rows[1]["draft_n"] == 0 and rows[1]["acceptance"] is None
    assert len(format_table(rows).splitlines()) == 3


# -- metrics ---------------------------------------------------------------------------------------------------------

def test_metrics(server, client):
    client.completions.create(model=server.model, prompt="Hello", max_tokens=8, temperature=0)
    assert httpx.get(server.url + "/metrics").status_code == 401  # the API key covers /metrics too
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, v = line.rsplit(" ", 1)
            values[name] = float(v)
    gen = [v for k, v in values.items() if k.startswith("tandem:generation_tokens_total")]
    assert gen and gen[0] >= 3
    for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"):
        assert any(k.startswith("tandem:" + name + "{") for k in values), name
    assert 'tandem:spec_decode_num_accepted_tokens_per_pos{position="0"}' in values
    assert any(k.startswith("tandem:request_success_total") for k in values)
    assert "# TYPE tandem:spec_decode_num_drafts counter" in text
    assert values['tandem:requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    drafts = [v for k, v in values.items() if k.startswith("tandem:spec_decode_num_drafts{")][0]
    accepted = [v for k, v in values.items() if k.startswith("tandem:spec_decode_num_accepted_tokens{")][0]
    assert drafts >= 1 and accepted >= 1
    assert values['tandem:spec_decode_num_accepted_tokens_per_pos{position="0"}'] >= 1
    mem = {k.split("{")[0]: v for k, v in values.items() if k.startswith("tandem:") and "_bytes{" in k}
    assert mem["tandem:kv_cache_bytes"] == server.engine.cache.total_bytes > 0
    assert mem["tandem:peak_rss_bytes"] >= values["process_resident_memory_bytes"] * 0.5 > 0
    assert mem["tandem:drafter_cache_bytes"] >= 0
    if getattr(server.engine, "rss_after_load", None):  # engines from build_engine record it
        assert 0 < mem["tandem:rss_after_load_bytes"] <= mem["tandem:peak_rss_bytes"]


# -- errors: OpenAI-style JSON with the right 4xx; the server stays up -----------------------------------------------

def _err(r, status, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param, e
    if code is not None:
        assert e["code"] == code, e
    return e


def test_error_cases(server, client):
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    _err(post(server, chat, None, raw=b'{"messages": ['), 400)
    _err(post(server, chat, None, raw=b'[1, 2]'), 400)
    _err(post(server, chat, {"messages": msgs, "temperature": "hot"}), 400, "temperature")
    _err(post(server, chat, {"messages": msgs, "temperature": 3}), 400, "temperature")
    _err(post(server, chat, {"messages": msgs, "max_tokens": "10"}), 400, "max_tokens")
    _err(post(server, chat, {"messages": "hi"}), 400, "messages")
    _err(post(server, chat, {}), 400, "messages")
    _err(post(server, chat, {"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role")
    _err(post(server, chat, {"messages": msgs, "speculative": {"n_max": 0}}), 400, "speculative.n_max")
    _err(post(server, chat, {"messages": msgs, "speculative": {"n_max": "3"}}), 400, "speculative.n_max")
    _err(post(server, chat, {"messages": msgs, "speculative": {"p_min": 1.5}}), 400, "speculative.p_min")
    _err(post(server, chat, {"messages": msgs, "speculative": {"enabled": "yes"}}), 400, "speculative.enabled")
    _err(post(server, chat, {"messages": msgs, "speculative": {"bogus": 1}}), 400, "speculative.bogus")
    _err(post(server, chat, {"messages": msgs, "speculative": {"n_max": 2, "n_min": 3}}), 400, "speculative.n_min")
    _err(post(server, chat, {"messages": msgs, "speculative": {"method": "bogus"}}), 400, "speculative.method")
    _err(post(server, chat, {"messages": msgs, "speculative": {"method": "mtp"}}), 400, "speculative.method")
    _err(post(server, chat, {"messages": msgs, "n": 2}), 400, "n")
    e = _err(post(server, chat, {"messages": msgs, "logprobs": True}), 400, "logprobs")
    assert "not supported" in e["message"]
    _err(post(server, "/v1/completions", {"prompt": "x", "logprobs": 2}), 400, "logprobs")
    _err(post(server, chat, {"messages": msgs, "model": "gpt-17"}), 404, "model", "model_not_found")
    _err(post(server, chat, {"messages": msgs, "max_tokens": MAX_TOKENS_LIMIT + 1}), 400, "max_tokens")
    _err(post(server, chat, {"messages": msgs, "max_completion_tokens": 10 ** 9}), 400, "max_completion_tokens")
    _err(post(server, "/v1/completions", {"prompt": "word " * (N_CTX + 10)}), 400, "prompt", "context_length_exceeded")
    _err(post(server, "/v1/completions", {"prompt": "word " * (N_CTX - 40), "max_tokens": 60}), 400, "max_tokens",
         "context_length_exceeded")
    _err(post(server, "/v1/completions", {"prompt": [1, 2, 10 ** 9]}), 400, "prompt")
    _err(post(server, "/v1/completions", {"prompt": []}), 400, "prompt")
    _err(post(server, "/v1/completions", {"prompt": ["a", "b"]}), 400, "prompt")
    _err(post(server, chat, {"messages": msgs}, key="wrong"), 401, code="invalid_api_key")
    _err(post(server, chat, {"messages": msgs}, key=None), 401, code="invalid_api_key")
    _err(httpx.get(server.url + "/v1/nope", headers={"Authorization": f"Bearer {KEY}"}), 404)
    _err(httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=msgs, n=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-a-model", messages=msgs)
    # still serving
    r = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# -- property-based: no input makes the server answer 5xx ------------------------------------------------------------

@pytest.mark.slow
def test_schemathesis_no_server_errors(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})

    failures, statuses = [], {}
    for op_result in schema.get_all_operations():
        op = op_result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if op.method.lower() == "post":  # GETs without parameters have no negative cases
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=20, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=op.as_strategy(mode))
            def run(case):
                body = case.body
                if isinstance(body, dict):  # keep generations short: the point is validation, not decoding
                    for k in ("max_tokens", "max_completion_tokens"):
                        if isinstance(body.get(k), int) and 0 < body[k] <= MAX_TOKENS_LIMIT:
                            body[k] = min(body[k], 3)
                        elif k not in body:
                            body[k] = 2
                resp = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                if resp.status_code >= 500:
                    failures.append((case.method, case.path, body, resp.status_code, resp.text[:300]))
                case.validate_response(resp, checks=[not_a_server_error])

            run()
    print("statuses:", statuses)
    assert not failures, failures
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# -- prefix cache (issue 24) -----------------------------------------------------------------------------------------

def test_prefix_cache_reuse_metrics_and_opt_out(server):
    """A resent conversation reuses its cached prefix (usage.prompt_tokens_details.cached_tokens, timings.cache_n)
    with the same T=0 answer; cache_prompt: false reuses nothing; /metrics counts hits, tokens, bytes."""
    msgs = [{"role": "system", "content": "You answer in one short sentence about prefix caches. " * 6},
            {"role": "user", "content": "What is reused?"}]

    def once(**extra):
        r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    a, b, c = once(), once(), once(cache_prompt=False)
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    assert b["timings"]["cache_n"] == b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert c["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert a["choices"][0]["message"] == b["choices"][0]["message"] == c["choices"][0]["message"]
    _err(post(server, "/v1/chat/completions", {"messages": msgs, "cache_prompt": "no"}), 400)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = {ln.rsplit(" ", 1)[0].split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
              if ln.startswith("tandem:prefix_cache")}
    assert values["tandem:prefix_cache_hits_total"] >= 1
    assert values["tandem:prefix_cache_hit_tokens_total"] >= 64
    assert 0 < values["tandem:prefix_cache_bytes"] <= values["tandem:prefix_cache_budget_bytes"]
    assert values["tandem:prefix_cache_queries_total"] >= 2 and "tandem:prefix_cache_evictions_total" in values
