"""Gemma 4 text model (HF model_type `gemma4_text`; `gemma4` configs use their text_config).

On top of Gemma 3: plain-weight RMSNorms (no 1 + w), q/k norms with attention scale 1, an unscaled RMSNorm on
values, wider heads on global layers (per-layer `head_dim` / `num_key_value_heads` overrides), `attention_k_eq_v`
(global layers take values from the key projection), proportional partial RoPE on global layers, a learned
`layer_scalar` per layer, MoE blocks (router + experts added to the dense MLP), per-layer embeddings (PLE) and
KV-shared layers: the last `num_kv_shared_layers` layers own no cache and read that of the last non-shared layer of
their type (they never write).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from tandem.errors import ConfigError
from tandem.kvcache import KVCache
from tandem.models.base import BaseConfig, CausalLM, Output, embed_scale, softcap
from tandem.models.layers import GLUMLP, RMSNorm, activation
from tandem.models.moe import Experts
from tandem.models.rope import apply_rope, inv_freq, rope_cos_sin


@dataclass
class ModelArgs(BaseConfig):
    model_type: str = "gemma4_text"
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512  # HF's default when a config has neither this nor per_layer_config
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None  # how transformers >= 5.x serialises the two fields above
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | None = None
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int | None = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = "full_attention"  # HF forces this too
        if self.use_bidirectional_attention == "all":
            raise ConfigError("gemma4: use_bidirectional_attention='all' is not a causal LM; unsupported")
        activation(self.hidden_activation, "gemma4")
        if self.rope_parameters is None:
            self.rope_parameters = default_rope_parameters()
        self._dims = layer_dims(self, "gemma4")
        # KV sharing: layer i >= first_shared reads the cache of the last non-shared layer of its type
        first = n - self.num_kv_shared_layers
        owners = {t: max(i for i in range(first) if self.layer_types[i] == t)
                  for t in set(self.layer_types[:first])}
        if set(owners) != set(self.layer_types):
            raise ConfigError("gemma4: every layer type shared by a KV-shared layer needs a non-shared layer")
        self._kv_source = [i if i < first else owners[self.layer_types[i]] for i in range(n)]

    def attn_dims(self, i: int) -> tuple[int, int]:
        """(num_key_value_heads, head_dim) of layer i."""
        return self._dims[i]

    def kv_source(self, i: int) -> int:
        """The layer whose cache layer i reads (itself unless i is KV-shared)."""
        return self._kv_source[i]

    def inv_freq(self, layer_type: str) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2] of a layer type (Gemma 4's default, or proportional)."""
        hd = self._dims[self.layer_types.index(layer_type)][1]
        return gemma4_inv_freq(self.rope_parameters[layer_type], hd, f"gemma4 {layer_type}")


def default_rope_parameters() -> dict:
    return {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}


def layer_dims(a, where: str) -> list[tuple[int, int]]:
    """Per-layer (n_kv_heads, head_dim) of a Gemma 4 (or assistant) config, resolved exactly as
    Gemma4TextConfig.__post_init__ does (global_head_dim / num_global_key_value_heads, or per_layer_config)."""
    if a.per_layer_config is None:
        over = {"head_dim": a.global_head_dim}
        if a.attention_k_eq_v and a.num_global_key_value_heads is not None:
            over["num_key_value_heads"] = a.num_global_key_value_heads
        plc = {i: over for i, t in enumerate(a.layer_types) if t == "full_attention"}
    else:
        plc = {int(i): o for i, o in a.per_layer_config.items()}
    for o in plc.values():
        if set(o) - {"head_dim", "num_key_value_heads"}:
            raise ConfigError(f"{where}: unsupported per_layer_config override(s) {sorted(o)}")
    return [(plc.get(i, {}).get("num_key_value_heads", a.num_key_value_heads),
             plc.get(i, {}).get("head_dim", a.head_dim)) for i in range(a.num_hidden_layers)]


