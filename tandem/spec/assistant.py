"""Kind `assistant`: the Gemma 4 assistant drafter (multi-token prediction from one position, HF's
SinglePositionMultiTokenCandidateGenerator), reading the target's KV cache.

Per round, from the last emitted token x at position p (target cache = entries 0..p-1) and the target hidden state
h that produced x:
    step 1: assistant(concat(target.embed(x), h)) at RoPE position p -> logits_1, h_1; d_1 = argmax (or sample)
    step i: assistant(concat(target.embed(d_{i-1}), h_{i-1})) at the SAME position p -> d_i
Each step is ONE assistant forward over all slots still drafting (a slot stops at its k_max, or below p_floor).
First round (HF convention): h = the prompt's last hidden state, x = the target's first sampled token.
A tree (DraftContext.nodes > k_max), EAGLE-2's dynamic tree: every step runs the W frontier nodes of every slot in
one forward (all at position p, so the nodes need no cache of their own), each proposes its top-W tokens, whose
cumulative probability (the product along the path) ranks them; the W best become the next frontier. The draft is
the `nodes` best nodes of all depths (a child never ranks above its parent, so they form a tree).
"""

from __future__ import annotations

import heapq

import torch

from tandem.sampling import process_logits, sample
from tandem.spec.drafter import Draft, DraftContext, Drafter, PromptState, propose_split, register_kind


