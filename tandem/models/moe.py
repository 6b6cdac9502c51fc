"""Mixture of experts: routers, the experts (transformers 5 fused layout), shared experts, checkpoint fusing.

Row invariance (the lossless-speculation guarantee): after kernels.prepare(model, fmt) every expert is a pair of
PackedLinears (`pack_weights`), each computing a row's output bitwise independently of the other rows routed to
that expert, and a row's top-k expert outputs are summed in its own top-k order, never in an order set by the batch.
Routers' projections are packed the same way (fp32 included). Unprepared modules run plain F.linear.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.errors import ModelLoadError
from tandem.kernels.linear import PackedLinear
from tandem.models.layers import rowwise


class _Router(nn.Module):
    """Holds the HF router weight `weight` [E, D]; logits through a PackedLinear once packed."""

    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k, self.n_experts = top_k, n_experts
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden))
        self.proj: PackedLinear | None = None

    def pack_weights(self, fmt: str) -> None:
        self.proj = PackedLinear.from_weight(self.weight.detach(), fmt)
        del self.weight

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, E] fp32."""
        return (F.linear(x.float(), self.weight.float()) if self.proj is None else self.proj(x.float()))


class SoftmaxTopKRouter(_Router):
    """Softmax over all experts, top-k, optionally renormalised over the k (Qwen2/3-MoE `norm_topk_prob`)."""

    def __init__(self, hidden: int, n_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__(hidden, n_experts, top_k)
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] fp32, expert ids [N, K])."""
        probs = torch.softmax(self.router_logits(x), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w, idx


class SigmoidGroupedTopKRouter(_Router):
    """DeepSeek-V3 / GLM-4.5: sigmoid scores; experts chosen on score + e_score_correction_bias among the
    `topk_group` best of `n_group` groups (group score = sum of its 2 best); weights are the raw sigmoid scores,
    optionally renormalised, times routed_scaling_factor."""

    def __init__(self, hidden: int, n_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float):
        super().__init__(hidden, n_experts, top_k)
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] fp32, expert ids [N, K])."""
        scores = rowwise(torch.sigmoid, self.router_logits(x))
        choice = scores + self.e_score_correction_bias.float()
        N, E, G = choice.shape[0], self.n_experts, self.n_group
        group_scores = choice.view(N, G, E // G).topk(2, dim=-1)[0].sum(-1)  # [N, G]
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        choice = choice.masked_fill(~keep[:, :, None].expand(N, G, E // G).reshape(N, E), float("-inf"))
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.routed_scaling_factor, idx


class Experts(nn.Module):
    """E GLU experts as 3D tensors (transformers 5 layout): gate_up_proj [E, 2I, D], down_proj [E, D, I]."""

    def __init__(self, n_experts: int, hidden: int, inter: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.n_experts, self.act = n_experts, act
        self.gate_up_proj = nn.Parameter(torch.zeros(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, hidden, inter))
        self.packed: nn.ModuleList | None = None  # per expert [gate_up, down] PackedLinears after pack_weights

    def pack_weights(self, fmt: str) -> None:
        """Pack every expert in the run-time format (fp32 too: fixed-shape row blocks) and drop the 3D tensors."""
        gu, dn = self.gate_up_proj.detach(), self.down_proj.detach()
        self.packed = nn.ModuleList(nn.ModuleList([PackedLinear.from_weight(gu[e], fmt),
                                                   PackedLinear.from_weight(dn[e], fmt)])
                                    for e in range(self.n_experts))
        del self.gate_up_proj, self.down_proj

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows x [M, D] -> [M, D]."""
        if self.packed is None:
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            return F.linear(self.act(gate) * up, self.down_proj[e])
        gate_up, down = self.packed[e]
        gate, up = gate_up(x).chunk(2, dim=-1)
        return down(self.act(gate) * up)

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], routing weights w [N, K], expert ids idx [N, K] -> sum_k w[:, k] * expert_idx[:, k](x)."""
        N, K = idx.shape
        y = x.new_zeros(N, K, x.shape[-1])
        for e in idx.unique().tolist():
            tok, kk = (idx == e).nonzero(as_tuple=True)
            y[tok, kk] = (self.expert(e, x[tok]) * w[tok, kk, None]).to(y.dtype)
        out = y[:, 0]
        for k in range(1, K):  # a row's own top-k order: independent of the other rows
            out = out + y[:, k]
        return out


class SparseMoeBlock(nn.Module):
    """router `gate` + `experts` on [B, T, D], plus an optional shared expert (`shared_name` as in the checkpoint)
    scaled by sigmoid(shared_expert_gate(x)) when `shared_gate` (Qwen2-MoE)."""

    def __init__(self, gate: _Router, experts: Experts, shared: nn.Module | None = None,
                 shared_name: str = "shared_experts", shared_gate: bool = False):
        super().__init__()
        self.gate, self.experts, self.shared_name = gate, experts, shared_name
        if shared is not None:
            setattr(self, shared_name, shared)
        hidden = experts.gate_up_proj.shape[-1]
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(flat)
        out = self.experts(flat, w, idx)
        shared = getattr(self, self.shared_name, None)
        if shared is not None:
            s = shared(flat)
            if self.shared_expert_gate is not None:
                s = rowwise(torch.sigmoid, self.shared_expert_gate(flat)) * s
            out = out + s
        return out.reshape(x.shape)


_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint expert tensors -> the fused `experts.gate_up_proj` [E, 2I, D] / `experts.down_proj` [E, D, I].

    Accepts per-expert hub names (`...experts.{e}.gate_proj.weight` [I, D], up_proj, down_proj [D, I]) and
    separate 3D tensors (`...experts.gate_proj` / `up_proj` [E, I, D], `...experts.down_proj` [E, D, I], as the
    GGUF loader emits ffn_{gate,up,down}_exps). Other names pass through."""
    out, per = {}, {}
    for k, v in weights.items():
        m = _PER_EXPERT.match(k)
        if m:
            per.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = v
        else:
            out[k] = v
    for prefix, parts in per.items():
        n = max(max(p) for p in parts.values()) + 1
        for name in ("gate_proj", "up_proj", "down_proj"):
            missing = sorted(set(range(n)) - set(parts.get(name, {})))
            if missing:
                raise ModelLoadError(f"{prefix}: {name} missing for expert(s) {missing[:8]} of {n}")
        g, u, d = (torch.stack([parts[name][e] for e in range(n)]) for name in ("gate_proj", "up_proj", "down_proj"))
        out[f"{prefix}.gate_up_proj"], out[f"{prefix}.down_proj"] = torch.cat([g, u], dim=1), d
    for k in [k for k in out if k.endswith(".experts.gate_proj")]:
        prefix = k[: -len(".gate_proj")]
        up = out.pop(f"{prefix}.up_proj", None)
        if up is None or f"{prefix}.down_proj" not in out:
            raise ModelLoadError(f"{prefix}: gate_proj present without up_proj / down_proj")
        gate = out.pop(k)
        if gate.shape != up.shape:
            raise ModelLoadError(f"{prefix}: gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ")
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
    return out
