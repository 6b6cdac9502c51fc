"""The speculative decoding loop: per-slot state (SlotSpeculator) and the one drafting call per scheduler step
(draft_rows), used alike by Engine.generate (one slot) and the batch scheduler (all speculating slots).

Round r of a slot, with x = its last emitted token at position n (the target cache holds exactly entries 0..n-1):
    1. draft_rows(...)                                  ONE drafter.propose for all speculating slots; the policy
                                                        (tandem.spec.policy) sets each k_max and cuts each draft;
                                                        the slot's rows are [x, d_1..d_k] (k may be 0)
    2. ONE target forward over rows at n..n+k           (engine / scheduler: cache length n+k+1)
    3. SlotSpeculator.verify(rows, logits, hidden):
         verdict = verify(d, q, logits, sampling)       a accepted, then the recovered/bonus token y
         cache.rollback(slot, n + a + 1)                keeps x, d_1..d_a; y (at n+a+1) is not in the cache
         drafter.accept(slot, [d_1..d_a, y], hidden[:a+1])
First round (HF's convention): x = the target's own token sampled from the prefill logits, h = the prompt's last
hidden state (every prompt row's, [P, D], for a drafter with needs_prompt_hidden: prefill keeps them for it).
Once verify() returns, the target cache never holds more than the accepted tokens.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.sampling import process_logits, sample
from tandem.spec.chain import check_spec
from tandem.spec.drafter import Draft, DraftContext, PromptState, get_method
from tandem.spec.policy import AdaptiveLength, ChainLengths, DraftPolicy, RoundCost
from tandem.spec.stats import SpecStats
from tandem.spec.trace import get_tracer
from tandem.spec.verify import verify


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> {(method, chain | member): RoundCost}


def round_cost(engine, method: str, chain: tuple[str, ...] = (), member: str | None = None) -> RoundCost:
    """The engine's learned round cost for a drafting method (and chain), or for one member kind of a chain,
    shared by its requests (tandem.spec.policy)."""
    key = (method, member) if member is not None else (method, tuple(chain))
    return _COSTS.setdefault(engine, {}).setdefault(key, RoundCost())


def chain_lengths(engine, spec: SpecConfig, sampling: SamplingParams) -> ChainLengths:
    """The request's adaptive lengths: one per member of its chain (a single drafter: one, keyed by method and
    chain); a seeded sampled request gets fixed cost models of its own (reproducible lengths)."""
    members = engine.drafter.chain_for(spec) if hasattr(engine.drafter, "chain_for") else (engine.drafter.kind,)
    fixed = sampling.seed is not None and not sampling.greedy

    def cost(member: str | None) -> RoundCost:
        return RoundCost(fixed=True) if fixed else round_cost(engine, spec.method, spec.chain, member)

    return ChainLengths({m: AdaptiveLength(cost(m if len(members) > 1 else None), spec.n_min) for m in members})


class SlotSpeculator:
    """Speculative state of one request on one slot. Made right after prefill (`out` = prefill Output; its hidden
    holds every prompt row when the drafter needs_prompt_hidden)."""

    def __init__(self, engine, slot: int, ids: list[int], out, sampling: SamplingParams, spec: SpecConfig,
                 gen: torch.Generator | None, stats: Any = None, request_id: str | None = None):
        self.engine, self.cache, self.drafter = engine, engine.cache, engine.drafter
        spec = spec.resolved(getattr(self.drafter, "recommended", None))  # unset n_max / p_min
        self.slot, self.sampling, self.spec, self.gen = slot, sampling, spec, gen
        self.request_id = request_id
        method = get_method(spec.method)
        check_spec(self.drafter, spec)  # the method's kind and the chain's names are drafters of this engine
        self.sample_drafts = method.sample_drafts and not sampling.greedy
        self.policy = DraftPolicy(spec, self.drafter.max_draft)
        self.adaptive = chain_lengths(engine, spec, sampling) if spec.adaptive else None
        self.stats = stats  # GenStats (predicted_n is the budget already spent); its .spec gets our SpecStats
        self.spec_stats = SpecStats()
        if stats is not None:
            stats.spec = self.spec_stats
        self.budget = min(sampling.max_tokens, self.cache.max_len - len(ids))
        self.tracer = get_tracer()
        self.round = 0
        self._pending: tuple[Draft, int, float] | None = None
        self.drafter.begin(slot, PromptState(ids=list(ids), hidden=self._prompt_hidden(ids, out), cache=self.cache))

    def _prompt_hidden(self, ids: list[int], out) -> torch.Tensor:
        """The prefill rows the drafter reads: all of them [P, D] when it asks (prefill kept them), else [1, D]."""
        rows = out.drafter_rows  # the target's aux hidden states when it captures them (EAGLE-3), else hidden
        if not self.drafter.needs_prompt_hidden:
            return rows[0, -1:]
        if rows.shape[1] != len(ids):
            raise RuntimeError(f"{type(self.drafter).__name__} needs every prompt row's hidden state; prefill kept "
                               f"{rows.shape[1]} of {len(ids)} (prefill(..., keep_hidden=True))")
        return rows[0]

    def context(self, last_token: int) -> DraftContext:
        """This round's DraftContext: `last_token` sits at the slot's cache length; k_max from the policy."""
        n = self.cache.lengths[self.slot]
        done = self.stats.predicted_n if self.stats is not None else 0
        k_max = self.policy.k_max(n, self.cache.max_len, self.budget - done)
        k_by_member = None
        if self.adaptive is not None:
            members = getattr(self.drafter, "members", {})
            ks = self.adaptive.choose({m: min(k_max, members[m].max_draft) if m in members else k_max
                                       for m in self.adaptive.order})
            k_max = max(ks.values())
            k_by_member = ks if len(ks) > 1 else None
        return DraftContext(slot=self.slot, last_token=int(last_token), position=n, cache=self.cache,
                            sampling=self.sampling, k_max=k_max, k_by_member=k_by_member,
                            p_floor=self.policy.p_floor, sample_drafts=self.sample_drafts, generator=self.gen,
                            request_id=self.request_id, round=self.round, spec=self.spec)

    def take(self, ctx: DraftContext, draft: Draft, ms: float) -> list[int]:
        """The drafter's proposal for this slot, cut by the policy -> the rows the target must verify."""
        if self.cache.lengths[self.slot] != ctx.position:
            raise RuntimeError("drafter moved the target cache length (only the engine may)")
        if draft.k > ctx.k_max:
            raise RuntimeError(f"drafter proposed {draft.k} tokens, at most {ctx.k_max} allowed")
        draft = self.policy.cut(draft)
        self._pending = (draft, ctx.position, ms)
        if self.tracer is not None:
            self.tracer.emit("draft", req=self.request_id, slot=self.slot, round=self.round, pos=ctx.position,
                             tokens=draft.tokens.tolist(), probs=[round(c, 6) for c in draft.confidence],
                             drafter=draft.source or self.drafter.kind,
                             ms=round(ms, 3))
        self._t_verify = time.perf_counter()
        return [ctx.last_token] + draft.tokens.tolist()

    def verify(self, rows: list[int], logits: torch.Tensor, hidden: torch.Tensor) -> list[tuple[int, bool]]:
        """logits [k+1, V], hidden [k+1, D] of the verify forward (cache length already n+k+1). Rolls the cache
        back to the accepted prefix, tells the drafter, and returns the emitted (token, from_draft) pairs."""
        draft, n, draft_ms = self._pending
        self._pending = None
        k = draft.k
        assert len(rows) == k + 1 and self.cache.lengths[self.slot] == n + k + 1
        probs = None if draft.probs is None else draft.probs[None]
        verdict = verify(draft.tokens[None], probs, logits[None, : k + 1], self.sampling, self.gen)
        a = int(verdict.n_accepted[0])
        self.cache.rollback(self.slot, n + a + 1)
        toks = verdict.emitted(0)
        self.drafter.accept(self.slot, toks, hidden[: a + 1])
        ms = 1000 * (time.perf_counter() - self._t_verify)
        self.spec_stats.record(k, a, draft_ms, ms, draft.source or self.drafter.kind)
        if self.adaptive is not None:
            self.adaptive.observe(draft.source, k, a, draft_ms, ms)
        if self.tracer is not None:
            self.tracer.emit("verify", req=self.request_id, slot=self.slot, round=self.round, pos=n, n_draft=k,
                             accepted=a, tokens=toks, ms=round(ms, 3))
        self.round += 1
        return [(t, i < a) for i, t in enumerate(toks)]

    def close(self) -> None:
        self.drafter.end(self.slot)


