"""Drafter protocol v2, the registry of drafter kinds, and the one table of request-level method names.

A scheduler step, as the engine runs it (tandem.engine.speculative) for ALL speculating slots at once:

    drafter.make_cache(n_slots, max_len, ...)    once, by Engine.__init__: a drafter that owns a cache is sized here
    drafter.begin(slot, prompt_state)            once per request, after the target's prefill; prompt_state.hidden
                                                 = the last prompt row [1, D], or every prompt row [P, D] when the
                                                 drafter's class sets needs_prompt_hidden (only then does the
                                                 engine's prefill keep them: plain decoding pays nothing)
    loop:
        drafts = drafter.propose([ctx_1..ctx_B]) ONE call for all speculating slots -> one Draft per context, in order
                                                 (ragged: each Draft has its own length k_b <= ctx_b.k_max)
        policy.cut(draft)                        the speculator's rule (n_min / p_min), not the drafter's
        target forward over [x, d_1..d_k] per slot, verify, cache rolled back to position + a + 1
        drafter.accept(slot, tokens, hidden)     tokens = the a+1 emitted [d_1..d_a, y]; hidden [a+1, D] = the
                                                 target's rows that produced them (row i produced tokens[i])
    drafter.end(slot)

Trees: when ctx.nodes > ctx.k_max a drafter may return a draft TREE (Draft.parents; at most ctx.nodes nodes, depth
<= k_max, parents before children, distinct sibling tokens, deterministic: probs None); a drafter that cannot
returns a chain, the one-branch tree. The engine verifies all nodes in one forward (a node at position
position + depth sees its ancestors), then calls accept(slot, tokens, hidden) exactly as for a chain: tokens = the
accepted PATH's tokens + the recovered/bonus token, hidden = the target rows of that path. A drafter that ran tree
nodes on its own cache finds the path by those tokens and compacts the path's entries in place (its cache's
compact(), as the engine does for the target) before dropping the rest: its cache again holds only accepted tokens.

ctx.last_token x sits at ctx.position; the target cache holds entries 0..position-1 when propose runs. A drafter
never writes the target cache. A drafter with its own cache keeps in it only accepted tokens (it learns what was
accepted from accept()'s tokens); a token it has not run yet (the last draft of a fully accepted round) it runs
with the next propose. `Draft.probs = None` marks deterministic drafts (verified as one-hot q).

Kinds (`assistant`, `draft-model`, `nextn`, `eagle3`, ...) are registered by the modules that implement them; which
kind a drafter checkpoint is comes from `KINDS[...].model_types` (a table), the `fallback` kind taking any full model. A
kind with `in_target` builds from the target itself (its checkpoint carries the drafter: `nextn`'s MTP heads);
load_drafter(None) uses it when the predicate holds. describe() names a drafter for people (`tandem generate`).
"""

from __future__ import annotations

import heapq

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.errors import ConfigError, ModelLoadError
from tandem.kvcache.cache import TreeRows


