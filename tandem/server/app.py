"""The FastAPI app: OpenAI-compatible completions and chat completions over the batch scheduler.

create_app(engine, ...) -> FastAPI. Generation runs in the scheduler's thread; handlers only validate, tokenize,
submit and relay events (JSON, or SSE exactly as OpenAI streams them). Every response carries llama-server's
`timings` (+ `draft_acceptance_per_position`) and the effective `speculative` settings. Errors are always
OpenAI-style JSON, never an HTML page or a bare 500.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.chat import template_for
from tandem.engine.batch import BatchScheduler
from tandem.server.guard import Guard, json_bytes
from tandem.server.metrics import Metrics
from tandem.server.protocol import APIError, param_of
from tandem.server.routes import router
from tandem.server.state import ServerState, model_names, state_of, vocab_size

log = logging.getLogger("tandem.server")


MAX_BODY_BYTES = 8 * 1024 * 1024


class SafeJSONResponse(JSONResponse):
    """JSON that is always valid UTF-8, even when a message echoes a lone surrogate from the request."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def create_app(engine, *, loaded: Any = None, alias: str | None = None, api_key: str | None = None,
               max_tokens_limit: int | None = None, scheduler: BatchScheduler | None = None,
               max_waiting: int | None = 1024, allowed_hosts: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, special_in_content: bool = False) -> FastAPI:
    """special_in_content: special-token strings inside chat message content are parsed as control tokens
    (default: they are plain text, so a user cannot forge turns or system prompts)."""
    loaded = loaded if loaded is not None else getattr(engine, "loaded", None)
    model_id, names = model_names(loaded, alias)
    sched = scheduler or BatchScheduler(engine, max_waiting=max_waiting)
    state = ServerState(engine=engine, scheduler=sched, model_id=model_id, names=names,
                        template=template_for(loaded, engine.tokenizer), metrics=Metrics(model_id),
                        api_key=api_key or None, max_tokens_limit=max_tokens_limit or engine.max_len,
                        spec_default=engine.spec, vocab_size=vocab_size(engine),
                        special_in_content=special_in_content)

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        sched.stop()

    app = FastAPI(title="tandem", version="0.1.0", lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description="OpenAI-compatible server with lossless speculative decoding")
    app.state.tandem = state
    sched.start()
    add_error_handlers(app)
    app.add_middleware(Guard, api_key=state.api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes,
                       on_reject=state.metrics.record_request)
    app.include_router(router)
    return app


def _error_response(request: Request, status: int, body: dict, headers=None) -> JSONResponse:
    state_of(request).metrics.record_request(request.url.path, status)
    return SafeJSONResponse(body, status_code=status, headers=headers)


def _validation_message(errs: list[dict]) -> APIError:
    """pydantic's first error as OpenAI's {message, param}; param is the dotted path of the offending field."""
    if not errs:
        return APIError(400, "invalid request body")
    err = errs[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "))
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
    return APIError(400, f"{param or 'body'}: {msg}{extra}", param, "invalid_value")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(request, e.status, e.body())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(request, 400, _validation_message(e.errors()).body())

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