def draft_rows(drafter, sps: list[SlotSpeculator], last_tokens: list[int]) -> list[list[int]]:
    """ONE propose() for all speculating slots of a step; returns each slot's verify rows [x, d_1..d_k]."""
    ctxs = [sp.context(t) for sp, t in zip(sps, last_tokens)]
    t0 = time.perf_counter()
    drafts = drafter.propose(ctxs)
    ms = 1000 * (time.perf_counter() - t0)  # the whole call: every slot waited for it
    if len(drafts) != len(ctxs):
        raise RuntimeError(f"drafter returned {len(drafts)} drafts for {len(ctxs)} slots")
    return [sp.take(c, d, ms) for sp, c, d in zip(sps, ctxs, drafts)]


def speculative_tokens(engine, slot: int, ids: list[int], out, sampling: SamplingParams, spec: SpecConfig,
                       gen: torch.Generator, stats=None, request_id: str | None = None) -> Iterator[tuple[int, bool]]:
    """Yield (token id, from_draft) after prefill (`out` = prefill Output); stats.spec gets the SpecStats."""
    sp = SlotSpeculator(engine, slot, ids, out, sampling, spec, gen, stats, request_id)
    try:
        tok = int(sample(process_logits(out.logits[:, -1], sampling), gen)[0])
        yield tok, False
        while engine.cache.lengths[slot] < engine.cache.max_len:
            rows = draft_rows(engine.drafter, [sp], [tok])[0]
            res = engine.forward_rows(slot, rows)
            toks = sp.verify(rows, res.logits[0], res.drafter_rows[0])
            yield from toks
            tok = toks[-1][0]
    finally:
        sp.close()
