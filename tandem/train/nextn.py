"""`tandem train-nextn`: self-distil a nextn (MTP) head for a dense target that ships without one.

The head is tandem.models.nextn's (DeepSeek form) over the target's family block, attached to the target as a
checkpoint's MTP layer would be. Training unrolls the drafting it does at run time (tandem.spec.nextn), from start n:
    step 0   head(embed(t_q), h_{q-1}) at every position q, causal over its own entries (the accepted prefix);
             output at q is trained against the target's distribution at q (it predicts t_{q+1})
    step s   head(embed(t_{n+s}), out_{s-1}(n+s-1)) at position n+s, attending step 0's entries at positions <= n
             plus this start's own chain entries n+1..n+s (the drafts' entries in the run-time cache)
The teacher data, loss (sampled softmax over the teacher's top-K) and training loop are train-assistant's.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from tandem.errors import ConfigError
from tandem.models.nextn import NextN, nextn_heads
from tandem.spec.nextn_dir import attach, target_fingerprint
from tandem.train.data import DistillData
from tandem.train.trainer import TrainConfig, sampled_ce

SHIPPED_DTYPE = torch.bfloat16


class ChainKV:
    """The head's cache in training. Step 0 writes entries for positions 1..T-1 (cache index q-1) and attends
    causally; a chain step s >= 1 (one row per start n, at cache index n+s-1) attends step-0 entries <= n-1 and the
    chain entries its own row wrote at steps 1..s."""

    def __init__(self):
        self.k0 = self.v0 = None  # [B, Hkv, T0, D]
        self.chain: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: [B, N, Hkv, D]
        self.step = 0

    def write(self, layer, slots, positions, k, v):  # k, v [B, T, Hkv, D]
        if self.step == 0:
            self.k0, self.v0 = k.transpose(1, 2), v.transpose(1, 2)
        else:
            self.chain.append((k, v))

    def attend(self, layer, q, slots, positions, window, scale, softcap=None):  # q [B, T, Hq, D]
        B, T, Hq, D = q.shape
        g = Hq // self.k0.shape[1]
        k0, v0 = self.k0.repeat_interleave(g, 1), self.v0.repeat_interleave(g, 1)  # [B, Hq, T0, D]
        qh = q.transpose(1, 2)  # [B, Hq, T, D]
        s0 = qh @ k0.transpose(-1, -2) * scale  # [B, Hq, T, T0]
        last = positions.clamp(min=0) - self.step  # the last step-0 entry each row sees
        j = torch.arange(k0.shape[2], device=q.device)
        s0 = s0.masked_fill(j[None, None, None, :] > last[:, None, :, None], float("-inf"))
        ks = [k.repeat_interleave(g, 2).transpose(1, 2) for k, _ in self.chain]  # [B, Hq, T, D] each
        vs = [v.repeat_interleave(g, 2).transpose(1, 2) for _, v in self.chain]
        sc = [(qh * k).sum(-1, keepdim=True) * scale for k in ks]  # [B, Hq, T, 1] each
        probs = torch.softmax(torch.cat([s0] + sc, -1), -1)
        out = probs[..., :k0.shape[2]] @ v0
        for i, v in enumerate(vs):
            out = out + probs[..., k0.shape[2] + i:k0.shape[2] + i + 1] * v
        return out.transpose(1, 2)


def init_weights(target: nn.Module) -> dict[str, torch.Tensor]:
    """Hub-named starting weights for one head: the block is a copy of the target's last layer, eh_proj sums the
    two normed inputs, shared_head.norm is the target's final norm. Call before kernels.prepare (fp32 weights)."""
    L, D = target.args.num_hidden_layers, target.args.hidden_size
    sd = {f"model.layers.{L}.{k}": v.detach().float().clone()
          for k, v in target.model.layers[L - 1].state_dict().items()}
    eye = torch.eye(D)
    sd.update({f"model.layers.{L}.enorm.weight": torch.ones(D), f"model.layers.{L}.hnorm.weight": torch.ones(D),
               f"model.layers.{L}.eh_proj.weight": torch.cat([eye, eye], 1),
               f"model.layers.{L}.shared_head.norm.weight": target.model.norm.weight.detach().float().clone()})
    return sd


def trainable_head(target: nn.Module, weights: dict[str, torch.Tensor]) -> NextN:
    """One head attached to `target`, in fp32 with gradients."""
    attach(target, weights, 1)
    heads = nextn_heads(target)
    heads.requires_grad_(True)
    return heads


def chain_outputs(heads: NextN, tokens: torch.Tensor, hidden: torch.Tensor, steps: int, drafts=None):
    """Step 0 over every position, then `steps - 1` chain steps from every start n = 1..T-steps. tokens [B, T],
    hidden [B, T, D]; drafts(s, y) -> the tokens fed to step s+1 [B, N] (None: the data's own, teacher forcing).
    Yields (s, y [B, rows, D], first position) for each step."""
    B, T = tokens.shape
    kv, slots, offs = ChainKV(), torch.arange(B), torch.ones(B, dtype=torch.long)
    pos = torch.arange(1, T).expand(B, -1)
    y = heads(0, tokens[:, 1:], hidden[:, :-1], pos, kv, slots, offs)  # [B, T-1, D]: position q at row q-1
    yield 0, y, 1
    N = T - steps  # starts n = 1..N
    prev = y[:, :N]
    nxt = drafts(0, y[:, :N]) if drafts else None
    for s in range(1, steps):
        kv.step = s
        toks = tokens[:, 1 + s:N + 1 + s] if drafts is None else nxt
        prev = heads(0, toks, prev, torch.arange(1 + s, N + 1 + s).expand(B, -1), kv, slots, offs)
        yield s, prev, 1 + s
        if drafts is not None and s + 1 < steps:
            nxt = drafts(s, prev)


