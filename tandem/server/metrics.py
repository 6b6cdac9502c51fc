"""Server counters in Prometheus text format. Speculative counters use vLLM's names (prefix `tandem:`)."""

from __future__ import annotations

import re
import threading
from collections import defaultdict

from tandem.engine.memory import rss_bytes

PREFIX = "tandem:"
# the only endpoint labels: a raw path (user input) would make one series per distinct URL, without bound
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
_MODEL_PATH = re.compile(r"^/v1/models/[^/]+$")


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if _MODEL_PATH.match(path) else "other"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status) -> count, every API request answered
        self.finished = defaultdict(int)  # finish reason -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.draft_generation_tokens = 0  # emitted tokens that were accepted drafts
        self.prompt_ms = 0.0
        self.predicted_ms = 0.0
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos: list[int] = []
        self.drafted_per_pos: list[int] = []
        self.by_drafter: dict[str, dict[str, int]] = {}  # kind -> won / proposed / accepted (bounded: kind names)

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint_label(endpoint), int(status))] += 1

    def record_finish(self, reason: str, stats, draft_tokens_emitted: int = 0) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.prompt_tokens += stats.prompt_n
            self.generation_tokens += stats.predicted_n
            self.prompt_ms += stats.prompt_ms
            self.predicted_ms += stats.predicted_ms
            self.draft_generation_tokens += draft_tokens_emitted
            sp = stats.spec
            if sp is not None:
                self.num_drafts += sp.drafts
                self.num_draft_tokens += sp.drafted
                self.num_accepted_tokens += sp.accepted
                for name, counts in sp.by_drafter.items():
                    mine = self.by_drafter.setdefault(name, {"won": 0, "proposed": 0, "accepted": 0})
                    for key, v in counts.items():
                        mine[key] += v
                for mine, theirs in ((self.accepted_per_pos, sp.accepted_at), (self.drafted_per_pos, sp.drafted_at)):
                    if len(mine) < len(theirs):
                        mine.extend([0] * (len(theirs) - len(mine)))
                    for i, v in enumerate(theirs):
                        mine[i] += v

    def render(self, running: int, waiting: int, n_slots: int, spec_n_max: int, memory: dict | None = None,
               prefix=None) -> str:
        """`memory` is tandem.engine.memory.report(engine) (RSS once loaded, peak, caches); prefix: the engine's
        PrefixCache (tandem.kvcache.prefix), or None when it is off."""
        m = f'model_name="{_esc(self.model_name)}"'
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {PREFIX}{name} {help_}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            for labels, value in samples:
                lab = ",".join(x for x in (labels, ) if x)
                lines.append(f"{PREFIX}{name}{{{lab}}} {value}" if lab else f"{PREFIX}{name} {value}")

        with self._lock:
            metric("requests_total", "counter", "API requests answered, by endpoint and HTTP status",
                   [(f'endpoint="{_esc(e)}",status="{s}"', n) for (e, s), n in sorted(self.requests.items())]
                   or [("", 0)])
            metric("request_success_total", "counter", "finished generations by finish reason",
                   [(f'{m},finished_reason="{r}"', self.finished.get(r, 0)) for r in ("stop", "length")])
            metric("prompt_tokens_total", "counter", "prefilled prompt tokens", [(m, self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "generated tokens", [(m, self.generation_tokens)])
            metric("prompt_seconds_total", "counter", "time spent in prefill",
                   [(m, round(self.prompt_ms / 1000, 6))])
            metric("generation_seconds_total", "counter", "time from first token to finish, summed over requests",
                   [(m, round(self.predicted_ms / 1000, 6))])
            metric("num_requests_running", "gauge", "requests holding a slot", [(m, running)])
            metric("num_requests_waiting", "gauge", "requests waiting for a slot", [(m, waiting)])
            metric("num_slots", "gauge", "slots (parallel requests)", [(m, n_slots)])
            metric("spec_decode_num_drafts", "counter", "verification rounds with a non-empty draft",
                   [(m, self.num_drafts)])
            metric("spec_decode_num_draft_tokens", "counter", "draft tokens verified", [(m, self.num_draft_tokens)])
            metric("spec_decode_num_accepted_tokens", "counter", "draft tokens accepted",
                   [(m, self.num_accepted_tokens)])
            n_pos = max(spec_n_max, len(self.accepted_per_pos))
            acc = self.accepted_per_pos + [0] * (n_pos - len(self.accepted_per_pos))
            metric("spec_decode_num_accepted_tokens_per_pos", "counter", "draft tokens accepted at each position",
                   [(f'position="{i}"', v) for i, v in enumerate(acc)])
            dr = self.drafted_per_pos + [0] * (n_pos - len(self.drafted_per_pos))
            metric("spec_decode_num_draft_tokens_per_pos", "counter", "draft tokens verified at each position",
                   [(f'position="{i}"', v) for i, v in enumerate(dr)])
            for key, name, help_ in (("won", "rounds_won", "rounds whose verified draft came from this drafter"),
                                     ("proposed", "draft_tokens", "draft tokens verified, by drafter"),
                                     ("accepted", "accepted_tokens", "draft tokens accepted, by drafter")):
                metric(f"spec_decode_drafter_{name}", "counter", help_,
                       [(f'{m},drafter="{_esc(d)}"', c[key]) for d, c in sorted(self.by_drafter.items())])
            for key, help_ in (("rss_after_load_bytes", "resident memory once the model, caches and kernels were "
                                                        "loaded"),
                               ("peak_rss_bytes", "peak resident memory of the process so far"),
                               ("kv_cache_bytes", "bytes allocated for the target's KV cache (every slot)"),
                               ("drafter_cache_bytes", "bytes allocated for the drafters' own caches")):
                v = (memory or {}).get(key)
                if v is not None:
                    metric(key, "gauge", help_, [(m, int(v))])
            if prefix is not None:
                _prefix_metrics(metric, m, prefix)
        rss = rss_bytes()
        if rss is not None:
            lines.append("# HELP process_resident_memory_bytes Resident memory size in bytes.")
            lines.append("# TYPE process_resident_memory_bytes gauge")
            lines.append(f"process_resident_memory_bytes {rss}")
        return "\n".join(lines) + "\n"


def _prefix_metrics(metric, m: str, prefix) -> None:
    st = prefix.stats
    for name, kind, help_, v in (
            ("prefix_cache_queries_total", "counter", "requests that looked up the prefix cache", st.lookups),
            ("prefix_cache_hits_total", "counter", "requests that restored a cached prefix", st.hits),
            ("prefix_cache_query_tokens_total", "counter", "prompt tokens of those lookups", st.lookup_tokens),
            ("prefix_cache_hit_tokens_total", "counter", "prompt tokens reused from the cache, not prefilled",
             st.reused_tokens),
            ("prefix_cache_evictions_total", "counter", "blocks evicted for the byte budget", st.evictions),
            ("prefix_cache_blocks", "gauge", "blocks held", len(prefix.blocks)),
            ("prefix_cache_bytes", "gauge", "bytes held by cached blocks", prefix.bytes),
            ("prefix_cache_budget_bytes", "gauge", "the byte budget (--prefix-cache-mb)", prefix.budget)):
        metric(name, kind, help_, [(m, v)])
