"""DeepSeek-V3 (HF model_type `deepseek_v3`): multi-head latent attention (MLA) over a cache of the compressed
latent, yarn RoPE (mscale on the softmax scale), sigmoid grouped-top-k MoE with shared experts after
`first_k_dense_replace` dense layers. The MoE half (`GroupedMoeArgs`, `GroupedMoeLM`) is shared with GLM-4.5.

MTP (nextn) layers: checkpoints carry `num_nextn_predict_layers` extra layers at `model.layers.{L + i}`. They are not
part of the target: sanitize() sets them aside in `model.nextn_weights` (HF names, untouched) for the nextn drafter.

MLA attention is always weight-absorbed: per token the cache holds c_kv (after kv_a_layernorm) and the rotated k_pe
(tandem/kvcache/mla.py); q_nope goes through kv_b_proj's K half (per head, [Dn] -> [R]) and the attended latent
through its V half ([R] -> [Dv]), so no token's K/V is ever expanded. After kernels.prepare() both halves are
per-head PackedLinears, so every step of a row is row-invariant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from tandem.kernels import PackedLinear
from tandem.kvcache.mla import MLACache
from tandem.models.decoder import DecoderArgs, DecoderLM
from tandem.models.layers import GLUMLP, RMSNorm, activation
from tandem.models.moe import Experts, SigmoidGroupedTopKRouter, SparseMoeBlock, fuse_experts
from tandem.models.rope import _mscale, apply_rope

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class GroupedMoeArgs(DecoderArgs):
    """The DeepSeek-V3 / GLM-4.5 MoE fields."""

    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 0

    def is_moe(self, i: int) -> bool:
        return i >= self.first_k_dense_replace


class GroupedMoeLM(DecoderLM):
    """Dense GLU MLP on the first `first_k_dense_replace` layers, then routed experts + shared experts."""

    def __init__(self, args: GroupedMoeArgs):
        super().__init__(args)
        self.nextn_weights: dict[str, torch.Tensor] = {}

    def make_mlp(self, args: GroupedMoeArgs, i: int) -> nn.Module:
        act = activation(args.hidden_act, args.model_type)
        if not args.is_moe(i):
            return GLUMLP(args.hidden_size, args.intermediate_size, act)
        gate = SigmoidGroupedTopKRouter(args.hidden_size, args.n_routed_experts, args.num_experts_per_tok,
                                        args.n_group, args.topk_group, args.norm_topk_prob,
                                        args.routed_scaling_factor)
        experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size, act)
        shared = (GLUMLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts, act)
                  if args.n_shared_experts > 0 else None)
        return SparseMoeBlock(gate, experts, shared, "shared_experts")

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sets the MTP layers `model.layers.{L..L+n-1}.*` aside in `self.nextn_weights` (not loaded into the
        target); any other layer index past the trunk stays and fails the strict load by name."""
        L, n = self.args.num_hidden_layers, self.args.num_nextn_predict_layers

        def is_nextn(k: str) -> bool:
            m = _LAYER.match(k)
            return m is not None and L <= int(m[1]) < L + n

        self.nextn_weights = {k: v for k, v in weights.items() if is_nextn(k)}
        trunk = {k: v for k, v in weights.items() if not is_nextn(k)}
        return super().sanitize(fuse_experts(trunk))


