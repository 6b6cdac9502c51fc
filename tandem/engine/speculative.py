"""One speculative round: the only loop body of decoding. Engine.generate runs it for its one slot, the batch
scheduler for every decoding slot of a step (tandem.engine.batch):

    def decode_round(engine, slots):
        drafts = drafter.propose(contexts)          propose: ONE call for every speculating slot; the policy
                                                    (tandem.spec.policy) set its depth k_max and node budget
        drafts = [policy.cut(d) for d in drafts]    cut: p_min / n_min, per branch of a tree
        out = engine.forward_batch(rows)            forward: ONE target forward; a slot's rows are [x, draft nodes]
                                                    at positions n + depth, a node seeing its ancestors
        path, toks = verify(draft, out.logits)      verify: the accepted path, then one recovered/bonus token
        cache.compact(path); cache.rollback(n+a+1)  rollback: the cache holds x and the accepted path, in place
        drafter.accept(slot, toks, hidden[path])    accept: every drafter's state follows the accepted path
        policy.observe(...)                         observe: lengths and tree shape learn from the round

A slot that does not speculate is the round with an empty draft: its one row is sampled as plain decoding.
x = the slot's last emitted token at position n (the target cache holds exactly entries 0..n-1 before the round).
First round (HF's convention): x = the target's own token sampled from the prefill logits, h = the prompt's last
hidden state (every prompt row's, [P, D], for a drafter with needs_prompt_hidden: prefill keeps them for it).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable

import torch

from tandem import kernels
from tandem.config import SamplingParams, SpecConfig
from tandem.sampling import process_logits, sample
from tandem.spec.chain import check_spec
from tandem.spec.drafter import Draft, DraftContext, PromptState, get_method
from tandem.spec.policy import AdaptiveLength, ChainLengths, DraftPolicy, RoundCost, TreeShape, tree_budget
from tandem.spec.stats import SpecStats
from tandem.spec.trace import get_tracer
from tandem.spec.verify import verify, verify_tree

log = logging.getLogger("tandem.engine")

_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> {(method, chain | member): RoundCost}


def sample_token(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator) -> int:
    """One token from logits [1, V] (plain decoding: a slot that does not speculate)."""
    if sampling.greedy:  # = argmax of process_logits' one-hot, without its copies of the vocabulary
        return int(kernels.argmax(logits[0]))
    return int(sample(process_logits(logits, sampling), gen)[0])


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
        budget = tree_budget(spec, self.sample_drafts, self.cache)
        self.shape = TreeShape(budget, fixed=sampling.seed is not None and not sampling.greedy) if budget else None
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
        nodes = min(self.shape.choose(k_max), self.cache.max_len - n - 1) if self.shape is not None else 0
        return DraftContext(slot=self.slot, last_token=int(last_token), position=n, cache=self.cache,
                            sampling=self.sampling, k_max=k_max, k_by_member=k_by_member, nodes=nodes,
                            p_floor=self.policy.p_floor, sample_drafts=self.sample_drafts, generator=self.gen,
                            request_id=self.request_id, round=self.round, spec=self.spec)

    def take(self, ctx: DraftContext, draft: Draft, ms: float) -> Draft:
        """The drafter's proposal for this slot, cut by the policy: the draft the target verifies."""
        if self.cache.lengths[self.slot] != ctx.position:
            raise RuntimeError("drafter moved the target cache length (only the engine may)")
        if draft.depth > ctx.k_max or draft.k > max(ctx.k_max, ctx.nodes):
            raise RuntimeError(f"drafter proposed {draft.k} nodes of depth {draft.depth}, at most "
                               f"{max(ctx.k_max, ctx.nodes)} of depth {ctx.k_max} allowed")
        draft = self.policy.cut(draft)
        self._pending = (draft, ctx.position, ms)
        if self.tracer is not None:
            tree = {"parents": draft.parents} if draft.is_tree else {}
            self.tracer.emit("draft", req=self.request_id, slot=self.slot, round=self.round, pos=ctx.position,
                             tokens=draft.tokens.tolist(), probs=[round(c, 6) for c in draft.confidence],
                             drafter=draft.source or self.drafter.kind, ms=round(ms, 3), **tree)
        self._t_verify = time.perf_counter()
        return draft

    def finish(self, logits: torch.Tensor, hidden: torch.Tensor) -> list[tuple[int, bool]]:
        """verify -> rollback -> accept -> observe. logits [N+1, V], hidden [N+1, D] of the round's forward (cache
        length n+N+1); returns the emitted (token, from_draft) pairs."""
        draft, n, draft_ms = self._pending
        self._pending = None
        k = draft.k
        assert self.cache.lengths[self.slot] == n + k + 1
        if draft.probs is not None:  # sampled drafts (a chain): p/q rejection
            verdict = verify(draft.tokens[None], draft.probs[None], logits[None, : k + 1], self.sampling, self.gen)
            toks = verdict.emitted(0)
            path = list(range(len(toks) - 1))
        else:
            path, toks = verify_tree(draft.tokens.tolist(), draft.parent_list(), logits[: k + 1], self.sampling,
                                     self.gen)
        a = len(path)
        if draft.is_tree:
            self.cache.compact(self.slot, n + 1, [n + 1 + i for i in path])
        self.cache.rollback(self.slot, n + a + 1)
        self.drafter.accept(self.slot, toks, hidden[[0] + [i + 1 for i in path]])
        ms = 1000 * (time.perf_counter() - self._t_verify)
        depth = draft.depth
        self.spec_stats.record(k, a, draft_ms, ms, draft.source or self.drafter.kind, depth=depth,
                               tree=draft.is_tree)
        if self.adaptive is not None:
            self.adaptive.observe(draft.source, depth, a, draft_ms, ms)
        if self.shape is not None and k:
            self.shape.observe(a + 1, draft_ms + ms)
        if self.tracer is not None:
            self.tracer.emit("verify", req=self.request_id, slot=self.slot, round=self.round, pos=n, n_draft=k,
                             accepted=a, tokens=toks, ms=round(ms, 3), path=path)
        self.round += 1
        return [(t, i < a) for i, t in enumerate(toks)]

    def close(self) -> None:
        self.drafter.end(self.slot)


