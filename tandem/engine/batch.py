"""Continuous batching: a scheduler over the engine's N cache slots, in a background thread.

Requests wait in a queue until a slot is free; the prompt is then prefilled into the slot (alone, in the chunks
Engine.generate uses, at most PREFILL_CHUNK prompt tokens per scheduler iteration so decoding slots keep moving)
and the first token sampled. Then every step is ONE round (tandem.engine.speculative.decode_round, the loop body
Engine.generate runs for its one slot) over all decoding slots: ONE drafter.propose for the speculating slots, ONE
target forward (tokens/positions [B, T_max], padded with position -1; a plain slot contributes 1 row, its pending
token, a speculating slot its pending token + draft nodes, chain or tree), each slot's own verification with its
own generator. Its tokens go through the same `RequestOutput` (EOS, detokenizer, stop strings, budget) as
Engine.generate. With batch-invariant kernels a request's tokens therefore do not depend on what else is in the
batch.

Consumers talk to the scheduler only through `submit()` (returns a `RequestHandle`: a sync or async iterator of
events) and `RequestHandle.cancel()` (frees the slot before the next step). Events arrive per step in lists, so a
consumer can see that a token is the last one (the list ends with Finished).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.engine.core import PREFILL_CHUNK, Engine, RequestOutput
from tandem.engine.events import Finished, Token
from tandem.engine.speculative import SlotSpeculator, decode_round, sample_token
from tandem.errors import RequestError
from tandem.sampling import make_generator
from tandem.spec.policy import speculates

log = logging.getLogger("tandem.batch")

_ids = itertools.count()


@dataclass
class Failed:
    """The request could not be completed (an internal error); the last event of its stream."""

    message: str


Event = Token | Finished | Failed


class RequestHandle:
    """One submitted request, seen from the consumer: iterate its events, or cancel it.

    Made inside a running asyncio loop, events are delivered to that loop (use `async for` / `batches()`);
    otherwise to a thread-safe queue (use plain `for` / `sync_batches()`).
    """

    def __init__(self, scheduler: "BatchScheduler", request_id: str, loop: asyncio.AbstractEventLoop | None):
        self.scheduler = scheduler
        self.id = request_id
        self.loop = loop
        self.cancelled = False
        self.done = False
        self.slot: int | None = None
        if loop is not None:
            self._aq: asyncio.Queue = asyncio.Queue()
        else:
            self._q: queue.Queue = queue.Queue()

    # -- producer side (scheduler thread) ------------------------------------------------------------------------
    def _deliver(self, events: list[Event]) -> None:
        if not events:
            return
        if any(isinstance(e, (Finished, Failed)) for e in events):
            self.done = True
        if self.loop is None:
            self._q.put(events)
            return
        try:
            self.loop.call_soon_threadsafe(self._aq.put_nowait, events)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True

    # -- consumer side --------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating and free the slot (idempotent; safe from any thread)."""
        if not self.cancelled:
            self.cancelled = True
            self.scheduler._wake()

    def sync_batches(self, timeout: float | None = None) -> Iterator[list[Event]]:
        while True:
            events = self._q.get(timeout=timeout)
            yield events
            if any(isinstance(e, (Finished, Failed)) for e in events):
                return

    def __iter__(self) -> Iterator[Event]:
        for events in self.sync_batches():
            yield from events

    async def batches(self) -> AsyncIterator[list[Event]]:
        while True:
            events = await self._aq.get()
            yield events
            if any(isinstance(e, (Finished, Failed)) for e in events):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for events in self.batches():
            for e in events:
                yield e


@dataclass
class _Request:
    ids: list[int]
    sampling: SamplingParams
    spec: SpecConfig
    handle: RequestHandle
    submitted: float
    cache_prompt: bool = True  # False: neither reuse nor keep prefix-cache blocks for this request


