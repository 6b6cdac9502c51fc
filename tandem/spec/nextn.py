"""Kind `nextn`: the target's own MTP heads (tandem.models.nextn), drafting on their OWN cache (engine-sized).

Head 0's entry at position q is head(embed(t_q), h_{q-1}) with h_{q-1} the target's hidden row that produced t_q;
head j's is head_j(embed(t_q), out_{j-1}(q-1)). So every accepted (token, hidden) pair runs through the heads:
    begin(slot, prompt)   the prompt's pairs (PromptState.hidden = the last r prompt rows [r, D]: r-1 pairs; the
                          engine passes all P, as needs_prompt_hidden asks), in BEGIN_CHUNK pieces; the pair
                          (x, h_{P-1}) waits for x, the first propose's last_token
    accept(slot, toks, h) rolls every head back to the previous round's last token, then runs the a+1 emitted pairs
                          (one forward per head): the cache holds exactly the accepted prefix after every round
    propose(batch)        d_1 = argmax of head 0's output at the last token; step i >= 1 runs head min(i, n-1) on
                          (d_i, step i-1's output) at position n+i, batched over slots: with n heads step i < n uses
                          head i (transformers' MtpModel: one token per head per round); past n the last head recurs
                          on its own output (what llama.cpp / vLLM do with one head; transformers cannot draft k > n).
Drafts are argmax (probs None) or, when the method samples drafts, draws from the processed distribution (probs q).
A tree (DraftContext.nodes > k_max): the argmax chain plus, at every depth, the runner-up tokens of the same logits
as leaves (the most probable first, up to the node budget): the heads run once per depth as for the chain, so the
extra branches cost no drafting. accept() re-runs the emitted pairs, so the heads' cache follows any accepted path.
"""

from __future__ import annotations

import logging

import torch

from tandem.models.nextn import NextN, has_nextn, nextn_heads
from tandem.sampling import process_logits, sample
from tandem.spec.drafter import Draft, DraftContext, Drafter, PromptState, register_kind

log = logging.getLogger("tandem.spec")

BEGIN_CHUNK = 512  # prompt pairs per heads' forward in begin() (bounds the attention scores of a long prompt)


def weight_format_of(model: torch.nn.Module) -> str:
    """The format kernels.prepare() gave the model's linears ("fp32" when unprepared)."""
    fmt = getattr(model, "kernel_format", None)
    return fmt or next((m.fmt for m in model.modules() if hasattr(m, "fmt") and hasattr(m, "out_features")), "fp32")


def nextn_drafter(target: torch.nn.Module, weight_format: str | None = None) -> "NextNDrafter | None":
    """The target's MTP heads as a drafter, or None (and says so) when the checkpoint carries none."""
    if not has_nextn(target):
        log.warning("%s: this checkpoint has no MTP layers; no model drafter", target.args.model_type)
        return None
    return NextNDrafter.build(target, target, weight_format=weight_format)


