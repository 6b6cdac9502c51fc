"""OpenAI request bodies (pydantic: types, ranges, the OpenAPI schema), their translation to engine settings, and
the response pieces every endpoint shares (usage, llama-server's timings).

Every rejected request becomes an APIError (status, message, param, code) that the app renders as OpenAI's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from tandem.config import SamplingParams, SpecConfig
from tandem.engine.events import GenStats
from tandem.errors import ConfigError

MAX_STOPS = 16
MAX_STOP_CHARS = 256
# below these, fp32 sampling overflows (logits / T) or underflows (top_p): they mean greedy, as in vLLM
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SpeculativeOptions(BaseModel):
    """Per-request speculative decoding control; omitted fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid")
    enabled: StrictBool | None = None
    method: StrictStr | None = Field(None, max_length=64)
    n_max: StrictInt | None = Field(None, ge=1, le=16, description="most draft tokens per round (unset: the "
                                    "server's, i.e. --spec-n-max, else the drafter's recommendation, else 3)")
    n_min: StrictInt | None = Field(None, ge=1, le=16, description="drafts shorter than this are dropped")
    p_min: Number | None = Field(None, ge=0, le=1, description="stop drafting below this top-1 probability (unset: "
                                 "as n_max)")
    adaptive: StrictBool | None = Field(None, description="choose each round's length up to n_max (false: n_max); "
                                        "with a seed at T > 0 the lengths depend only on the request: reproducible")
    chain: list[StrictStr] | None = Field(None, max_length=8, description="drafters to try in order, e.g. "
                                          "[\"ngram\", \"mtp\"]: the first with a draft wins the round")
    tree: StrictBool | StrictInt | None = Field(None, description="draft trees (several continuations verified in "
                                                "one forward): true/false, or a node budget in [1, 64]")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


def bad_unicode(value: Any, path: str = "") -> str | None:
    """Where (a dotted path) a string holds a lone surrogate, which no tokenizer and no UTF-8 reply can carry."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            where = bad_unicode(k, path) or bad_unicode(v, f"{path}.{k}" if path else str(k))
            if where:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            where = bad_unicode(v, f"{path}[{i}]")
            if where:
                return where
    return None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = bad_unicode(data)
        if where:
            raise ValueError(f"{where.encode('utf-8', 'replace').decode()} holds a lone surrogate (\\ud800-\\udfff "
                             f"escape): not valid Unicode text")
        return data

    model: StrictStr | None = Field(None, max_length=512)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, lt=1)
    seed: StrictInt | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool | None = None
    speculative: SpeculativeOptions | None = None
    cache_prompt: StrictBool | None = None  # False: no prefix-cache reuse or storing for this request (llama-server)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = Field(None, ge=1)


FIELD_NAMES = set()
for _m in (SpeculativeOptions, StreamOptions, ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart):
    FIELD_NAMES |= set(_m.model_fields)


def param_of(loc: tuple | list) -> str | None:
    """A pydantic error location ('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part in FIELD_NAMES:
            out += ("." if out else "") + part
        else:
            break
    return out or None


# -- request -> engine settings ----------------------------------------------------------------------------------

def check_unsupported(req: _Common) -> None:
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported (only 0 or null)", name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            raise APIError(400, "logprobs are not supported by this server", "logprobs" if req.logprobs else
                           "top_logprobs")
        if req.tools:
            raise APIError(400, "tools / function calling are not supported", "tools")
        rf = req.response_format
        if rf and rf.get("type") not in (None, "text"):
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not supported by this server", "logprobs")
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", "best_of")


