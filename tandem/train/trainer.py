"""Self-distillation of a gemma4_assistant drafter from its target, unrolled over several draft steps.

Draft step s from start n (as at run time): input concat(target.embed(x[n+s]), h) with h = target hidden h[n-1]
for s = 0 and the assistant's own projected state after; RoPE position n for every step; the target cache is
visible up to n - 1. Teacher for that step: the target's distribution at n + s (which predicts x[n+s+1]).
Loss per step: cross-entropy against the teacher's top-K (renormalised) over the top-K plus shared random
negatives (a sampled softmax: the full 262k head is never multiplied), plus the centroid head's cross-entropy
against the teacher's mass per cluster.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tandem.kernels.reference import attend_reference
from tandem.train.data import DistillData


class TensorKV:
    """The target's K/V for a batch of training sequences, read through the reference attention (autograd)."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    def attend(self, layer, q, slots, q_pos, window, scale, softcap=None):
        k, v = self.kv[layer]
        return attend_reference(q, k, v, slots, q_pos, window, scale, softcap)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 4
    draft_steps: int = 3
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    loss_top_k: int = 16
    negatives: int = 1024
    centroid_weight: float = 0.5
    step_weights: tuple[float, ...] = (1.0, 0.8, 0.6, 0.5, 0.4)
    seed: int = 0
    ckpt_every: int = 200
    eval_every: int = 1000
    autocast: str | None = None  # "bf16": forward/backward in bfloat16 (fp32 master weights), 2x on AVX512-BF16


def trunk(asst, x, positions, cache, slots, kv_positions):
    """The assistant up to its final norm: y [B, T, D] (training reads y for its sampled head)."""
    return asst.trunk(x, positions, cache, slots, kv_positions)


