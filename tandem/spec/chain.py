"""Chains of drafters: an ordered set of drafters; per slot and round, the first of the request's chain that
proposes a draft (at least n_min tokens) wins, e.g. ["ngram", "mtp"]: copy from the text when it repeats itself,
else ask the MTP drafter.

Each member drafts at most its own k (DraftContext.k_by_member, the per-member adaptive length of
tandem.spec.policy.ChainLengths; None: k_max for all); a member whose k is 0 is skipped and the next one is asked.
Every member sees every begin / propose / accept / end of every slot, whether or not it drafts for that slot this
round (a member not asked gets k_max = 0): a drafter with its own state (draft model cache, nextn heads, ngram
history) must follow all accepted tokens even in rounds another member won. Each member is called with all the
slots that reach it at the same place of their chains (one batched call per member in the common case).

A tree request (DraftContext.nodes > k_max) asks every member of its chain and MERGES their trees into one trie
(the first member's nodes first, then the others' branches while the node budget lasts): the target verifies every
member's continuations in the same forward.

Chain names are kind names (ngram, assistant, draft-model, nextn) or the method names of a kind (mtp, draft).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from tandem.config import SpecConfig
from tandem.errors import ConfigError
from tandem.spec.drafter import KINDS, METHODS, Draft, DraftContext, Drafter, PromptState, get_method


def chain_kind(name: str) -> str:
    """The drafter kind a chain name stands for (ConfigError naming the known names)."""
    import tandem.spec  # noqa: F401  (registers the built-in kinds)
    if name in KINDS:
        return name
    m = METHODS.get(name)
    if m is not None and m.kind is not None and not m.sample_drafts:
        return m.kind
    raise ConfigError(f"speculative.chain: unknown drafter {name!r}; known: {sorted(names_for(KINDS))}")


def names_for(kinds) -> list[str]:
    """Every chain name (kind or method name) that stands for one of `kinds`."""
    aliases = [m.name for m in METHODS.values() if m.kind in kinds and not m.sample_drafts]
    return sorted(set(kinds) | set(aliases))


def kinds_of(drafter: Any) -> list[str]:
    """The kinds an engine's drafter offers: a chain's members, else the drafter's own kind."""
    members = getattr(drafter, "members", None)
    return list(members) if members else [drafter.kind]


def check_spec(drafter: Any, spec: SpecConfig) -> None:
    """A request's method and chain must name drafters the engine has (ConfigError naming the allowed ones)."""
    method = get_method(spec.method)
    if not method.fits(drafter):
        hint = " (start it with --spec-chain ngram)" if spec.method == "ngram" else ""
        raise ConfigError(f"speculative.method {spec.method!r} needs a {method.drafter_cls.__name__}, "
                          f"the engine has {describe(drafter)}{hint}")
    have = kinds_of(drafter)
    for name in spec.chain:
        try:
            kind = chain_kind(name)
        except ConfigError:
            kind = None
        if kind not in have:
            raise ConfigError(f"speculative.chain: {name!r} is not a drafter of this engine; allowed: "
                              f"{names_for(have)}")


def member(drafter: Any, kind: str) -> Any:
    """The engine's drafter of `kind`: the drafter itself, or that member of its chain (None when it has none)."""
    if getattr(drafter, "kind", None) == kind:
        return drafter
    return (getattr(drafter, "members", None) or {}).get(kind)


def describe(drafter: Any) -> str:
    return drafter.describe() if drafter is not None else "no drafter"