def gemma4_inv_freq(rp: dict, hd: int, where: str) -> torch.Tensor:
    """Inverse frequencies [hd/2] for one rope_parameters entry, as Gemma 4 computes them."""
    kind = rp.get("rope_type", "default")
    if kind == "default":  # Gemma 4's own default ignores partial_rotary_factor and factor
        rp = {"rope_theta": rp["rope_theta"]}
    elif kind != "proportional":
        raise ConfigError(f"{where}: rope_type {kind!r} unsupported")
    return inv_freq(hd, rp)[0]


def _norm(dim: int, args: ModelArgs, with_scale: bool = True) -> RMSNorm:
    return RMSNorm(dim, args.rms_norm_eps, unit_offset=False, with_scale=with_scale)


class Gemma4Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.kv_layer = layer_idx, args.kv_source(layer_idx)
        self.shared = self.kv_layer != layer_idx
        sliding = args.layer_types[layer_idx] == "sliding_attention"
        self.window = args.sliding_window if sliding else None
        self.n_heads = args.num_attention_heads
        self.n_kv, self.head_dim = args.attn_dims(layer_idx)
        d, hd, bias = args.hidden_size, self.head_dim, args.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.q_norm = _norm(hd, args)
        if not self.shared:  # shared layers have no K/V weights at all (as in HF)
            self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
            self.v_proj = None if (args.attention_k_eq_v and not sliding) else nn.Linear(d, self.n_kv * hd, bias=bias)
            self.k_norm = _norm(hd, args)
            self.v_norm = _norm(hd, args, with_scale=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)

    def forward(self, x: torch.Tensor, cos_sin, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)), *cos_sin)
        if not self.shared:
            k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
            v = k if self.v_proj is None else self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
            k, v = apply_rope(self.k_norm(k), *cos_sin), self.v_norm(v)
            cache.write(self.layer_idx, slots, positions, k, v)
        out = cache.attend(self.kv_layer, q, slots, positions, self.window, 1.0, None)  # q/k norms replace scaling
        return self.o_proj(out.reshape(B, T, -1))


