"""Kind `eagle3`: an EAGLE-3 head (tandem.models.eagle3) drafting on its OWN one-layer KV cache (engine-sized).

The target captures its residual stream entering three layers (model.aux_layers, set here); the engine hands the
drafter those rows (Output.aux) where it would hand the final hidden state. Row i of the head's cache is
(t_{i+1}, fc(a_i)) at position i, a_i the target's aux rows at position i (vLLM's convention: a row sits at the
position of the hidden state it reads). So, with x the last emitted token at position p:
    begin(slot, prompt)   rows 0..P-2 of the prompt (needs_prompt_hidden); the row (x, a_{P-1}) waits for x
    propose(batch)        d_1 = argmax of the head's logits at row p-1's output; step j >= 1 runs row p+j-1 =
                          (d_j, the previous step's pre-norm output) -> d_{j+1}; batched over slots
    accept(slot, toks, a) drops the draft rows (cache back to p rows) and runs the a+1 emitted pairs
                          (toks[i], fc(a[i])) at p..p+a: the cache holds exactly the accepted prefix
Draft ids map to target ids through d2t; drafts are argmax (probs None) or, when the method samples drafts, draws
from the processed distribution over the target vocabulary (zero outside the draft vocabulary).
A tree (DraftContext.nodes > k_max, EAGLE-2 style: tandem.spec.drafter.grow_trees): the root's children come from
row p-1's output; a node at depth j runs as row p+j-1 = (d_j, its PARENT's output) at entry _n + u of a tree region
after the accepted rows, seeing them and its ancestors only (TreeRows); one head forward per depth for all slots.
accept() needs no compaction: it drops the region with the draft rows and reruns the accepted path with fc(a).
"""

from __future__ import annotations

import torch

from tandem.errors import ModelLoadError
from tandem.models.eagle3 import Eagle3
from tandem.sampling import process_logits, sample
from tandem.spec.drafter import (Draft, DraftContext, Drafter, PromptState, grow_trees, propose_split, register_kind,
                                 tree_rows)
from tandem.spec.nextn import weight_format_of

BEGIN_CHUNK = 512  # prompt rows per head forward in begin()


def attach(head: Eagle3, target: torch.nn.Module, name: str) -> None:
    """Make the target capture the aux hidden states the head reads (ModelLoadError when it cannot)."""
    if not getattr(target, "captures_aux", False):
        raise ModelLoadError(f"EAGLE-3 head {name}: the target ({target.args.model_type}) cannot expose its "
                             f"intermediate hidden states (families built on tandem.models.decoder can)")
    emb = head.embed_tokens.weight.shape[1] if head.embed_tokens is not None else target.args.hidden_size
    if emb != head.args.hidden_size:
        raise ModelLoadError(f"EAGLE-3 head {name}: hidden_size {head.args.hidden_size} but it has no "
                             f"embed_tokens and the target's embedding is {emb} wide")
    target.aux_layers = tuple(head.aux_layers)


