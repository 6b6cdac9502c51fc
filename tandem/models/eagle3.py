"""EAGLE-3 draft head (Li et al. 2025), in the checkpoint layout vLLM's and SGLang's `llama_eagle3` loaders read.

One drafting row at position i reads the token t_{i+1} and a hidden state h_i [Dt or D]:
    h_0   = fc(concat(a_lo, a_mid, a_hi))            the target's residual stream entering three of its layers
                                                    [3 * Dt] -> [D]; later steps read the head's own output
    x     = concat(input_layernorm(embed(t)), hidden_norm(h))                     [2D]: attention's input
    r     = h (hidden_norm(h) with norm_before_residual) + o_proj(attn(x))       one Llama layer, its own KV cache
    out   = r + mlp(post_attention_layernorm(r))                                  the pre-norm output: next step's h
    logits = lm_head(norm(out))                                                   over the draft vocabulary [Vd]
A draft id d is target id d + d2t[d]; t2d [V] marks the target ids the draft vocabulary holds. Module and buffer
names are the checkpoint's (`fc.weight`, `midlayer.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`,
`d2t`, `t2d`, optional `embed_tokens.weight`; without it the target's embedding is used, as vLLM and SGLang do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tandem.errors import ModelLoadError
from tandem.kvcache import KVCache
from tandem.models.decoder import DecoderArgs
from tandem.models.layers import GLUMLP, Attention, RMSNorm, activation
from tandem.models.rope import inv_freq, rope_cos_sin

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")  # SGLang's / SpecForge's, vLLM's name


def default_aux_layers(n_layers: int) -> tuple[int, int, int]:
    """vLLM's and SGLang's default: the residual stream entering layers 2, L // 2 and L - 3."""
    return (2, n_layers // 2, n_layers - 3)


@dataclass
class Eagle3Args(DecoderArgs):
    """A public EAGLE-3 config.json (Llama fields + the EAGLE-3 ones)."""

    model_type: str = "llama"
    num_hidden_layers: int = 1
    architectures: list[str] | None = None
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    target_hidden_size: int | None = None  # None: hidden_size
    norm_before_residual: bool = False
    eagle_aux_hidden_state_layer_ids: list[int] | None = None  # vLLM numbering (input of layer j)
    eagle_config: dict | None = None  # SGLang reads its eagle_aux_hidden_state_layer_ids as layer OUTPUTS

    def __post_init__(self):
        super().__post_init__()
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size

    def aux_layers(self, n_target_layers: int) -> tuple[int, ...]:
        """The target layers whose inputs the head reads, in vLLM's numbering: the top-level ids, else
        eagle_config's (SGLang's numbering, + 1), else the default."""
        if self.eagle_aux_hidden_state_layer_ids:
            return tuple(int(i) for i in self.eagle_aux_hidden_state_layer_ids)
        ids = (self.eagle_config or {}).get("eagle_aux_hidden_state_layer_ids")
        if ids:
            return tuple(int(i) + 1 for i in ids)
        return default_aux_layers(n_target_layers)


class Eagle3Layer(nn.Module):
    """The checkpoint's `midlayer`: a Llama decoder layer whose attention reads [embed | hidden] (2D wide)."""

    def __init__(self, a: Eagle3Args):
        super().__init__()
        D, eps = a.hidden_size, a.rms_norm_eps
        self.self_attn = Attention(0, 2 * D, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                   qkv_bias=a.attention_bias, o_bias=a.attention_bias)
        self.self_attn.o_proj = nn.Linear(a.num_attention_heads * a.head_dim, D, bias=a.attention_bias)
        self.mlp = GLUMLP(D, a.intermediate_size, activation(a.hidden_act), bias=a.mlp_bias)
        self.input_layernorm = RMSNorm(D, eps, unit_offset=False)
        self.hidden_norm = RMSNorm(D, eps, unit_offset=False)
        self.post_attention_layernorm = RMSNorm(D, eps, unit_offset=False)
        self.norm_before_residual = a.norm_before_residual

    def forward(self, emb, h, cos_sin, positions, cache, slots):
        """emb, h [B, T, D] -> the pre-norm output [B, T, D]."""
        hn = self.hidden_norm(h)
        x = torch.cat([self.input_layernorm(emb), hn], dim=-1)
        r = (hn if self.norm_before_residual else h) + self.self_attn(x, cos_sin, positions, cache, slots)
        return r + self.mlp(self.post_attention_layernorm(r))


class Eagle3(nn.Module):
    """The head; aux_layers: the target layers (vLLM's numbering) whose inputs, each args.target_hidden_size wide,
    feed `fc`."""

    def __init__(self, args: Eagle3Args, aux_layers: tuple[int, ...], own_embedding: bool = False):
        super().__init__()
        if args.num_hidden_layers != 1:
            raise ModelLoadError(f"EAGLE-3 head: num_hidden_layers {args.num_hidden_layers}; only one-layer heads "
                                 "(the published EAGLE-3 layout) are supported")
        self.args, self.aux_layers = args, tuple(aux_layers)
        D = args.hidden_size
        self.fc = nn.Linear(len(self.aux_layers) * args.target_hidden_size, D, bias=False)
        self.midlayer = Eagle3Layer(args)
        self.norm = RMSNorm(D, args.rms_norm_eps, unit_offset=False)
        self.lm_head = nn.Linear(D, args.draft_vocab_size, bias=False)
        self.embed_tokens = nn.Embedding(args.vocab_size, D) if own_embedding else None
        self.register_buffer("d2t", torch.zeros(args.draft_vocab_size, dtype=torch.long))
        full = args.draft_vocab_size == args.vocab_size  # no reduced vocabulary: every target id is a draft id
        self.register_buffer("t2d", torch.full((args.vocab_size,), full, dtype=torch.bool))
        self._inv_freq, self._rope_scale = inv_freq(args.head_dim, args.rope(), args.max_position_embeddings)

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        a = self.args
        return {0: (a.num_key_value_heads, a.head_dim, a.head_dim)}

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str = "f32", v_type: str | None = None,
                   device="cpu") -> KVCache:
        return KVCache(self.kv_specs(), n_slots, max_len, device=device, k_type=k_type, v_type=v_type or k_type)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's aux hidden states [.., n_aux * Dt] -> the head's hidden [.., D]."""
        return self.fc(aux.to(self.norm.weight.dtype))  # norms keep the model's dtype; fc may be packed

    def forward(self, emb: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, cache,
                slots: torch.Tensor) -> torch.Tensor:
        """emb, h [B, T, D] at positions [B, T] (-1 = padding; cache index = position) -> pre-norm out [B, T, D]."""
        cs = rope_cos_sin(positions, self._inv_freq, emb.dtype, self._rope_scale)
        return self.midlayer(emb, h, cs, positions, cache, slots)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [.., Vd] fp32 of pre-norm outputs."""
        return self.lm_head(self.norm(out)).float()

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [N, Vd] spread over the target vocabulary [N, V] (-inf outside the draft vocabulary)."""
        full = logits.new_full((logits.shape[0], self.args.vocab_size), float("-inf"))
        full[:, self.to_target(torch.arange(logits.shape[-1], device=logits.device))] = logits
        return full

    def set_vocab(self, target_ids: torch.Tensor) -> None:
        """The draft vocabulary: these target ids [Vd] (ascending), as d2t offsets and the t2d mask."""
        ids = torch.sort(target_ids.long()).values
        self.d2t.copy_(ids - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[ids] = True
