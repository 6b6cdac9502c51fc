"""The generation loop. The engine is the only place that moves cache lengths.

generate() runs one request on one slot: prefill, then plain decode steps or speculative rounds, yielding
Token events and one Finished event. Batched serving builds on the same pieces (tandem.engine.batch).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Iterator
from typing import Any

import torch

from tandem import kernels
from tandem.config import SamplingParams, SpecConfig
from tandem.engine.events import Finished, GenStats, Token
from tandem.engine.stops import StopMatcher
from tandem.errors import RequestError
from tandem.models.base import Output
from tandem.sampling import make_generator, process_logits, sample

PREFILL_CHUNK = 512
log = logging.getLogger("tandem.engine")


def sample_token(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator) -> int:
    """One token from logits [1, V] (plain decoding; the batch scheduler uses the same function per slot)."""
    if sampling.greedy:  # = argmax of process_logits' one-hot, without its copies of the vocabulary
        return int(kernels.argmax(logits[0]))
    return int(sample(process_logits(logits, sampling), gen)[0])


def _stream_decoder(tokenizer: Any):
    """The tokenizer's incremental decoder (`stream_decoder()`, or `stream()` in tandem.tokenizer)."""
    make = getattr(tokenizer, "stream_decoder", None) or tokenizer.stream
    return make()


class RequestOutput:
    """What happens to each generated token of one request: EOS, detokenization, stop strings, the token budget.

    Shared by Engine.generate and the batch scheduler (tandem.engine.batch) so both emit the same events.
    push() returns the Token event to emit (or None) and sets `reason` once the request is finished.
    """

    def __init__(self, tokenizer: Any, sampling: SamplingParams, prompt_n: int, max_len: int):
        self.stats = GenStats(prompt_n=prompt_n)
        self.eos = set() if sampling.ignore_eos or tokenizer is None else set(tokenizer.eos_ids)
        self.stops = StopMatcher(sampling.stop)
        self.detok = _stream_decoder(tokenizer) if tokenizer is not None else None
        self.budget = min(sampling.max_tokens, max_len - prompt_n)
        self.reason: str | None = None
        if self.detok is not None:
            self._detok_push = getattr(self.detok, "push", None) or self.detok.put

    def push(self, tok: int, from_draft: bool = False) -> Token | None:
        self.stats.predicted_n += 1
        if tok in self.eos:
            self.reason = "stop"
            return None
        piece = self._detok_push(tok) if self.detok is not None else ""
        text, hit = self.stops.push(piece)
        if hit:
            self.reason = "stop"
            return Token(tok, text, from_draft) if text else None
        if self.stats.predicted_n >= self.budget:
            self.reason = "length"
        return Token(tok, text, from_draft)

    def finish(self) -> list[Token | Finished]:
        """The closing events: text held back (pending UTF-8 bytes, a possible stop-string start) unless a stop
        string ended the text, then Finished. A stream that ended early = "length"."""
        reason = self.reason or "length"
        out: list[Token | Finished] = []
        tail, hit = self.stops.push(self.detok.flush() if self.detok is not None else "")
        if not hit:
            more, hit = self.stops.flush()
            tail += more
        if tail:
            out.append(Token(-1, tail, False))
        if hit:
            reason = "stop"
        out.append(Finished(reason, self.stats, self.stops.text))
        return out