def stops_of(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"at most {MAX_STOPS} stop sequences are supported, got {len(stops)}", "stop")
    for s in stops:
        if len(s) > MAX_STOP_CHARS:
            raise APIError(400, f"a stop sequence may hold at most {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
    return tuple(stops)


def sampling_of(req: _Common, max_tokens: int) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    top_k = 0 if req.top_k is None or req.top_k < 0 else req.top_k
    if top_p < MIN_TOP_P:  # OpenAI accepts 0: keep only the most likely token
        top_p, top_k = 1.0, 1
    seed = None if req.seed is None else req.seed % (2 ** 63)
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                              min_p=0.0 if req.min_p is None else float(req.min_p), seed=seed,
                              max_tokens=max_tokens, stop=stops_of(req.stop), ignore_eos=bool(req.ignore_eos))
    except ConfigError as e:
        msg = str(e)
        field = msg.split(" ", 1)[0].removeprefix("sampling.")
        raise APIError(400, msg, field if field in FIELD_NAMES else None) from None


def spec_of(req: _Common, default: SpecConfig, drafter: Any) -> SpecConfig:
    """The request's speculative settings over the server's defaults; disabled when no drafter is loaded."""
    available = drafter is not None
    o = req.speculative
    changes = {} if o is None else {k: v for k, v in o.model_dump().items() if v is not None}
    if "p_min" in changes:
        changes["p_min"] = float(changes["p_min"])
    if "n_max" in changes and "n_min" not in changes:
        changes["n_min"] = min(default.n_min, changes["n_max"])
    try:
        spec = dataclasses.replace(default, **changes)
    except ConfigError as e:
        msg = str(e)
        raise APIError(400, msg, msg.split(" ", 1)[0]) from None
    if spec.enabled and available and ("method" in changes or "chain" in changes):
        from tandem.spec import check_spec
        try:
            check_spec(drafter, spec)
        except ConfigError as e:
            raise APIError(400, str(e), str(e).split(" ", 1)[0].rstrip(":")) from None
    if not available and spec.enabled:
        spec = dataclasses.replace(spec, enabled=False)
    return spec


def spec_echo(spec: SpecConfig) -> dict:
    return {"enabled": spec.enabled, "method": spec.method, "n_max": spec.n_max, "n_min": spec.n_min,
            "p_min": spec.p_min, **({"chain": list(spec.chain)} if spec.chain else {}),
            **({"tree": spec.tree} if spec.tree else {})}


def message_text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, p in enumerate(m.content):
        if p.type != "text" or p.text is None:
            raise APIError(400, f"only text content parts are supported, got type {p.type!r}",
                           f"messages[{i}].content[{j}]")
        parts.append(p.text)
    return "".join(parts)


def timings_of(stats: GenStats) -> dict:
    """llama-server's `timings` for one finished request, plus the draft acceptance at each position."""
    sp = stats.spec
    return {
        "cache_n": stats.cached_n,
        "prompt_n": stats.prompt_n,
        "prompt_ms": round(stats.prompt_ms, 3),
        "prompt_per_token_ms": round(stats.prompt_ms / stats.prompt_n, 3) if stats.prompt_n else 0.0,
        "prompt_per_second": round(stats.prompt_per_second, 3),
        "predicted_n": stats.predicted_n,
        "predicted_ms": round(stats.predicted_ms, 3),
        "predicted_per_token_ms": round(stats.predicted_ms / stats.predicted_n, 3) if stats.predicted_n else 0.0,
        "predicted_per_second": round(stats.predicted_per_second, 3),
        "draft_n": sp.drafted if sp is not None else 0,
        "draft_n_accepted": sp.accepted if sp is not None else 0,
        "draft_acceptance_per_position": [round(x, 6) for x in sp.acceptance_by_position] if sp is not None else [],
        "draft_by_drafter": {k: dict(v) for k, v in sp.by_drafter.items()} if sp is not None else {},
    }


def usage_of(stats: GenStats) -> dict:
    return {"prompt_tokens": stats.prompt_n, "completion_tokens": stats.predicted_n,
            "total_tokens": stats.prompt_n + stats.predicted_n,
            "prompt_tokens_details": {"cached_tokens": stats.cached_n}}