@dataclass
class Draft:
    """A draft TREE over the last emitted token x (the root). tokens [N] long, node i's parent parents[i] (-1: the
    root x; a parent comes before its children; siblings carry distinct tokens); parents None = a chain (node i's
    parent is i - 1), the one-branch tree. probs [N, V] fp32 = the distribution each token was SAMPLED from, or
    None (deterministic drafts; trees are always deterministic). confidence [N]: the drafter's probability of each
    node's token given its parent (a chain: the top-1 probability at each step), what the policy's p_min compares
    against. N may be 0. source: the kind that drafted it (a chain of drafters names its winner)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    confidence: list[float] = field(default_factory=list)
    source: str = ""
    parents: list[int] | None = None

    @property
    def k(self) -> int:
        """Nodes (= draft tokens a chain verifies)."""
        return int(self.tokens.shape[0])

    @property
    def is_tree(self) -> bool:
        return self.parents is not None and self.parents != list(range(-1, self.k - 1))

    def parent_list(self) -> list[int]:
        return list(range(-1, self.k - 1)) if self.parents is None else list(self.parents)

    def depths(self) -> list[int]:
        """Depth of each node (a child of the root: 1)."""
        out: list[int] = []
        for p in self.parent_list():
            out.append(1 if p < 0 else out[p] + 1)
        return out

    @property
    def depth(self) -> int:
        return max(self.depths(), default=0)

    @staticmethod
    def empty(device="cpu") -> "Draft":
        return Draft(torch.zeros(0, dtype=torch.long, device=device), None, [])

    def head(self, n: int) -> "Draft":
        """A chain's first n tokens."""
        assert not self.is_tree
        return Draft(self.tokens[:n], None if self.probs is None else self.probs[:n], self.confidence[:n],
                     self.source)

    def select(self, keep: list[int]) -> "Draft":
        """The subtree of nodes `keep` (ascending; each one's parent kept too), renumbered."""
        new = {-1: -1, **{old: i for i, old in enumerate(keep)}}
        pl = self.parent_list()
        idx = torch.tensor(keep, dtype=torch.long, device=self.tokens.device)
        return Draft(self.tokens[idx], None if self.probs is None else self.probs[idx],
                     [self.confidence[i] for i in keep], self.source, [new[pl[i]] for i in keep])

    @staticmethod
    def tree(tokens: list[int], parents: list[int], confidence: list[float], device="cpu") -> "Draft":
        """A deterministic draft tree (a chain when parents is 0..N-2 shifted: stored as a chain)."""
        chain = parents == list(range(-1, len(tokens) - 1))
        return Draft(torch.tensor(tokens, dtype=torch.long, device=device), None, list(confidence), "",
                     None if chain else list(parents))


@dataclass
class PromptState:
    """What a drafter may read after prefill. hidden: the target's final-norm hidden rows [r, D] of the last r
    prompt positions (row r-1 produced the first generated token): r = 1, or r = len(ids) for a drafter whose
    class sets needs_prompt_hidden."""

    ids: list[int]
    hidden: torch.Tensor
    cache: Any  # the target's cache


@dataclass
class DraftContext:
    """One slot of a propose() call. last_token sits at `position`; the target cache holds entries 0..position-1."""

    slot: int
    last_token: int
    position: int
    cache: Any  # the target's cache (read-only for drafters)
    sampling: SamplingParams
    k_max: int  # most tokens this slot may draft this round (decided by tandem.spec.policy); a tree: its depth
    nodes: int = 0  # a tree's node budget (> k_max: the slot takes a tree; else a chain of at most k_max)
    k_by_member: dict[str, int] | None = None  # a chain: each member's own k_max (0: skip it this round)
    p_floor: float = 0.0  # a drafter may stop a row early once its top-1 probability falls below this
    sample_drafts: bool = False  # draw from the drafter's processed distribution (T > 0 and the method asks)
    generator: torch.Generator | None = None
    request_id: str | None = None
    round: int = 0
    spec: SpecConfig | None = None  # the request's settings (a chain reads its order of drafters here)


class Drafter:
    """Base class of every drafter kind (see the module docstring for the call order)."""

    kind: ClassVar[str] = ""
    max_draft: ClassVar[int] = 16
    needs_prompt_hidden: ClassVar[bool] = False  # begin() gets every prompt row's hidden state, not just the last

    def describe(self) -> str:
        """What this drafter is, for people: kind and source (e.g. `assistant <path>`)."""
        return self.kind

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str, v_type: str, device) -> None:
        """Allocate the drafter's own cache (only drafters that own one override this)."""

    def begin(self, slot: int, prompt_state: PromptState) -> None:
        raise NotImplementedError

    def propose(self, batch: list[DraftContext]) -> list[Draft]:
        raise NotImplementedError

    def accept(self, slot: int, tokens: list[int], hidden: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self, slot: int) -> None:
        """Forget the slot's state."""


def propose_split(batch: list[DraftContext], trees: list[int], chains_fn, trees_fn) -> list[Draft]:
    """Drafts for `batch` where the contexts at indices `trees` draft trees (trees_fn) and the rest chains
    (chains_fn), each function called once on its sub-batch; results back in batch order."""
    if not trees:
        return chains_fn(batch)
    chains = [b for b in range(len(batch)) if b not in trees]
    out: list[Draft | None] = [None] * len(batch)
    for idx, fn in ((chains, chains_fn), (trees, trees_fn)):
        for b, d in zip(idx, fn([batch[b] for b in idx]) if idx else []):
            out[b] = d
    return out