def sampled_ce(y: torch.Tensor, E: torch.Tensor, ids: torch.Tensor, top_logp: torch.Tensor,
               e_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of head rows E against the teacher's top-K (renormalised) over those K plus shared negatives.
    y [B, N, D], ids / top_logp [B, N, K], e_neg [R, D] -> (loss, top-1 hit [B, N], teacher probs p [B, N, K])."""
    K = ids.shape[-1]
    p = top_logp.float().exp()
    p = p / p.sum(-1, keepdim=True)
    z_top = torch.einsum("bnd,bnkd->bnk", y, E[ids].float())
    z_neg = y @ e_neg.T
    logq = torch.log_softmax(torch.cat([z_top, z_neg], -1), -1)[..., :K]
    acc = (z_top.argmax(-1) == 0) & (z_top.max(-1).values >= z_neg.max(-1).values)
    return -(p * logq).sum(-1).mean(), acc, p


def unrolled_losses(asst, target_embed, batch: DistillData, cfg: TrainConfig, cluster_of: torch.Tensor | None,
                    neg_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    tokens, hidden = batch.tokens, batch.hidden.float()
    B, T = tokens.shape
    S = cfg.draft_steps
    n = torch.arange(1, T - S + 1)  # start positions
    pos = n.expand(B, -1)
    cache = TensorKV({i: (k.float(), v.float()) for i, (k, v) in batch.kv.items()})
    slots = torch.arange(B)
    h = hidden[:, n - 1]
    E = asst.lm_head.weight  # the target's (frozen) embedding rows
    e_neg = E[neg_ids].float()  # [R, D]
    total, stats = 0.0, {}
    for s in range(S):
        x = torch.cat([target_embed(tokens[:, n + s]).float(), h], -1)
        y = trunk(asst, x, pos, cache, slots, pos - 1)  # [B, N, D]
        h = asst.post_projection(y)
        ids = batch.top_ids[:, n + s, :cfg.loss_top_k].long()  # [B, N, K]
        loss, acc, p = sampled_ce(y, E, ids, batch.top_logp[:, n + s, :cfg.loss_top_k], e_neg)
        if cluster_of is not None and asst.masked_embedding is not None:
            c_logits = asst.masked_embedding.centroids(y).float()
            q = torch.zeros_like(c_logits).scatter_add_(-1, cluster_of[ids], p)
            c_loss = -(q * torch.log_softmax(c_logits, -1)).sum(-1).mean()
            c_top = c_logits.topk(asst.masked_embedding.top_k, -1).indices
            hit = (c_top == cluster_of[ids[..., :1]]).any(-1)
            stats[f"cluster_hit{s}"] = float(hit.float().mean())
            loss = loss + cfg.centroid_weight * c_loss
        w = cfg.step_weights[min(s, len(cfg.step_weights) - 1)]
        total = total + w * loss
        stats[f"loss{s}"] = float(loss.detach())
        stats[f"acc{s}"] = float(acc.float().mean())
    return total, stats


@torch.no_grad()
def eval_acceptance(asst, target_embed, data: DistillData, draft_steps: int) -> dict:
    """Greedy drafting with the run-time head on held-out sequences; a draft counts while it equals the target's
    argmax (exact on the target's own greedy generations). Returns acceptance per position and mean length."""
    alive_sum = torch.zeros(draft_steps)
    rows = 0
    for b in range(len(data)):  # one sequence at a time: run-time logits are [T, V]
        tokens, hidden = data.tokens[b:b + 1], data.hidden[b:b + 1].float()
        T = tokens.shape[1]
        n = torch.arange(1, T - draft_steps + 1)
        cache = TensorKV({i: (k[b:b + 1].float(), v[b:b + 1].float()) for i, (k, v) in data.kv.items()})
        alive = (n >= data.gen_start[b] - 1)[None]  # only where the target's own greedy tokens follow
        counted = int(alive.sum())
        if counted == 0:
            continue
        h, tok, pos = hidden[:, n - 1], tokens[:, n], n[None]
        for s in range(draft_steps):
            x = torch.cat([target_embed(tok).float(), h], -1)
            draft, _, h = asst.greedy_step(x, pos, cache, torch.zeros(1, dtype=torch.long), pos - 1)
            alive = alive & (draft == data.top_ids[b:b + 1, n + s, 0].long())
            alive_sum[s] += alive.sum()
            tok = draft
        rows += counted
    per_pos = (alive_sum / max(rows, 1)).tolist()
    cond = [per_pos[0]] + [per_pos[i] / per_pos[i - 1] if per_pos[i - 1] else 0.0 for i in range(1, draft_steps)]
    return {"accept_cumulative": [round(v, 4) for v in per_pos], "accept_conditional": [round(v, 4) for v in cond],
            "mean_acceptance_length": round(1 + sum(per_pos), 4)}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(asst, target_embed, train_data: DistillData, eval_data: DistillData | None, cfg: TrainConfig,
          out_dir: Path, cluster_of: torch.Tensor | None = None, resume: bool = True, log=print,
          losses=unrolled_losses, evaluate=eval_acceptance) -> dict:
    """Train in place; checkpoints to out_dir/checkpoint.pt every cfg.ckpt_every steps (resumed if present).
    losses / evaluate: the drafter's (unrolled_losses / eval_acceptance signatures; the assistant's by default)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in asst.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        asst.load_state_dict(st["model"], strict=False)
        opt.load_state_dict(st["opt"])
        g.set_state(st["rng"])
        start, history = st["step"], st["history"]
        log(f"resumed from {ckpt} at step {start}")
    N = len(train_data)
    V = asst.args.vocab_size
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", unit="step")
    asst.train()
    for step in bar:
        idx = torch.randint(0, N, (cfg.batch,), generator=g)
        batch = train_data.subset(idx)
        neg = torch.randint(0, V, (cfg.negatives,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
            loss, stats = losses(asst, target_embed, batch, cfg, cluster_of, neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stats["loss"] = float(loss.detach())
        history.append({"step": step + 1, **{k: round(v, 4) for k, v in stats.items()}})
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc0=f"{stats['acc0']:.2f}")
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.ckpt_every == 0 or last:
            frozen = {n for n, p in asst.named_parameters() if not p.requires_grad}  # the target's, shared
            torch.save({"model": {k: v for k, v in asst.state_dict().items() if k not in frozen},
                        "opt": opt.state_dict(), "rng": g.get_state(), "step": step + 1, "history": history}, ckpt)
        if eval_data is not None and ((step + 1) % cfg.eval_every == 0 or last):
            asst.eval()
            ev = evaluate(asst, target_embed, eval_data, cfg.draft_steps)
            asst.train()
            history[-1]["eval"] = ev
            log(f"step {step + 1}: held-out acceptance per position {ev['accept_cumulative']}, "
                f"mean length {ev['mean_acceptance_length']}")
    asst.eval()
    report = {"config": asdict(cfg), "train_sequences": N, "wall_s": round(time.time() - t0, 1),
              "final": history[-1] if history else {},
              "loss_first": history[0]["loss"] if history else None}
    if eval_data is not None:  # the last step's evaluation when it ran (resumed at the end: evaluate now)
        report["eval"] = (history[-1].get("eval") if history else None) or \
            evaluate(asst, target_embed, eval_data, cfg.draft_steps)
    (out_dir / "train_history.json").write_text(json.dumps(history))
    return report
