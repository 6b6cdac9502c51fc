"""One generation request: check it against the server's limits, submit it to the scheduler, and answer with the
whole result (JSON) or a stream (SSE). Generation itself runs in the scheduler's thread."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tandem.config import SamplingParams, SpecConfig
from tandem.engine.batch import Failed, RequestHandle
from tandem.engine.events import Finished, Token
from tandem.errors import RequestError
from tandem.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, check_unsupported,
                                    sampling_of, spec_echo, spec_of, timings_of, usage_of)
from tandem.server.state import FINGERPRINT, ServerState
from tandem.server.streaming import stream_chat, stream_completion


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name not in state.names:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_id!r}",
                       "model", "model_not_found")


def encode_text(state: ServerState, text: str, add_special: bool) -> list[int]:
    tok = state.engine.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
    # encode_batch releases the GIL (tokenizers' single encode does not): the event loop keeps running meanwhile
    return tok.encode_batch([text], add_special_tokens=add_special)[0]


def settings_of(state: ServerState, req, ids: list[int], requested_max: int | None,
                max_param: str) -> tuple[SamplingParams, SpecConfig]:
    """The request's sampling and speculative settings, after checking its prompt and budget fit the context."""
    check_unsupported(req)
    n = len(ids)
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if n == 0:
        raise APIError(400, "the prompt is empty", prompt_param)
    if requested_max is not None and requested_max > state.max_tokens_limit:
        raise APIError(400, f"{max_param} is {requested_max}; this server allows at most "
                            f"{state.max_tokens_limit}", max_param, "invalid_value")
    if n >= state.n_ctx:
        raise APIError(400, f"the prompt has {n} tokens; this model's context holds {state.n_ctx} tokens "
                            f"(prompt + completion)", prompt_param, "context_length_exceeded")
    if requested_max is not None and n + requested_max > state.n_ctx:
        raise APIError(400, f"this model's context holds {state.n_ctx} tokens, but {n + requested_max} were "
                            f"requested ({n} in the prompt, {requested_max} for the completion); lower "
                            f"{max_param}", max_param, "context_length_exceeded")
    max_tokens = requested_max or min(state.max_tokens_limit, state.n_ctx - n)
    return sampling_of(req, max_tokens), spec_of(req, state.spec_default, state.engine.drafter)


async def run(state: ServerState, request: Request, req: ChatCompletionRequest | CompletionRequest, ids: list[int],
              requested_max: int | None, max_param: str):
    """Submit and answer: a StreamingResponse when req.stream, else the whole completion as JSON."""
    chat = isinstance(req, ChatCompletionRequest)
    sampling, spec = settings_of(state, req, ids, requested_max, max_param)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    try:
        handle = state.scheduler.submit(ids, sampling, spec, request_id=rid, add_special_tokens=False,
                                        cache_prompt=req.cache_prompt is not False)
    except RequestError as e:
        busy = "busy" in str(e)
        raise APIError(503 if busy else 400, str(e), None, "server_busy" if busy else None) from None
    created = int(time.time())
    ctx = dict(id=rid, created=created, model=req.model or state.model_id, spec=spec_echo(spec))
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = (stream_chat if chat else stream_completion)(state, handle, ctx, include_usage)
        state.metrics.record_request(endpoint, 200)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, fin = await collect(state, request, handle)
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": ctx["model"], "system_fingerprint": FINGERPRINT}
    if chat:
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None, "finish_reason": fin.reason}]
    else:
        body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": fin.reason}]
    body["usage"] = usage_of(fin.stats)
    body["timings"] = timings_of(fin.stats)
    body["speculative"] = ctx["spec"]
    state.metrics.record_request(endpoint, 200)
    return JSONResponse(body)


async def collect(state: ServerState, request: Request, handle: RequestHandle) -> tuple[str, Finished]:
    """The whole text and the Finished event; a client that disconnects cancels its request."""
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
                    state.metrics.record_finish(ev.reason, ev.stats)
                    return "".join(parts), ev
                elif isinstance(ev, Failed):
                    raise APIError(500, ev.message, None, "internal_error")
    finally:
        watcher.cancel()
        if not handle.done:
            handle.cancel()
    raise APIError(500, "generation ended without a result", None, "internal_error")
