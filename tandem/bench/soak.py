"""Soak: mixed traffic against a running `tandem serve` for --minutes, then checks that nothing was lost or leaked.

    python -m tandem.bench.loadtest --soak --minutes 30 --clients 8 --url http://127.0.0.1:8080

Each client loops over random kinds: T=0 completions (speculation on or off, streamed or not), T>0 chat, T=0
multi-turn conversations (each turn resends the conversation with the model's answers appended: prefix-cache hits),
a client that goes away mid-request (non-streaming timeout, or a stream closed after two events), and bad requests
(must be a 4xx). Checks: 0 5xx for valid requests, every bad request a 4xx, every T=0 output identical to the same
request sent alone at the end with `cache_prompt: false` (from scratch), all slots free at the end (/health), and the
server's RSS (/metrics
process_resident_memory_bytes) less the prefix cache's bytes (which grow to their budget by design, checked
separately) at start, after warm-up and at the end (growth after warm-up under --max-rss-growth).
Standard library only, like loadtest.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict

BAD_BODIES = [b'{"prompt": "x", "temperature": -1}', b'{"prompt": "x", "max_tokens": 0}', b'{"prompt": ',
              b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"prompt": "x", "model": "no-such-model"}',
              b'{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}',
              b'[1, 2, 3]', b'{"messages": []}']


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 300.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.headers = {"Content-Type": "application/json", **auth}

    def call(self, path: str, body: dict | bytes | None = None, timeout: float | None = None,
             stream_events: int | None = None) -> tuple[int, object]:
        """(status, parsed JSON | streamed text | raw text). stream_events: close the stream after that many."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers,
                                     method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                if isinstance(body, dict) and body.get("stream"):
                    return r.status, _read_stream(r, stream_events)
                raw = r.read().decode()
                return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def rss(self) -> int | None:
        return self.metric("process_resident_memory_bytes")

    def metric(self, name: str) -> int | None:
        """A gauge of /metrics (the first series of that name), or None."""
        _, text = self.call("/metrics")
        for line in str(text).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return int(float(line.split()[-1]))
        return None

    def held(self) -> tuple[int | None, int]:
        """(RSS less the prefix cache's bytes, the prefix cache's bytes): the cache grows to its budget by design."""
        rss, pc = self.rss(), self.metric("tandem:prefix_cache_bytes") or 0
        return (None if rss is None else rss - pc), pc


def _read_stream(r, stop_after: int | None) -> dict:
    """The streamed text and the number of completion tokens (one per content chunk); errors mark the result."""
    text, n, events = [], 0, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            return {"error": ev["error"]}
        for ch in ev.get("choices", []):
            piece = ch.get("text") or (ch.get("delta") or {}).get("content") or ""
            text.append(piece)
            n += bool(piece)
        events += 1
        if stop_after is not None and events >= stop_after:
            return {"text": "".join(text), "tokens": n, "closed": True}
    return {"text": "".join(text), "tokens": n}


