"""SSE relay: engine events -> OpenAI stream chunks, one chunk per token, `data: [DONE]` at the end.

finish_reason rides on the last content chunk (or an empty one when the last event carried no text); that chunk
also carries `timings` and `speculative`, and with stream_options.include_usage a final chunk has the usage.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from tandem.engine.batch import Failed, RequestHandle
from tandem.engine.events import Finished, Token
from tandem.server.protocol import timings_of, usage_of
from tandem.server.state import FINGERPRINT, ServerState


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def relay(state: ServerState, handle: RequestHandle, ctx: dict, include_usage: bool,
                make_chunk: Callable[[str | dict | None, str | None], dict], first: dict | None,
                obj: str) -> AsyncIterator[str]:
    """The SSE lines of one request; ctx holds id, created, model and the spec echo."""
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
                state.metrics.record_finish(fin.reason, fin.stats)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage_of(fin.stats),
                               "timings": timings_of(fin.stats), "speculative": ctx["spec"]})
                break
        yield "data: [DONE]\n\n"
    finally:
        if not handle.done:
            handle.cancel()


def _chat_chunk(text: str | dict | None, reason: str | None) -> dict:
    delta = text if isinstance(text, dict) else ({} if text is None else {"content": text})
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def _completion_chunk(text: str | None, reason: str | None) -> dict:
    return {"object": "text_completion",
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}


def stream_chat(state: ServerState, handle: RequestHandle, ctx: dict, include_usage: bool) -> AsyncIterator[str]:
    return relay(state, handle, ctx, include_usage, _chat_chunk, {"role": "assistant", "content": ""},
                 "chat.completion.chunk")


def stream_completion(state: ServerState, handle: RequestHandle, ctx: dict,
                      include_usage: bool) -> AsyncIterator[str]:
    return relay(state, handle, ctx, include_usage, _completion_chunk, None, "text_completion")
