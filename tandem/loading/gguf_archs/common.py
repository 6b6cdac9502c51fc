"""Pieces the llama-style GGUF archs share (llama, qwen2, qwen3, qwen3moe): names, metadata keys, RoPE, q/k permute.

Conventions are llama.cpp's (convert_hf_to_gguf.py / conversion/{base,llama,qwen}.py, gguf-py constants.py and
tensor_mapping.py): ggml's ne order is the reverse of the torch shape (the reader undoes it); `ffn_norm` is the
post-attention norm; a tied head writes no `output.weight`; llama3 RoPE scaling is stored only as the generated
`rope_freqs.weight` tensor; linear / yarn scaling as `rope.scaling.*` metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tandem.errors import ModelLoadError

if TYPE_CHECKING:
    from tandem.loading.gguf import GGUFFile

ROPE_FREQS = "rope_freqs.weight"

DECODER_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.attn_q.weight": "model.layers.{bid}.self_attn.q_proj.weight",
    "blk.{bid}.attn_k.weight": "model.layers.{bid}.self_attn.k_proj.weight",
    "blk.{bid}.attn_v.weight": "model.layers.{bid}.self_attn.v_proj.weight",
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
}
DENSE_MLP = {
    "blk.{bid}.ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj.weight",
    "blk.{bid}.ffn_up.weight": "model.layers.{bid}.mlp.up_proj.weight",
    "blk.{bid}.ffn_down.weight": "model.layers.{bid}.mlp.down_proj.weight",
}
QKV_BIAS = {f"blk.{{bid}}.attn_{g}.bias": f"model.layers.{{bid}}.self_attn.{h}_proj.bias"
            for g, h in (("q", "q"), ("k", "k"), ("v", "v"))}
QK_NORM = {
    "blk.{bid}.attn_q_norm.weight": "model.layers.{bid}.self_attn.q_norm.weight",
    "blk.{bid}.attn_k_norm.weight": "model.layers.{bid}.self_attn.k_norm.weight",
}

CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
CONFIG_DEFAULTS = {"hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0}


def _uniform(cfg: dict, key: str, f: "GGUFFile") -> None:
    # llama.cpp allows per-layer arrays (get_key_or_arr); our families need one value for every layer
    v = cfg.get(key)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ModelLoadError(f"{f.path}: per-layer {key} {list(v)} unsupported (must be the same for every layer)")
        cfg[key] = int(v[0])


def finalize_decoder(cfg: dict, f: "GGUFFile") -> None:
    """Head sizes and RoPE from the metadata, checked against what our families compute."""
    a = f.architecture
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        _uniform(cfg, key, f)
    if "num_attention_heads" not in cfg:
        raise ModelLoadError(f"{f.path}: GGUF metadata lacks {a}.attention.head_count")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    hd = cfg["head_dim"]
    for key in ("attention.value_length", "rope.dimension_count"):
        v = f.meta(f"{a}.{key}")
        if v is not None and int(v) != hd:
            raise ModelLoadError(f"{f.path}: {a}.{key} = {v} but the head dim is {hd} (partial RoPE / "
                                 f"different K and V head dims are not supported for {a!r})")
    cfg["rope_parameters"] = rope_parameters(cfg, f)


def rope_parameters(cfg: dict, f: "GGUFFile") -> dict:
    """HF `rope_parameters` from `rope.scaling.*` metadata or the generated `rope_freqs.weight` (llama3)."""
    a, base = f.architecture, float(cfg["rope_theta"])
    kind = f.meta(f"{a}.rope.scaling.type")
    factor = f.meta(f"{a}.rope.scaling.factor")
    has_freqs = ROPE_FREQS in f.tensor_names
    if kind in (None, "none") or factor is None:
        kind = None
    if has_freqs and kind is not None:
        raise ModelLoadError(f"{f.path}: both {ROPE_FREQS} and {a}.rope.scaling.type {kind!r} (unsupported)")
    if has_freqs:
        ff = f.read(ROPE_FREQS).flatten()
        if ff.numel() != cfg["head_dim"] // 2:
            raise ModelLoadError(f"{f.path}: {ROPE_FREQS} has {ff.numel()} entries, expected head_dim/2 = "
                                 f"{cfg['head_dim'] // 2}")
        return {"rope_type": "freq_factors", "rope_theta": base, "freq_factors": ff.tolist()}
    if kind is None:
        return {"rope_type": "default", "rope_theta": base}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": base, "factor": float(factor)}
    if kind == "yarn":
        orig = f.meta(f"{a}.rope.scaling.original_context_length")
        if orig is None:
            raise ModelLoadError(f"{f.path}: yarn RoPE without {a}.rope.scaling.original_context_length")
        p = {"rope_type": "yarn", "rope_theta": base, "factor": float(factor),
             "original_max_position_embeddings": int(orig)}
        for gk, hk in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = f.meta(f"{a}.rope.scaling.{gk}")
            if v is not None:
                p[hk] = float(v)
        return p
    raise ModelLoadError(f"{f.path}: unsupported {a}.rope.scaling.type {kind!r} (supported: linear, yarn, "
                         f"llama3 via {ROPE_FREQS})")


def no_experts(cfg: dict, f: "GGUFFile") -> None:
    if f.meta(f"{f.architecture}.expert_count"):
        raise ModelLoadError(f"{f.path}: {f.architecture!r} with experts (expert_count "
                             f"{f.meta(f'{f.architecture}.expert_count')}) is not supported")


def unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of LlamaModel.permute (convert_hf_to_gguf): rows [H, 2, D/2] were stored as [H, D/2, 2]."""
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of pairs")
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_q(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    return unpermute(t, cfg["num_attention_heads"])


def unpermute_k(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    return unpermute(t, cfg["num_key_value_heads"])


# -- MoE and MTP (nextn) layers: deepseek2, glm4moe, qwen35moe -----------------------------------------------------

GROUPED_MOE = {  # DeepSeek-V3 / GLM-4.5 MoE layers; the converter stacks each projection's experts: [E, I, D]
    "blk.{bid}.ffn_gate_inp.weight": "model.layers.{bid}.mlp.gate.weight",
    "blk.{bid}.exp_probs_b.bias": "model.layers.{bid}.mlp.gate.e_score_correction_bias",
    "blk.{bid}.ffn_gate_exps.weight": "model.layers.{bid}.mlp.experts.gate_proj",
    "blk.{bid}.ffn_up_exps.weight": "model.layers.{bid}.mlp.experts.up_proj",
    "blk.{bid}.ffn_down_exps.weight": "model.layers.{bid}.mlp.experts.down_proj",
    **{f"blk.{{bid}}.ffn_{p}_shexp.weight": f"model.layers.{{bid}}.mlp.shared_experts.{p}_proj.weight"
       for p in ("gate", "up", "down")},
}
NEXTN = {  # an MTP layer's own tensors; its decoder block uses the trunk names at blk.{L + j}
    "blk.{bid}.nextn.eh_proj.weight": "model.layers.{bid}.eh_proj.weight",
    "blk.{bid}.nextn.enorm.weight": "model.layers.{bid}.enorm.weight",
    "blk.{bid}.nextn.hnorm.weight": "model.layers.{bid}.hnorm.weight",
    "blk.{bid}.nextn.shared_head_norm.weight": "model.layers.{bid}.shared_head.norm.weight",
    "blk.{bid}.nextn.embed_tokens.weight": "model.layers.{bid}.embed_tokens.weight",
    "blk.{bid}.nextn.shared_head_head.weight": "model.layers.{bid}.shared_head.head.weight",
}
NEXTN_REQUIRED = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight")
MOE_KEYS = {"expert_count": "n_routed_experts", "expert_used_count": "num_experts_per_tok",
            "expert_feed_forward_length": "moe_intermediate_size", "expert_shared_count": "n_shared_experts",
            "expert_group_count": "n_group", "expert_group_used_count": "topk_group",
            "leading_dense_block_count": "first_k_dense_replace", "expert_weights_scale": "routed_scaling_factor",
            "expert_weights_norm": "norm_topk_prob"}
# what llama.cpp assumes when a key is absent
MOE_DEFAULTS = {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "n_shared_experts": 0,
                "routed_scaling_factor": 1.0, "norm_topk_prob": False}
SIGMOID_GATING = 2  # gguf.ExpertGatingFuncType.SIGMOID


def split_nextn(cfg: dict, f: "GGUFFile", key: str = "num_nextn_predict_layers") -> tuple[int, int]:
    """block_count counts the MTP layers too (the converter appends them at blk.{L..}): the trunk is block_count -
    nextn_predict_layers. A file whose MTP tensors were left out has no heads (it runs plain)."""
    n = int(f.meta(f"{f.architecture}.nextn_predict_layers") or 0)
    L = cfg["num_hidden_layers"] - n
    if L <= 0:
        raise ModelLoadError(f"{f.path}: {f.architecture}.nextn_predict_layers = {n} leaves no trunk layers of "
                             f"block_count {cfg['num_hidden_layers']}")
    if n and not any(name.startswith(f"blk.{L}.nextn.") for name in f.tensor_names):
        n = 0
    cfg["num_hidden_layers"], cfg[key] = L, n
    return L, n


def grouped_moe_config(cfg: dict, f: "GGUFFile") -> None:
    """The sigmoid grouped router's settings (DeepSeek-V3 / GLM-4.5); llama.cpp's softmax gating is another model."""
    if "n_routed_experts" not in cfg or "num_experts_per_tok" not in cfg or "moe_intermediate_size" not in cfg:
        raise ModelLoadError(f"{f.path}: GGUF metadata lacks {f.architecture}.expert_count / expert_used_count / "
                             f"expert_feed_forward_length")
    gating = f.meta(f"{f.architecture}.expert_gating_func")
    if gating is not None and int(gating) != SIGMOID_GATING:
        raise ModelLoadError(f"{f.path}: {f.architecture}.expert_gating_func = {gating}: only sigmoid routing "
                             f"({SIGMOID_GATING}, DeepSeek-V3 / GLM-4.5) is supported")
    for k, v in MOE_DEFAULTS.items():
        cfg.setdefault(k, v)
    cfg["norm_topk_prob"] = bool(cfg["norm_topk_prob"])


def grouped_moe_layer(cfg: dict, i: int) -> list[str]:
    """The FFN tensors block i needs: dense before first_k_dense_replace, routed + shared experts after."""
    if i < cfg["first_k_dense_replace"]:
        return [f"ffn_{p}.weight" for p in ("gate", "up", "down")]
    names = ["ffn_gate_inp.weight", "exp_probs_b.bias"] + [f"ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
    return names + ([f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")] if cfg["n_shared_experts"] else [])


def require(f: "GGUFFile", per_block: dict[int, list[str]]) -> None:
    """Every block's required tensors are present (the keymaps mark block tensors optional: which ones a block
    needs depends on its kind)."""
    have = set(f.tensor_names)
    missing = [f"blk.{i}.{n}" for i, names in per_block.items() for n in names if f"blk.{i}.{n}" not in have]
    if missing:
        raise ModelLoadError(f"{f.path}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} for "
                             f"architecture {f.architecture!r}")


def uniform(cfg: dict, f: "GGUFFile", *keys: str) -> None:
    for key in keys:
        _uniform(cfg, key, f)