class Decoding:
    """One slot's decoding state between rounds: `pending` = x, the last emitted token (not yet in the cache);
    spec = its SlotSpeculator, or None (plain decoding). The batch scheduler's slots carry the same fields."""

    def __init__(self, idx: int, sampling: SamplingParams, gen: torch.Generator | None,
                 spec: SlotSpeculator | None = None, pending: int | None = None):
        self.idx, self.sampling, self.gen, self.spec, self.pending = idx, sampling, gen, spec, pending


def _raise(slot, where: str, e: Exception) -> None:
    raise e


def propose(drafter, slots: list, fail: Callable = _raise) -> dict[int, Draft]:
    """propose + cut: ONE drafter.propose for every speculating slot -> slot index -> its cut draft. If it raises,
    each slot drafts alone and only those whose own propose raises fail (`fail(slot, "drafter", error)`)."""
    def call(group):
        ctxs = [s.spec.context(s.pending) for s in group]
        t0 = time.perf_counter()
        drafts = drafter.propose(ctxs)
        ms = 1000 * (time.perf_counter() - t0)  # the whole call: every slot waited for it
        if len(drafts) != len(ctxs):
            raise RuntimeError(f"drafter returned {len(drafts)} drafts for {len(ctxs)} slots")
        return {s.idx: s.spec.take(c, d, ms) for s, c, d in zip(group, ctxs, drafts)}

    if not slots:
        return {}
    try:
        return call(slots)
    except Exception:  # noqa: BLE001 - find the request(s) at fault instead of failing all of them
        if len(slots) == 1 and fail is _raise:
            raise
        log.exception("batched propose failed; drafting slot by slot")
    out = {}
    for s in slots:
        try:
            out.update(call([s]))
        except Exception as e:  # noqa: BLE001
            fail(s, "drafter", e)
    return out


def decode_round(engine, slots: list, fail: Callable = _raise) -> tuple[list[tuple[Any, list[tuple[int, bool]]]], int]:
    """One round for `slots` (Decoding-like: idx, pending, sampling, gen, spec): propose -> cut -> forward ->
    verify -> rollback -> accept -> observe. Returns ([(slot, emitted (token, from_draft) pairs)], rows
    forwarded); a slot whose drafting or sampling raises goes to fail(slot, where, error) and is left out."""
    drafts = propose(engine.drafter, [s for s in slots if s.spec is not None], fail)
    live = [s for s in slots if s.spec is None or s.idx in drafts]
    if not live:
        return [], 0
    rows, parents = [], []
    for s in live:
        d = drafts.get(s.idx)
        rows.append([s.pending] + (d.tokens.tolist() if d is not None else []))
        parents.append(d.parents if d is not None and d.is_tree else None)
    outs = engine.forward_batch([s.idx for s in live], rows, parents)
    done = []
    for s, (logits, hidden) in zip(live, outs):
        try:
            if s.spec is None:
                done.append((s, [(sample_token(logits[-1:], s.sampling, s.gen), False)]))
            else:
                done.append((s, s.spec.finish(logits, hidden)))
        except Exception as e:  # noqa: BLE001 - e.g. NaN probabilities from this request's own settings
            fail(s, "sampling", e)
    return done, sum(map(len, rows))
