"""Step 3.5 text model (HF model_type `step3p5`; `step3p7`, the vision-language release whose text model sits under
`model.language_model.*`, loads its text model and drops the vision tower), as transformers' Step3p7TextModel:

- per-layer `layer_types` (sliding / full attention), each type with its own RoPE (theta, partial rotary) and the
  sliding layers with their own query-head count (`num_sliding_attention_heads`); (1 + w) RMSNorms everywhere,
  q/k norms per head, a per-head output gate sigmoid(g_proj(x)), scale query_pre_attn_scalar^-0.5;
- per-layer `mlp_layer_types`: a dense SwiGLU or a MoE (sigmoid router + correction bias, top-k renormalised,
  times moe_router_scaling_factor, plus a shared expert); SwiGLU clamps per layer (`swiglu_limits` for the routed
  experts, `swiglu_limits_shared` for the shared expert and the dense MLP): act(gate) <= l, |up| <= l.

Hub configs pad the per-layer lists with `num_nextn_predict_layers` MTP entries and use legacy names
(`moe_layers_enum`, `attention_other_setting`, per-layer `rope_theta` / `partial_rotary_factors`); `from_dict` reads
both those and transformers' serialisation. The MTP layers (`model.layers.{L + j}.*`) are set aside in
`nextn_weights` for the nextn drafter, which runs them one per draft step (a chain).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.errors import ConfigError
from tandem.kvcache import KVCache
from tandem.models.base import CausalLM, Output
from tandem.models.decoder import DecoderArgs, DecoderLM, DecoderModel
from tandem.models.layers import GLUMLP, Attention, DecoderLayer, RMSNorm, activation, rowwise
from tandem.models.moe import Experts, SigmoidGroupedTopKRouter, SparseMoeBlock, fuse_experts
from tandem.models.nextn import NextN, NextNLayer
from tandem.models.rope import apply_rope, inv_freq, rope_config, rope_cos_sin

LAYER_TYPES = ("full_attention", "sliding_attention")
# hub (remote-code) config names -> transformers' names
ALIASES = {"moe_num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts",
           "moe_top_k": "num_experts_per_tok", "num_attention_groups": "num_key_value_heads",
           "share_expert_dims": "share_expert_dim", "num_mtp_layers": "num_nextn_predict_layers"}
# hub checkpoint names -> transformers' (conversion_mapping "step3p7"); experts stay 3D for fuse_experts
HUB_RENAMES = [(".moe.gate.weight", ".mlp.gate.weight"), (".moe.router_bias", ".mlp.gate.e_score_correction_bias"),
               (".moe.gate_proj.weight", ".mlp.experts.gate_proj"), (".moe.up_proj.weight", ".mlp.experts.up_proj"),
               (".moe.down_proj.weight", ".mlp.experts.down_proj"), (".share_expert.", ".mlp.shared_experts.")]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DROP = ("model.vision_model.", "model.multi_modal_projector.", "vision_model.", "vit_large_projector.")


def hub_to_hf(key: str) -> str:
    for old, new in HUB_RENAMES:
        key = key.replace(old, new)
    return key


def _split_padded(d: dict, L: int, n: int) -> None:
    """Hub lists of L + n entries -> the trunk's L and the MTP layers' n (`mtp_*`), as Step3p7TextConfig."""
    for name in ("layer_types", "mlp_layer_types", "swiglu_limits", "swiglu_limits_shared"):
        v = d.get(name)
        if isinstance(v, list) and n and len(v) == L + n:
            d[name] = v[:L]
            d.setdefault(f"mtp_{name}", v[L:])


def _hub_fields(d: dict) -> dict:
    """Legacy hub fields -> transformers' (mlp_layer_types, num_sliding_attention_heads, rope per layer type)."""
    d = dict(d)
    for old, new in ALIASES.items():
        if old in d and new not in d:
            d[new] = d.pop(old)
    L, n = d.get("num_hidden_layers", 45), d.get("num_nextn_predict_layers", 0) or 0
    if d.get("mlp_layer_types") is None:
        enum = d.get("moe_layers_enum")
        items = enum.split(",") if isinstance(enum, str) else enum
        moe = {int(i) for i in items if str(i).strip()} if enum is not None else set(range(3, L))
        d["mlp_layer_types"] = ["sparse" if i in moe else "dense" for i in range(L + n)]
    if d.get("layer_types") is None:
        d["layer_types"] = ["full_attention"] * (L + n)
    _split_padded(d, L, n)
    if d.get("num_sliding_attention_heads") is None:
        d["num_sliding_attention_heads"] = (d.get("attention_other_setting") or {}).get(
            "num_attention_heads", d.get("num_attention_heads"))
    rp = d.get("rope_parameters") or {}
    if not all(isinstance(rp.get(t), dict) for t in set(d["layer_types"])):
        theta, prf = d.get("rope_theta", 10_000.0), d.get("partial_rotary_factors")
        rp = {}
        for t in set(d["layer_types"]) | set(d.get("mtp_layer_types") or []):
            i = d["layer_types"].index(t) if t in d["layer_types"] else 0
            rp[t] = {"rope_type": "default", "rope_theta": theta[i] if isinstance(theta, list) else theta}
            if prf:
                rp[t]["partial_rotary_factor"] = prf[i]
        if d.get("rope_scaling") and "full_attention" in rp:
            rp["full_attention"].update(d["rope_scaling"])
        d["rope_parameters"] = rp
    d["rope_scaling"], d["rope_theta"], d["hidden_act"] = None, 10_000.0, "silu"  # the gate is SwiGLU (clamped)
    return d


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "step3p5"
    rms_norm_eps: float = 1e-5
    mlp_layer_types: list[str] | None = None
    moe_intermediate_size: int = 1280
    n_routed_experts: int = 288
    num_experts_per_tok: int = 8
    share_expert_dim: int = 1280
    num_sliding_attention_heads: int | None = None
    query_pre_attn_scalar: float | None = None
    moe_router_scaling_factor: float = 1.0
    gating: bool | str = True
    use_bidirectional_attention: bool = False
    swiglu_limits: list | None = None
    swiglu_limits_shared: list | None = None
    num_nextn_predict_layers: int = 0
    mtp_layer_types: list[str] | None = None
    mtp_mlp_layer_types: list[str] | None = None
    mtp_swiglu_limits: list | None = None  # the MTP layers' own limits (hub configs only)
    mtp_swiglu_limits_shared: list | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return super().from_dict(_hub_fields(d))

    def __post_init__(self):
        super().__post_init__()
        L, n = self.num_hidden_layers, self.num_nextn_predict_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * L
        for name, v, want in (("layer_types", self.layer_types, L), ("mlp_layer_types", self.mlp_layer_types, L)):
            if len(v) != want:
                raise ConfigError(f"{self.model_type}: {name} has {len(v)} entries, expected {want}")
        if set(self.layer_types) - set(LAYER_TYPES) or set(self.mlp_layer_types) - {"sparse", "dense"}:
            raise ConfigError(f"{self.model_type}: layer_types {sorted(set(self.layer_types))} / mlp_layer_types "
                              f"{sorted(set(self.mlp_layer_types))} unsupported (want {LAYER_TYPES}, sparse/dense)")
        if self.use_bidirectional_attention:
            raise ConfigError(f"{self.model_type}: use_bidirectional_attention is unsupported")
        if n and (self.mtp_layer_types is None or self.mtp_mlp_layer_types is None):
            raise ConfigError(f"{self.model_type}: {n} MTP layers but no mtp_layer_types / mtp_mlp_layer_types "
                              f"(or layer lists padded to {L + n} entries)")
        self.num_sliding_attention_heads = self.num_sliding_attention_heads or self.num_attention_heads
        self.query_pre_attn_scalar = self.query_pre_attn_scalar or self.head_dim

    def rope(self, layer_type: str = "full_attention") -> dict:
        rp = (self.rope_parameters or {}).get(layer_type) or {"rope_type": "default", "rope_theta": self.rope_theta}
        return rope_config(rp, max_position_embeddings=self.max_position_embeddings)

    def limit(self, which: str, i: int) -> float | None:
        """The clamp of layer i's routed experts ("swiglu_limits") or shared/dense MLP; 0 / None = none."""
        v = getattr(self, which)
        return (v[i] if v and i < len(v) else None) or None

    def mtp_config(self) -> "ModelArgs":
        """The config the MTP heads see (transformers' get_mtp_config): their layer types as layers 0..n-1, the
        attention heads of num_attention_heads whatever the type (no mtp_per_layer_config); each head's own
        SwiGLU limits where the hub config pads them, else the trunk's first n (what transformers reads)."""
        return dataclasses.replace(
            self, num_hidden_layers=self.num_nextn_predict_layers, layer_types=list(self.mtp_layer_types),
            mlp_layer_types=list(self.mtp_mlp_layer_types), num_sliding_attention_heads=self.num_attention_heads,
            swiglu_limits=self.mtp_swiglu_limits or self.swiglu_limits,
            swiglu_limits_shared=self.mtp_swiglu_limits_shared or self.swiglu_limits_shared)