@register_kind("nextn", help="the target's own MTP (nextn) heads, own KV cache", in_target=has_nextn)
class NextNDrafter(Drafter):
    max_draft = 16
    needs_prompt_hidden = True  # the heads run over every prompt position, so their cache is complete

    def __init__(self, heads: NextN):
        self.heads, self.target = heads, heads.target
        self.cache = None
        self._off: dict[int, int] = {}  # slot -> first position with a head-0 entry
        self._last: dict[int, int] = {}  # slot -> position of the last token run through the heads
        self._out: dict[int, list[torch.Tensor | None]] = {}  # slot -> head j's output [D] at _last
        self._wait: dict[int, torch.Tensor] = {}  # slot -> h_{P-1} [D], paired with x at the first propose

    @classmethod
    def build(cls, model, target, *, weight_format: str | None = None, **_) -> "NextNDrafter":
        """From the target itself (`model` is ignored: the heads live in the target's checkpoint); the heads'
        weight format defaults to the target's."""
        heads = nextn_heads(target).eval()
        fmt = weight_format or weight_format_of(target)
        if fmt != "fp32":
            from tandem import kernels
            kernels.prepare(heads, fmt)
        return cls(heads)

    def describe(self) -> str:
        n = self.heads.n_heads
        where = "trained for the target" if getattr(self.target, "nextn_trained", False) else "in-target"
        return f"nextn ({n} MTP head{'s' if n > 1 else ''}, {where}, {weight_format_of(self.heads)})"

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str, v_type: str, device) -> None:
        self.cache = self.heads.make_cache(n_slots, max_len, k_type=k_type, v_type=v_type, device=device)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # -- protocol ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, slot: int, prompt_state: PromptState) -> None:
        if self.cache is None:
            raise RuntimeError("nextn drafter: no cache (the engine calls make_cache)")
        ids, h = prompt_state.ids, prompt_state.hidden.reshape(-1, prompt_state.hidden.shape[-1])
        P, r = len(ids), h.shape[0]
        self._off[slot], self._last[slot] = P - r + 1, P - r
        self._out[slot] = [None] * self.heads.n_heads
        self.cache.set_length(slot, 0)
        for c in range(P - r + 1, P, BEGIN_CHUNK):  # token at position c pairs with h's row for c - 1
            e = min(c + BEGIN_CHUNK, P)
            self._run([(slot, ids[c:e], h[c - 1 - (P - r):e - 1 - (P - r)])])
        self._wait[slot] = h[-1]

    @torch.inference_mode()
    def accept(self, slot: int, tokens: list[int], hidden: torch.Tensor) -> None:
        self._run([(slot, list(tokens), hidden)])

    def end(self, slot: int) -> None:
        for d in (self._off, self._last, self._out, self._wait):
            d.pop(slot, None)

    def _run(self, items: list[tuple[int, list[int], torch.Tensor]]) -> None:
        """Run (slot, tokens, target hidden rows [m, D]) pairs at each slot's next positions through every head,
        batched over slots (ragged rows padded with position -1); drops any draft entries first."""
        dev, n = self.device, self.heads.n_heads
        B, T = len(items), max(len(t) for _, t, _ in items)
        tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        pos = torch.full((B, T), -1, dtype=torch.long, device=dev)
        prev = torch.zeros(B, T, items[0][2].shape[-1], dtype=items[0][2].dtype, device=dev)
        for b, (s, toks, h) in enumerate(items):
            q0 = self._last[s] + 1
            self.cache.rollback(s, q0 - self._off[s])  # drafts out: back to the accepted prefix
            tokens[b, :len(toks)] = torch.tensor(toks, device=dev)
            pos[b, :len(toks)] = torch.arange(q0, q0 + len(toks), device=dev)
            prev[b, :len(toks)] = h
        slots = torch.tensor([s for s, _, _ in items], device=dev)
        offs = torch.tensor([self._off[s] for s, _, _ in items], device=dev)
        before = [list(self._out[s]) for s, _, _ in items]  # each head's output at the last position run
        for j in range(n):
            if j > 0:  # head j pairs token q with head j-1's output at q-1 (none yet: the row waits, padded)
                shifted = torch.zeros_like(prev)
                shifted[:, 1:] = out[:, :-1]
                for b in range(B):
                    if before[b][j - 1] is not None:
                        shifted[b, 0] = before[b][j - 1]
                prev = shifted
            p = pos.clone()
            for b in range(B):
                if j > 0 and before[b][j - 1] is None:
                    p[b, 0] = -1
            out = self.heads(j, tokens, prev, p, self.cache, slots, offs)  # [B, T, D]
            self._store_last(items, j, out, p)
        for s, toks, _ in items:
            self._last[s] += len(toks)
            self.cache.set_length(s, self._last[s] + 1 - self._off[s])

    def _store_last(self, items, j: int, out: torch.Tensor, p: torch.Tensor) -> None:
        for b, (s, toks, _) in enumerate(items):
            if p[b, len(toks) - 1] >= 0:
                self._out[s][j] = out[b, len(toks) - 1]

    @torch.inference_mode()
    def propose(self, batch: list[DraftContext]) -> list[Draft]:
        waiting = [(c.slot, [c.last_token], self._wait.pop(c.slot)[None]) for c in batch if c.slot in self._wait]
        if waiting:
            self._run(waiting)
        for c in batch:
            assert self._last[c.slot] == c.position, (self._last[c.slot], c.position)
        toks: list[list[int]] = [[] for _ in batch]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        conf: list[list[float]] = [[] for _ in batch]
        live = [b for b, c in enumerate(batch) if c.k_max > 0]
        alts: dict[int, list[tuple[float, int, int]]] = {}  # tree rows: (prob, token, depth) runner-ups
        # outs[b][j][q]: head j's output at position q this round (q = n: from accept)
        outs = {b: [{batch[b].position: o} for o in self._out[batch[b].slot]] for b in live}
        done = [0] * self.heads.n_heads  # per head: the last draft step whose position it has run
        j, step = 0, 0
        while live:
            if step > 0:
                j = self._step(batch, live, step, toks, outs, done)
            h = torch.stack([outs[b][j][batch[b].position + step] for b in live])[:, None]  # [B', 1, D]
            logits = self.target.logits(h)[:, 0].float()  # [B', V]
            nxt = []
            for i, b in enumerate(live):
                c = batch[b]
                top = float(torch.softmax(logits[i], -1).max())
                if top < c.p_floor:
                    continue
                if c.sample_drafts:
                    q = process_logits(logits[i:i + 1], c.sampling)
                    toks[b].append(int(sample(q, c.generator)[0]))
                    probs[b].append(q[0])
                else:
                    toks[b].append(int(logits[i].argmax()))
                    if c.nodes > c.k_max:
                        pr, tk = torch.softmax(logits[i], -1).topk(4)
                        alts.setdefault(b, []).extend((p, t, len(toks[b]) - 1) for p, t in
                                                      zip(pr[1:].tolist(), tk[1:].tolist()) if p >= c.p_floor)
                conf[b].append(top)
                if len(toks[b]) < c.k_max:
                    nxt.append(b)
            live, step = nxt, step + 1
        return [self._tree(toks[b], conf[b], alts[b], batch[b].nodes) if b in alts else
                Draft(torch.tensor(toks[b], dtype=torch.long, device=self.device),
                      torch.stack(probs[b]) if probs[b] else None, conf[b]) for b in range(len(batch))]

    def _tree(self, chain: list[int], conf: list[float], alts, budget: int) -> Draft:
        """The chain, then its best runner-up siblings (a sibling of chain node i hangs off node i - 1)."""
        extra = sorted((a for a in alts if a[2] < len(chain)), key=lambda a: -a[0])[:max(0, budget - len(chain))]
        return Draft.tree(chain + [t for _, t, _ in extra], list(range(-1, len(chain) - 1)) + [i - 1 for _, _, i in extra],
                          conf + [p for p, _, _ in extra], self.device)

    def _step(self, batch: list[DraftContext], live: list[int], i: int, toks, outs, done: list[int]) -> int:
        """Draft step i >= 1: head j = min(i, n-1) over the draft positions it has not run yet, up to n+i, each
        token d paired with the previous head's output one position earlier (its own output when it recurs)."""
        dev, j = self.device, min(i, self.heads.n_heads - 1)
        ph = j - 1 if j == i else j
        lo = done[j] + 1  # the first draft position (n + lo) head j has not run, the same for every row
        slots = [batch[b].slot for b in live]
        tokens = torch.tensor([toks[b][lo - 1:i] for b in live], device=dev)  # d_lo..d_i  [B', T]
        pos = torch.tensor([[batch[b].position + q for q in range(lo, i + 1)] for b in live], device=dev)
        prev = torch.stack([torch.stack([outs[b][ph][batch[b].position + q - 1] for q in range(lo, i + 1)])
                            for b in live])  # [B', T, D]
        offs = torch.tensor([self._off[s] for s in slots], device=dev)
        out = self.heads(j, tokens, prev, pos, self.cache, torch.tensor(slots, device=dev), offs)
        for r, b in enumerate(live):
            n, s = batch[b].position, batch[b].slot
            outs[b][j].update({n + q: out[r, t] for t, q in enumerate(range(lo, i + 1))})
            self.cache.set_length(s, max(self.cache.lengths[s], n + i + 1 - self._off[s]))
        done[j] = i
        return j
