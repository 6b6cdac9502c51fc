"""The endpoints: /health, /v1/models[/{model}], /metrics, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from tandem.engine import memory
from tandem.errors import RequestError
from tandem.server.generation import check_model, encode_text, run
from tandem.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, message_text, spec_echo
from tandem.server.state import ServerState, state_of

router = APIRouter()


def model_card(state: ServerState) -> dict:
    sched = state.scheduler
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "tandem",
            "meta": {"n_ctx": state.n_ctx, "n_vocab": state.vocab_size, "n_slots": sched.n_slots,
                     "speculative_available": state.spec_available, "speculative": spec_echo(state.spec_default),
                     "drafter": state.engine.describe_drafter()}}


@router.get("/health")
async def health(state: ServerState = Depends(state_of)):
    sched = state.scheduler
    exact, why = state.engine.exact
    return {"status": "ok", "slots_idle": sched.n_slots - sched.n_active, "slots_processing": sched.n_active,
            "requests_waiting": sched.n_waiting, "drafter": state.engine.describe_drafter(), "exact": exact,
            "exact_reason": why}


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(state_of)):
    return {"object": "list", "data": [model_card(state)]}


@router.get("/v1/models/{model}")
async def get_model(model: str, state: ServerState = Depends(state_of)):
    check_model(state, model)
    return model_card(state)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: ServerState = Depends(state_of)):
    sched = state.scheduler
    text = state.metrics.render(sched.n_active, sched.n_waiting, sched.n_slots, state.spec_default.n_max,
                                memory.report(state.engine), getattr(state.engine, "prefix", None))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, state: ServerState = Depends(state_of)):
    check_model(state, req.model)
    msgs = [{"role": m.role, "content": message_text(m, i), **({"name": m.name} if m.name else {})}
            for i, m in enumerate(req.messages)]
    try:  # template rendering and tokenization are CPU work: off the event loop, so /health etc. stay responsive
        ids = await asyncio.to_thread(state.chat.encode, msgs)
    except RequestError as e:
        raise APIError(400, str(e), "messages") from None
    if req.max_completion_tokens is not None:
        return await run(state, request, req, ids, req.max_completion_tokens, "max_completion_tokens")
    return await run(state, request, req, ids, req.max_tokens, "max_tokens")


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, state: ServerState = Depends(state_of)):
    check_model(state, req.model)
    p = req.prompt
    if isinstance(p, list):
        if len(p) == 0:
            raise APIError(400, "the prompt is empty", "prompt")
        if isinstance(p[0], (list, str)):  # a batch of prompts: one is all a request may hold
            if len(p) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            p = p[0]
    if isinstance(p, str):
        ids = await asyncio.to_thread(encode_text, state, p, True)
    else:
        ids = list(p)
        if state.vocab_size is not None and any(not 0 <= t < state.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {state.vocab_size})", "prompt")
    return await run(state, request, req, ids, req.max_tokens, "max_tokens")
