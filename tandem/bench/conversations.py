"""Multi-turn chat replay against a running `tandem serve`: time to first token per turn with and without the
prefix cache.

    python -m tandem.bench.conversations --url http://127.0.0.1:8080 --clients 1,4,8

Conversations: ShareGPT V3 ones with >= --turns user turns from the evaluation side of tandem.sharegpt.split (the
~534 reserved by shared/eval-exclude; nothing is trained here, and the reserved side is what measurements use).
Each client replays its conversations turn by turn: the user turns of the dataset (cut to --max-user-chars), each
sent with the model's own previous answers appended (streamed chat completions, T=0, --max-tokens per answer).
Every level runs its conversations twice: first with `cache_prompt: false` (nothing reused, nothing stored), then
with the cache; each level takes its own conversations, so no level reuses another's prefixes. Reports per turn the
mean client-side TTFT of both, their ratio, the prefix hit rate (usage.prompt_tokens_details.cached_tokens /
prompt_tokens), completion tokens/s, and whether every T=0 answer was identical in both runs.
Only the standard library talks to the server; traffic goes to --url only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request


def load_conversations(path: str, turns: int, max_chars: int, min_chars: int = 0) -> list[list[str]]:
    """User turns (cut to max_chars) of the eval-reserved conversations with at least `turns` of them, whose first
    `turns` user turns (cut) hold at least min_chars characters."""
    from tandem.sharegpt import split
    _, held = split(path)
    out = []
    for c in held:
        users = [m["content"][:max_chars] for m in c.messages if m["role"] == "user" and m["content"].strip()]
        if len(users) >= turns and sum(len(u) for u in users[:turns]) >= min_chars:
            out.append(users[:turns])
    return out


def chat_turn(url: str, messages: list[dict], max_tokens: int, cache: bool, timeout: float) -> dict:
    """One streamed chat completion: {ttft_s, total_s, text, usage, error}."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": cache}
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for ch in chunk.get("choices", []):
                    piece = ch.get("delta", {}).get("content") or ""
                    if ttft is None and (piece or ch.get("finish_reason")):  # not the role chunk sent at once
                        ttft = time.perf_counter() - t0
                    parts.append(piece)
                usage = chunk.get("usage") or usage
    except urllib.error.HTTPError as e:
        return {"error": f"HTTP {e.code}: {e.read()[:200]!r}"}
    except (urllib.error.URLError, OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "text": "".join(parts), "usage": usage or {}}


