"""Kind `draft-model`: any model the engine runs, with the target's vocabulary, drafting on its OWN KV cache.

The engine sizes the cache (make_cache: slots, context, cache types). begin() prefills the prompt into it. Each
propose() runs the draft steps for all slots together: step 1 feeds, per slot, the accepted tokens it has not run
yet plus the last emitted token x (ragged rows, padded with position -1); step i feeds d_{i-1}. Drafts are the
argmax (deterministic, probs None) or, when the method samples drafts, draws from the processed distribution
(probs = q, for p/q rejection). accept() rolls the cache back to the longest prefix of what it ran that the
target accepted (the verified tokens decide, not the drafter's memory); an accepted token it has not run (the last
draft of a fully accepted round) is run with the next propose's first step. `threads` (--draft-threads): torch's
intra-op thread count while the draft model runs (the C++ kernels' at::parallel_for follows it), restored after;
None: the engine's.
A tree (DraftContext.nodes > k_max), EAGLE-2 style: after the fed tokens, each step runs the W frontier nodes of
every slot in one forward on the own cache, stored after the fed tokens and attending to their ancestors only
(tandem.kvcache.cache.TreeRows, positions = depth), and ranks their top-W children by cumulative probability
(tandem.spec.drafter.grow_trees); the draft is the `nodes` best nodes. accept() compacts the nodes it ran along the
accepted path in place (the cache again holds only accepted tokens), the rest of the path waiting for the next
propose as above.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tandem.errors import ModelLoadError
from tandem.sampling import process_logits, sample
from tandem.spec.drafter import (Draft, DraftContext, Drafter, PromptState, grow_trees, propose_split, register_kind,
                                 tree_rows)

PREFILL_CHUNK = 512


def check_vocab(model, target, name: str, target_name: str, tokenizer=None, target_tokenizer=None) -> None:
    """The drafter must speak the target's vocabulary: same size and, when both have a tokenizer, the same token
    strings and special ids. Raises ModelLoadError naming both and the first differing token id."""
    dv, tv = model.args.vocab_size, target.args.vocab_size
    if dv != tv:
        raise ModelLoadError(f"drafter {name} has vocabulary size {dv}, its target {target_name} {tv}: a draft "
                             f"model must use the target's vocabulary")
    if tokenizer is None or target_tokenizer is None:
        return
    for what in ("bos_id", "eos_ids", "pad_id"):
        a, b = getattr(tokenizer, what, None), getattr(target_tokenizer, what, None)
        if a != b:
            raise ModelLoadError(f"drafter {name}: special token {what} = {a!r}, target {target_name}: {b!r}")
    for i in range(max(tokenizer.vocab_size, target_tokenizer.vocab_size)):
        a, b = tokenizer.id_to_piece(i), target_tokenizer.id_to_piece(i)
        if a != b:
            raise ModelLoadError(f"drafter {name} and target {target_name} have different vocabularies: first "
                                 f"differing token id {i} ({a!r} vs {b!r})")


@contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to n for the block (process-wide, so restored after); n None: unchanged."""
    prev = torch.get_num_threads()
    if n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@register_kind("draft-model", fallback=True, help="any model with the target's vocabulary, own KV cache")
