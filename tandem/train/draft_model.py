"""`tandem train-draft-model`: a draft model (kind `draft-model`) built from its target: the target's first N
layers, final norm and LM head (so it speaks the target's vocabulary), optionally self-distilled on the target's
outputs with train-assistant's teacher data and trainer.

The result is an ordinary HF-style directory (config.json of the target's family, model.safetensors, tokenizer.json +
tokenizer_config.json equal to the target's), loaded by `--draft-model DIR` like any full model. Training is
teacher-forced over whole sequences: a draft model drafts on its own cache of the accepted prefix, and while its
drafts equal the target's greedy tokens that prefix is the training sequence itself (so eval_draft's teacher-forced
count equals run-time greedy drafting on the target's own generations).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from tandem.errors import ConfigError
from tandem.kernels.reference import attend_reference
from tandem.train.data import DistillData
from tandem.train.trainer import TrainConfig, sampled_ce


def draft_config(config: dict, layers: int, source: str = "target") -> dict:
    """The target's HF config cut to its first `layers` layers (per-layer lists too, e.g. layer_types)."""
    cfg = copy.deepcopy(config)
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    L = text.get("num_hidden_layers")
    if not isinstance(L, int) or not 1 <= layers < L:
        raise ConfigError(f"--layers {layers}: a draft model keeps 1 .. num_hidden_layers - 1 of {source}'s "
                          f"layers (num_hidden_layers = {L})")
    for k, v in list(text.items()):
        if isinstance(v, list) and len(v) == L:
            text[k] = v[:layers]
    text["num_hidden_layers"] = layers
    return cfg


def truncate(target: nn.Module, config: dict, layers: int, source: str = "target") -> tuple[nn.Module, dict]:
    """(draft model in fp32, its config): a copy of the target's first `layers` layers, final norm, embedding and
    head. Call before kernels.prepare(target): the weights are read from the target's fp32 parameters."""
    from tandem import models
    from tandem.loading import _no_init, load_state_into

    cfg = draft_config(config, layers, source)
    with _no_init():
        model = models.build(cfg)
    keep = {}
    for k, v in target.state_dict().items():
        parts = k.split(".")
        if "layers" in parts:  # model.layers.{i}.*: only the first `layers`
            i = parts.index("layers")
            if not parts[i + 1].isdigit() or int(parts[i + 1]) >= layers:
                continue
        keep[k] = v.detach().float().clone()
    keep = {k: v for k, v in keep.items() if k in model.state_dict()}  # e.g. per-layer buffers past N
    load_state_into(model, keep, f"{source} (first {layers} layers)")
    model.requires_grad_(False)
    return model.eval(), cfg


class CausalKV:
    """The draft model's cache in training: each layer's K/V of the whole batch [B, Hkv, T, D] (positions 0..T-1,
    slot b = row b), read causally through the reference attention (autograd)."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer, slots, positions, k, v):  # k, v [B, T, Hkv, D]
        self.kv[layer] = (k.transpose(1, 2), v.transpose(1, 2))

    def attend(self, layer, q, slots, positions, window, scale, softcap=None):
        k, v = self.kv[layer]
        return attend_reference(q, k, v, slots, positions, window, scale, softcap)


def draft_hidden(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, D] of the draft model over whole sequences tokens [B, T]."""
    B, T = tokens.shape
    pos = torch.arange(T).expand(B, T)
    return model(tokens, pos, CausalKV(), torch.arange(B), logit_rows=slice(0, 0)).hidden


def draft_losses(model, target_embed, batch: DistillData, cfg: TrainConfig, cluster_of, neg_ids):
    """trainer.train's loss hook: sampled cross-entropy against the target's top-K at every position (the draft's
    own frozen head rows E, shared random negatives)."""
    y = draft_hidden(model, batch.tokens)
    E = model.lm_head.weight.detach()
    loss, acc, _ = sampled_ce(y, E, batch.top_ids[..., :cfg.loss_top_k].long(),
                              batch.top_logp[..., :cfg.loss_top_k], E[neg_ids].float())
    return loss, {"acc0": float(acc.float().mean())}


