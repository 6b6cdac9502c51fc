"""Gemma 3 text model (HF model_type `gemma3_text`; `gemma3` configs use their text_config).

Sliding/global layer pattern, q/k RMSNorm, sandwich norms, sqrt(D) embedding scale, GELU-tanh MLP, tied LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from tandem.kvcache import KVCache
from tandem.models.base import BaseConfig, CausalLM, Output, embed_scale, softcap
from tandem.models.layers import GLUMLP, Attention, RMSNorm, activation
from tandem.models.rope import inv_freq, rope_cos_sin


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


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_type = args.layer_types[layer_idx]
        # HF Gemma 3 ignores attn_logit_softcapping; so do we, to stay identical
        sliding = self.layer_type == "sliding_attention"
        self.self_attn = Attention(layer_idx, args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                   args.head_dim, qk_norm=partial(RMSNorm, eps=args.rms_norm_eps),
                                   scale=args.query_pre_attn_scalar ** -0.5,
                                   window=args.sliding_window if sliding else None)
        self.mlp = GLUMLP(args.hidden_size, args.intermediate_size, activation("gelu_pytorch_tanh"))
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps)

    def forward(self, x, cos_sin, positions, cache, slots):
        h = self.self_attn(self.input_layernorm(x), cos_sin, positions, cache, slots)
        x = self.post_attention_layernorm(h, residual=x)  # x + norm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return self.post_feedforward_layernorm(h, residual=x)


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
            self._inv_freq[lt] = inv_freq(args.head_dim, {"rope_type": "linear", "rope_theta": theta,
                                                          "factor": factor})[0]

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
