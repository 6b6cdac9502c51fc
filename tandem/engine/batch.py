"""Continuous batching: a scheduler over the engine's N cache slots, in a background thread.

Requests wait in a queue until a slot is free; the prompt is then prefilled into the slot (alone, in the chunks
Engine.generate uses, at most PREFILL_CHUNK prompt tokens per scheduler iteration so decoding slots keep moving)
and the first token sampled. Then every step runs ONE target forward over all active slots:
tokens/positions [B, T_max], padded with position -1; a plain slot contributes 1 row (its pending token), a
speculating slot its k+1 verify rows (pending token + the drafter's proposals, from ONE drafter.propose for all
speculating slots). Each slot gets its own rows' logits and runs its own sampling / verification with its own
generator, and its tokens go through the same `RequestOutput` (EOS, detokenizer, stop strings, budget) as Engine.generate. With batch-invariant kernels a
request's tokens therefore do not depend on what else is in the batch.

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
from tandem.engine.core import PREFILL_CHUNK, Engine, RequestOutput, sample_token
from tandem.engine.events import Finished, Token
from tandem.engine.speculative import SlotSpeculator, draft_rows
from tandem.errors import RequestError
from tandem.models.base import Output
from tandem.sampling import make_generator

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


class _Slot:
    """Per-slot decoding state: the same pieces Engine.generate builds for one request."""

    def __init__(self, engine: Engine, idx: int, req: _Request):
        self.idx = idx
        self.req = req
        self.out = RequestOutput(engine.tokenizer, req.sampling, len(req.ids), engine.max_len)
        self.gen = make_generator(req.sampling.seed, "cpu")
        self.pending: int | None = None  # sampled and emitted, not yet fed to the target
        self.t1 = 0.0
        self.spec = None  # per-slot speculative state, when speculating
        self.prefilling = True
        self.prefill_pos = 0  # prompt tokens already in the cache
        # the drafter reads every prompt row's hidden state: prefill chunks' hidden [1, c, D] kept until it starts
        self.keep_hidden = req.spec.enabled and engine.drafter is not None and engine.drafter.needs_prompt_hidden
        self.hidden: list[Output] = []

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
               loop: asyncio.AbstractEventLoop | None | bool = True) -> RequestHandle:
        """Queue a request. loop=True: deliver to the running asyncio loop if called from one, else a sync queue.

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
            self._waiting.append(_Request(ids, sampling, spec, handle, time.perf_counter()))
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

    def _release(self, i: int) -> None:
        s = self._slots[i]
        self._slots[i] = None
        if s is not None:
            s.handle.slot = None
            if s.spec is not None:
                s.spec.close()

    def _fail_all(self, message: str) -> None:
        for i, s in enumerate(self._slots):
            if s is not None:
                s.handle._deliver([Failed(message)])
                self._release(i)
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
            self._slots[i] = _Slot(self.engine, i, req)

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
            ids = s.req.ids
            c = s.prefill_pos
            chunk = ids[c:c + PREFILL_CHUNK]
            try:
                t0 = time.perf_counter()
                out = self.engine.prefill(s.idx, chunk, start=c, keep_hidden=s.keep_hidden)
                s.out.stats.prompt_ms += 1000 * (time.perf_counter() - t0)
                s.prefill_pos += len(chunk)
                budget -= len(chunk)
                if s.keep_hidden:
                    s.hidden.append(out)
                if s.prefill_pos >= len(ids):
                    if s.keep_hidden:
                        out, s.hidden = Output.cat_rows(s.hidden), []
                    self._start_decoding(s, out)
            except Exception as e:  # noqa: BLE001 - fail this request only
                self._fail_slot(s, "prefill", e)

    def _start_decoding(self, s: _Slot, out) -> None:
        """After the last prefill chunk: speculative state (if any) and the first token, as Engine.generate."""
        eng = self.engine
        s.prefilling = False
        s.t1 = time.perf_counter()
        if s.req.spec.enabled and eng.drafter is not None:
            s.spec = self._spec_state(s, out)
        tok = sample_token(out.logits[:, -1], s.req.sampling, s.gen)
        self._emit(s, [(tok, False)])

    def _spec_state(self, s: _Slot, out) -> SlotSpeculator:
        return SlotSpeculator(self.engine, s.idx, s.req.ids, out, s.req.sampling, s.req.spec, s.gen, s.out.stats,
                              s.handle.id)

    def _emit(self, s: _Slot, toks: list[tuple[int, bool]]) -> None:
        """Push new tokens through the slot's RequestOutput; deliver the events; finish and free when done."""
        events: list[Event] = []
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

    def _rows(self, active: list[_Slot]) -> tuple[list[_Slot], list[list[int]]]:
        """Each slot's rows: [pending] (plain), or [pending, d_1..d_k] from ONE propose for all speculating slots
        (if it raises, each drafts alone and only those whose own propose raises fail). -> (active slots, rows)"""
        rows = {s.idx: [s.pending] for s in active}
        spec = [s for s in active if s.spec is not None]
        if spec:
            try:
                drafted = draft_rows(self.engine.drafter, [s.spec for s in spec], [s.pending for s in spec])
            except Exception:  # noqa: BLE001 - find the request(s) at fault instead of failing all of them
                log.exception("batched propose failed; drafting slot by slot")
                drafted = []
                for s in spec:
                    try:
                        drafted.append(draft_rows(self.engine.drafter, [s.spec], [s.pending])[0])
                    except Exception as e:  # noqa: BLE001
                        self._fail_slot(s, "drafter", e)
                        drafted.append(None)
            for s, r in zip(spec, drafted):
                rows[s.idx] = r
        active = [s for s in active if rows[s.idx] is not None]
        return active, [rows[s.idx] for s in active]

    def _fail_slot(self, s: _Slot, where: str, e: Exception) -> None:
        """One request failed (its sampling, drafter or output): end it alone; the other slots go on."""
        log.error("request %s failed in %s: %s: %s", s.handle.id, where, type(e).__name__, e)
        self._release(s.idx)
        s.handle._deliver([Failed(f"this request failed in {where}: {type(e).__name__}: {e}")])

    def _step(self) -> None:
        eng = self.engine
        active = [s for s in self._slots if s is not None and not s.prefilling]
        active, rows = self._rows(active)
        if not active:
            return
        B, T = len(active), max(len(r) for r in rows)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.full((B, T), -1, dtype=torch.long)
        for b, (s, r) in enumerate(zip(active, rows)):
            n = eng.cache.lengths[s.idx]
            tokens[b, :len(r)] = torch.tensor(r)
            positions[b, :len(r)] = torch.arange(n, n + len(r))
        slots = torch.tensor([s.idx for s in active])
        dev = eng.device
        with torch.inference_mode():
            out = eng.model(tokens.to(dev), positions.to(dev), eng.cache, slots.to(dev), logit_rows=slice(0, 0))
            # LM head only on the rows someone reads (padding rows never pay for the vocabulary projection)
            hidden = torch.cat([out.hidden[b, :len(r)] for b, r in enumerate(rows)])[:, None]
            logits = eng.model.logits(hidden)[:, 0]
        self.steps += 1
        self.step_rows += sum(len(r) for r in rows)
        o = 0
        for b, (s, r) in enumerate(zip(active, rows)):
            lg = logits[o:o + len(r)]
            o += len(r)
            n = eng.cache.lengths[s.idx]
            try:
                if s.spec is None:
                    eng.cache.set_length(s.idx, n + 1)
                    toks = [(sample_token(lg[-1:], s.req.sampling, s.gen), False)]
                else:
                    eng.cache.set_length(s.idx, n + len(r))
                    toks = s.spec.verify(r, lg, out.drafter_rows[b, :len(r)])
                self._emit(s, toks)
            except Exception as e:  # noqa: BLE001 - e.g. NaN probabilities from this request's own settings
                self._fail_slot(s, "sampling", e)
