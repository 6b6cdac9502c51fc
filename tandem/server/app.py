"""The FastAPI app: OpenAI-compatible completions and chat completions over the batch scheduler.

create_app(engine, ...) -> FastAPI. Generation runs in the scheduler's thread; handlers only validate, tokenize,
submit and relay events (JSON, or SSE exactly as OpenAI streams them). Every response carries llama-server's
`timings` (+ `draft_acceptance_per_position`) and the effective `speculative` settings.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.config import SpecConfig
from tandem.engine.batch import BatchScheduler, Failed, RequestHandle
from tandem.engine.events import Finished, GenStats, Token
from tandem.errors import RequestError
from tandem.chat import ChatTemplate, template_for
from tandem.server.metrics import Metrics
from tandem.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, check_unsupported,
                                    message_text, param_of, sampling_of, spec_echo, spec_of)

log = logging.getLogger("tandem.server")
FINGERPRINT = "tandem-0.1.0"
DEFAULT_MODEL_ID = "gemma-3-270m"


@dataclass
class ServerState:
    engine: Any
    scheduler: BatchScheduler
    model_id: str
    names: set[str]
    template: ChatTemplate
    metrics: Metrics
    api_key: str | None
    max_tokens_limit: int
    spec_default: SpecConfig
    vocab_size: int | None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n_ctx(self) -> int:
        return self.engine.max_len

    @property
    def spec_available(self) -> bool:
        return self.engine.drafter is not None


def model_names(loaded: Any, alias: str | None) -> tuple[str, set[str]]:
    """The served model id and every name a request may use for it."""
    path = getattr(loaded, "path", None)
    names: set[str] = set()
    if path:
        p = Path(path)
        names |= {str(path), p.name, p.stem}
    if path is None or "gemma-3-270m-q4_k_m" in Path(path).name:
        names.add(DEFAULT_MODEL_ID)
        model_id = DEFAULT_MODEL_ID
    else:
        model_id = Path(path).stem
    if alias:
        model_id = alias
    names.add(model_id)
    return model_id, names


def _vocab_size(engine) -> int | None:
    args = getattr(engine.model, "args", None)
    v = getattr(args, "vocab_size", None)
    return int(v) if v else None


def timings_of(stats: GenStats) -> dict:
    sp = stats.spec
    t = {
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
    }
    return t


def usage_of(stats: GenStats) -> dict:
    return {"prompt_tokens": stats.prompt_n, "completion_tokens": stats.predicted_n,
            "total_tokens": stats.prompt_n + stats.predicted_n}


def create_app(engine, *, loaded: Any = None, alias: str | None = None, api_key: str | None = None,
               max_tokens_limit: int | None = None, scheduler: BatchScheduler | None = None,
               max_waiting: int | None = 1024) -> FastAPI:
    loaded = loaded if loaded is not None else getattr(engine, "loaded", None)
    model_id, names = model_names(loaded, alias)
    sched = scheduler or BatchScheduler(engine, max_waiting=max_waiting)
    state = ServerState(engine=engine, scheduler=sched, model_id=model_id, names=names,
                        template=template_for(loaded, engine.tokenizer), metrics=Metrics(model_id),
                        api_key=api_key or None, max_tokens_limit=max_tokens_limit or engine.max_len,
                        spec_default=engine.spec, vocab_size=_vocab_size(engine))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        sched.stop()

    app = FastAPI(title="tandem", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server with lossless speculative decoding")
    app.state.tandem = state
    sched.start()

    # -- errors: always OpenAI-style JSON, never an HTML page or a bare 500 -----------------------------------------
    def _error_response(request: Request, status: int, body: dict, headers=None) -> JSONResponse:
        if request.url.path.startswith("/v1"):
            state.metrics.record_request(request.url.path, status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(request, e.status, e.body())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        if not errs:
            return _error_response(request, 400, APIError(400, "invalid request body").body())
        err = errs[0]
        if err.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": ")
            return _error_response(request, 400, APIError(400, msg).body())
        param = param_of(err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            msg = "this field is required"
        elif err.get("type") == "extra_forbidden":
            param = f"{param}.{err['loc'][-1]}" if param else str(err["loc"][-1])
            msg = "unknown field"
        elif err.get("type") in ("model_type", "dict_type") and param is None:
            msg = "the request body must be a JSON object"
        extra = f" ({len(errs) - 1} more error{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        return _error_response(request, 400, APIError(400, f"{param or 'body'}: {msg}{extra}", param,
                                                      "invalid_value").body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(request, e.status_code, APIError(e.status_code, msg, None, code).body(),
                               getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(request, 500, APIError(500, f"internal server error: {type(e).__name__}", None,
                                                      "internal_error").body())

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1"):
            got = request.headers.get("authorization", "")
            token = got[7:].strip() if got[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                state.metrics.record_request(request.url.path, 401)
                return JSONResponse(APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                             None, "invalid_api_key").body(), status_code=401)
        return await call_next(request)

    # -- informational endpoints ------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "tandem",
                "meta": {"n_ctx": state.n_ctx, "n_vocab": state.vocab_size, "n_slots": sched.n_slots,
                         "speculative_available": state.spec_available,
                         "speculative": spec_echo(state.spec_default)}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots_idle": sched.n_slots - sched.n_active, "slots_processing": sched.n_active,
                "requests_waiting": sched.n_waiting}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        if model not in state.names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_id!r}",
                           "model", "model_not_found")
        return model_card()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        text = state.metrics.render(sched.n_active, sched.n_waiting, sched.n_slots, state.spec_default.n_max)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- generation -------------------------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name not in state.names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_id!r}",
                           "model", "model_not_found")

    def prepare(req, ids: list[int], requested_max: int | None, max_param: str):
        check_unsupported(req)
        n = len(ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", "prompt" if isinstance(req, CompletionRequest) else "messages")
        if requested_max is not None and requested_max > state.max_tokens_limit:
            raise APIError(400, f"{max_param} is {requested_max}; this server allows at most "
                                f"{state.max_tokens_limit}", max_param, "invalid_value")
        if n >= state.n_ctx:
            raise APIError(400, f"the prompt has {n} tokens; this model's context holds {state.n_ctx} tokens "
                                f"(prompt + completion)", "messages" if isinstance(req, ChatCompletionRequest)
                           else "prompt", "context_length_exceeded")
        if requested_max is not None and n + requested_max > state.n_ctx:
            raise APIError(400, f"this model's context holds {state.n_ctx} tokens, but {n + requested_max} were "
                                f"requested ({n} in the prompt, {requested_max} for the completion); lower "
                                f"{max_param}", max_param, "context_length_exceeded")
        max_tokens = requested_max or min(state.max_tokens_limit, state.n_ctx - n)
        sampling = sampling_of(req, max_tokens)
        spec = spec_of(req, state.spec_default, engine.drafter)
        return sampling, spec

    def encode_text(text: str, add_special: bool) -> list[int]:
        tok = engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
        return tok.encode(text, add_special_tokens=add_special)

    async def run(request: Request, endpoint: str, req, ids: list[int], requested_max: int | None, max_param: str):
        sampling, spec = prepare(req, ids, requested_max, max_param)
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            handle = sched.submit(ids, sampling, spec, request_id=rid, add_special_tokens=False)
        except RequestError as e:
            busy = "busy" in str(e)
            raise APIError(503 if busy else 400, str(e), None, "server_busy" if busy else None) from None
        created = int(time.time())
        ctx = dict(id=rid, created=created, model=req.model or state.model_id, spec=spec_echo(spec))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = stream_chat(handle, ctx, include_usage) if endpoint == "chat" else stream_completion(
                handle, ctx, include_usage)
            state.metrics.record_request(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", 200)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, fin = await collect(request, handle)
        body = {"id": rid, "object": "chat.completion" if endpoint == "chat" else "text_completion",
                "created": created, "model": ctx["model"], "system_fingerprint": FINGERPRINT}
        if endpoint == "chat":
            body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": None, "finish_reason": fin.reason}]
        else:
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": fin.reason}]
        body["usage"] = usage_of(fin.stats)
        body["timings"] = timings_of(fin.stats)
        body["speculative"] = ctx["spec"]
        state.metrics.record_request(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", 200)
        return JSONResponse(body)

    async def collect(request: Request, handle: RequestHandle) -> tuple[str, Finished]:
        async def watch():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    handle.cancel()
                    return
        watcher = asyncio.create_task(watch())
        parts: list[str] = []
        try:
            async for events in handle.batches():
                for ev in events:
                    if isinstance(ev, Token):
                        parts.append(ev.text)
                    elif isinstance(ev, Finished):
                        record(ev)
                        return "".join(parts), ev
                    elif isinstance(ev, Failed):
                        raise APIError(500, ev.message, None, "internal_error")
        finally:
            watcher.cancel()
            if not handle.done:
                handle.cancel()
        raise APIError(500, "generation ended without a result", None, "internal_error")

    def record(fin: Finished) -> None:
        state.metrics.record_finish(fin.reason, fin.stats)

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def relay(handle: RequestHandle, ctx: dict, include_usage: bool, make_chunk, first: dict | None,
                    obj: str):
        """SSE for one request: a chunk per token; finish_reason on the last content chunk (or an empty one)."""
        base = {"id": ctx["id"], "object": obj, "created": ctx["created"], "model": ctx["model"],
                "system_fingerprint": FINGERPRINT}
        extra = {"usage": None} if include_usage else {}
        try:
            if first is not None:
                yield sse({**base, **make_chunk(first, None), **extra})
            async for events in handle.batches():
                end = events[-1]
                if isinstance(end, Failed):
                    yield sse({"error": {"message": end.message, "type": "server_error", "param": None,
                                         "code": "internal_error"}})
                    break
                fin = end if isinstance(end, Finished) else None
                texts = [e.text for e in events if isinstance(e, Token) and e.text]
                for i, t in enumerate(texts):
                    last = fin is not None and i == len(texts) - 1
                    chunk = {**base, **make_chunk(t, fin.reason if last else None), **extra}
                    if last:
                        chunk["timings"], chunk["speculative"] = timings_of(fin.stats), ctx["spec"]
                    yield sse(chunk)
                if fin is not None:
                    if not texts:
                        yield sse({**base, **make_chunk(None, fin.reason), **extra,
                                   "timings": timings_of(fin.stats), "speculative": ctx["spec"]})
                    record(fin)
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": usage_of(fin.stats),
                                   "timings": timings_of(fin.stats), "speculative": ctx["spec"]})
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done:
                handle.cancel()

    def stream_chat(handle, ctx, include_usage):
        def chunk(text, reason):
            if isinstance(text, dict):
                delta = text
            else:
                delta = {} if text is None else {"content": text}
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        return relay(handle, ctx, include_usage, chunk, {"role": "assistant", "content": ""},
                     "chat.completion.chunk")

    def stream_completion(handle, ctx, include_usage):
        def chunk(text, reason):
            return {"object": "text_completion",
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}
        return relay(handle, ctx, include_usage, chunk, None, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        msgs = [{"role": m.role, "content": message_text(m, i), **({"name": m.name} if m.name else {})}
                for i, m in enumerate(req.messages)]
        try:
            prompt = state.template.render(msgs, add_generation_prompt=True)
        except RequestError as e:
            raise APIError(400, str(e), "messages") from None
        ids = encode_text(prompt, add_special=False)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        return await run(request, "chat", req, ids, requested, param)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        p = req.prompt
        if isinstance(p, list):
            if len(p) == 0:
                raise APIError(400, "the prompt is empty", "prompt")
            if isinstance(p[0], list):
                if len(p) != 1:
                    raise APIError(400, "only one prompt per request is supported", "prompt")
                p = p[0]
            elif isinstance(p[0], str):
                if len(p) != 1:
                    raise APIError(400, "only one prompt per request is supported", "prompt")
                p = p[0]
        if isinstance(p, str):
            ids = encode_text(p, add_special=True)
        else:
            ids = list(p)
            if state.vocab_size is not None and any(not 0 <= t < state.vocab_size for t in ids):
                raise APIError(400, f"token ids must be in [0, {state.vocab_size})", "prompt")
        return await run(request, "completion", req, ids, req.max_tokens, "max_tokens")

    return app