class Gemma4Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.root = args.top_k_experts, args.hidden_size ** -0.5
        self.norm = _norm(args.hidden_size, args, with_scale=False)
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(args.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(args.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K], expert ids [N, K]): softmax, top-k, renormalise, per-expert scale."""
        probs = torch.softmax(self.proj(self.norm(x) * self.scale * self.root), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        d, act = args.hidden_size, activation(args.hidden_activation)
        self.layer_type = args.layer_types[layer_idx]
        self.self_attn = Gemma4Attention(args, layer_idx)
        wide = 2 if (args.use_double_wide_mlp and self.self_attn.shared) else 1
        self.mlp = GLUMLP(d, args.intermediate_size * wide, act)
        self.input_layernorm = _norm(d, args)
        self.post_attention_layernorm = _norm(d, args)
        self.pre_feedforward_layernorm = _norm(d, args)
        self.post_feedforward_layernorm = _norm(d, args)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.ple = bool(args.hidden_size_per_layer_input)
        if self.ple:
            self.act = act
            self.per_layer_input_gate = nn.Linear(d, args.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(args.hidden_size_per_layer_input, d, bias=False)
            self.post_per_layer_input_norm = _norm(d, args)
        self.moe = args.enable_moe_block
        if self.moe:
            self.router = Gemma4Router(args)
            self.experts = Experts(args.num_experts, d, args.moe_intermediate_size, act)
            self.post_feedforward_layernorm_1 = _norm(d, args)
            self.post_feedforward_layernorm_2 = _norm(d, args)
            self.pre_feedforward_layernorm_2 = _norm(d, args)

    def forward(self, x, cos_sin, positions, cache, slots, per_layer_input=None):
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos_sin, positions, cache, slots))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:  # router and experts read the residual stream, not the MLP's input norm
            flat = x.reshape(-1, x.shape[-1])
            w, idx = self.router(flat)
            h2 = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).reshape(x.shape)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(h2)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            g = self.act(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar


class Gemma4TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([Gemma4DecoderLayer(args, i) for i in range(args.num_hidden_layers)])
        self.norm = _norm(args.hidden_size, args)
        p = args.hidden_size_per_layer_input
        if p:
            n = args.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, n * p)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, n * p, bias=False)
            self.per_layer_projection_norm = _norm(p, args)


class Model(CausalLM):
    """Gemma4ForCausalLM with explicit positions: forward(tokens, positions, cache, slots) -> Output."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Gemma4TextModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq = {lt: args.inv_freq(lt) for lt in set(args.layer_types)}

    # -- what the engine and drafters need to know -------------------------------------------------------------
    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        """Cache layout of the layers that own KV (KV-shared layers are omitted: they own none)."""
        a = self.args
        return {i: (a.attn_dims(i)[0], a.attn_dims(i)[1], a.attn_dims(i)[1])
                for i in range(a.num_hidden_layers) if a.kv_source(i) == i}

    def kv_layer_for(self, layer_idx: int) -> int:
        """The cache-owning layer whose K/V layer `layer_idx` attends to."""
        return self.args.kv_source(layer_idx)

    def last_layer_of_type(self, layer_type: str) -> int:
        """The last cache-owning layer of a type (for KV-shared models, the layer the shared ones read)."""
        a = self.args
        return max(i for i, t in enumerate(a.layer_types) if t == layer_type and a.kv_source(i) == i)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled input embeddings [B, T, D] (== HF get_input_embeddings()(ids))."""
        w = self.model.embed_tokens.weight
        return self.model.embed_tokens(tokens) * embed_scale(self.args.hidden_size, w.dtype).to(w.device)

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """PLE [B, T, L, P]: (norm(proj(x) / sqrt(D)) + embed_per_layer(tokens) * sqrt(P)) / sqrt(2)."""
        m, a = self.model, self.args
        n, p = a.num_hidden_layers, a.hidden_size_per_layer_input
        w = m.embed_tokens_per_layer.weight
        tok = m.embed_tokens_per_layer(tokens) * embed_scale(p, w.dtype).to(w.device)
        proj = m.per_layer_model_projection(x) * a.hidden_size ** -0.5
        proj = m.per_layer_projection_norm(proj.reshape(*x.shape[:-1], n, p))
        return (proj + tok.reshape(*tokens.shape, n, p)) * 2.0 ** -0.5

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(hidden).float(), self.args.final_logit_softcapping)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, logit_rows: torch.Tensor | slice | None = None) -> Output:
        """tokens, positions [B, T] (position -1 = padding); slots [B] (default 0..B-1).

        logit_rows selects rows along T for the LM head; None = all rows. hidden = final-norm output [B, T, D].
        """
        if slots is None:
            slots = torch.arange(tokens.shape[0], device=tokens.device)
        x = self.embed(tokens)
        ple = self.per_layer_inputs(tokens, x) if self.args.hidden_size_per_layer_input else None
        cs = {lt: rope_cos_sin(positions, f, x.dtype) for lt, f in self._inv_freq.items()}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cs[layer.layer_type], positions, cache, slots, None if ple is None else ple[:, :, i])
        hidden = self.model.norm(x)
        h = hidden if logit_rows is None else hidden[:, logit_rows]
        return Output(self.logits(h), hidden)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF checkpoint names -> ours: strip the multimodal prefix, drop vision/audio towers and embedders, and
        the K/V weights some checkpoints still carry for KV-shared layers (HF ignores them on load too).
        An instance method (unlike gemma3's static one): which layers are shared depends on the config."""
        drop = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.")
        shared = tuple(f"model.layers.{i}.self_attn.{n}." for i in range(self.args.num_hidden_layers)
                       if self.args.kv_source(i) != i for n in ("k_proj", "v_proj", "k_norm", "v_norm"))
        out = {}
        for k, v in weights.items():
            if k.startswith(drop) or k.startswith(tuple("model." + p for p in drop)):
                continue
            k = k.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
            if not k.startswith(shared) and "rotary_emb." not in k:
                out[k] = v
        if self.args.tie_word_embeddings and "model.embed_tokens.weight" in out:
            out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])  # tied: checkpoints often omit it
        return out
