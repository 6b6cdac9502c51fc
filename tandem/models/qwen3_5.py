"""Qwen3.5 / Qwen3.6 text models, dense and MoE (HF model_type `qwen3_5_text`, `qwen3_5_moe_text`, and the
vision-language releases `qwen3_5` / `qwen3_5_moe` whose text model sits under `model.language_model.*`).

Hybrid layers: every `full_attention_interval`-th layer is gated full attention (q_proj also emits a per-head output
gate; (1 + w) q/k norms; partial rotary), the others Gated DeltaNet (models/gated_deltanet.py). Norms are the
zero-centred (1 + w) RMSNorm. MoE: every layer's MLP is softmax top-k experts (renormalised) plus a shared expert
scaled by sigmoid(shared_expert_gate). The cache is a HybridCache (K/V + recurrent state, exact rollback). The
vision tower is dropped on load; the `mtp.*` weights are kept aside (`mtp_weights`) for the nextn drafter.

The MTP module (`mtp.*`, `mtp_num_hidden_layers` layers; as vLLM's / SGLang's qwen3_5_mtp.py read it):
    x = mtp.fc(concat(pre_fc_norm_embedding(embed(token)), pre_fc_norm_hidden(prev)))     -- embedding FIRST
    out = mtp.norm(mtp.layers[j](x))     a full gated-attention layer + the family's MLP / MoE, its OWN K/V cache
fc and the norms are shared by the layers; draft step i uses layer i (the last recurring), on its own output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from tandem.errors import ConfigError
from tandem.kvcache import KVCache
from tandem.kvcache.hybrid import HybridCache
from tandem.models.base import CausalLM, Output
from tandem.models.decoder import DecoderArgs, DecoderLM, DecoderModel
from tandem.models.gated_deltanet import GatedDeltaNet
from tandem.models.layers import GLUMLP, Attention, RMSNorm, activation, rowwise
from tandem.models.moe import Experts, SoftmaxTopKRouter, SparseMoeBlock, fuse_experts
from tandem.models.nextn import NextN
from tandem.models.rope import apply_rope, inv_freq, rope_cos_sin

LAYER_TYPES = ("full_attention", "linear_attention")


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "qwen3_5_text"
    head_dim: int | None = 256
    partial_rotary_factor: float | None = 0.25
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 0  # > 0: the MoE variant
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    mtp_num_hidden_layers: int = 0

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [LAYER_TYPES[bool((i + 1) % self.full_attention_interval)] for i in range(n)]
        if len(self.layer_types) != n or set(self.layer_types) - set(LAYER_TYPES):
            raise ConfigError(f"{self.model_type}: layer_types must be {n} of {LAYER_TYPES}, got {self.layer_types}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"{self.model_type}: linear_num_value_heads {self.linear_num_value_heads} is not a "
                              f"multiple of linear_num_key_heads {self.linear_num_key_heads}")
        super().__post_init__()


class GatedAttention(Attention):
    """Full attention whose q_proj emits [q | gate] per head; the output is out * sigmoid(gate) before o_proj."""

    def __init__(self, a: ModelArgs, i: int):
        super().__init__(i, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                         qk_norm=partial(RMSNorm, eps=a.rms_norm_eps, unit_offset=True))
        self.q_proj = nn.Linear(a.hidden_size, 2 * a.num_attention_heads * a.head_dim, bias=a.attention_bias)

    def forward(self, x, cos_sin, positions, cache, slots):
        """x [B, T, D], positions [B, T] (-1 = padding), slots [B] -> [B, T, D]."""
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = apply_rope(self.q_norm(q), *cos_sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)), *cos_sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        cache.write(self.layer_idx, slots, positions, k, v)
        out = cache.attend(self.layer_idx, q, slots, positions, self.window, self.scale, self.softcap)
        return self.o_proj(out.reshape(B, T, -1) * rowwise(torch.sigmoid, gate.reshape(B, T, -1)))


class HybridLayer(nn.Module):
    """Pre-norm block whose token mixer is `linear_attn` (Gated DeltaNet) or `self_attn` (gated attention)."""

    def __init__(self, a: ModelArgs, i: int, mlp: nn.Module):
        super().__init__()
        self.linear = a.layer_types[i] == "linear_attention"
        if self.linear:
            self.linear_attn = GatedDeltaNet(i, a.hidden_size, a.linear_num_key_heads, a.linear_num_value_heads,
                                             a.linear_key_head_dim, a.linear_value_head_dim,
                                             a.linear_conv_kernel_dim, activation(a.hidden_act), a.rms_norm_eps)
        else:
            self.self_attn = GatedAttention(a, i)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, unit_offset=True)

    def forward(self, x, cos_sin, positions, cache, slots, n_valid):
        h = self.input_layernorm(x)
        if self.linear:
            x = x + self.linear_attn(h, positions, cache, slots, n_valid)
        else:
            x = x + self.self_attn(h, cos_sin, positions, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTP(NextN):
    """Qwen3.5's `mtp.*` heads (names under `mtp.`), read from the target's `mtp_weights`."""

    @staticmethod
    def count(target: nn.Module) -> int:
        return target.args.mtp_num_hidden_layers

    @staticmethod
    def weights_of(target: nn.Module) -> dict[str, torch.Tensor]:
        return target.mtp_weights

    def head_args(self, t: ModelArgs, n: int) -> ModelArgs:
        return dataclasses.replace(t, num_hidden_layers=n, layer_types=["full_attention"] * n)

    def build(self, target: nn.Module) -> None:
        a, D, eps = self.args, self.args.hidden_size, self.args.rms_norm_eps
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(D, eps, unit_offset=True)
        self.pre_fc_norm_hidden = RMSNorm(D, eps, unit_offset=True)
        self.layers = nn.ModuleList(HybridLayer(a, j, target.make_mlp(a, j)) for j in range(self.n_heads))
        self.norm = RMSNorm(D, eps, unit_offset=True)

    def rename(self, key: str) -> str | None:
        return key[len("mtp."):] if key.startswith("mtp.") else None

    def layout(self) -> str:
        return "mtp.*"

    def head(self, j: int, emb: torch.Tensor, prev: torch.Tensor, cos_sin, cache_pos: torch.Tensor, cache,
             slots: torch.Tensor) -> torch.Tensor:
        """emb, prev [B, T, D]; cache_pos [B, T] (-1 = padding) -> mtp.norm output [B, T, D]."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(prev.to(emb.dtype))], -1))
        return self.norm(self.layers[j](x, cos_sin, cache_pos, cache, slots, None))

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        a = self.args
        return {j: (a.num_key_value_heads, a.head_dim, a.head_dim) for j in range(self.n_heads)}

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str = "bf16", v_type: str | None = None,
                   device="cpu") -> KVCache:
        """A plain K/V cache: the heads are full-attention layers only (no recurrent state to roll back)."""
        return KVCache(self.kv_specs(), n_slots, max_len, device=device, k_type=k_type, v_type=v_type or k_type)