def _t0_body(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def _t0_request(key: tuple[str, str, int]) -> dict:
    """The body of a T=0 request from its key (path, prompt or JSON of the chat messages, max_tokens)."""
    path, text, n = key
    if path == "/v1/chat/completions":
        return {"messages": json.loads(text), "max_tokens": n, "temperature": 0}
    return _t0_body(text, n)


class Soak:
    def __init__(self, client: Client, prompts: list[str], max_tokens: int, seed: int):
        self.c, self.max_tokens = client, max_tokens
        self.prompts = prompts
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.kinds: Counter = Counter()
        self.tokens = 0
        self.server_errors: list[str] = []  # 5xx (or a failed stream) on a valid request
        self.bad_not_4xx: list[str] = []
        self.t0: dict[tuple[str, str, int], set[str]] = defaultdict(set)

    def one(self, rng: random.Random) -> None:
        kind = rng.choice(["t0", "t0", "t0_stream", "sample_chat", "conversation", "disconnect", "disconnect_stream",
                           "bad"])
        prompt, n = rng.choice(self.prompts), rng.choice([8, self.max_tokens])
        spec = {"speculative": {"enabled": rng.random() < 0.5}}
        if kind in ("t0", "t0_stream"):
            status, res = self.c.call("/v1/completions", {**_t0_body(prompt, n), **spec, "stream": kind == "t0_stream"})
            self._valid(kind, status, res, ("/v1/completions", prompt, n))
        elif kind == "sample_chat":
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0.8,
                    "top_p": 0.95, "seed": rng.randrange(1 << 31), **spec}
            self._valid(kind, *self.c.call("/v1/chat/completions", body))
        elif kind == "conversation":
            self.conversation(rng, n, spec)
        elif kind == "disconnect":
            try:
                self.c.call("/v1/completions", {**_t0_body(prompt, self.max_tokens), "ignore_eos": True},
                            timeout=rng.uniform(0.05, 1.0))
            except (TimeoutError, socket.timeout, urllib.error.URLError):
                pass
        elif kind == "disconnect_stream":
            body = {**_t0_body(prompt, self.max_tokens), "ignore_eos": True, "stream": True}
            self._valid(kind, *self.c.call("/v1/completions", body, stream_events=2))
        else:
            status, res = self.c.call("/v1/completions", rng.choice(BAD_BODIES))
            if not 400 <= status < 500:
                with self.lock:
                    self.bad_not_4xx.append(f"{status}: {str(res)[:200]}")
        with self.lock:
            self.kinds[kind] += 1

    def _valid(self, kind: str, status: int, res, key: tuple[str, str, int] | None = None) -> None:
        with self.lock:
            if status >= 500 or (isinstance(res, dict) and "error" in res):
                self.server_errors.append(f"{kind} {status}: {str(res)[:300]}")
                return
            if status != 200:
                self.bad_not_4xx.append(f"valid {kind} answered {status}: {str(res)[:200]}")
                return
            if "usage" in res:
                self.tokens += res["usage"]["completion_tokens"]
                text = res["choices"][0].get("text", res["choices"][0].get("message", {}).get("content"))
            else:
                self.tokens += res["tokens"]
                text = res["text"]
            if key is not None:
                self.t0[key].add(text)

    def conversation(self, rng: random.Random, n: int, spec: dict) -> None:
        """Three T=0 turns; each resends the conversation so far (the model's answers included)."""
        msgs: list[dict] = []
        for _ in range(3):
            msgs.append({"role": "user", "content": rng.choice(self.prompts)})
            key = ("/v1/chat/completions", json.dumps(msgs), n)
            status, res = self.c.call("/v1/chat/completions", {"messages": msgs, "max_tokens": n, "temperature": 0,
                                                                **spec})
            self._valid("conversation", status, res, key)
            if status != 200 or not isinstance(res, dict) or "choices" not in res:
                return
            msgs = msgs + [{"role": "assistant", "content": res["choices"][0]["message"]["content"]}]

    def client_loop(self, until: float, seed: int) -> None:
        rng = random.Random(seed)
        while time.time() < until:
            try:
                self.one(rng)
            except (OSError, ValueError) as e:  # the server closed on us, or sent something unreadable
                with self.lock:
                    self.server_errors.append(f"client error: {type(e).__name__}: {e}")

    def check_alone(self) -> list[dict]:
        """Each T=0 request once more, alone: every output seen under load must equal it."""
        bad = []
        for (path, prompt, n), seen in sorted(self.t0.items()):
            status, res = self.c.call(path, {**_t0_request((path, prompt, n)), "cache_prompt": False})
            choice = res["choices"][0] if status == 200 else {}
            alone = choice["text"] if "text" in choice else choice.get("message", {}).get("content")
            if alone is None or seen != {alone}:
                bad.append({"prompt": prompt[:60], "max_tokens": n, "alone": alone, "under_load": sorted(seen)})
        return bad


def wait_idle(c: Client, timeout: float = 60.0) -> dict:
    deadline, h = time.time() + timeout, {}
    while time.time() < deadline:
        _, h = c.call("/health")
        if h.get("slots_processing") == 0 and h.get("requests_waiting") == 0:
            break
        time.sleep(0.2)
    return h


def run_soak(url: str, minutes: float, clients: int = 8, api_key: str | None = None, max_tokens: int = 32,
             warmup_frac: float = 0.1, max_rss_growth: float = 0.05, prompts: list[str] | None = None,
             seed: int = 0) -> dict:
    from tandem.bench.loadtest import _prompts

    c = Client(url, api_key)
    prompts = prompts or _prompts()[:8]
    soak = Soak(c, prompts, max_tokens, seed)
    t_start = time.time()
    (rss_start, _), end = c.held(), t_start + 60 * minutes
    threads = [threading.Thread(target=soak.client_loop, args=(end, seed * 1000 + i), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, min(60 * minutes * warmup_frac, end - time.time())))
    rss_warm, pc_warm = c.held()
    for t in threads:
        t.join()
    health = wait_idle(c)
    rss_end, pc_end = c.held()
    budget = c.metric("tandem:prefix_cache_budget_bytes")
    mismatches = soak.check_alone()
    growth = (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else None
    report = {"minutes": round((time.time() - t_start) / 60, 2), "requests": sum(soak.kinds.values()),
              "by_kind": dict(soak.kinds), "completion_tokens": soak.tokens,
              "server_errors": len(soak.server_errors), "bad_not_4xx": len(soak.bad_not_4xx),
              "rss_start": rss_start, "rss_warm": rss_warm, "rss_end": rss_end,
              "rss_growth_after_warmup": None if growth is None else round(growth, 4),
              "prefix_cache_bytes": [pc_warm, pc_end], "prefix_cache_budget": budget,
              "t0_requests_checked": len(soak.t0), "t0_identical": len(soak.t0) - len(mismatches),
              "slots_free": health.get("slots_processing") == 0 and health.get("requests_waiting") == 0,
              "first_errors": (soak.server_errors + soak.bad_not_4xx)[:5], "t0_mismatches": mismatches[:5]}
    report["ok"] = (not soak.server_errors and not soak.bad_not_4xx and not mismatches and report["slots_free"]
                    and (growth is None or growth < max_rss_growth) and (budget is None or pc_end <= budget))
    return report
