"""Gemma 4 assistant (HF model_type `gemma4_assistant`): the multi-token-prediction drafter of Gemma 4.

One draft step, as HF's Gemma4AssistantForCausalLM + SinglePositionMultiTokenCandidateGenerator do it:

    x = pre_projection(concat(target.embed(last_token), h))     # [B, 1, 2*Db] -> [B, 1, D]
    x = decoder layers (Gemma 4 text layers that own NO K/V)      # Q attends to the TARGET's cache
    y = norm(x)
    logits = lm_head(y)  or the centroid-routed sparse head      # [B, 1, V]
    h' = post_projection(y)                                      # [B, 1, Db], the `h` of the next step

`h` is the target's final-norm hidden state of the row that produced `last_token` for the first step of a round,
then the assistant's own projected state. Every step of a round uses ONE RoPE position: that of `last_token`
(p, not yet in the target cache). Its queries read the target cache of the last cache-owning sliding and full
attention layers, seeing exactly the accepted prefix: mask position p - 1 (entries j <= p - 1). Sliding layers
see `sliding_window + 1` entries (HF's bidirectional sliding mask is inclusive: |q - kv| <= window), i.e.
j >= p - 1 - window. Attention scale is 1 (q_norm replaces it), no attention softcap, no final logit softcap.

Known difference from transformers' generate(assistant_model=...): after a partially accepted round HF's
SinglePositionMultiTokenCandidateGenerator slices the shared K/V to `input_ids.shape[1]` entries, so its query at
position p also sees entry p, the K/V of the rejected draft token. We never read past the accepted prefix; given
the same prefix state, our drafts equal HF's candidate generator's (tests/test_gemma4_assistant.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from tandem.errors import ConfigError, ModelLoadError
from tandem.kvcache import KVCache
from tandem.models.base import BaseConfig, CausalLM, Output
from tandem.models.layers import GLUMLP, RMSNorm, activation
from tandem.models.rope import apply_rope, rope_cos_sin
from tandem.models.gemma4 import default_rope_parameters, gemma4_inv_freq, layer_dims

LAYER_TYPES = ("sliding_attention", "full_attention")
FULL_CONFIG = True  # tandem.models.build passes the whole config (top-level fields + text_config), not text_config


@dataclass
class ModelArgs(BaseConfig):
    """The assistant config flattened: top-level fields plus those of its `text_config` (a gemma4_text config)."""

    model_type: str = "gemma4_assistant"
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    # text_config
    vocab_size: int = 262144
    hidden_size: int = 256
    intermediate_size: int = 2048
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None
    attention_k_eq_v: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    attention_bias: bool = False
    hidden_size_per_layer_input: int | None = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_kv_shared_layers: int = 0
    use_bidirectional_attention: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Accepts the HF config.json ({..., "text_config": {...}}) or an already flattened dict."""
        tc = d.get("text_config")
        if isinstance(tc, dict):
            d = {**tc, **{k: v for k, v in d.items() if k != "text_config"}}
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != n or set(self.layer_types) - set(LAYER_TYPES):
            raise ConfigError(f"gemma4_assistant: layer_types must be {n} of {LAYER_TYPES}, got {self.layer_types}")
        # the checks HF's Gemma4AssistantConfig.validate_architecture makes
        for name, bad in (("hidden_size_per_layer_input", bool(self.hidden_size_per_layer_input)),
                          ("enable_moe_block", self.enable_moe_block),
                          ("use_double_wide_mlp", self.use_double_wide_mlp)):
            if bad:
                raise ConfigError(f"gemma4_assistant: {name} must be 0/False, got {getattr(self, name)!r}")
        if self.num_kv_shared_layers not in (0, n):
            raise ConfigError(f"gemma4_assistant: all {n} layers must be KV-shared, "
                              f"got num_kv_shared_layers={self.num_kv_shared_layers}")
        if self.use_bidirectional_attention == "all":
            raise ConfigError("gemma4_assistant: use_bidirectional_attention='all' unsupported")
        activation(self.hidden_activation, "gemma4_assistant")
        if self.use_ordered_embeddings and self.vocab_size % self.num_centroids:
            raise ConfigError(f"gemma4_assistant: vocab_size {self.vocab_size} not divisible by "
                              f"num_centroids {self.num_centroids}")
        if self.rope_parameters is None:
            self.rope_parameters = default_rope_parameters()
        self._dims = layer_dims(self, "gemma4_assistant")
        for t in set(self.layer_types):  # one K/V layout per type: all layers of a type read the same cache
            dims = {self._dims[i] for i in range(n) if self.layer_types[i] == t}
            if len(dims) > 1:
                raise ConfigError(f"gemma4_assistant: {t} layers disagree on (kv heads, head_dim): {sorted(dims)}")

    def attn_dims(self, i: int) -> tuple[int, int]:
        """(num_key_value_heads of the target layer read, head_dim) of layer i."""
        return self._dims[i]

    def dims_of_type(self, layer_type: str) -> tuple[int, int]:
        return self._dims[self.layer_types.index(layer_type)]

    def inv_freq(self, layer_type: str) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2] (Gemma 4 default, or proportional partial RoPE)."""
        return gemma4_inv_freq(self.rope_parameters[layer_type], self.dims_of_type(layer_type)[1],
                               f"gemma4_assistant {layer_type}")


def _norm(dim: int, args: ModelArgs) -> RMSNorm:
    return RMSNorm(dim, args.rms_norm_eps, unit_offset=False)


class AssistantAttention(nn.Module):
    """Query-only attention over the target's cache (HF: a KV-shared Gemma4TextAttention)."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_type = args.layer_types[layer_idx]
        # HF's bidirectional sliding mask allows |q - kv| <= window: window + 1 entries ending at p - 1
        self.window = args.sliding_window + 1 if self.layer_type == "sliding_attention" else None
        self.n_heads = args.num_attention_heads
        self.n_kv, self.head_dim = args.attn_dims(layer_idx)
        d, hd, bias = args.hidden_size, self.head_dim, args.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.q_norm = _norm(hd, args)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)

    def forward(self, x, cos_sin, cache: KVCache, target_layer: int, slots, kv_positions) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)), *cos_sin)
        out = cache.attend(target_layer, q, slots, kv_positions, self.window, 1.0, None)
        return self.o_proj(out.reshape(B, T, -1))


class AssistantDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        d = args.hidden_size
        self.layer_type = args.layer_types[layer_idx]
        self.self_attn = AssistantAttention(args, layer_idx)
        self.mlp = GLUMLP(d, args.intermediate_size, activation(args.hidden_activation))
        self.input_layernorm = _norm(d, args)
        self.post_attention_layernorm = _norm(d, args)
        self.pre_feedforward_layernorm = _norm(d, args)
        self.post_feedforward_layernorm = _norm(d, args)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, cos_sin, cache, target_layer, slots, kv_positions):
        h = self.self_attn(self.input_layernorm(x), cos_sin, cache, target_layer, slots, kv_positions)
        x = x + self.post_attention_layernorm(h)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class MaskedEmbedder(nn.Module):
    """Centroid-routed sparse LM head (HF Gemma4AssistantMaskedEmbedder).

    The vocabulary is split into `num_centroids` clusters of V/C tokens (`token_ordering` lists the token ids of
    cluster c at [c*V/C, (c+1)*V/C)). Only the top-k clusters by `centroids(h)` get real logits (dot products with
    the tied embedding rows); every other token gets (row minimum of the real logits) - 1. HF takes that minimum
    over the whole batch; we take it per row (identical for one row, and batch invariant).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.centroid_intermediate_top_k
        self.num_centroids = args.num_centroids
        self.vocab_size = args.vocab_size
        self.centroids = nn.Linear(args.hidden_size, args.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.arange(args.vocab_size, dtype=torch.long))

    def select(self, h: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, D] -> (ids [B, T, K*V/C] of the top-k clusters' tokens, their logits [B, T, K*V/C] fp32).

        Head rows come from a cluster-ordered copy of the tied head ([C, V/C, D], built once per head), so a step
        reads K contiguous blocks instead of gathering K*V/C scattered rows."""
        B, T, D = h.shape
        top = torch.topk(self.centroids(h).float(), self.top_k, dim=-1).indices  # [B, T, K]
        clusters = self.token_ordering.view(self.num_centroids, -1)  # [C, V/C]
        ids = clusters[top].reshape(B, T, -1)
        sel = self._packed_select(h, top, lm_head)
        if sel is not None:
            return ids, sel
        w = self._table(lm_head)[top.reshape(-1)].view(B, T, -1, D)  # [B, T, K*V/C, D]
        sel = (h.to(w.dtype).unsqueeze(-2) @ w.transpose(-1, -2)).squeeze(-2).float()
        return ids, sel

    def _packed_select(self, h: torch.Tensor, top: torch.Tensor, lm_head: nn.Module) -> torch.Tensor | None:
        """Packed head (tandem.kernels): a cluster-ordered copy of it, and per row a GEMM over the chosen clusters'
        64-row panels only (no gather, exact packed values). None when not applicable."""
        per = self.vocab_size // self.num_centroids
        if getattr(lm_head, "fmt", "fp32") == "fp32" or per % 64 or torch.is_grad_enabled():
            return None
        key = (id(lm_head), self.token_ordering.data_ptr(), self.token_ordering._version)
        cached = getattr(self, "_packed_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, lm_head.reordered(self.token_ordering))
            self._packed_cache = cached
        head, ppc = cached[1], per // 64
        B, T, K = top.shape
        panels = (top[..., None] * ppc + torch.arange(ppc, device=top.device)).reshape(B * T, -1)  # [BT, K*ppc]
        hf = h.reshape(B * T, -1)
        rows = []
        for i in range(B * T):  # one call per row: a row's logits never depend on its neighbours
            y = head.panels(hf[i:i + 1], panels[i])
            if y is None:
                return None
            rows.append(y)
        return torch.cat(rows).view(B, T, -1)

    def _table(self, lm_head: nn.Module) -> torch.Tensor:
        key = (id(lm_head), self.token_ordering.data_ptr(), self.token_ordering._version)
        cached = getattr(self, "_table_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        order = self.token_ordering.long()
        rows = getattr(lm_head, "rows", None)
        if rows is None:  # a plain nn.Linear: exact rows in its own dtype
            table = lm_head.weight.detach()[order]
        else:  # packed head: rows come back fp32; bf16-packed values are exact in bf16
            dt = torch.bfloat16 if getattr(lm_head, "fmt", "") in ("bf16", "q8_0") else torch.float32
            table = torch.cat([rows(order[i:i + 16384]).to(dt) for i in range(0, len(order), 16384)])
        table = table.view(self.num_centroids, -1, table.shape[-1])
        self._table_cache = (key, table)
        return table

    def forward(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """h [B, T, D] -> logits [B, T, V]; rows of the tied head are read through `lm_head` (an nn.Linear, or a
        packed one from tandem.kernels.prepare exposing rows())."""
        B, T, _ = h.shape
        ids, sel = self.select(h, lm_head)
        fill = sel.amin(-1, keepdim=True) - 1.0
        out = fill.expand(B, T, self.vocab_size).clone()
        return out.scatter_(-1, ids, sel)


class AssistantTextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)  # only as the tied LM head
        self.layers = nn.ModuleList([AssistantDecoderLayer(args, i) for i in range(args.num_hidden_layers)])
        self.norm = _norm(args.hidden_size, args)


class Model(CausalLM):
    """Gemma4AssistantForCausalLM. Owns no cache: `forward` reads the target's cache through `cache.attend`.

    bind(target) checks the fit and records which target layers are read; until bound, `target_layers` maps
    each layer type to a target layer index and can be set by hand (tests).
    """

    owns_kv = False

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = AssistantTextModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.pre_projection = nn.Linear(2 * args.backbone_hidden_size, args.hidden_size, bias=False)
        self.post_projection = nn.Linear(args.hidden_size, args.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedder(args) if args.use_ordered_embeddings else None
        self._inv_freq = {lt: args.inv_freq(lt) for lt in set(args.layer_types)}
        self.target_layers: dict[str, int] = {}

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        return {}  # no K/V of its own

    # -- fit with a target --------------------------------------------------------------------------------------
    def check_fit(self, target: nn.Module, target_name: str = "target", name: str = "assistant") -> dict[str, int]:
        """Raise ModelLoadError naming both sources unless `target` can feed this assistant; returns
        {layer type: target cache layer read}. Any target works that exposes `embed()`, a final hidden state of
        size backbone_hidden_size, the same vocabulary, `kv_specs()` and cache-owning layers of each needed type
        whose (kv heads, head_dim) match."""
        a = self.args

        def fail(msg: str):
            raise ModelLoadError(f"drafter {name} does not fit target {target_name}: {msg}")

        targs = getattr(target, "args", None)
        if targs is None or not hasattr(target, "embed") or not hasattr(target, "kv_specs"):
            fail("the target exposes no args/embed()/kv_specs() (not a tandem model)")
        if targs.hidden_size != a.backbone_hidden_size:
            fail(f"assistant backbone_hidden_size {a.backbone_hidden_size} != target hidden_size {targs.hidden_size}")
        if targs.vocab_size != a.vocab_size:
            fail(f"assistant vocab_size {a.vocab_size} != target vocab_size {targs.vocab_size}")
        specs = target.kv_specs()
        ttypes = list(getattr(targs, "layer_types", None) or [])
        out = {}
        for lt in sorted(set(a.layer_types)):
            owners = [i for i, t in enumerate(ttypes) if t == lt and i in specs]
            if not owners:
                fail(f"assistant has {lt} layers but the target has no cache-owning {lt} layer "
                     f"(target layer types: {sorted(set(ttypes))})")
            layer = max(owners)  # HF: the last non-KV-shared layer of the type ("store" layer)
            h_kv, dk, dv = specs[layer]
            n_kv, hd = a.dims_of_type(lt)
            if dk != hd or dv != hd:
                fail(f"{lt}: assistant head_dim {hd} != target layer {layer} K/V head dims ({dk}, {dv})")
            if a.num_attention_heads % h_kv:
                fail(f"{lt}: assistant num_attention_heads {a.num_attention_heads} is not a multiple of target "
                     f"layer {layer} num_key_value_heads {h_kv}")
            out[lt] = layer
        return out

    def bind(self, target: nn.Module, target_name: str = "target", name: str = "assistant") -> "Model":
        self.target_layers = self.check_fit(target, target_name, name)
        return self

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor | None = None,
                logit_rows: torch.Tensor | slice | None = None, kv_positions: torch.Tensor | None = None) -> Output:
        """x = concat(target.embed(last token), h) [B, T, 2*Db]; positions [B, T] = RoPE position of the last
        token; kv_positions [B, T] = last cache entry visible (default positions - 1). Returns Output(logits
        [B, R, V] fp32, hidden = post_projection(norm(x)) [B, T, Db])."""
        if slots is None:
            slots = torch.arange(x.shape[0], device=x.device)
        if kv_positions is None:
            kv_positions = positions - 1
        y = self.trunk(x, positions, cache, slots, kv_positions)
        projected = self.post_projection(y)
        ys = y if logit_rows is None else y[:, logit_rows]
        return Output(self.logits(ys), projected)

    def trunk(self, x: torch.Tensor, positions: torch.Tensor, cache, slots: torch.Tensor,
              kv_positions: torch.Tensor) -> torch.Tensor:
        """pre_projection -> KV-less layers -> final norm: y [B, T, D] (training reads y for its sampled head)."""
        if not self.target_layers:
            raise RuntimeError("gemma4_assistant: call bind(target) (or set target_layers) before forward")
        h = self.pre_projection(x)
        cs = {lt: rope_cos_sin(positions, f, h.dtype) for lt, f in self._inv_freq.items()}
        for layer in self.model.layers:
            h = layer(h, cs[layer.layer_type], cache, self.target_layers[layer.layer_type], slots, kv_positions)
        return self.model.norm(h)

    @torch.inference_mode()
    def top_step(self, x: torch.Tensor, positions: torch.Tensor, cache, slots: torch.Tensor,
                 kv_positions: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k most likely draft tokens per row (1: greedy drafting; more: a tree's children) as forward() ranks
        them, without its [V] vector: (tokens [B, T, k], full-vocab probabilities [B, T, k], projected [B, T, Db])."""
        y = self.trunk(x, positions, cache, slots, kv_positions)
        projected = self.post_projection(y)
        if self.masked_embedding is None:
            p = torch.softmax(self.lm_head(y).float(), -1)
            probs, tok = p.max(-1, keepdim=True) if k == 1 else p.topk(k, -1)
            return tok, probs, projected
        ids, sel = self.masked_embedding.select(y, self.lm_head)  # [B, T, n]
        m = sel.max(-1, keepdim=True).values
        n_fill = self.args.vocab_size - sel.shape[-1]
        denom = (torch.exp(sel - m).sum(-1) + n_fill * torch.exp(sel.amin(-1) - 1.0 - m[..., 0]))[..., None]
        if k == 1:  # ties: the full vector's argmax is the lowest token id among the maxima
            return torch.where(sel == m, ids, self.args.vocab_size).min(-1, keepdim=True).values, 1.0 / denom, projected
        vals, j = sel.topk(min(k, sel.shape[-1]), -1)
        return ids.gather(-1, j), torch.exp(vals - m) / denom, projected

    def greedy_step(self, x: torch.Tensor, positions: torch.Tensor, cache, slots: torch.Tensor,
                    kv_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """top_step at k = 1: (tokens [B, T], probabilities [B, T], projected hidden [B, T, Db])."""
        tok, p, projected = self.top_step(x, positions, cache, slots, kv_positions)
        return tok[..., 0], p[..., 0], projected

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        if self.masked_embedding is not None:
            return self.masked_embedding(y, self.lm_head).float()
        return self.lm_head(y).float()

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF names are ours already: drop RoPE buffers, keep token_ordering integral. The tied head needs no
        entry (the loader fills tie groups from one member); a checkpoint's lm_head.weight is kept."""
        out = {k: v for k, v in weights.items() if "rotary_emb." not in k}
        if "masked_embedding.token_ordering" in out:
            out["masked_embedding.token_ordering"] = out["masked_embedding.token_ordering"].long()
        return out