class Model(DecoderLM):
    """forward(tokens [B, T], positions [B, T] (-1 = padding, after a slot's rows), cache, slots [B]) -> Output."""

    nextn_layout = MTP

    def __init__(self, args: ModelArgs):
        CausalLM.__init__(self)
        self.args = args
        layers = [HybridLayer(args, i, self.make_mlp(args, i)) for i in range(args.num_hidden_layers)]
        self.model = DecoderModel(args, layers)
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, unit_offset=True)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq, self._rope_scale = inv_freq(args.head_dim, args.rope(), args.max_position_embeddings)
        self.mtp_weights: dict[str, torch.Tensor] = {}

    def make_mlp(self, args: ModelArgs, i: int) -> nn.Module:
        act = activation(args.hidden_act, args.model_type)
        if args.num_experts <= 0:
            return GLUMLP(args.hidden_size, args.intermediate_size, act)
        gate = SoftmaxTopKRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, norm_topk_prob=True)
        shared = GLUMLP(args.hidden_size, args.shared_expert_intermediate_size, act)
        return SparseMoeBlock(gate, Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size, act),
                              shared, shared_name="shared_expert", shared_gate=True)

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        a = self.args
        return {i: (a.num_key_value_heads, a.head_dim, a.head_dim)
                for i, t in enumerate(a.layer_types) if t == "full_attention"}

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str = "bf16", v_type: str | None = None,
                   device="cpu") -> HybridCache:
        rec = {i: layer.linear_attn.spec() for i, layer in enumerate(self.model.layers) if layer.linear}
        return HybridCache(self.kv_specs(), rec, n_slots, max_len, device=device, k_type=k_type,
                           v_type=v_type or k_type)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: HybridCache,
                slots: torch.Tensor | None = None, logit_rows: torch.Tensor | slice | None = None) -> Output:
        if slots is None:
            slots = torch.arange(tokens.shape[0], device=tokens.device)
        n_valid = cache.recurrent.begin(slots, positions)
        x = self.embed(tokens)
        cs = rope_cos_sin(positions, self._inv_freq, x.dtype, self._rope_scale)
        for layer in self.model.layers:
            x = layer(x, cs, positions, cache, slots, n_valid)
        hidden = self.model.norm(x)
        h = hidden if logit_rows is None else hidden[:, logit_rows]
        return Output(self.logits(h), hidden)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """VL layout -> text names, vision tower dropped, `mtp.*` set aside, experts fused, tied head filled."""
        out = {}
        for k, v in weights.items():
            k = k.replace("model.language_model.", "model.", 1) if k.startswith("model.language_model.") else k
            if k.startswith("mtp."):
                self.mtp_weights[k] = v
            elif not k.startswith(("model.visual.", "visual.")):
                out[k] = v
        return super().sanitize(fuse_experts(out))
