"""Kind `ngram`: drafts copied from text already seen, no model (vLLM's prompt lookup + suffix decoding, llama.cpp's
ngram-cache).

Per slot, the history is the prompt plus the ACCEPTED tokens (accept() appends only what the target emitted, so a
rejected draft never enters it). A round drafts from:
  1. prompt lookup: the longest suffix of the history (n_max .. n_min tokens) that occurred earlier in it; the most
     recent earlier occurrence wins and the tokens that followed it are copied (periodically past the history's end);
  2. else the suffix cache shared by all requests of the engine: n-gram -> counts of the token that followed it in
     the outputs of requests so far (each accepted token is counted as it is accepted, so concurrent requests use
     each other's text before they end); drafts greedily (longest known context, most frequent next token,
     smallest id on ties), confidence = that token's share of the counts. The cache keeps at most `cache_size`
     n-grams (LRU). A seeded sampled request does not read it (its drafts, hence its sample, depend only on
     itself: tandem.spec.policy).
Drafts are deterministic (probs None, verified as one-hot); prompt-lookup confidence is 1.0.
A tree (DraftContext.nodes > k_max): every continuation the text knows, merged into one trie up to the node budget:
prompt lookup's continuations after each of the last OCCURRENCES occurrences of the matched suffix (the most recent
first: its branch is the chain draft), else the suffix cache's next tokens expanded best-first by the product of
their shares.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

import torch

from tandem.errors import ConfigError
from tandem.spec.drafter import Draft, DraftContext, Drafter, PromptState, register_kind


class SuffixCache:
    """n-gram (n_min..n_max tokens) -> {next token: count}, learnt from the requests' accepted tokens. Bounded: at
    most `size` n-grams (least recently used dropped first), at most `width` next tokens per n-gram (rarest
    dropped)."""

    def __init__(self, n_min: int, n_max: int, size: int, width: int = 4):
        self.n_min, self.n_max, self.size, self.width = n_min, n_max, size, width
        self.table: OrderedDict[tuple[int, ...], dict[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.table)

    def learn(self, tokens: list[int], start: int) -> None:
        """Count every token of tokens[start:] after each n-gram that precedes it (the prompt gives left context)."""
        for i in range(max(start, self.n_min), len(tokens)):
            t = tokens[i]
            for n in range(self.n_min, min(self.n_max, i) + 1):
                key = tuple(tokens[i - n:i])
                counts = self.table.get(key)
                if counts is None:
                    counts = self.table[key] = {}
                else:
                    self.table.move_to_end(key)
                if t not in counts and len(counts) >= self.width:
                    del counts[min(counts, key=lambda x: (counts[x], -x))]
                counts[t] = counts.get(t, 0) + 1
        while len(self.table) > self.size:
            self.table.popitem(last=False)

    def next(self, tail: list[int]) -> tuple[int, float] | None:
        """The most frequent token after the longest known suffix of `tail`, and its share of the counts."""
        for n in range(min(self.n_max, len(tail)), self.n_min - 1, -1):
            key = tuple(tail[-n:])
            counts = self.table.get(key)
            if counts:
                self.table.move_to_end(key)
                t = min(counts, key=lambda x: (-counts[x], x))
                return t, counts[t] / sum(counts.values())
        return None

    def options(self, tail: list[int]) -> list[tuple[int, float]]:
        """Every token known after the longest known suffix of `tail`, with its share, most frequent first."""
        for n in range(min(self.n_max, len(tail)), self.n_min - 1, -1):
            counts = self.table.get(tuple(tail[-n:]))
            if counts:
                total = sum(counts.values())
                return [(t, c / total) for t, c in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
        return []

    def tree(self, history: list[int], k: int, nodes: int, p_floor: float) -> tuple[list[int], list[int], list[float]]:
        """Best-first expansion (by the product of shares along the path) up to `nodes` nodes of depth <= k."""
        toks: list[int] = []
        parents: list[int] = []
        conf: list[float] = []
        heap: list = []  # (-cumulative share, tie, parent node, token, share, depth, tail after the token)
        order = itertools.count()

        def expand(node: int, tail: list[int], cum: float, depth: int) -> None:
            if depth < k:
                for t, sh in self.options(tail):
                    if sh >= p_floor:
                        heapq.heappush(heap, (-cum * sh, next(order), node, t, sh, depth + 1,
                                              (tail + [t])[-self.n_max:]))

        expand(-1, history[-self.n_max:], 1.0, 0)
        while heap and len(toks) < nodes:
            neg, _, parent, t, sh, depth, tail = heapq.heappop(heap)
            toks.append(t)
            parents.append(parent)
            conf.append(sh)
            expand(len(toks) - 1, tail, -neg, depth)
        return toks, parents, conf

    def draft(self, history: list[int], k: int, p_floor: float) -> tuple[list[int], list[float]]:
        tail, toks, conf = history[-self.n_max:], [], []
        while len(toks) < k:
            hit = self.next(tail)
            if hit is None or hit[1] < p_floor:
                break
            toks.append(hit[0])
            conf.append(hit[1])
            tail = tail[1:] + [hit[0]] if len(tail) >= self.n_max else tail + [hit[0]]
        return toks, conf


OCCURRENCES = 4  # earlier occurrences of an n-gram kept per slot (a tree copies what followed each)


@register_kind("ngram", help="n-grams of the request's own text + a suffix cache learnt from earlier requests "
                             "(no model)")
class NgramDrafter(Drafter):
    max_draft = 16

    def __init__(self, n_min: int = 2, n_max: int = 4, cache_size: int = 1 << 16):
        if not (isinstance(n_min, int) and isinstance(n_max, int) and 1 <= n_min <= n_max <= 16):
            raise ConfigError(f"ngram: need integers 1 <= n_min <= n_max <= 16, got n_min={n_min!r}, n_max={n_max!r}")
        if not (isinstance(cache_size, int) and cache_size >= 0):
            raise ConfigError(f"ngram: cache size must be an integer >= 0 (0 = off), got {cache_size!r}")
        self.n_min, self.n_max = n_min, n_max
        self.suffix = SuffixCache(n_min, n_max, cache_size) if cache_size else None
        self._hist: dict[int, list[int]] = {}  # slot -> prompt + accepted tokens
        # slot -> n-gram -> where its latest occurrences that have a following token end (oldest first)
        self._index: dict[int, dict[tuple[int, ...], list[int]]] = {}
        self._prompt_n: dict[int, int] = {}  # slot -> prompt length (the suffix cache learns what follows it)

    @classmethod
    def build(cls, model=None, target=None, **kw) -> "NgramDrafter":
        return cls(**{k: kw[k] for k in ("n_min", "n_max", "cache_size") if k in kw})

    def describe(self) -> str:
        cache = f"suffix cache {self.suffix.size} n-grams" if self.suffix is not None else "no suffix cache"
        return f"ngram n={self.n_min}..{self.n_max}, {cache}"

    # -- protocol ------------------------------------------------------------------------------------------------
    def begin(self, slot: int, prompt_state: PromptState) -> None:
        self._hist[slot], self._index[slot] = [], {}
        self._prompt_n[slot] = len(prompt_state.ids)
        self._push(slot, list(prompt_state.ids))

    def accept(self, slot: int, tokens: list[int], hidden: torch.Tensor) -> None:
        self._push(slot, tokens)  # [d_1..d_a, y]: what the target emitted after x

    def end(self, slot: int) -> None:
        self._hist.pop(slot, None), self._prompt_n.pop(slot, None), self._index.pop(slot, None)

    def propose(self, batch: list[DraftContext]) -> list[Draft]:
        out = []
        for c in batch:
            hist = self._hist[c.slot]
            if len(hist) == c.position:  # x of the first round (sampled from the prefill) is not yet in
                self._push(c.slot, [c.last_token])
            if len(hist) != c.position + 1 or hist[-1] != c.last_token:
                raise RuntimeError(f"ngram slot {c.slot}: history of {len(hist)} tokens does not end with the "
                                   f"token at position {c.position}")
            private = c.sampling.seed is not None and not c.sampling.greedy  # reproducible: no shared state
            if c.k_max > 0 and c.nodes > c.k_max:
                out.append(Draft.tree(*self._tree(c.slot, c.k_max, c.nodes, c.p_floor, not private)))
                continue
            toks, conf = self._draft(c.slot, c.k_max, c.p_floor, not private) if c.k_max > 0 else ([], [])
            out.append(Draft(torch.tensor(toks, dtype=torch.long), None, conf))
        return out

    # -- internals -----------------------------------------------------------------------------------------------
    def _push(self, slot: int, tokens: list[int]) -> None:
        hist, index = self._hist[slot], self._index[slot]
        start = len(hist)
        for t in tokens:
            i = len(hist)  # the n-grams ending at i-1 now have a following token
            for n in range(self.n_min, min(self.n_max, i) + 1):
                ends = index.setdefault(tuple(hist[i - n:i]), [])
                ends.append(i - 1)
                del ends[:-OCCURRENCES]
            hist.append(int(t))
        if self.suffix is not None:  # the output so far (not the prompt), as it is accepted
            self.suffix.learn(hist, max(start, self._prompt_n[slot]))

    def _draft(self, slot: int, k: int, p_floor: float, shared: bool = True) -> tuple[list[int], list[float]]:
        hist, index = self._hist[slot], self._index[slot]
        for n in range(min(self.n_max, len(hist)), self.n_min - 1, -1):
            ends = index.get(tuple(hist[-n:]))
            if ends:
                j, toks = ends[-1], []
                for p in range(j + 1, j + 1 + k):  # past the end: copy what was just drafted (periodic text)
                    toks.append(hist[p] if p < len(hist) else toks[p - len(hist)])
                return toks, [1.0] * k
        if self.suffix is not None and shared:
            return self.suffix.draft(hist, k, p_floor)
        return [], []

    def _tree(self, slot: int, k: int, nodes: int, p_floor: float, shared: bool):
        """(tokens, parents, confidence): the continuations after every kept occurrence of the longest matched
        suffix (most recent first) merged into a trie of <= nodes nodes, else the suffix cache's tree."""
        hist, index = self._hist[slot], self._index[slot]
        for n in range(min(self.n_max, len(hist)), self.n_min - 1, -1):
            ends = index.get(tuple(hist[-n:]))
            if ends:
                toks, parents, child = [], [], {}
                for j in reversed(ends):
                    node, run = -1, []
                    for p in range(j + 1, j + 1 + k):
                        run.append(hist[p] if p < len(hist) else run[p - len(hist)])
                        t = run[-1]
                        if (node, t) not in child:
                            if len(toks) >= nodes:
                                break
                            child[node, t] = len(toks)
                            toks.append(t)
                            parents.append(node)
                        node = child[node, t]
                return toks, parents, [1.0] * len(toks)
        if self.suffix is not None and shared:
            return self.suffix.tree(hist, k, nodes, p_floor)
        return [], [], []