@register_kind("assistant", model_types=("gemma4_assistant",), help="Gemma 4 assistant (reads the target's KV)")
class MTPAssistantDrafter(Drafter):
    max_draft = 16

    def __init__(self, assistant: torch.nn.Module, target: torch.nn.Module, target_name: str = "target",
                 assistant_name: str = "assistant"):
        self.assistant = assistant.bind(target, target_name, assistant_name)
        self.target = target
        self.names = (target_name, assistant_name)
        self._hidden: dict[int, torch.Tensor] = {}  # slot -> [Db] target hidden that produced the last token

    @classmethod
    def build(cls, model, target, *, target_name="target", name="assistant", **_) -> "MTPAssistantDrafter":
        return cls(model, target, target_name, name)

    def describe(self) -> str:
        return f"assistant {self.names[1]}"

    def begin(self, slot: int, prompt_state: PromptState) -> None:
        self._hidden[slot] = prompt_state.hidden[-1].reshape(-1)  # [r, D]: the last prompt row

    def accept(self, slot: int, tokens: list[int], hidden: torch.Tensor) -> None:
        self._hidden[slot] = hidden[-1].reshape(-1)  # only the row that produced the last emitted token

    def end(self, slot: int) -> None:
        self._hidden.pop(slot, None)

    @torch.inference_mode()
    def propose(self, batch: list[DraftContext]) -> list[Draft]:
        trees = [b for b, c in enumerate(batch) if c.k_max > 0 and c.nodes > c.k_max and not c.sample_drafts]
        return propose_split(batch, trees, self._propose_chains, self._propose_trees)

    def _propose_trees(self, batch: list[DraftContext]) -> list[Draft]:
        """EAGLE-2 trees for every context, one assistant forward per depth over all frontier nodes."""
        dev = self._hidden[batch[0].slot].device
        # per context: nodes (token, parent, prob, cum); frontier [(node, token, h)]; node -1 is the root x
        nodes: list[list[tuple[int, int, float, float]]] = [[] for _ in batch]
        front = {b: [(-1, c.last_token, self._hidden[c.slot], 1.0)] for b, c in enumerate(batch)}
        width = {b: max(2, min(4, -(-c.nodes // c.k_max))) for b, c in enumerate(batch)}
        for depth in range(max(c.k_max for c in batch)):
            rows = [(b, f) for b in front for f in front[b] if depth < batch[b].k_max]
            if not rows:
                break
            ctxs = [batch[b] for b, _ in rows]
            pos = torch.tensor([[c.position] for c in ctxs], device=dev)  # [R, 1]
            slots = torch.tensor([c.slot for c in ctxs], device=dev)
            tok = torch.tensor([[f[1]] for _, f in rows], device=dev)
            hb = torch.stack([f[2] for _, f in rows])[:, None]  # [R, 1, Db]
            x = torch.cat([self.target.embed(tok).to(hb.dtype), hb], dim=-1)
            k = max(width.values())
            t, p, hn = self.assistant.top_step(x, pos, ctxs[0].cache, slots, pos - 1, k)
            t, p = t[:, -1].tolist(), p[:, -1].tolist()
            cand: dict[int, list] = {}
            for r, (b, (node, _, _, cum)) in enumerate(rows):
                for j in range(min(width[b], len(t[r]))):
                    if p[r][j] >= batch[b].p_floor:
                        nodes[b].append((t[r][j], node, p[r][j], cum * p[r][j]))
                        cand.setdefault(b, []).append((len(nodes[b]) - 1, t[r][j], hn[r, -1], cum * p[r][j]))
            front = {b: heapq.nlargest(width[b], cs, key=lambda f: f[3]) for b, cs in cand.items()}
        return [self._best(nodes[b], c.nodes, dev) for b, c in enumerate(batch)]

    @staticmethod
    def _best(nodes: list[tuple[int, int, float, float]], budget: int, dev) -> Draft:
        """The `budget` nodes of highest cumulative probability (parents first on ties), renumbered."""
        keep = sorted(sorted(range(len(nodes)), key=lambda i: (-nodes[i][3], i))[:budget])
        new = {-1: -1, **{old: i for i, old in enumerate(keep)}}  # cum(child) <= cum(parent): parents are kept
        return Draft.tree([nodes[i][0] for i in keep], [new[nodes[i][1]] for i in keep],
                          [nodes[i][2] for i in keep], dev)

    def _propose_chains(self, batch: list[DraftContext]) -> list[Draft]:
        dev = self._hidden[batch[0].slot].device if batch else torch.device("cpu")
        toks: list[list[int]] = [[] for _ in batch]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        conf: list[list[float]] = [[] for _ in batch]
        live = [b for b, c in enumerate(batch) if c.k_max > 0]
        h = {b: self._hidden[batch[b].slot] for b in live}
        last = {b: batch[b].last_token for b in live}
        while live:
            # greedy rows and sampled rows go through separate forwards: a sampled row needs its [V] logits
            for group in ([b for b in live if not batch[b].sample_drafts], [b for b in live if batch[b].sample_drafts]):
                if group:
                    self._step([batch[b] for b in group], group, h, last, toks, probs, conf, dev)
            live = [b for b in live if len(toks[b]) == len(conf[b]) and len(toks[b]) < batch[b].k_max
                    and (not conf[b] or conf[b][-1] >= batch[b].p_floor)]
        out = []
        for b, c in enumerate(batch):
            t = torch.tensor(toks[b], dtype=torch.long, device=dev)
            q = torch.stack(probs[b]) if c.sample_drafts and probs[b] else None
            out.append(Draft(t, q, conf[b][:len(toks[b])]))
        return out

    def _step(self, ctxs: list[DraftContext], rows: list[int], h, last, toks, probs, conf, dev) -> None:
        """One assistant forward for `rows` (indices into the batch); appends one token (or stops) per row."""
        pos = torch.tensor([[c.position] for c in ctxs], device=dev)  # [B, 1]
        slots = torch.tensor([c.slot for c in ctxs], device=dev)
        tok = torch.tensor([[last[b]] for b in rows], device=dev)
        hb = torch.stack([h[b] for b in rows])[:, None]  # [B, 1, Db]
        x = torch.cat([self.target.embed(tok).to(hb.dtype), hb], dim=-1)
        if not ctxs[0].sample_drafts:  # argmax drafts: no [V] vector needed
            t, top, hn = self.assistant.greedy_step(x, pos, ctxs[0].cache, slots, pos - 1)
            t, top = t[:, -1].tolist(), top[:, -1].tolist()
            qs = [None] * len(rows)
        else:
            out = self.assistant(x, pos, ctxs[0].cache, slots, kv_positions=pos - 1)
            logits, hn = out.logits[:, -1], out.hidden  # [B, V] fp32
            top = torch.softmax(logits, -1).max(-1).values.tolist()
            # nothing is drawn for a row below its floor (it stops here)
            qs = [process_logits(logits[i:i + 1], c.sampling) if top[i] >= c.p_floor else None
                  for i, c in enumerate(ctxs)]
            t = [int(sample(q, c.generator)[0]) if q is not None else -1 for q, c in zip(qs, ctxs)]
        for i, b in enumerate(rows):
            conf[b].append(float(top[i]))
            if top[i] < ctxs[i].p_floor:
                continue  # below the floor: the token is not drafted (the policy would cut it anyway)
            toks[b].append(int(t[i]))
            if qs[i] is not None:
                probs[b].append(qs[i][0])
            last[b], h[b] = int(t[i]), hn[i, -1]