def grow_trees(batch: list[DraftContext], logits: torch.Tensor, run_front, device, ids=None) -> list[Draft]:
    """EAGLE-2 trees for `batch` (contexts with nodes > k_max); logits [B, V] fp32: each root's children. Per depth,
    the top-W children (W = max(2, min(4, ceil(nodes / k_max)))) of every frontier node with probability >= p_floor;
    the W best by cumulative probability at depth < k_max form the next frontier, which run_front(front, nodes) runs
    (front {b: [(node, cum, depth)]}, nodes[b][i] = (token, parent node | -1, prob, cum)) and returns its logits
    [B', W, V] in front's order. The draft: the `nodes` best nodes (ties by index). ids: the token ids of vocabulary
    indices (a reduced draft vocabulary), None: the indices."""
    width = {b: max(2, min(4, -(-c.nodes // c.k_max))) for b, c in enumerate(batch)}
    nodes: list[list[tuple[int, int, float, float]]] = [[] for _ in batch]
    front = {b: [(-1, 1.0, 0)] for b in range(len(batch))}  # (node, cum, depth) whose children come next
    for step in range(max(c.k_max for c in batch)):
        cand = {}
        for i, b in enumerate(front):
            probs = torch.softmax(logits[i], -1)  # [V] at the roots, then [W, V]
            for r, (node, cum, depth) in enumerate(front[b]):
                top, tok = (probs[r] if step else probs).topk(width[b])
                for p, t in zip(top.tolist(), (tok if ids is None else ids(tok)).tolist()):
                    if p >= batch[b].p_floor and depth < batch[b].k_max:
                        nodes[b].append((t, node, p, cum * p))
                        cand.setdefault(b, []).append((len(nodes[b]) - 1, cum * p, depth + 1))
        front = {b: heapq.nlargest(width[b], cs, key=lambda f: f[1]) for b, cs in cand.items()}
        front = {b: [f for f in fs if f[2] < batch[b].k_max] for b, fs in front.items()}
        front = {b: fs for b, fs in front.items() if fs}
        if not front:
            break
        logits = run_front(front, nodes)  # [B', W, V]
    out = []
    for b, c in enumerate(batch):
        keep = sorted(sorted(range(len(nodes[b])), key=lambda i: (-nodes[b][i][3], i))[:c.nodes])
        new = {-1: -1, **{old: i for i, old in enumerate(keep)}}
        out.append(Draft.tree([nodes[b][i][0] for i in keep], [new[nodes[b][i][1]] for i in keep],
                              [nodes[b][i][2] for i in keep], device))
    return out


def tree_rows(front, nodes, entry, region, base: list[int], first: list[int]):
    """The rows of one grow_trees frontier forward on a drafter's own cache: batch row r's nodes (front's order) go
    to region entries base[r] + u (entry[b][node] = u from now on; the root's is -1) at position first[r] + depth,
    each seeing its run ancestors and itself (region[b]: (position, parent entry) per run entry). Returns tokens
    and positions [B', W] long (padding: position -1) and the TreeRows, on the CPU."""
    items = list(front.items())
    B, T = len(items), max(len(fs) for _, fs in items)
    M = max(len(region[b]) + len(fs) for b, fs in items)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    index = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.full((B, M), -1, dtype=torch.long)
    mask = torch.zeros(B, T, M, dtype=torch.bool)
    for r, (b, fs) in enumerate(items):
        for t, (node, _, depth) in enumerate(fs):
            u, par = len(region[b]), entry[b][nodes[b][node][1]]
            region[b].append((first[r] + depth, par))
            entry[b][node] = u
            tokens[r, t], positions[r, t], index[r, t] = nodes[b][node][0], first[r] + depth, base[r] + u
            while u >= 0:  # itself and its ancestors
                mask[r, t, u] = True
                u = region[b][u][1]
        pos[r, :len(region[b])] = torch.tensor([p for p, _ in region[b]])
    return tokens, positions, TreeRows(index, torch.tensor(base), pos, mask)


# -- kinds ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """A drafter kind. build(model, target, *, target_name, name, tokenizer, target_tokenizer, weight_format)
    -> Drafter; an in-target kind is built with model=None."""

    name: str
    cls: type
    build: Callable[..., Drafter]
    model_types: frozenset[str]  # drafter checkpoints of these model types are this kind
    fallback: bool  # the kind of any other full model the engine runs
    help: str = ""
    in_target: Callable[[Any], bool] | None = None  # the target's own checkpoint carries a drafter of this kind


KINDS: dict[str, Kind] = {}


def register_kind(name: str, *, model_types: tuple[str, ...] = (), fallback: bool = False, help: str = "",
                  in_target: Callable[[Any], bool] | None = None):
    """Class decorator: the class's `build` classmethod makes the drafter from a loaded model (or, for a kind
    with an `in_target` predicate, from the target alone)."""
    def deco(cls):
        cls.kind = name
        KINDS[name] = Kind(name, cls, cls.build, frozenset(model_types), fallback, help, in_target)
        return cls
    return deco


def in_target_kind(target: Any) -> Kind | None:
    """The first registered kind whose drafter the target's own checkpoint carries, or None."""
    import tandem.spec  # noqa: F401  (registers the built-in kinds)
    return next((k for k in KINDS.values() if k.in_target is not None and k.in_target(target)), None)


def kind_of(model: Any, name: str = "drafter") -> Kind:
    """The kind a loaded drafter model is, from the model-type table (a full model: the fallback kind)."""
    import tandem.spec  # noqa: F401  (registers the built-in kinds)
    mtype = getattr(getattr(model, "args", None), "model_type", None)
    for k in KINDS.values():
        if mtype in k.model_types:
            return k
    fallback = [k for k in KINDS.values() if k.fallback]
    if fallback and getattr(model, "owns_kv", True) and hasattr(model, "make_cache"):
        return fallback[0]
    raise ModelLoadError(f"drafter {name}: model_type {mtype!r} is not a drafter kind (kinds: "
                         f"{ {k.name: sorted(k.model_types) or 'any full model' for k in KINDS.values()} })")


# -- request-level method names -> (kind, sampling of drafts) --------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    kind: str | None  # None: whatever kind the engine's drafter is
    sample_drafts: bool  # at T > 0 drafts are sampled (p/q rejection) instead of argmax (sample-and-compare)
    help: str = ""

    @property
    def drafter_cls(self) -> type:
        return KINDS[self.kind].cls if self.kind is not None else Drafter

    def fits(self, drafter: Any) -> bool:
        """The drafter is of this method's kind, or is a chain with a member of it (tandem.spec.chain)."""
        members = getattr(drafter, "members", None) or {}
        return any(isinstance(d, self.drafter_cls) for d in (drafter, *members.values()))


# the only place method names are defined (SpecConfig.method picks one); tests add their own via register_method
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("auto", None, False, "the engine's drafter, argmax drafts (sample-and-compare at T > 0)"),
    Method("mtp", "assistant", False, "Gemma 4 assistant, argmax drafts (sample-and-compare at T > 0)"),
    Method("mtp_sample", "assistant", True, "Gemma 4 assistant, sampled drafts (p/q rejection at T > 0)"),
    Method("draft", "draft-model", False, "a draft model, argmax drafts (sample-and-compare at T > 0)"),
    Method("draft_sample", "draft-model", True, "a draft model, sampled drafts (p/q rejection at T > 0)"),
    Method("nextn", "nextn", False, "the target's MTP heads, argmax drafts (sample-and-compare at T > 0)"),
    Method("nextn_sample", "nextn", True, "the target's MTP heads, sampled drafts (p/q rejection at T > 0)"),
    Method("eagle3", "eagle3", False, "an EAGLE-3 head, argmax drafts (sample-and-compare at T > 0)"),
    Method("eagle3_sample", "eagle3", True, "an EAGLE-3 head, sampled drafts (p/q rejection at T > 0)"),
    Method("ngram", "ngram", False, "n-gram lookup in the request's text + the suffix cache (no model)"),
)}


def register_method(name: str, kind: str | None, sample_drafts: bool = False, help: str = "") -> Method:
    METHODS[name] = Method(name, kind, sample_drafts, help)
    return METHODS[name]


def get_method(name: str) -> Method:
    import tandem.spec  # noqa: F401  (registers the built-in kinds)
    m = METHODS.get(name)
    if m is None:
        raise ConfigError(f"speculative.method {name!r} unknown; known: {sorted(METHODS)}")
    return m