class DraftModelDrafter(Drafter):
    max_draft = 16

    def __init__(self, model: torch.nn.Module, target_name: str = "target", name: str = "draft model",
                 threads: int | None = None):
        self.model = model
        self.threads = threads
        self.names = (target_name, name)
        self.cache = None
        self._todo: dict[int, list[int]] = {}  # slot -> accepted tokens at positions cache.lengths[slot].. not run
        self._round: dict[int, tuple[int, list[int]]] = {}  # slot -> (cache length before propose, fed + drafted)
        self._fed: dict[int, int] = {}  # slot -> tokens fed before this round's drafts (not yet run + x)
        self._tree: dict[int, dict[tuple[int, int], int]] = {}  # slot -> (parent entry | -1, token) -> entry run

    @classmethod
    def build(cls, model, target, *, target_name="target", name="draft model", tokenizer=None,
              target_tokenizer=None, **_) -> "DraftModelDrafter":
        check_vocab(model, target, name, target_name, tokenizer, target_tokenizer)
        return cls(model, target_name, name)

    def describe(self) -> str:
        return f"draft-model {self.names[1]}"

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str, v_type: str, device) -> None:
        cache = self.model.make_cache(n_slots, max_len, k_type=k_type, v_type=v_type, device=device)
        if not cache.rolls_back_across_forwards:  # drafting k tokens is k forwards, rejected ones undone later
            raise ModelLoadError(f"draft model {self.names[1]}: its cache ({type(cache).__name__}) keeps recurrent "
                                 f"state that rolls back only within one forward; it cannot serve as a draft model")
        self.cache = cache

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # -- protocol ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, slot: int, prompt_state: PromptState) -> None:
        if self.cache is None:
            raise RuntimeError(f"draft model {self.names[1]}: no cache (the engine calls make_cache)")
        ids, dev = list(prompt_state.ids), self.device
        with _threads(self.threads):
            for c in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids[c:c + PREFILL_CHUNK]
                self.model(torch.tensor([chunk], device=dev), torch.arange(c, c + len(chunk), device=dev)[None],
                           self.cache, torch.tensor([slot], device=dev), logit_rows=slice(0, 0))
        self.cache.set_length(slot, len(ids))
        self._todo[slot] = []

    def accept(self, slot: int, tokens: list[int], hidden: torch.Tensor) -> None:
        run = self._tree.pop(slot, None)
        if run is not None:  # a tree: compact the run nodes along the accepted path after the fed tokens
            start, ran = self._round.pop(slot)
            fed = self._fed[slot]
            src, node = [], -1
            for t in tokens[:-1]:
                node = run.get((node, t), -2)
                if node < 0:
                    break
                src.append(node)
            self.cache.compact(slot, start + fed, src)
            self.cache.rollback(slot, start + fed + len(src))
            self._todo[slot] = (ran[:fed] + tokens[:-1])[fed + len(src):]
            return
        start, ran = self._round.pop(slot)  # the cache holds `ran` at positions start.. (maybe fewer: see below)
        accepted = ran[: self._fed[slot]] + tokens[:-1]  # not yet run + x, then d_1..d_a as verified
        ran = ran[: self.cache.lengths[slot] - start]  # the last draft token of a row is never run
        keep = 0
        while keep < min(len(ran), len(accepted)) and ran[keep] == accepted[keep]:
            keep += 1
        self.cache.rollback(slot, start + keep)
        self._todo[slot] = accepted[keep:]

    def end(self, slot: int) -> None:
        for d in (self._todo, self._round, self._fed, self._tree):
            d.pop(slot, None)

    @torch.inference_mode()
    def propose(self, batch: list[DraftContext]) -> list[Draft]:
        trees = [b for b, c in enumerate(batch) if c.k_max > 0 and c.nodes > c.k_max and not c.sample_drafts
                 and self.cache.supports_tree and c.position + 1 + 4 * c.k_max < self.cache.max_len]
        with _threads(self.threads):
            return propose_split(batch, trees, self._propose, self._propose_trees)

    def _propose_trees(self, batch: list[DraftContext]) -> list[Draft]:
        """EAGLE-2 trees: the fed tokens, then one forward per depth over every slot's frontier nodes."""
        feeds = {}
        for b, c in enumerate(batch):
            start = self.cache.lengths[c.slot]
            feeds[b] = self._todo[c.slot] + [c.last_token]
            assert start + len(feeds[b]) == c.position + 1, (start, feeds[b], c.position)
            self._round[c.slot], self._fed[c.slot] = (start, list(feeds[b])), len(feeds[b])
            self._tree[c.slot] = {}
        logits = self._forward(batch, feeds)  # [B, V]: after x
        entry: list[dict[int, int]] = [{-1: -1} for _ in batch]  # node -> its region entry once run (-1: x)
        region: list[list[tuple[int, int]]] = [[] for _ in batch]  # run entries: (position, parent entry index)
        return grow_trees(batch, logits, lambda front, nodes: self._forward_nodes(batch, front, nodes, entry, region),
                          self.device)

    def _forward_nodes(self, batch, front, nodes, entry, region) -> torch.Tensor:
        """Run the frontier nodes of each slot (rows [B', W]) at the slot's next entries, each attending to the
        entries before the round's tree region and its run ancestors in it; returns their logits [B', W, V]."""
        bs = list(front)
        base = [self._round[batch[b].slot][0] + self._fed[batch[b].slot] for b in bs]  # the region: after the fed
        tokens, positions, tree = tree_rows(front, nodes, entry, region, base, [batch[b].position for b in bs])
        for r, b in enumerate(bs):
            slot = batch[b].slot
            for node, _, _ in front[b]:
                key = (self._tree_key(b, node, nodes, entry, batch), nodes[b][node][0])
                self._tree[slot][key] = base[r] + entry[b][node]
            self.cache.set_length(slot, base[r] + len(region[b]))
        dev = self.device
        with self.cache.tree_rows(tree.to(dev)):
            out = self.model(tokens.to(dev), positions.to(dev), self.cache,
                             torch.tensor([batch[b].slot for b in bs], device=dev), logit_rows=slice(0, 0))
        return self.model.logits(out.hidden).float()  # [B', T, V]

    def _tree_key(self, b, node, nodes, entry, batch) -> int:
        """The parent of `node` as accept() finds it: its cache entry, or -1 for x."""
        par = nodes[b][node][1]
        if par < 0:
            return -1
        return self._round[batch[b].slot][0] + self._fed[batch[b].slot] + entry[b][par]

    def _propose(self, batch: list[DraftContext]) -> list[Draft]:
        toks: list[list[int]] = [[] for _ in batch]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        conf: list[list[float]] = [[] for _ in batch]
        feeds = {}
        for b, c in enumerate(batch):
            start = self.cache.lengths[c.slot]
            feed = self._todo[c.slot] + [c.last_token]
            assert start + len(feed) == c.position + 1, (start, feed, c.position)
            self._round[c.slot], self._fed[c.slot] = (start, list(feed)), len(feed)
            if c.k_max > 0:
                feeds[b] = feed
        while feeds:
            logits = self._forward(batch, feeds)  # [B', V] fp32, one row per fed slot
            nxt = {}
            for i, b in enumerate(feeds):
                c = batch[b]
                top = float(torch.softmax(logits[i], -1).max())
                if top < c.p_floor:
                    continue
                if c.sample_drafts:
                    q = process_logits(logits[i:i + 1], c.sampling)
                    t = int(sample(q, c.generator)[0])
                    probs[b].append(q[0])
                else:
                    t = int(logits[i].argmax())
                toks[b].append(t)
                conf[b].append(top)
                if len(toks[b]) < c.k_max:
                    nxt[b] = [t]
            feeds = nxt
        out = []
        for b, c in enumerate(batch):
            self._round[c.slot][1].extend(toks[b])
            q = torch.stack(probs[b]) if probs[b] else None
            out.append(Draft(torch.tensor(toks[b], dtype=torch.long, device=self.device), q, conf[b]))
        return out

    def _forward(self, batch: list[DraftContext], feeds: dict[int, list[int]]) -> torch.Tensor:
        """Run each fed slot's tokens at its next positions (ragged, padded with position -1) into the own cache;
        returns the logits of each slot's last fed row [B', V]."""
        B, T = len(feeds), max(len(f) for f in feeds.values())
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.full((B, T), -1, dtype=torch.long)
        slots = []
        for i, (b, f) in enumerate(feeds.items()):
            s = batch[b].slot
            n = self.cache.lengths[s]
            tokens[i, :len(f)] = torch.tensor(f)
            positions[i, :len(f)] = torch.arange(n, n + len(f))
            self.cache.set_length(s, n + len(f))
            slots.append(s)
        dev = self.device
        out = self.model(tokens.to(dev), positions.to(dev), self.cache, torch.tensor(slots, device=dev),
                         logit_rows=slice(0, 0))
        last = torch.tensor([len(f) - 1 for f in feeds.values()], device=dev)
        hidden = out.hidden[torch.arange(B, device=dev), last]  # [B', D]
        return self.model.logits(hidden[:, None])[:, 0].float()