class _Slot:
    """Per-slot decoding state: the same pieces Engine.generate builds for one request."""

    def __init__(self, engine: Engine, idx: int, req: _Request):
        self.idx = idx
        self.req = req
        self.sampling = req.sampling
        self.out = RequestOutput(engine.tokenizer, req.sampling, len(req.ids), engine.max_len)
        self.gen = make_generator(req.sampling.seed, "cpu")
        self.pending: int | None = None  # sampled and emitted, not yet fed to the target
        self.t1 = 0.0
        self.spec = None  # per-slot speculative state, when speculating
        self.prefilling = True
        # the drafter reads every prompt row's hidden state: prefill chunks' hidden [c, D] kept until it starts
        self.keep_hidden = speculates(req.spec, engine.drafter) and engine.drafter.needs_prompt_hidden
        # prompt tokens already in the cache: restored from the prefix cache (with their hidden rows, if kept)
        self.prefill_pos, self.hidden = engine.begin_prompt(idx, req.ids, req.cache_prompt)
        self.out.stats.cached_n = self.prefill_pos
        self.fed = list(req.ids)  # the prompt, then every token emitted (the cache holds a prefix of it)

    @property
    def handle(self) -> RequestHandle:
        return self.req.handle


class BatchScheduler:
    """Continuous batching over `engine.cache.n_slots` slots. start() launches the thread; stop() ends it."""

    def __init__(self, engine: Engine, *, max_waiting: int | None = None):
        self.engine = engine
        self.n_slots = engine.cache.n_slots
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._slots: list[_Slot | None] = [None] * self.n_slots
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_rows = 0  # rows forwarded, summed over steps (for a mean batch size)

    # -- public API ----------------------------------------------------------------------------------------------
    def start(self) -> "BatchScheduler":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="tandem-batch", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def n_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: str | list[int], sampling: SamplingParams | None = None, spec: SpecConfig | None = None,
               request_id: str | None = None, add_special_tokens: bool = True,
               loop: asyncio.AbstractEventLoop | None | bool = True, cache_prompt: bool = True) -> RequestHandle:
        """Queue a request. loop=True: deliver to the running asyncio loop if called from one, else a sync queue.
        cache_prompt=False: the request neither reuses nor leaves prefix-cache blocks.

        Raises RequestError for an empty or too long prompt (nothing is queued then).
        """
        ids = self.engine.encode(prompt, add_special_tokens)
        sampling = sampling or SamplingParams()
        spec = spec if spec is not None else self.engine.spec
        if loop is True:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        elif loop is False:
            loop = None
        handle = RequestHandle(self, request_id or f"req-{next(_ids)}", loop)
        with self._cv:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise RequestError(f"the server is busy: {len(self._waiting)} requests are already waiting")
            self._waiting.append(_Request(ids, sampling, spec, handle, time.perf_counter(), cache_prompt))
            self._cv.notify_all()
        return handle

    # -- scheduler thread ----------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not any(self._slots):
                    self._cv.wait()
                if self._stop:
                    break
                self._drop_cancelled_waiting()
            self._free_cancelled()
            try:
                self._admit()
                self._prefill_some()
                if any(s is not None and not s.prefilling for s in self._slots):
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("batch step failed")
                self._fail_all(f"internal error in the batch step: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _drop_cancelled_waiting(self) -> None:
        if any(r.handle.cancelled for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.handle.cancelled)

    def _free_cancelled(self) -> None:
        for i, s in enumerate(self._slots):
            if s is not None and s.handle.cancelled:
                self._release(i)

    def _release(self, i: int, keep_prefix: bool = True) -> None:
        """Free slot i; keep_prefix: its cache is consistent (finished or cancelled between steps), so what it holds
        goes to the prefix cache."""
        s = self._slots[i]
        self._slots[i] = None
        if s is not None:
            s.handle.slot = None
            if s.spec is not None:
                s.spec.close()
            if keep_prefix and not s.prefilling:
                self.engine.slot_done(i, s.fed, s.req.cache_prompt)

    def _fail_all(self, message: str) -> None:
        for i, s in enumerate(self._slots):
            if s is not None:
                s.handle._deliver([Failed(message)])
                self._release(i, keep_prefix=False)
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting:
            r.handle._deliver([Failed(message)])

    def _admit(self) -> None:
        """Give free slots to waiting requests (oldest first); their prompts are prefilled by _prefill_some()."""
        while True:
            free = [i for i, s in enumerate(self._slots) if s is None]
            with self._cv:
                self._drop_cancelled_waiting()
                if not free or not self._waiting:
                    return
                req = self._waiting.popleft()
            i = free[0]
            req.handle.slot = i
            try:  # restores the request's cached prefix into the slot
                self._slots[i] = _Slot(self.engine, i, req)
            except Exception as e:  # noqa: BLE001 - fail this request only
                log.exception("admission of %s failed", req.handle.id)
                req.handle.slot = None
                req.handle._deliver([Failed(f"this request failed in admission: {type(e).__name__}: {e}")])

    def _prefill_some(self) -> None:
        """Prefill chunks (Engine.prefill's chunking, so the cache ends up exactly as in Engine.generate) for up to
        PREFILL_CHUNK prompt tokens per scheduler iteration, oldest request first: a long prompt does not stall
        the decoding slots for its whole prefill."""
        budget = PREFILL_CHUNK
        pending = sorted((s for s in self._slots if s is not None and s.prefilling),
                         key=lambda s: s.req.submitted)
        for s in pending:
            if budget <= 0:
                return
            ids, c, eng = s.req.ids, s.prefill_pos, self.engine
            try:
                t0 = time.perf_counter()
                out, s.prefill_pos = eng.prefill_chunk(s.idx, ids, c, s.hidden, s.keep_hidden, s.req.cache_prompt)
                s.out.stats.prompt_ms += 1000 * (time.perf_counter() - t0)
                budget -= s.prefill_pos - c
                if s.prefill_pos >= len(ids):
                    eng.prompt_done(s.idx, ids, s.hidden, s.req.cache_prompt)
                    if s.keep_hidden:
                        out = out.with_drafter_rows(torch.cat(s.hidden)[None])
                    s.hidden = []
                    self._start_decoding(s, out)
            except Exception as e:  # noqa: BLE001 - fail this request only
                self._fail_slot(s, "prefill", e)

    def _start_decoding(self, s: _Slot, out) -> None:
        """After the last prefill chunk: speculative state (if any) and the first token, as Engine.generate."""
        eng = self.engine
        s.prefilling = False
        s.t1 = time.perf_counter()
        if speculates(s.req.spec, eng.drafter):
            s.spec = self._spec_state(s, out)
        tok = sample_token(out.logits[:, -1], s.req.sampling, s.gen)
        self._emit(s, [(tok, False)])

    def _spec_state(self, s: _Slot, out) -> SlotSpeculator:
        return SlotSpeculator(self.engine, s.idx, s.req.ids, out, s.req.sampling, s.req.spec, s.gen, s.out.stats,
                              s.handle.id)

    def _emit(self, s: _Slot, toks: list[tuple[int, bool]]) -> None:
        """Push new tokens through the slot's RequestOutput; deliver the events; finish and free when done."""
        events: list[Event] = []
        s.fed.extend(t for t, _ in toks)
        for tok, from_draft in toks:
            ev = s.out.push(tok, from_draft)
            if ev is not None:
                events.append(ev)
            if s.out.reason is not None:
                break
        else:
            s.pending = toks[-1][0] if toks else s.pending
            if self.engine.cache.lengths[s.idx] >= self.engine.max_len:
                s.out.reason = s.out.reason or "length"
        if s.out.reason is not None:
            s.out.stats.predicted_ms = 1000 * (time.perf_counter() - s.t1)
            events.extend(s.out.finish())
            self._release(s.idx)
        s.handle._deliver(events)

    def _fail_slot(self, s: _Slot, where: str, e: Exception) -> None:
        """One request failed (its sampling, drafter or output): end it alone; the other slots go on."""
        log.error("request %s failed in %s: %s: %s", s.handle.id, where, type(e).__name__, e)
        self._release(s.idx, keep_prefix=False)
        s.handle._deliver([Failed(f"this request failed in {where}: {type(e).__name__}: {e}")])

    def _step(self) -> None:
        active = [s for s in self._slots if s is not None and not s.prefilling]
        done, rows = decode_round(self.engine, active, fail=self._fail_slot)  # Engine.generate's loop body too
        if rows:
            self.steps += 1
            self.step_rows += rows
        for s, toks in done:
            try:
                self._emit(s, toks)
            except Exception as e:  # noqa: BLE001 - this request's output handling failed: end it alone
                self._fail_slot(s, "output", e)
