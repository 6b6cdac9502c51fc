"""Self-distillation data: the target's own forward passes over text and over its own greedy generations.

For every position t we keep what the assistant sees at run time and what it must match:
tokens [N, T], the target's final hidden h_t [N, T, D], the K/V of the target layers the assistant reads
(k, v [N, Hkv, T, Dh]), and the teacher = top-K of the target's next-token distribution softmax(lm_head(h_t)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tandem.kvcache import KVCache
from tandem.train.corpus import Corpus


@dataclass
class DistillData:
    tokens: torch.Tensor  # [N, T] int64
    hidden: torch.Tensor  # [N, T, D] bf16
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # target layer -> (k, v) [N, Hkv, T, Dh] bf16
    top_ids: torch.Tensor  # [N, T, K] int32: teacher's top-K next tokens at position t
    top_logp: torch.Tensor  # [N, T, K] fp32 log-probs of those tokens (full-vocab normalised)
    gen_start: torch.Tensor  # [N] int64: first position the target generated itself (T for plain text)

    def save(self, path: str | Path) -> None:
        t = {"tokens": self.tokens, "hidden": self.hidden, "top_ids": self.top_ids, "top_logp": self.top_logp,
             "gen_start": self.gen_start}
        for layer, (k, v) in self.kv.items():
            t[f"k.{layer}"], t[f"v.{layer}"] = k.contiguous(), v.contiguous()
        save_file(t, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "DistillData":
        t = load_file(str(path))
        layers = sorted({int(k.split(".")[1]) for k in t if k.startswith("k.")})
        return cls(t["tokens"], t["hidden"], {i: (t[f"k.{i}"], t[f"v.{i}"]) for i in layers}, t["top_ids"],
                   t["top_logp"], t["gen_start"])

    @classmethod
    def cat(cls, parts: list["DistillData"]) -> "DistillData":
        return cls(torch.cat([p.tokens for p in parts]), torch.cat([p.hidden for p in parts]),
                   {i: (torch.cat([p.kv[i][0] for p in parts]), torch.cat([p.kv[i][1] for p in parts]))
                    for i in parts[0].kv},
                   torch.cat([p.top_ids for p in parts]), torch.cat([p.top_logp for p in parts]),
                   torch.cat([p.gen_start for p in parts]))

    def subset(self, idx: torch.Tensor) -> "DistillData":
        return DistillData(self.tokens[idx], self.hidden[idx], {i: (k[idx], v[idx]) for i, (k, v) in self.kv.items()},
                           self.top_ids[idx], self.top_logp[idx], self.gen_start[idx])

    def __len__(self) -> int:
        return self.tokens.shape[0]


def text_windows(tokenizer, corpus: Corpus, n: int, seq_len: int, seed: int) -> list[list[int]]:
    """n windows of seq_len tokens, each BOS + a contiguous piece of one document."""
    out: list[list[int]] = []
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    body = seq_len - len(bos)
    for doc in corpus.documents(seed):
        ids = tokenizer.encode(doc, add_special_tokens=False)
        for i in range(0, len(ids) - body + 1, body):
            out.append(bos + ids[i:i + body])
            if len(out) >= n:
                return out
    return out


@torch.inference_mode()
def greedy_continue(model, prompts: list[list[int]], total_len: int, device="cpu") -> list[list[int]]:
    """Batched greedy continuation of prompts (any lengths < total_len) to exactly total_len tokens.

    Each prompt is prefilled into its own slot; then one forward per step decodes every slot at its own position.
    """
    B = len(prompts)
    cache = KVCache(model.kv_specs(), B, total_len, torch.float32, device)
    seqs = [list(p[:total_len - 1]) for p in prompts]
    nxt = []
    for b, p in enumerate(seqs):
        out = model(torch.tensor([p], device=device), torch.arange(len(p), device=device)[None], cache,
                    torch.tensor([b], device=device), logit_rows=slice(-1, None))
        nxt.append(int(out.logits[0, -1].argmax()))
    slots = torch.arange(B, device=device)
    while True:
        for b in range(B):
            if len(seqs[b]) < total_len:
                seqs[b].append(nxt[b])
        if all(len(s) == total_len for s in seqs):
            return seqs
        # finished rows ride along as padding (position -1): they neither write nor matter
        pos = torch.tensor([[len(s) - 1 if len(s) < total_len else -1] for s in seqs], device=device)
        toks = torch.tensor([[s[-1]] for s in seqs], device=device)
        out = model(toks, pos, cache, slots)
        nxt = out.logits[:, -1].argmax(-1).tolist()


@torch.inference_mode()
def teacher_pass(model, seqs: list[list[int]], layers: list[int], top_k: int, gen_start: list[int],
                 device="cpu") -> DistillData:
    """One target forward over a batch of equal-length sequences; keep hidden, K/V of `layers`, teacher top-K."""
    B, T = len(seqs), len(seqs[0])
    cache = KVCache(model.kv_specs(), B, T, torch.float32, device)
    toks = torch.tensor(seqs, device=device)
    pos = torch.arange(T, device=device).expand(B, T)
    hidden = model(toks, pos, cache, torch.arange(B, device=device), logit_rows=slice(0, 0)).hidden
    ids, logp = [], []
    for b in range(B):  # full-vocab logits one sequence at a time: [T, V] fp32 is large
        lp = torch.log_softmax(model.logits(hidden[b]).float(), -1)
        v, i = lp.topk(top_k, -1)
        ids.append(i.int())
        logp.append(v)
    kv = {i: (cache.k[i][:B, :, :T].to(torch.bfloat16).cpu(), cache.v[i][:B, :, :T].to(torch.bfloat16).cpu())
          for i in layers}
    return DistillData(toks.cpu(), hidden.to(torch.bfloat16).cpu(), kv, torch.stack(ids).cpu(),
                       torch.stack(logp).cpu(), torch.tensor(gen_start, dtype=torch.long))


def collect(model, tokenizer, corpus: Corpus, *, layers: list[int], n_text: int, n_gen: int, seq_len: int,
            prompt_len: int, top_k: int = 32, batch: int = 8, seed: int = 0, device="cpu",
            gen_prompts: list[str] | None = None, gen_batch: int = 16, log=print) -> DistillData:
    """n_text windows of corpus text plus n_gen target greedy generations (prompts cut from other windows)."""
    t0 = time.time()
    windows = text_windows(tokenizer, corpus, n_text + n_gen, seq_len, seed)
    text, prompts = windows[:n_text], [w[:prompt_len] for w in windows[n_text:n_text + n_gen]]
    if gen_prompts:  # prompt texts (questions, code stubs, ...) first; corpus cuts fill up to n_gen
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        mine = [bos + tokenizer.encode(p, add_special_tokens=False)[:seq_len // 2] for p in gen_prompts[:n_gen]]
        prompts = mine + prompts[:max(0, n_gen - len(mine))]
    gens: list[list[int]] = []
    for i in tqdm(range(0, len(prompts), gen_batch), desc="target generations", unit="batch"):
        gens += greedy_continue(model, prompts[i:i + gen_batch], seq_len, device)
    seqs = text + gens
    starts = [seq_len] * len(text) + [min(len(p), seq_len - 1) for p in prompts]
    parts = []
    for i in tqdm(range(0, len(seqs), batch), desc="teacher passes", unit="batch"):
        parts.append(teacher_pass(model, seqs[i:i + batch], layers, top_k, starts[i:i + batch], device))
    data = DistillData.cat(parts)
    log(f"collected {len(data)} sequences x {seq_len} tokens ({len(text)} text, {len(gens)} generated) "
        f"in {time.time() - t0:.0f}s")
    return data