@torch.no_grad()
def eval_draft(model, target_embed, data: DistillData, draft_steps: int) -> dict:
    """Greedy drafting on held-out generations: from each start n whose next token the target generated, draft s
    counts while drafts 0..s all equal the target's argmax (as trainer.eval_acceptance)."""
    alive_sum, rows = torch.zeros(draft_steps), 0
    for b in range(len(data)):
        tokens = data.tokens[b:b + 1]
        T = tokens.shape[1]
        hit = model.logits(draft_hidden(model, tokens))[0].argmax(-1) == data.top_ids[b, :, 0].long()  # [T]
        n = torch.arange(max(1, int(data.gen_start[b]) - 1), T - draft_steps + 1)
        if len(n) == 0:
            continue
        alive = torch.ones(len(n), dtype=torch.bool)
        for s in range(draft_steps):
            alive = alive & hit[n + s]
            alive_sum[s] += alive.sum()
        rows += len(n)
    per_pos = (alive_sum / max(rows, 1)).tolist()
    cond = [per_pos[0]] + [per_pos[i] / per_pos[i - 1] if per_pos[i - 1] else 0.0 for i in range(1, draft_steps)]
    return {"accept_cumulative": [round(v, 4) for v in per_pos], "accept_conditional": [round(v, 4) for v in cond],
            "mean_acceptance_length": round(1 + sum(per_pos), 4)}


def save(model: nn.Module, cfg: dict, tokenizer, chat_template: str | None, out: Path, report: dict) -> None:
    """An HF directory: config.json, model.safetensors (fp32; a tied head is stored once, as the embedding),
    tokenizer.json + tokenizer_config.json giving the target's special ids, report.json."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.lm_head.weight is model.model.embed_tokens.weight:
        sd.pop("lm_head.weight")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(cfg)
    if tokenizer is not None:
        piece = tokenizer.id_to_piece
        tc = {"add_bos_token": tokenizer.add_bos, "bos_token": None if tokenizer.bos_id is None else
              piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_ids[0]) if tokenizer.eos_ids else None,
              "pad_token": None if tokenizer.pad_id is None else piece(tokenizer.pad_id),
              "unk_token": None if tokenizer.unk_id is None else piece(tokenizer.unk_id)}
        if chat_template:
            tc["chat_template"] = chat_template
        tokenizer.backend.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
        cfg.update(bos_token_id=tokenizer.bos_id, eos_token_id=list(tokenizer.eos_ids), pad_token_id=tokenizer.pad_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def check_saved(out: Path, model: nn.Module, target: nn.Module, target_tokenizer, target_name: str) -> None:
    """The saved tokenizer, read back as `--draft-model` reads it, passes the draft-model kind's vocabulary check."""
    from tandem.loading import hf
    from tandem.spec.draft_model import check_vocab

    tok, _ = hf.read_tokenizer(out, hf.read_config(out))
    check_vocab(model, target, str(out), target_name, tok, target_tokenizer)


def cmd_train_draft_model(a) -> int:
    from tandem import kernels
    from tandem.train import load_target, run_report, teacher_data
    from tandem.train.trainer import train

    out = Path(a.out)
    loaded, t_start = load_target(a)
    target = loaded.model
    model, cfg = truncate(target, loaded.config, a.layers, str(loaded.path))  # before packing: fp32 weights
    report = {"layers": a.layers, "target_layers": target.args.num_hidden_layers}
    if a.steps > 0:
        kernels.prepare(target, a.weight_format)  # teacher passes with the weights drafts are verified against
        work, corpus, _, train_data, eval_data = teacher_data(a, target, loaded.tokenizer, [], out)
        for n, p in model.named_parameters():  # the head (tied: the embedding) stays the target's
            p.requires_grad_("embed_tokens" not in n and "lm_head" not in n)
        tcfg = TrainConfig(steps=a.steps, batch=a.batch, draft_steps=a.draft_steps, lr=a.lr, seed=a.seed)
        report["truncated_eval"] = eval_draft(model, target.embed, eval_data, a.draft_steps)
        print(f"truncated, before training: {json.dumps(report['truncated_eval'])}")
        report.update(train(model, target.embed, train_data, eval_data, tcfg, work, resume=not a.no_resume,
                            losses=draft_losses, evaluate=eval_draft))
        report.update(run_report(a, loaded, corpus, t_start))
        model.requires_grad_(False)
    save(model.eval(), cfg, loaded.tokenizer, loaded.chat_template, out, report)
    check_saved(out, model, target, loaded.tokenizer, str(loaded.path))
    print(json.dumps(report.get("eval", {})))
    print(f"wrote {out}/config.json, model.safetensors, tokenizer.json, report.json (--draft-model {out})")
    return 0
