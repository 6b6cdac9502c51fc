"""The plain pre-norm decoder-only LM that Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE share: config fields,
embedding -> layers -> final norm -> LM head, the cache it declares. A family subclasses `DecoderArgs` for its
own config fields and `DecoderLM` for its attention / MLP choices (`make_attention`, `make_mlp`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tandem.kvcache import KVCache
from tandem.models.base import BaseConfig, CausalLM, Output
from tandem.models.layers import GLUMLP, Attention, DecoderLayer, RMSNorm, activation
from tandem.models.rope import inv_freq, rope_config, rope_cos_sin


@dataclass
class DecoderArgs(BaseConfig):
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None  # legacy (transformers 4) form of rope_parameters
    rope_theta: float = 10_000.0
    partial_rotary_factor: float | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:  # Mistral style: a sliding window, when set, applies to every layer
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        activation(self.hidden_act, self.model_type)

    def window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    def rope(self) -> dict:
        return rope_config(self.rope_parameters, self.rope_scaling, self.rope_theta, self.partial_rotary_factor,
                           self.max_position_embeddings)


class DecoderModel(nn.Module):
    """Holds the checkpoint's `model.*` modules."""

    def __init__(self, args: DecoderArgs, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, unit_offset=False)


class DecoderLM(CausalLM):
    """forward(tokens [B, T], positions [B, T] (-1 = padding), cache, slots [B], logit_rows) -> Output."""

    captures_aux = True

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        layers = [DecoderLayer(self.make_attention(args, i), self.make_mlp(args, i), args.hidden_size,
                               args.rms_norm_eps) for i in range(args.num_hidden_layers)]
        self.model = DecoderModel(args, layers)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq, self._rope_scale = inv_freq(args.head_dim, args.rope(), args.max_position_embeddings)

    def make_attention(self, args: DecoderArgs, i: int) -> nn.Module:
        return Attention(i, args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         qkv_bias=args.attention_bias, o_bias=args.attention_bias, window=args.window(i))

    def make_mlp(self, args: DecoderArgs, i: int) -> nn.Module:
        return GLUMLP(args.hidden_size, args.intermediate_size, activation(args.hidden_act), bias=args.mlp_bias)

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        a = self.args
        return {i: (a.num_key_value_heads, a.head_dim, a.head_dim) for i in range(a.num_hidden_layers)}

    def last_layer_of_type(self, layer_type: str) -> int:
        return max(i for i, t in enumerate(self.args.layer_types) if t == layer_type)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B, T, D] (unscaled in these families)."""
        return self.model.embed_tokens(tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, logit_rows: torch.Tensor | slice | None = None) -> Output:
        """logit_rows selects rows along T for the LM head; None = all. hidden = final-norm output [B, T, D];
        aux = the inputs of the layers in aux_layers (id L: the last layer's output), concatenated."""
        if slots is None:
            slots = torch.arange(tokens.shape[0], device=tokens.device)
        x = self.embed(tokens)
        cs = rope_cos_sin(positions, self._inv_freq, x.dtype, self._rope_scale)
        aux = {}
        for i, layer in enumerate(self.model.layers):
            if i in self.aux_layers:
                aux[i] = x
            x = layer(x, cs, positions, cache, slots)
        aux[len(self.model.layers)] = x
        hidden = self.model.norm(x)
        h = hidden if logit_rows is None else hidden[:, logit_rows]
        rows = torch.cat([aux[i] for i in self.aux_layers], -1) if self.aux_layers else None
        return Output(self.logits(h), hidden, rows)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF names are ours; drop rotary buffers; a tied head may be missing from the checkpoint."""
        out = {k: v for k, v in weights.items() if "rotary_emb." not in k}
        if self.args.tie_word_embeddings and "model.embed_tokens.weight" in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out
