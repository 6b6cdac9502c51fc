"""The speculative decoding loop for one slot (Engine.generate) and its per-slot state (batch scheduler).

Round r, with x = the last emitted token at position n (the target cache holds exactly entries 0..n-1):
    1. rows = [x, d_1..d_k] = SlotSpeculator.rows(x)     drafter.propose (k may be 0)
    2. ONE target forward over rows at n..n+k             (engine / scheduler: cache length n+k+1)
    3. SlotSpeculator.verify(rows, logits, hidden):
         verdict = verify(d, q, logits, sampling)         a accepted, then the recovered/bonus token y
         cache.rollback(slot, n + a + 1)                  keeps x, d_1..d_a; y (at n+a+1) is not in the cache
         drafter.accept(slot, a, hidden[a])               row a produced y; y becomes the next x
First round (HF's convention): x = the target's own token sampled from the prefill logits, h = the prompt's last
hidden state. Once verify() returns, the cache never holds more than the accepted tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.errors import ConfigError
from tandem.sampling import process_logits, sample
from tandem.spec.drafter import Draft, DraftContext, PromptState, get_method
from tandem.spec.stats import SpecStats
from tandem.spec.trace import get_tracer
from tandem.spec.verify import verify


class SlotSpeculator:
    """Speculative state of one request on one slot. Made right after prefill (`out` = prefill Output)."""

    def __init__(self, engine, slot: int, ids: list[int], out, sampling: SamplingParams, spec: SpecConfig,
                 gen: torch.Generator | None, stats: Any = None, request_id: str | None = None):
        self.engine, self.cache, self.drafter = engine, engine.cache, engine.drafter
        self.slot, self.sampling, self.spec, self.gen = slot, sampling, spec, gen
        self.request_id = request_id
        method = get_method(spec.method)
        if not isinstance(self.drafter, method.drafter_cls):
            raise ConfigError(f"speculative.method {spec.method!r} needs a {method.drafter_cls.__name__}, "
                              f"the engine has a {type(self.drafter).__name__}")
        self.sample_drafts = method.sample_drafts and not sampling.greedy
        self.stats = stats  # GenStats (predicted_n is the budget already spent); its .spec gets our SpecStats
        self.spec_stats = SpecStats()
        if stats is not None:
            stats.spec = self.spec_stats
        self.budget = min(sampling.max_tokens, self.cache.max_len - len(ids))
        self.tracer = get_tracer()
        self.round = 0
        self._pending: tuple[Draft, int, float] | None = None
        self.drafter.begin(slot, PromptState(ids=list(ids), hidden=out.hidden[:, -1], cache=self.cache))

    def rows(self, last_token: int) -> list[int]:
        """Draft from `last_token` (at the slot's cache length); the rows the target must verify."""
        n = self.cache.lengths[self.slot]
        done = self.stats.predicted_n if self.stats is not None else 0
        k_max = min(self.spec.n_max, self.drafter.max_draft, self.cache.max_len - n - 1, self.budget - done - 1)
        ctx = DraftContext(slot=self.slot, last_token=last_token, position=n, cache=self.cache,
                           sampling=self.sampling, spec=self.spec, k_max=max(k_max, 0),
                           sample_drafts=self.sample_drafts, generator=self.gen, request_id=self.request_id,
                           round=self.round)
        t0 = time.perf_counter()
        draft = self.drafter.propose(ctx)
        ms = 1000 * (time.perf_counter() - t0)
        if self.cache.lengths[self.slot] != n:
            raise RuntimeError("drafter moved the target cache length (only the engine may)")
        if draft.k > max(k_max, 0):
            raise RuntimeError(f"drafter proposed {draft.k} tokens, at most {k_max} allowed")
        self._pending = (draft, n, ms)
        if self.tracer is not None:
            self.tracer.emit("draft", req=self.request_id, slot=self.slot, round=self.round, pos=n,
                             tokens=draft.tokens[0].tolist(), probs=[round(c, 6) for c in draft.confidences],
                             ms=round(ms, 3))
        self._t_verify = time.perf_counter()
        return [int(last_token)] + draft.tokens[0].tolist()

    def verify(self, rows: list[int], logits: torch.Tensor, hidden: torch.Tensor) -> list[tuple[int, bool]]:
        """logits [k+1, V], hidden [k+1, D] of the verify forward (cache length already n+k+1). Rolls the cache
        back to the accepted prefix and returns the emitted (token, from_draft) pairs."""
        draft, n, draft_ms = self._pending
        self._pending = None
        k = draft.k
        assert len(rows) == k + 1 and self.cache.lengths[self.slot] == n + k + 1
        verdict = verify(draft.tokens, draft.probs, logits[None, : k + 1], self.sampling, self.gen)
        a = int(verdict.n_accepted[0])
        self.cache.rollback(self.slot, n + a + 1)
        self.drafter.accept(self.slot, a, hidden[a:a + 1])
        ms = 1000 * (time.perf_counter() - self._t_verify)
        self.spec_stats.record(k, a, draft_ms, ms)
        toks = verdict.emitted(0)
        if self.tracer is not None:
            self.tracer.emit("verify", req=self.request_id, slot=self.slot, round=self.round, pos=n, n_draft=k,
                             accepted=a, tokens=toks, ms=round(ms, 3))
        self.round += 1
        return [(t, i < a) for i, t in enumerate(toks)]

    def close(self) -> None:
        end = getattr(self.drafter, "end", None)
        if end is not None:
            end(self.slot)


def speculative_tokens(engine, slot: int, ids: list[int], out, sampling: SamplingParams, spec: SpecConfig,
                       gen: torch.Generator, stats=None, request_id: str | None = None) -> Iterator[tuple[int, bool]]:
    """Yield (token id, from_draft) after prefill (`out` = prefill Output); stats.spec gets the SpecStats."""
    sp = SlotSpeculator(engine, slot, ids, out, sampling, spec, gen, stats, request_id)
    try:
        tok = int(sample(process_logits(out.logits[:, -1], sampling), gen)[0])
        yield tok, False
        while engine.cache.lengths[slot] < engine.cache.max_len:
            rows = sp.rows(tok)
            res = engine.forward_rows(slot, rows)
            toks = sp.verify(rows, res.logits[0], res.hidden[0])
            yield from toks
            tok = toks[-1][0]
    finally:
        sp.close()