@dataclass
class ModelArgs(GroupedMoeArgs):
    model_type: str = "deepseek_v3"
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rope_interleave: bool = True
    routed_scaling_factor: float = 2.5

    def __post_init__(self):
        self.head_dim = self.qk_rope_head_dim  # the rotary dim, as DeepseekV3Config sets it
        super().__post_init__()

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 for a scaled rope (as transformers)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        rp = self.rope()
        if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
            scale *= _mscale(rp["factor"], rp["mscale_all_dim"]) ** 2
        return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3)... -> rotate_half layout (evens, then odds); the same
    permutation of q and k leaves their dot products unchanged, as transformers' interleaved rotation does."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MLAttention(nn.Module):
    """Multi-head latent attention of layer `layer_idx`, weight-absorbed, over an MLACache (names as in HF)."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_heads = layer_idx, args.num_attention_heads
        self.rank, self.nope, self.rope_dim, self.v_dim = (args.kv_lora_rank, args.qk_nope_head_dim,
                                                           args.qk_rope_head_dim, args.v_head_dim)
        self.interleave, self.scale = args.rope_interleave, args.softmax_scale()
        H, D, qk = self.n_heads, args.hidden_size, self.nope + self.rope_dim
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:  # HF builds these norms with the default eps 1e-6, not rms_norm_eps
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6, unit_offset=False)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.rank + self.rope_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6, unit_offset=False)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=args.attention_bias)
        self.absorb_k: nn.ModuleList | None = None  # per head PackedLinear [Dn] -> [R] after pack_weights
        self.absorb_v: nn.ModuleList | None = None  # per head PackedLinear [R] -> [Dv]

    def _kv_b_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight split per head: W_k [H, Dn, R], W_v [H, Dv, R] (dequantised once packed)."""
        kvb = self.kv_b_proj
        w = kvb.dequantized_weight() if isinstance(kvb, PackedLinear) else kvb.weight
        w = w.view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, :self.nope], w[:, self.nope:]

    def pack_weights(self, fmt: str) -> None:
        """Per-head absorption linears in the run-time format (kv_b_proj is not read after this)."""
        wk, wv = (w.detach().float() for w in self._kv_b_halves())
        self.absorb_k = nn.ModuleList(PackedLinear.from_weight(wk[h].T.contiguous(), fmt)
                                      for h in range(self.n_heads))
        self.absorb_v = nn.ModuleList(PackedLinear.from_weight(wv[h].contiguous(), fmt) for h in range(self.n_heads))
        del self.kv_b_proj

    def _absorb(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """x [B, T, H, Dn] -> [B, T, H, R] (which="k"), or [B, T, H, R] -> [B, T, H, Dv] (which="v")."""
        packed = self.absorb_k if which == "k" else self.absorb_v
        if packed is not None:  # row-invariant: one packed linear per head
            return torch.stack([packed[h](x[:, :, h]) for h in range(self.n_heads)], dim=2)
        wk, wv = self._kv_b_halves()
        if which == "k":
            return torch.einsum("bthd,hdr->bthr", x, wk.to(x.dtype))
        return torch.einsum("bthr,hvr->bthv", x, wv.to(x.dtype))

    def _rope(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        return apply_rope(deinterleave(x) if self.interleave else x, *cos_sin)

    def forward(self, x: torch.Tensor, cos_sin, positions: torch.Tensor, cache: MLACache,
                slots: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], positions [B, T] (-1 = padding), slots [B] -> [B, T, D]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, R]
        k_pe = self._rope(k_pe[:, :, None], cos_sin)[:, :, 0]  # [B, T, Dr], shared by every head
        cache.write(self.layer_idx, slots, positions, c_kv, k_pe)
        q_full = torch.cat((self._absorb(q_nope, "k"), self._rope(q_pe, cos_sin)), dim=-1)  # [B, T, H, R + Dr]
        latent = cache.attend(self.layer_idx, q_full, slots, positions, self.scale)  # [B, T, H, R]
        return self.o_proj(self._absorb(latent, "v").reshape(B, T, -1))


class Model(GroupedMoeLM):
    def make_attention(self, args: ModelArgs, i: int) -> nn.Module:
        return MLAttention(args, i)

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str = "bf16", v_type: str | None = None,
                   device="cpu") -> MLACache:
        a = self.args
        return MLACache(a.num_hidden_layers, a.kv_lora_rank, a.qk_rope_head_dim, n_slots, max_len,
                        k_type=k_type, v_type=v_type, device=device)
