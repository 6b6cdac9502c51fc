"""Gemma 3 text model (HF model_type `gemma3_text`; `gemma3` configs use their text_config).

Sliding/global layer pattern, q/k RMSNorm, sandwich norms, sqrt(D) embedding scale, GELU-tanh MLP, tied LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from tandem.kvcache import KVCache
from tandem.models.base import BaseConfig, CausalLM, Output, embed_scale, gelu_tanh, softcap
from tandem.models.layers import RMSNorm
from tandem.models.rope import apply_rope, inv_freq, rope_cos_sin


@dataclass
class ModelArgs(BaseConfig):
    model_type: str = "gemma3_text"
    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    sliding_window_pattern: int = 6
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 1
    pad_token_id: int = 0
    rope_scaling: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = ["sliding_attention" if (i + 1) % p else "full_attention"
                                for i in range(self.num_hidden_layers)]

    def rope(self, layer_type: str) -> tuple[float, float]:
        """(theta, linear scaling factor) for a layer type."""
        rp = (self.rope_parameters or {}).get(layer_type) or {}
        default = self.rope_local_base_freq if layer_type == "sliding_attention" else self.rope_theta
        theta = rp.get("rope_theta", default)
        factor = 1.0
        scaling = rp if rp.get("rope_type") == "linear" else (
            self.rope_scaling if layer_type == "full_attention" else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            factor = float(scaling["factor"])
        return float(theta), factor


class Gemma3Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = args.query_pre_attn_scalar ** -0.5
        self.window = args.sliding_window if args.layer_types[layer_idx] == "sliding_attention" else None
        self.softcap = None  # HF Gemma 3 ignores attn_logit_softcapping; so do we, to stay identical
        d = args.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        cache.write(self.layer_idx, slots, positions, k, v)
        out = cache.attend(self.layer_idx, q, slots, positions, self.window, self.scale, self.softcap)
        return self.o_proj(out.reshape(B, T, -1))


class Gemma3MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_type = args.layer_types[layer_idx]
        self.self_attn = Gemma3Attention(args, layer_idx)
        self.mlp = Gemma3MLP(args)
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps)

    def forward(self, x, cos_sin, positions, cache, slots):
        h = self.self_attn(self.input_layernorm(x), cos_sin, positions, cache, slots)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([Gemma3DecoderLayer(args, i) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(CausalLM):
    """Gemma3ForCausalLM with explicit positions: forward(tokens, positions, cache, slots) -> Output."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Gemma3TextModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq = {}
        for lt in set(args.layer_types):
            theta, factor = args.rope(lt)
            self._inv_freq[lt] = inv_freq(args.head_dim, {"rope_theta": theta})[0] / factor

    # -- what the engine and drafters need to know -------------------------------------------------------------
    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        a = self.args
        return {i: (a.num_key_value_heads, a.head_dim, a.head_dim) for i in range(a.num_hidden_layers)}

    def last_layer_of_type(self, layer_type: str) -> int:
        return max(i for i, t in enumerate(self.args.layer_types) if t == layer_type)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled input embeddings [B, T, D] (what drafters concatenate with the target hidden state)."""
        w = self.model.embed_tokens.weight
        return self.model.embed_tokens(tokens) * embed_scale(self.args.hidden_size, w.dtype).to(w.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(hidden).float(), self.args.final_logit_softcapping)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, logit_rows: torch.Tensor | slice | None = None) -> Output:
        """tokens, positions [B, T] (position -1 = padding); slots [B] (default 0..B-1).

        logit_rows selects rows along T for the LM head (most of the cost); None = all rows.
        hidden is the final-norm output [B, T, D], the state the LM head and drafters read.
        """
        if slots is None:
            slots = torch.arange(tokens.shape[0], device=tokens.device)
        x = self.embed(tokens)
        cs = {lt: rope_cos_sin(positions, f, x.dtype) for lt, f in self._inv_freq.items()}
        for layer in self.model.layers:
            x = layer(x, cs[layer.layer_type], positions, cache, slots)
        hidden = self.model.norm(x)
        h = hidden if logit_rows is None else hidden[:, logit_rows]
        return Output(self.logits(h), hidden)

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF checkpoint names -> ours: strip the multimodal prefix, drop vision tower weights."""
        out = {}
        for k, v in weights.items():
            if k.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                             "model.multi_modal_projector.")):
                continue
            k = k.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
            out[k] = v
        return out