def replay(url: str, convs: list[list[str]], clients: int, cache: bool, max_tokens: int,
           timeout: float) -> tuple[list[list[dict]], float]:
    """Every conversation (clients at a time); -> (per conversation, its turns' results), wall seconds."""
    results: list[list[dict]] = [[] for _ in convs]
    todo = list(range(len(convs)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            messages: list[dict] = []
            for user in convs[i]:
                messages.append({"role": "user", "content": user})
                res = chat_turn(url, messages, max_tokens, cache, timeout)
                results[i].append(res)
                if "error" in res:
                    break  # e.g. the conversation outgrew the context: its later turns are not sent
                messages.append({"role": "assistant", "content": res["text"]})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarize(clients: int, off: list[list[dict]], on: list[list[dict]], wall: dict[str, float]) -> dict:
    n_turns = max(len(r) for r in off + on)
    per_turn = []
    for t in range(n_turns):
        pairs = [(a[t], b[t]) for a, b in zip(off, on) if len(a) > t and len(b) > t
                 and "error" not in a[t] and "error" not in b[t]]
        if not pairs:
            continue
        ttft_off = sum(a["ttft_s"] for a, _ in pairs) / len(pairs)
        ttft_on = sum(b["ttft_s"] for _, b in pairs) / len(pairs)
        prompt = sum(b["usage"].get("prompt_tokens", 0) for _, b in pairs)
        hit = sum(b["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for _, b in pairs)
        per_turn.append({"turn": t + 1, "n": len(pairs), "mean_prompt_tokens": round(prompt / len(pairs), 1),
                         "ttft_off_s": round(ttft_off, 4), "ttft_on_s": round(ttft_on, 4),
                         "speedup": round(ttft_off / ttft_on, 2) if ttft_on else None,
                         "hit_rate": round(hit / prompt, 4) if prompt else 0.0})
    late = [p for p in per_turn if p["turn"] >= 3]
    off3 = sum(p["ttft_off_s"] * p["n"] for p in late)
    on3 = sum(p["ttft_on_s"] * p["n"] for p in late)
    toks = {k: sum(r["usage"].get("completion_tokens", 0) for c in rs for r in c if "error" not in r)
            for k, rs in (("off", off), ("on", on))}
    same = [a["text"] == b["text"] for x, y in zip(off, on) for a, b in zip(x, y)
            if "error" not in a and "error" not in b]
    errors = [r["error"] for c in off + on for r in c if "error" in r]
    return {"clients": clients, "conversations": len(on), "per_turn": per_turn,
            "ttft_speedup_from_turn3": round(off3 / on3, 2) if on3 else None,
            "tokens_per_s_off": round(toks["off"] / wall["off"], 2), "tokens_per_s_on": round(toks["on"] / wall["on"], 2),
            "answers_compared": len(same), "answers_identical": sum(same), "errors": len(errors),
            **({"first_error": errors[0]} if errors else {})}


def format_report(rep: dict) -> str:
    lines = [f"clients {rep['clients']}, {rep['conversations']} conversations: TTFT from turn 3 "
             f"{rep['ttft_speedup_from_turn3']}x lower with the cache; tok/s off {rep['tokens_per_s_off']} on "
             f"{rep['tokens_per_s_on']}; T=0 answers identical {rep['answers_identical']}/{rep['answers_compared']};"
             f" errors {rep['errors']}",
             f"{'turn':>5} {'n':>3} {'prompt':>7} {'ttft off':>9} {'ttft on':>8} {'speedup':>8} {'hit rate':>9}"]
    for p in rep["per_turn"]:
        lines.append(f"{p['turn']:>5} {p['n']:>3} {p['mean_prompt_tokens']:>7} {p['ttft_off_s']:>9.3f} "
                     f"{p['ttft_on_s']:>8.3f} {p['speedup']!s:>8} {p['hit_rate']:>9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.conversations", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--sharegpt", default="/work/models/sharegpt/", help="ShareGPT V3 JSON (or its directory)")
    ap.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels")
    ap.add_argument("--conversations", type=int, default=0, help="per level (default: as many as clients, >= 2)")
    ap.add_argument("--turns", type=int, default=4, help="user turns replayed per conversation (>= 3)")
    ap.add_argument("--max-tokens", type=int, default=48, help="answer length per turn")
    ap.add_argument("--max-user-chars", type=int, default=1200, help="each user turn cut to this many characters")
    ap.add_argument("--min-chars", type=int, default=0,
                    help="only conversations whose replayed user turns hold at least this many characters")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    a = ap.parse_args(argv)
    try:
        levels = [int(c) for c in a.clients.split(",")]
    except ValueError:
        ap.error("--clients takes comma-separated integers")
    if a.turns < 3 or any(c < 1 for c in levels):
        ap.error("--turns must be >= 3 and every --clients level >= 1")
    convs = load_conversations(a.sharegpt, a.turns, a.max_user_chars, a.min_chars)
    per = [a.conversations or max(2, c) for c in levels]
    if sum(per) > len(convs):
        ap.error(f"{sum(per)} conversations needed, {len(convs)} in the eval side have {a.turns} user turns")
    reports, start = [], 0
    for c, n in zip(levels, per):
        mine, start = convs[start:start + n], start + n
        off, w_off = replay(a.url, mine, c, False, a.max_tokens, a.timeout)
        on, w_on = replay(a.url, mine, c, True, a.max_tokens, a.timeout)
        rep = summarize(c, off, on, {"off": w_off, "on": w_on})
        reports.append(rep)
        print(json.dumps(rep) if a.json else format_report(rep) + "\n", flush=True)
    ok = all(r["errors"] == 0 and r["answers_identical"] == r["answers_compared"] for r in reports)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