class GatedAttention(Attention):
    """Attention whose output heads are scaled by sigmoid(g_proj(x)) (one gate per head, or per channel)."""

    def __init__(self, a: ModelArgs, i: int):
        sliding = a.layer_types[i] == "sliding_attention"
        heads = a.num_sliding_attention_heads if sliding else a.num_attention_heads
        super().__init__(i, a.hidden_size, heads, a.num_key_value_heads, a.head_dim, qkv_bias=a.attention_bias,
                         o_bias=a.attention_bias, qk_norm=partial(RMSNorm, eps=a.rms_norm_eps),
                         scale=a.query_pre_attn_scalar ** -0.5, window=a.sliding_window if sliding else None)
        per_head = a.gating is True or a.gating == "per-head"
        self.g_proj = nn.Linear(a.hidden_size, heads if per_head else heads * a.head_dim, bias=False)

    def forward(self, x, cos_sin, positions, cache, slots):
        """x [B, T, D], positions [B, T] (-1 = padding), slots [B] -> [B, T, D]."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)), *cos_sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)), *cos_sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        cache.write(self.layer_idx, slots, positions, k, v)
        out = cache.attend(self.layer_idx, q, slots, positions, self.window, self.scale, self.softcap)
        gate = rowwise(torch.sigmoid, self.g_proj(x)).view(B, T, self.n_heads, -1)  # [B, T, H, 1 or Dh]
        return self.o_proj((out * gate).reshape(B, T, -1))


def _clamped_glu(act, gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    if limit is None:
        return act(gate) * up
    return act(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)


class ClampedMLP(GLUMLP):
    """SwiGLU with act(gate) <= limit and |up| <= limit (dense layers and the shared expert)."""

    def __init__(self, hidden: int, inter: int, act, limit: float | None):
        super().__init__(hidden, inter, act)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_clamped_glu(self.act, self.gate_proj(x), self.up_proj(x), self.limit))


class ClampedExperts(Experts):
    """The routed experts with the same clamp."""

    def __init__(self, n_experts: int, hidden: int, inter: int, act, limit: float | None):
        super().__init__(n_experts, hidden, inter, act)
        self.limit = limit

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows x [M, D] -> [M, D]."""
        if self.packed is None:
            gate_up, down = F.linear(x, self.gate_up_proj[e]), partial(F.linear, weight=self.down_proj[e])
        else:
            gate_up, down = self.packed[e][0](x), self.packed[e][1]
        return down(_clamped_glu(self.act, *gate_up.chunk(2, dim=-1), self.limit))