class Engine:
    """Generation over `n_slots` cache slots. The cache comes from the model (`model.make_cache`); a drafter that
    owns a cache gets one sized the same way (slots, context, cache types)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, max_len: int = 4096, n_slots: int = 1,
                 device: str | torch.device = "cpu", drafter: Any = None, spec: SpecConfig | None = None,
                 cache_type_k: str = "f32", cache_type_v: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        types = dict(k_type=cache_type_k, v_type=cache_type_v or cache_type_k, device=self.device)
        self.cache = model.make_cache(n_slots, max_len, **types)
        self.drafter = drafter
        if drafter is not None:
            drafter.make_cache(n_slots, max_len, **types)
        # unset n_max / p_min: the drafter's recommendation, else the built-in default
        self.spec = (spec or SpecConfig(enabled=drafter is not None)).resolved(getattr(drafter, "recommended", None))
        self._slot_ids = [torch.tensor([i], device=self.device) for i in range(n_slots)]
        self.warm_up(types)

    @torch.inference_mode()
    def warm_up(self, cache_types: dict) -> None:
        """Build/load the C++ kernels and run a prefill-sized and a decode-sized forward on a scratch cache, so the
        first request's prompt and decode timings are its own, not the kernels' JIT build and first calls."""
        t = time.perf_counter()
        scratch = self.model.make_cache(1, 8, **cache_types)
        slot = torch.zeros(1, dtype=torch.long, device=self.device)
        for n in (4, 1):
            toks = torch.zeros(1, n, dtype=torch.long, device=self.device)
            pos = torch.arange(n, device=self.device)[None]
            self.model(toks, pos, scratch, slot, logit_rows=slice(-1, None))
        log.info("kernels built and warmed at load (%.2f s): request timings exclude it", time.perf_counter() - t)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def exact(self) -> tuple[bool, str]:
        """(exact, reason): True when every target row is row-invariant here (speculative output == plain
        decoding bitwise at T=0); False: speculation keeps the target's distribution only."""
        return kernels.exactness(self.model, self.device)

    def check_ids(self, ids: list[int]) -> None:
        """Token ids outside [0, vocab) never reach a kernel: a RequestError naming the first bad one."""
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    # -- target forwards -----------------------------------------------------------------------------------------
    def describe_drafter(self) -> str:
        """The drafter requests use by default, for people: its own describe(), or `none (plain)`."""
        return self.drafter.describe() if self.drafter is not None and self.spec.enabled else "none (plain)"

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], start: int = 0, keep_hidden: bool = False):
        """Run ids at positions start.. into the slot's cache; returns the Output of the last chunk, its hidden
        (and aux) rows [1, len(ids), *] (all chunks) when keep_hidden."""
        self.check_ids(ids)
        outs = []
        for c in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[c:c + PREFILL_CHUNK]
            toks = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start + c, start + c + len(chunk), device=self.device)[None]
            out = self.model(toks, pos, self.cache, self._slot_ids[slot], logit_rows=slice(-1, None))
            outs = outs + [out] if keep_hidden else [out]
        self.cache.set_length(slot, start + len(ids))
        return outs[0] if len(outs) == 1 else Output.cat_rows(outs)

    @torch.inference_mode()
    def forward_rows(self, slot: int, ids: list[int], logit_rows=None):
        """Forward ids at the slot's next positions (decode: 1 row; verify: k+1 rows) and extend the length."""
        n = self.cache.lengths[slot]
        toks = torch.tensor([ids], device=self.device)
        pos = torch.arange(n, n + len(ids), device=self.device)[None]
        out = self.model(toks, pos, self.cache, self._slot_ids[slot], logit_rows=logit_rows)
        self.cache.set_length(slot, n + len(ids))
        return out

    # -- requests ------------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError as e:
                raise RequestError(f"prompt token ids must be integers ({e})") from None
        self.check_ids(ids)
        if not ids:
            raise RequestError("the prompt is empty (0 tokens)")
        if len(ids) >= self.max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {self.max_len} "
                               f"(prompt + generated tokens must fit)")
        return ids

    def generate(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                 spec: SpecConfig | None = None, slot: int = 0, request_id: str | None = None,
                 add_special_tokens: bool = True) -> Iterator[Token | Finished]:
        sampling = sampling or SamplingParams()
        spec = spec if spec is not None else self.spec
        ids = self.encode(prompt, add_special_tokens)
        req = RequestOutput(self.tokenizer, sampling, len(ids), self.max_len)
        stats = req.stats
        gen = make_generator(sampling.seed, "cpu")

        t0 = time.perf_counter()
        use_spec = spec.enabled and self.drafter is not None
        out = self.prefill(slot, ids, keep_hidden=use_spec and self.drafter.needs_prompt_hidden)
        stats.prompt_ms = 1000 * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        if use_spec:
            from tandem.engine.speculative import speculative_tokens
            stream = speculative_tokens(self, slot, ids, out, sampling, spec, gen, stats, request_id)
        else:
            stream = self._plain_tokens(slot, out, sampling, gen)
        try:
            for tok, from_draft in stream:
                ev = req.push(tok, from_draft)
                if ev is not None:
                    yield ev
                if req.reason is not None:
                    break
        finally:
            stream.close()
        stats.predicted_ms = 1000 * (time.perf_counter() - t1)
        yield from req.finish()

    def _plain_tokens(self, slot: int, out, sampling: SamplingParams, gen: torch.Generator):
        """Plain decoding: sample from the last logits, feed the token back, repeat."""
        logits = out.logits[:, -1]
        while True:
            tok = sample_token(logits, sampling, gen)
            yield tok, False
            if self.cache.lengths[slot] >= self.max_len:
                return
            logits = self.forward_rows(slot, [tok]).logits[:, -1]

    def complete(self, prompt: str | list[int], sampling: SamplingParams | None = None, **kw) -> tuple[list[int], Finished]:
        """Run to the end; returns (token ids, Finished)."""
        toks, fin = [], None
        for ev in self.generate(prompt, sampling, **kw):
            if isinstance(ev, Token) and ev.id >= 0:
                toks.append(ev.id)
            elif isinstance(ev, Finished):
                fin = ev
        return toks, fin
