"""Throughput against a running `tandem serve`: completion tokens per second summed over concurrent clients.

    python -m tandem.bench.loadtest --url http://127.0.0.1:8080 --clients 1,4,8 --spec on,off
    python -m tandem.bench.loadtest --soak --minutes 30 --clients 8     (mixed traffic + checks: bench/soak.py)

Each client sends `requests_per_client` completions back to back (bench prompts, temperature 0, ignore_eos so
every request generates exactly max_tokens); throughput = all completion tokens / wall time of the run. Also
reports the mean per-request decode speed and the draft acceptance from the responses' `timings`.
Only the standard library is used (urllib + threads), so it runs wherever the server runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request


def _prompts() -> list[str]:
    from tandem.bench.prompts import PROMPTS
    return [p for ps in PROMPTS.values() for p in ps]


def _post(url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_level(url: str, clients: int, spec: bool | None, *, max_tokens: int = 64, requests_per_client: int = 2,
              api_key: str | None = None, model: str | None = None, timeout: float = 600.0,
              prompts: list[str] | None = None) -> dict:
    """One measurement: `clients` threads, each sending requests_per_client requests. spec=None: server default."""
    prompts = prompts or _prompts()
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests_per_client):
            body = {"prompt": prompts[(c * requests_per_client + r) % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            if model:
                body["model"] = model
            if spec is not None:
                body["speculative"] = {"enabled": spec}
            try:
                res = _post(url.rstrip("/") + "/v1/completions", body, api_key, timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    timings = [r.get("timings", {}) for r in results]
    drafted = sum(t.get("draft_n", 0) for t in timings)
    accepted = sum(t.get("draft_n_accepted", 0) for t in timings)
    per_req = [t["predicted_per_second"] for t in timings if t.get("predicted_per_second")]
    return {
        "clients": clients,
        "speculative": spec,
        "requests": len(results),
        "errors": len(errors),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "mean_request_decode_tok_s": round(sum(per_req) / len(per_req), 2) if per_req else 0.0,
        "draft_n": drafted,
        "draft_n_accepted": accepted,
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "speculative_effective": bool(results and results[0].get("speculative", {}).get("enabled")),
        **({"first_error": errors[0]} if errors else {}),
    }


def run_loadtest(url: str, clients: tuple[int, ...] = (1, 4, 8), spec_modes: tuple[bool | None, ...] = (True, False),
                 warmup: bool = True, **kw) -> list[dict]:
    """Every (spec mode, clients) level in turn; a short warm-up request first."""
    if warmup:
        run_level(url, 1, None, max_tokens=4, requests_per_client=1,
                  **{k: v for k, v in kw.items() if k in ("api_key", "model", "timeout")})
    out = []
    for spec in spec_modes:
        for c in clients:
            out.append(run_level(url, c, spec, **kw))
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'spec':>5} {'clients':>7} {'reqs':>5} {'tokens':>7} {'wall s':>8} {'tok/s':>8} "
             f"{'req tok/s':>9} {'accept':>7}"]
    for r in rows:
        spec = "on" if r["speculative_effective"] else "off"
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(f"{spec:>5} {r['clients']:>7} {r['requests']:>5} {r['completion_tokens']:>7} {r['wall_s']:>8.2f} "
                     f"{r['tokens_per_s']:>8.2f} {r['mean_request_decode_tok_s']:>9.2f} {acc:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels")
    ap.add_argument("--spec", default="on,off", help="comma-separated: on, off, default (the server's)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ap.add_argument("--soak", action="store_true", help="mixed traffic for --minutes, then leak/exactness checks")
    ap.add_argument("--minutes", type=float, default=30.0, help="--soak: how long")
    ap.add_argument("--max-rss-growth", type=float, default=0.05, help="--soak: allowed RSS growth after warm-up")
    a = ap.parse_args(argv)
    if a.soak:
        from tandem.bench.soak import run_soak

        clients = int(a.clients.split(",")[-1])
        report = run_soak(a.url, a.minutes, clients, a.api_key, a.max_tokens, max_rss_growth=a.max_rss_growth)
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    modes = {"on": True, "off": False, "default": None}
    try:
        spec_modes = tuple(modes[s.strip()] for s in a.spec.split(","))
        clients = tuple(int(c) for c in a.clients.split(","))
    except (KeyError, ValueError):
        ap.error("--spec takes on/off/default, --clients integers")
    rows = run_loadtest(a.url, clients, spec_modes, max_tokens=a.max_tokens,
                        requests_per_client=a.requests_per_client, api_key=a.api_key, model=a.model)
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