class Layer(DecoderLayer):
    """The pre-norm block with (1 + w) norms; `layer_type` picks its RoPE table."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, a: ModelArgs, i: int):
        super().__init__(attn, mlp, a.hidden_size, a.rms_norm_eps)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.layer_type = a.layer_types[i]


class MtpLayer(NextNLayer):
    """MTP head j at `model.layers.{L + j}`: transformers' MtpLayer around this family's block, (1 + w) norms."""

    def __init__(self, target: nn.Module, args: ModelArgs, j: int):
        super().__init__(target, args, j)
        D, eps = args.hidden_size, args.rms_norm_eps
        for name in ("input_layernorm", "post_attention_layernorm", "enorm", "hnorm"):
            setattr(self, name, RMSNorm(D, eps))
        self.shared_head.norm = RMSNorm(D, eps)


class MtpHeads(NextN):
    """The chained heads (one per draft step): the MTP config's layer types, each head with its type's RoPE."""

    def head_args(self, t: ModelArgs, n: int) -> ModelArgs:
        return t.mtp_config()

    def rename(self, key: str) -> str | None:
        return super().rename(hub_to_hf(key))

    def build(self, target: nn.Module) -> None:
        self.layers = nn.ModuleList(MtpLayer(target, self.args, j) for j in range(self.n_heads))

    def rope(self, j: int) -> tuple[torch.Tensor, float]:
        return self.target.rope_of(self.args.layer_types[j])


class Model(DecoderLM):
    """forward(tokens [B, T], positions [B, T] (-1 = padding), cache, slots [B], logit_rows) -> Output."""

    nextn_layout = MtpHeads

    def __init__(self, args: ModelArgs):
        CausalLM.__init__(self)
        self.args = args
        layers = [Layer(self.make_attention(args, i), self.make_mlp(args, i), args, i)
                  for i in range(args.num_hidden_layers)]
        self.model = DecoderModel(args, layers)
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        types = set(args.layer_types) | set(args.mtp_layer_types or [])
        self._ropes = {t: inv_freq(args.head_dim, args.rope(t), args.max_position_embeddings) for t in types}
        self._inv_freq, self._rope_scale = self._ropes.get("full_attention", next(iter(self._ropes.values())))
        self.nextn_weights: dict[str, torch.Tensor] = {}

    def make_attention(self, args: ModelArgs, i: int) -> nn.Module:
        return GatedAttention(args, i)

    def make_mlp(self, args: ModelArgs, i: int) -> nn.Module:
        act = activation(args.hidden_act, args.model_type)
        if args.mlp_layer_types[i] == "dense":
            return ClampedMLP(args.hidden_size, args.intermediate_size, act, args.limit("swiglu_limits_shared", i))
        gate = SigmoidGroupedTopKRouter(args.hidden_size, args.n_routed_experts, args.num_experts_per_tok, 1, 1,
                                        True, args.moe_router_scaling_factor)
        experts = ClampedExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size, act,
                                 args.limit("swiglu_limits", i))
        shared = ClampedMLP(args.hidden_size, args.share_expert_dim, act, args.limit("swiglu_limits_shared", i))
        return SparseMoeBlock(gate, experts, shared, "shared_experts")

    def rope_of(self, layer_type: str) -> tuple[torch.Tensor, float]:
        """(inverse frequencies, cos/sin scale) of a layer type."""
        return self._ropes[layer_type]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, logit_rows: torch.Tensor | slice | None = None) -> Output:
        if slots is None:
            slots = torch.arange(tokens.shape[0], device=tokens.device)
        x = self.embed(tokens)
        cs = {t: rope_cos_sin(positions, f, x.dtype, s) for t, (f, s) in self._ropes.items()}
        for layer in self.model.layers:
            x = layer(x, cs[layer.layer_type], positions, cache, slots)
        hidden = self.model.norm(x)
        h = hidden if logit_rows is None else hidden[:, logit_rows]
        return Output(self.logits(h), hidden)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """VL layout -> text names, vision tower dropped, MTP layers `model.layers.{L..L+n-1}` set aside in
        nextn_weights (checkpoint names), hub MoE names -> transformers', experts fused."""
        L, n = self.args.num_hidden_layers, self.args.num_nextn_predict_layers
        out, self.nextn_weights = {}, {}
        for k, v in weights.items():
            if k.startswith(_DROP):
                continue
            if k.startswith("model.language_model."):
                k = "model." + k[len("model.language_model."):]
            m = _LAYER.match(k)
            if m and L <= int(m[1]) < L + n:
                self.nextn_weights[k] = v
            else:
                out[hub_to_hf(k)] = v
        return super().sanitize(fuse_experts(out))
