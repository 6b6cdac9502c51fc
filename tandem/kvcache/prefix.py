"""Prefix cache across requests and slots: blocks of BLOCK prompt tokens keyed by a hash chain over all tokens before
them, LRU under a byte budget. A request copies the longest cached prefix into its slot and prefills the rest.

A block holds, for its BLOCK positions, what the cache kind stores per position, copied verbatim (`export_rows`):
K/V of every layer (plain, q8_0 or rotated turbo codes + scales), MLA latents. Sliding-window layers (Gemma 3/4,
Mistral) keep every position in the slot's position-indexed buffers (the window is a read mask), so a block holds
them all and the tokens after a restored prefix see exactly their window. Recurrent state (Gated DeltaNet) cannot be
cut per position: the block that ends on a prefill-chunk boundary carries a snapshot of the conv windows and delta
states after its last token, and a hybrid prefix may end only there. Optionally (a drafter that reads every prompt
row, e.g. nextn) a block carries the target's final hidden rows, so the drafter's begin() rebuilds its own cache
from them; the assistant reads the target's cache (restored here) and a draft model re-prefills in its begin().

Why the bits are a fresh prefill's (tests/test_prefix_cache.py checks cache contents and T=0 outputs):
- `anywhere` mode (the engine is row-invariant, kernels.exactness, and holds no recurrent state): each position's
  entries depend only on its token, its position and the entries before it, never on which forward or how many
  rows computed it; equal tokens before => equal bits, wherever a block came from (prefill chunk, decode row or
  verify row). Blocks are stored after prefill (prompt) and at release (prompt + generated tokens in the cache).
- `grid` mode (recurrent state, or kernels that vary with the row count): prefill always runs chunks on the fixed
  grid of multiples of PREFILL_CHUNK from position 0, so the chunk [g, g + C) of a prompt is the same forward every
  time its tokens recur. Blocks are stored only when prefill reaches a grid point g (every position < g came from a
  grid chunk, the recurrent state is the one after g), and a prefix is restored only up to a grid point.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

BLOCK = 16  # tokens per block; PREFILL_CHUNK is a multiple of it, so grid points are block ends


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class _Block:
    tokens: tuple[int, ...]
    parent: bytes
    rows: list[torch.Tensor]  # cache.export_rows for the block's positions
    hidden: torch.Tensor | None = None  # [BLOCK, D] target final hidden rows
    snapshot: list[torch.Tensor] | None = None  # recurrent state after the block's last token
    nbytes: int = 0


@dataclass
class Match:
    n: int  # cached prompt tokens to restore
    blocks: list[_Block] = field(default_factory=list)


@dataclass
class PrefixStats:
    lookups: int = 0  # requests that asked
    hits: int = 0  # requests that restored at least one block
    lookup_tokens: int = 0  # prompt tokens of those requests
    reused_tokens: int = 0  # prompt tokens restored instead of prefilled
    evictions: int = 0  # blocks dropped for the budget
    stored_blocks: int = 0


class PrefixCache:
    """Blocks for `cache` (the engine's target cache) within `budget_bytes`.

    exact: the engine's rows are computed row-invariantly (anywhere mode, unless the cache holds recurrent state);
    grid: the prefill chunk (PREFILL_CHUNK); needs_hidden: blocks carry the target's hidden rows."""

    def __init__(self, cache, budget_bytes: int, *, exact: bool, grid: int, needs_hidden: bool = False,
                 block: int | None = None):
        block = block or BLOCK
        if grid % block:
            raise ValueError(f"prefill chunk {grid} must be a multiple of the prefix block {block}")
        self.cache, self.budget, self.block, self.grid = cache, int(budget_bytes), block, grid
        self.recurrent = getattr(cache, "recurrent", None)
        self.anywhere = exact and self.recurrent is None
        self.needs_hidden = needs_hidden
        self.blocks: OrderedDict[bytes, _Block] = OrderedDict()  # LRU first; parents always after their children
        self.bytes = 0
        self.stats = PrefixStats()

    @staticmethod
    def _key(parent: bytes, tokens) -> bytes:
        return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()

    def _chain(self, ids: list[int], n: int):
        """(key, parent key, tokens) of the full blocks of ids[:n]."""
        parent = b""
        for a in range(0, n - n % self.block, self.block):
            toks = tuple(ids[a:a + self.block])
            key = self._key(parent, toks)
            yield key, parent, toks
            parent = key

    def _touch(self, keys: list[bytes]) -> None:
        for k in reversed(keys):  # deepest first: a parent stays more recent than its children, evicted after them
            self.blocks.move_to_end(k)

    # -- lookup --------------------------------------------------------------------------------------------------
    def match(self, ids: list[int]) -> Match:
        """The longest restorable prefix of ids, leaving at least one token to prefill (its logits are needed)."""
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(ids)
        found: list[_Block] = []
        keys: list[bytes] = []
        for key, _, toks in self._chain(ids, len(ids) - 1):
            b = self.blocks.get(key)
            if b is None or b.tokens != toks or (self.needs_hidden and b.hidden is None):
                break
            found.append(b)
            keys.append(key)
        n = len(found) * self.block
        if not self.anywhere:  # down to the last grid point (with its snapshot when recurrent)
            n -= n % self.grid
            while n and self.recurrent is not None and found[n // self.block - 1].snapshot is None:
                n -= self.grid
        found, keys = found[:n // self.block], keys[:n // self.block]
        self._touch(keys)
        if n:
            self.stats.hits += 1
            self.stats.reused_tokens += n
        return Match(n, found)

    def load(self, slot: int, m: Match) -> torch.Tensor | None:
        """Copy the matched blocks into `slot` and set its length to m.n; returns their hidden rows [n, D] when
        blocks carry them (else None)."""
        rows = [torch.cat(parts, dim=1) for parts in zip(*(b.rows for b in m.blocks))]
        self.cache.import_rows(slot, 0, rows)
        if self.recurrent is not None:
            self.recurrent.load_snapshot(slot, m.n, m.blocks[-1].snapshot)
        self.cache.set_length(slot, m.n)
        if self.needs_hidden:
            return torch.cat([b.hidden for b in m.blocks])
        return None

    # -- storing -------------------------------------------------------------------------------------------------
    def store(self, slot: int, ids: list[int], n: int, hidden: torch.Tensor | None = None) -> None:
        """Keep the full blocks of ids[:n], whose entries `slot` holds now (n <= its length); hidden [>= n, D]: the
        target's hidden rows of those positions (blocks without them are not stored when needs_hidden). In grid
        mode n must be a grid point reached by prefill; the last block then gets the recurrent snapshot."""
        if self.needs_hidden:
            n = min(n, 0 if hidden is None else hidden.shape[0])
        if not self.anywhere:
            n -= n % self.grid
        n = min(n, len(ids), self.cache.lengths[slot])
        keys = []
        for i, (key, parent, toks) in enumerate(self._chain(ids, n)):
            keys.append(key)
            b = self.blocks.get(key)
            if b is not None and b.tokens == toks:
                continue
            a = i * self.block
            b = _Block(toks, parent, self.cache.export_rows(slot, a, a + self.block),
                       hidden[a:a + self.block].clone() if self.needs_hidden else None)
            self._add(key, b)
        if keys and self.recurrent is not None and self.recurrent.seen[slot] == n:
            last = self.blocks[keys[-1]]
            if last.snapshot is None:
                last.snapshot = self.recurrent.snapshot(slot)
                self._resize(last)
        self._touch(keys)
        self._evict()

    def _add(self, key: bytes, b: _Block) -> None:
        old = self.blocks.pop(key, None)  # a hash collision (different tokens): the newer block wins
        if old is not None:
            self.bytes -= old.nbytes
        self.blocks[key] = b
        self._resize(b)
        self.stats.stored_blocks += 1

    def _resize(self, b: _Block) -> None:
        new = _nbytes(b.rows) + _nbytes([b.hidden]) + _nbytes(b.snapshot or [])
        self.bytes += new - b.nbytes
        b.nbytes = new

    def _evict(self) -> None:
        while self.bytes > self.budget and self.blocks:
            _, b = self.blocks.popitem(last=False)
            self.bytes -= b.nbytes
            self.stats.evictions += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0