class ChainDrafter(Drafter):
    """members: kind name -> drafter, in the default order (a request without a chain uses it; one whose method
    names a kind uses that member alone)."""

    kind = "chain"

    def __init__(self, members: dict[str, Drafter]):
        if not members:
            raise ConfigError("a chain of drafters needs at least one drafter")
        self.members = dict(members)
        self.order = tuple(members)
        self.needs_prompt_hidden = any(d.needs_prompt_hidden for d in members.values())
        self.max_draft = max(d.max_draft for d in members.values())
        self.recommended: dict = {}  # n_max / p_min: the first member recommending each (tandem.spec.policy)
        for d in reversed(list(members.values())):
            self.recommended.update(getattr(d, "recommended", {}))

    def describe(self) -> str:
        return "chain " + " -> ".join(d.describe() for d in self.members.values())

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str, v_type: str, device) -> None:
        for d in self.members.values():
            d.make_cache(n_slots, max_len, k_type=k_type, v_type=v_type, device=device)

    def begin(self, slot: int, prompt_state: PromptState) -> None:
        last = dataclasses.replace(prompt_state, hidden=prompt_state.hidden[-1:])
        for d in self.members.values():
            d.begin(slot, prompt_state if d.needs_prompt_hidden else last)

    def accept(self, slot: int, tokens: list[int], hidden) -> None:
        for d in self.members.values():
            d.accept(slot, tokens, hidden)

    def end(self, slot: int) -> None:
        for d in self.members.values():
            d.end(slot)

    def chain_of(self, ctx: DraftContext) -> tuple[str, ...]:
        return self.chain_for(ctx.spec)

    def chain_for(self, spec: SpecConfig | None) -> tuple[str, ...]:
        """The member kinds a request's settings ask for, in order."""
        if spec is None:
            return self.order
        if spec.chain:
            return tuple(dict.fromkeys(chain_kind(n) for n in spec.chain))  # "mtp" and "assistant": once
        kind = get_method(spec.method).kind
        return (kind,) if kind is not None else self.order

    def propose(self, batch: list[DraftContext]) -> list[Draft]:
        chains = [self.chain_of(c) for c in batch]
        won: list[Draft | None] = [None] * len(batch)
        trees = {b: [] for b, c in enumerate(batch) if c.nodes > c.k_max}  # tree rows: every member's tree
        asked = {name: set() for name in self.order}  # batch rows each member has seen this round
        for level in range(max(map(len, chains), default=0)):
            groups: dict[str, list[int]] = {}
            for b, ch in enumerate(chains):
                if won[b] is None and level < len(ch) and self._k(batch[b], ch[level]) > 0:
                    groups.setdefault(ch[level], []).append(b)
            for name, rows in groups.items():
                for b, d in zip(rows, self._call(name, batch, rows)):
                    asked[name].add(b)
                    d.source = name
                    n_min = batch[b].spec.n_min if batch[b].spec is not None else 1
                    if b in trees:
                        trees[b] += [d] if d.k else []
                    elif d.k >= n_min:
                        won[b] = d
        for b, drafts in trees.items():
            won[b] = merge_trees(drafts, batch[b].nodes) if drafts else None
        for name in self.order:  # the others follow the round without drafting
            rest = [b for b in range(len(batch)) if b not in asked[name]]
            if rest:
                self._call(name, batch, rest, k_max=0)
        return [d if d is not None else Draft.empty() for d in won]

    def _k(self, ctx: DraftContext, name: str) -> int:
        k = ctx.k_max if ctx.k_by_member is None else ctx.k_by_member.get(name, ctx.k_max)
        return min(k, ctx.k_max, self.members[name].max_draft)

    def _call(self, name: str, batch: list[DraftContext], rows: list[int], k_max: int | None = None) -> list[Draft]:
        ctxs = [dataclasses.replace(batch[b], k_max=self._k(batch[b], name) if k_max is None else k_max,
                                    k_by_member=None) for b in rows]
        d = self.members[name]
        out = d.propose(ctxs)
        if len(out) != len(ctxs):
            raise RuntimeError(f"drafter {name} returned {len(out)} drafts for {len(ctxs)} slots")
        return out


def merge_trees(drafts: list[Draft], budget: int) -> Draft:
    """One trie of the drafts' nodes (in order, each draft's in its own order) while `budget` nodes last; a node
    already present (same parent, same token) is shared. Source: the first draft's."""
    toks, parents, conf, at = [], [], [], {}
    for d in drafts:
        mine: dict[int, int | None] = {-1: -1}  # this draft's node -> merged node (None: dropped)
        for i, (t, p) in enumerate(zip(d.tokens.tolist(), d.parent_list())):
            par = mine.get(p)
            if par is None:
                mine[i] = None
                continue
            if (par, t) not in at:
                if len(toks) >= budget:
                    mine[i] = None
                    continue
                at[par, t] = len(toks)
                toks.append(t)
                parents.append(par)
                conf.append(d.confidence[i])
            mine[i] = at[par, t]
    out = Draft.tree(toks, parents, conf, drafts[0].tokens.device)
    out.source = drafts[0].source
    return out


def build_drafters(names: tuple[str, ...], load_model_drafter: Callable[[], Drafter | None],
                   ngram: dict | None = None) -> Drafter | None:
    """The engine's drafter for `--spec-chain` names: the ngram drafter and/or the one model drafter
    (load_model_drafter: --drafter, the known one, or the target's own heads); a chain when there are several.
    No names: the chain ngram -> model drafter (copying where the text repeats costs nothing and, with each
    member's own adaptive length, measured never slower than the model drafter alone), or n-gram alone for a
    target without a model drafter (adaptive: where nothing repeats it drafts nothing, a plain step)."""
    from tandem.spec.ngram import NgramDrafter

    if not names:
        model, ngram_d = load_model_drafter(), NgramDrafter.build(**(ngram or {}))
        return ngram_d if model is None else ChainDrafter({"ngram": ngram_d, model.kind: model})
    kinds = [chain_kind(n) for n in names]
    if len(set(kinds)) != len(kinds) or len([k for k in kinds if k != "ngram"]) > 1:
        raise ConfigError(f"--spec-chain {','.join(names)}: each drafter once; ngram and at most one model drafter")
    members: dict[str, Drafter] = {}
    for name, kind in zip(names, kinds):
        if kind == "ngram":
            members[kind] = NgramDrafter.build(**(ngram or {}))
            continue
        model = load_model_drafter()
        if model is None or model.kind != kind:
            raise ConfigError(f"--spec-chain names {name!r} (a {kind} drafter) but the drafter loaded is "
                              f"{describe(model)}")
        members[kind] = model
    if len(members) == 1:
        return next(iter(members.values()))
    return ChainDrafter(members) if members else None
