"""The Gemma 4 assistant drafter (multi-token prediction from one position, HF's
SinglePositionMultiTokenCandidateGenerator).

Per round, from the last emitted token x at position p (target cache = entries 0..p-1) and the target hidden state
h that produced x:
    step 1: assistant(concat(target.embed(x), h)) at RoPE position p -> logits_1, h_1; d_1 = argmax (or sample)
    step i: assistant(concat(target.embed(d_{i-1}), h_{i-1})) at the SAME position p -> d_i
Up to k_max tokens; stop before a token whose top-1 probability (softmax of the raw assistant logits) is < p_min;
a draft shorter than n_min is dropped (the round then verifies no draft: a plain decode step).
First round (HF convention): h = the prompt's last hidden state, x = the target's first sampled token.
"""

from __future__ import annotations

import torch

from tandem.sampling import process_logits, sample
from tandem.spec.drafter import Draft, DraftContext, Drafter, PromptState, register


@register("mtp", sample_drafts=False, help="Gemma 4 assistant, argmax drafts (sample-and-compare at T > 0)")
@register("mtp_sample", sample_drafts=True, help="Gemma 4 assistant, drafts sampled at the request's sampling "
                                                 "settings (p/q rejection at T > 0)")
class MTPAssistantDrafter(Drafter):
    needs_target_hidden = True
    reads_target_kv = True
    max_draft = 16

    def __init__(self, assistant: torch.nn.Module, target: torch.nn.Module, target_name: str = "target",
                 assistant_name: str = "assistant"):
        self.assistant = assistant.bind(target, target_name, assistant_name)
        self.target = target
        self.names = (target_name, assistant_name)
        self._hidden: dict[int, torch.Tensor] = {}  # slot -> [1, Db] target hidden that produced the last token

    def begin(self, slot: int, prompt_state: PromptState) -> None:
        self._hidden[slot] = prompt_state.hidden.reshape(1, -1)

    def accept(self, slot: int, n_accepted: int, target_hidden: torch.Tensor | None) -> None:
        self._hidden[slot] = target_hidden.reshape(1, -1)

    def end(self, slot: int) -> None:
        self._hidden.pop(slot, None)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        dev = self._hidden[ctx.slot].device
        if ctx.k_max <= 0:
            return Draft.empty(1, dev)
        h = self._hidden[ctx.slot][:, None]  # [1, 1, Db]
        pos = torch.tensor([[ctx.position]], device=dev)
        kv_pos = pos - 1  # the accepted prefix, and nothing else
        slots = torch.tensor([ctx.slot], device=dev)
        tok = torch.tensor([[ctx.last_token]], device=dev)
        tokens, probs, conf = [], [], []
        for _ in range(ctx.k_max):
            x = torch.cat([self.target.embed(tok).to(h.dtype), h], dim=-1)
            if not ctx.sample_drafts:  # argmax drafts: no [V] vector needed
                t, top, h = self.assistant.greedy_step(x, pos, ctx.cache, slots, kv_pos)
                t, top = t[:, -1], top[:, -1]
                if float(top) < ctx.spec.p_min:
                    break
                conf.append(float(top))
                tokens.append(t)
                tok = t[:, None]
                continue
            out = self.assistant(x, pos, ctx.cache, slots, kv_positions=kv_pos)
            logits = out.logits[:, -1]  # [1, V] fp32
            top = torch.softmax(logits, -1).max(-1).values
            if float(top) < ctx.spec.p_min:
                break
            q = process_logits(logits, ctx.sampling)
            t = sample(q, ctx.generator)
            probs.append(q)
            conf.append(float(q[0, t]))
            tokens.append(t)
            tok = t[:, None]
            h = out.hidden
        if len(tokens) < ctx.spec.n_min:
            return Draft.empty(1, dev)
        return Draft(torch.stack(tokens, 1), torch.stack(probs, 1) if ctx.sample_drafts else None, conf)