def head_losses(heads: NextN, target_embed, batch: DistillData, cfg: TrainConfig, cluster_of, neg_ids, *,
                E: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """trainer.train's loss hook: weighted sampled cross-entropy of every unrolled step (E: the LM head rows)."""
    e_neg, total, stats = E[neg_ids].float(), 0.0, {}
    for s, y, q0 in chain_outputs(heads, batch.tokens, batch.hidden.float(), cfg.draft_steps):
        rows = slice(q0, q0 + y.shape[1])
        loss, acc, _ = sampled_ce(y, E, batch.top_ids[:, rows, :cfg.loss_top_k].long(),
                                  batch.top_logp[:, rows, :cfg.loss_top_k], e_neg)
        total = total + cfg.step_weights[min(s, len(cfg.step_weights) - 1)] * loss
        stats[f"loss{s}"], stats[f"acc{s}"] = float(loss.detach()), float(acc.float().mean())
    return total, stats


@torch.no_grad()
def eval_head(heads: NextN, target_embed, data: DistillData, draft_steps: int) -> dict:
    """Greedy drafting through the target's LM head on held-out generations, counted while every draft equals the
    target's own argmax, from each start whose next token the target generated itself (as eval_acceptance)."""
    alive_sum, rows = torch.zeros(draft_steps), 0
    logits = heads.target.logits
    for b in range(len(data)):
        tokens, hidden = data.tokens[b:b + 1], data.hidden[b:b + 1].float()
        N = tokens.shape[1] - draft_steps
        n = torch.arange(1, N + 1)
        alive = (n >= data.gen_start[b] - 1)[None]
        if not alive.any():
            continue
        rows += int(alive.sum())
        drafts = lambda s, y: logits(y).argmax(-1)  # noqa: E731
        for s, y, q0 in chain_outputs(heads, tokens, hidden, draft_steps, drafts):
            d = logits(y[:, :N] if s == 0 else y).argmax(-1)  # [1, N]
            alive = alive & (d == data.top_ids[b:b + 1, n + s, 0].long())
            alive_sum[s] += alive.sum()
    per_pos = (alive_sum / max(rows, 1)).tolist()
    cond = [per_pos[0]] + [per_pos[i] / per_pos[i - 1] if per_pos[i - 1] else 0.0 for i in range(1, draft_steps)]
    return {"accept_cumulative": [round(v, 4) for v in per_pos], "accept_conditional": [round(v, 4) for v in cond],
            "mean_acceptance_length": round(1 + sum(per_pos), 4)}


def save(heads: NextN, target: nn.Module, target_name: str, out: Path, report: dict) -> None:
    """config.json (kind nextn + the target's fingerprint) + model.safetensors (the head's own weights only, hub
    names, bf16) + report.json."""
    L = target.args.num_hidden_layers
    sd = {}
    for k, v in heads.state_dict().items():  # layers.{j}.* -> model.layers.{L + j}.*
        _, j, rest = k.split(".", 2)
        sd[f"model.layers.{L + int(j)}.{rest}"] = v.detach().to(SHIPPED_DTYPE).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"kind": "nextn", "num_nextn_predict_layers": heads.n_heads, "target": target_fingerprint(target, target_name)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def cmd_train_nextn(a) -> int:
    from tandem import kernels
    from tandem.train import load_target, run_report, teacher_data
    from tandem.train.trainer import train

    out = Path(a.out)
    loaded, t_start = load_target(a)
    target = loaded.model
    if getattr(target.args, "num_nextn_predict_layers", 0):
        raise ConfigError(f"{loaded.path}: this checkpoint already carries MTP layers; train-nextn is for a dense "
                          "target without them")
    weights = init_weights(target)  # before packing: the fp32 last layer
    kernels.prepare(target, a.weight_format)  # teacher passes with the weights the head is verified against
    head = target.lm_head
    E = (head.dequantized_weight() if hasattr(head, "dequantized_weight") else head.weight).detach().float()
    work, corpus, _, train_data, eval_data = teacher_data(a, target, loaded.tokenizer, [], out)
    heads = trainable_head(target, weights)
    tcfg = TrainConfig(steps=a.steps, batch=a.batch, draft_steps=a.draft_steps, lr=a.lr, seed=a.seed)
    report = train(heads, target.embed, train_data, eval_data, tcfg, work, resume=not a.no_resume,
                   losses=partial(head_losses, E=E), evaluate=eval_head)
    report.update(run_report(a, loaded, corpus, t_start))
    save(heads, target, Path(str(loaded.path)).name, out, report)
    print(json.dumps(report.get("eval", {})))
    print(f"wrote {out}/config.json, model.safetensors, report.json")
    return 0