@register_kind("eagle3", help="EAGLE-3 head over the target's low/mid/high hidden states, own KV cache")
class Eagle3Drafter(Drafter):
    max_draft = 16
    needs_prompt_hidden = True  # the head runs over every prompt row, so its cache is complete

    def __init__(self, head: Eagle3, target: torch.nn.Module, name: str = "eagle3"):
        attach(head, target, name)
        self.head, self.target, self.name = head, target, name
        self.embed = head.embed_tokens if head.embed_tokens is not None else target.embed
        self.cache = None
        self._n: dict[int, int] = {}  # slot -> rows of accepted tokens in the cache (= position of the next)
        self._out: dict[int, torch.Tensor] = {}  # slot -> pre-norm output [D] of row _n - 1
        self._wait: dict[int, torch.Tensor] = {}  # slot -> fc(a_{P-1}) [D], paired with x at the first propose

    @classmethod
    def build(cls, model, target, *, name="eagle3", weight_format: str | None = None, **_) -> "Eagle3Drafter":
        """`model`: a loaded head (tandem.loading.eagle3) with its aux_layers; weights in weight_format
        (default: the target's)."""
        fmt = weight_format or weight_format_of(target)
        if fmt != "fp32":
            from tandem import kernels
            kernels.prepare(model, fmt)
        return cls(model, target, name)

    def describe(self) -> str:
        a = self.head.args
        return (f"eagle3 {self.name} (target layers {list(self.head.aux_layers)}, draft vocabulary "
                f"{a.draft_vocab_size}, {weight_format_of(self.head)})")

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str, v_type: str, device) -> None:
        self.cache = self.head.make_cache(n_slots, max_len, k_type=k_type, v_type=v_type, device=device)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # -- protocol ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, slot: int, prompt_state: PromptState) -> None:
        if self.cache is None:
            raise RuntimeError("eagle3 drafter: no cache (the engine calls make_cache)")
        ids, a = prompt_state.ids, prompt_state.hidden
        if a.shape[0] != len(ids):
            raise RuntimeError(f"eagle3 drafter: {a.shape[0]} aux rows for a prompt of {len(ids)} tokens")
        self.cache.set_length(slot, 0)
        self._n[slot] = 0
        self._out.pop(slot, None)
        for c in range(0, len(ids) - 1, BEGIN_CHUNK):  # row i: token i + 1 with the target's row i
            e = min(c + BEGIN_CHUNK, len(ids) - 1)
            self._run([(slot, c, ids[c + 1:e + 1], self.head.fuse(a[c:e]))])
        self._wait[slot] = self.head.fuse(a[-1])

    @torch.inference_mode()
    def accept(self, slot: int, tokens: list[int], hidden: torch.Tensor) -> None:
        assert slot not in self._wait, "eagle3 drafter: accept before the first propose"
        self.cache.rollback(slot, self._n[slot])  # draft rows (a chain's or a tree's region) out: accepted prefix
        self._run([(slot, self._n[slot], list(tokens), self.head.fuse(hidden))])

    def end(self, slot: int) -> None:
        for d in (self._n, self._out, self._wait):
            d.pop(slot, None)

    def _run(self, items: list[tuple[int, int, list[int], torch.Tensor]], draft: bool = False) -> torch.Tensor:
        """Rows (slot, first position, tokens [m], hidden [m, D]) through the head, batched over slots (ragged,
        padded with position -1); accepted rows (draft=False) advance _n and _out. Returns the outputs [B, T, D]."""
        dev = self.device
        B, T = len(items), max(len(t) for _, _, t, _ in items)
        tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        pos = torch.full((B, T), -1, dtype=torch.long, device=dev)
        h = torch.zeros(B, T, self.head.args.hidden_size, device=dev)
        for b, (s, p, toks, hb) in enumerate(items):
            tokens[b, :len(toks)] = torch.tensor(toks, device=dev)
            pos[b, :len(toks)] = torch.arange(p, p + len(toks), device=dev)
            h[b, :len(toks)] = hb
        slots = torch.tensor([s for s, _, _, _ in items], device=dev)
        out = self.head(self.embed(tokens).to(h.dtype), h, pos, self.cache, slots)
        for b, (s, p, toks, _) in enumerate(items):
            self.cache.set_length(s, max(self.cache.lengths[s], p + len(toks)))
            if not draft:
                self._n[s], self._out[s] = p + len(toks), out[b, len(toks) - 1]
        return out

    @torch.inference_mode()
    def propose(self, batch: list[DraftContext]) -> list[Draft]:
        waiting = [(c.slot, self._n[c.slot], [c.last_token], self._wait.pop(c.slot)[None])
                   for c in batch if c.slot in self._wait]
        if waiting:
            self._run(waiting)
        for c in batch:
            assert self._n[c.slot] == c.position, (self._n[c.slot], c.position)
        # trees are argmax drafts on a cache with the tree kernel and room for the region (<= 4 rows per depth)
        trees = [b for b, c in enumerate(batch) if c.k_max > 0 and c.nodes > c.k_max and not c.sample_drafts
                 and self.cache.supports_tree and c.position + 1 + 4 * c.k_max < self.cache.max_len]
        return propose_split(batch, trees, self._propose_chains, self._propose_trees)

    def _propose_trees(self, batch: list[DraftContext]) -> list[Draft]:
        """EAGLE-2 trees: the root's children from row p-1's output, then one head forward per depth."""
        outs = [{-1: self._out[c.slot]} for c in batch]  # node -> its pre-norm output [D] (-1: the root's)
        entry: list[dict[int, int]] = [{-1: -1} for _ in batch]  # node -> its region entry once run
        region: list[list[tuple[int, int]]] = [[] for _ in batch]  # run entries: (position, parent entry)
        logits = self.head.logits(torch.stack([o[-1] for o in outs]))  # [B, Vd]
        return grow_trees(batch, logits, lambda front, nodes: self._run_nodes(batch, front, nodes, outs, entry, region),
                          self.device, self.head.to_target)

    def _run_nodes(self, batch, front, nodes, outs, entry, region) -> torch.Tensor:
        """The frontier nodes of each slot (rows [B', W]) as rows (d_j, the parent's output) at position p+j-1, in the
        tree region after the slot's _n accepted rows; records their outputs and returns their logits [B', W, Vd]."""
        bs, dev = list(front), self.device
        base = [self._n[batch[b].slot] for b in bs]
        tokens, positions, tree = tree_rows(front, nodes, entry, region, base, [batch[b].position - 1 for b in bs])
        h = torch.zeros(*tokens.shape, self.head.args.hidden_size, device=dev)  # [B', W, D]
        for r, b in enumerate(bs):
            for t, (node, _, _) in enumerate(front[b]):
                h[r, t] = outs[b][nodes[b][node][1]]
            self.cache.set_length(batch[b].slot, base[r] + len(region[b]))  # accept() rolls back to _n
        tokens = tokens.to(dev)
        with self.cache.tree_rows(tree.to(dev)):
            out = self.head(self.embed(tokens).to(h.dtype), h, positions.to(dev), self.cache,
                            torch.tensor([batch[b].slot for b in bs], device=dev))  # [B', W, D]
        for r, b in enumerate(bs):
            for t, (node, _, _) in enumerate(front[b]):
                outs[b][node] = out[r, t]
        return self.head.logits(out)

    def _propose_chains(self, batch: list[DraftContext]) -> list[Draft]:
        """Chains: d_1 from row p-1's output, then one head forward per step for every live slot."""
        toks: list[list[int]] = [[] for _ in batch]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        conf: list[list[float]] = [[] for _ in batch]
        live = [b for b, c in enumerate(batch) if c.k_max > 0]
        h = {b: self._out[batch[b].slot] for b in live}
        while live:
            logits = self.head.logits(torch.stack([h[b] for b in live]))  # [B', Vd]
            top = torch.softmax(logits, -1).max(-1).values.tolist()
            nxt = []
            for i, b in enumerate(live):
                c = batch[b]
                if top[i] < c.p_floor:
                    continue
                if c.sample_drafts:
                    q = process_logits(self.head.target_logits(logits[i:i + 1]), c.sampling)
                    toks[b].append(int(sample(q, c.generator)[0]))
                    probs[b].append(q[0])
                else:
                    toks[b].append(int(self.head.to_target(logits[i].argmax())))
                conf[b].append(top[i])
                if len(toks[b]) < c.k_max:
                    nxt.append(b)
            if nxt:  # row p + j - 1 = (d_j, the previous output): the next step's output
                out = self._run([(batch[b].slot, batch[b].position + len(toks[b]) - 1, [toks[b][-1]], h[b][None])
                                 for b in nxt], draft=True)
                h = {b: out[r, 0] for r, b in enumerate(nxt)}
            live = nxt
        return [Draft(torch.tensor(toks[b], dtype=torch.long, device=self.device),
                      torch.stack(probs[b]) if probs[b] else None, conf[b]) for b in range(len(batch))]


def load_eagle3_drafter(path: str, target: torch.nn.Module, target_name: str,
                        weight_format: str | None = None) -> Eagle3Drafter:
    """The EAGLE-3 head in `path` (public layout) for `target`; a head trained here also checks its target's
    fingerprint (config.json "tandem": {"target": ...})."""
    from tandem.loading.eagle3 import eagle3_config, load_eagle3
    from tandem.spec.nextn_dir import check_target

    cfg = eagle3_config(path) or {}
    trained_for = (cfg.get("tandem") or {}).get("target")
    if trained_for:
        check_target({"target": trained_for}, target, target_name, path, "EAGLE-3 head")
    a = target.args
    head = load_eagle3(path, a.num_hidden_layers, a.hidden_size, a.vocab_size)
    return Eagle3Drafter.build(head, target, name=str(path), weight_format=weight_format)
