"""GGUF arch `deepseek2` (DeepSeek-V3 and its MLA relatives), as conversion/deepseek.py DeepseekV2Model writes it.

MLA is written for llama.cpp's absorbed attention: kv_b_proj [H * (Dn + Dv), R] is split per head into
attn_k_b [H, R, Dn] (transposed) and attn_v_b [H, Dv, R]; regroup() puts kv_b_proj back (older files carry
attn_kv_b itself). head_count_kv is written as 1 (MLA as MQA); key_length / value_length are the latent's
(R + Dr, R) and key_length_mla / value_length_mla the heads' (Dn + Dr, Dv). Yarn's mscale_all_dim is stored as
rope.scaling.yarn_log_multiplier = 0.1 * mscale_all_dim and llama.cpp takes mscale equal to it. RoPE is always
interleaved (DeepSeek's rope_interleave). DeepseekV2Model drops the MTP layers; the converters that keep them
(Glm4MoeLiteModel, skip_mtp = False) append them as glm4moe does: blk.{L + j} plus blk.{L + j}.nextn.*.
"""

from __future__ import annotations

import numpy as np
import torch

from tandem.errors import ModelLoadError
from tandem.loading.gguf_archs import common as c
from tandem.loading.gguf_archs.base import GGUFArch

_A = "model.layers.{bid}.self_attn."
_LAYER = {
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.attn_q.weight": _A + "q_proj.weight",
    "blk.{bid}.attn_q_a.weight": _A + "q_a_proj.weight",
    "blk.{bid}.attn_q_a.bias": _A + "q_a_proj.bias",
    "blk.{bid}.attn_q_a_norm.weight": _A + "q_a_layernorm.weight",
    "blk.{bid}.attn_q_b.weight": _A + "q_b_proj.weight",
    "blk.{bid}.attn_kv_a_mqa.weight": _A + "kv_a_proj_with_mqa.weight",
    "blk.{bid}.attn_kv_a_mqa.bias": _A + "kv_a_proj_with_mqa.bias",
    "blk.{bid}.attn_kv_a_norm.weight": _A + "kv_a_layernorm.weight",
    "blk.{bid}.attn_kv_b.weight": _A + "kv_b_proj.weight",
    "blk.{bid}.attn_k_b.weight": _A + "k_b_proj.weight",  # regrouped into kv_b_proj
    "blk.{bid}.attn_v_b.weight": _A + "v_b_proj.weight",
    "blk.{bid}.attn_output.weight": _A + "o_proj.weight",
    "blk.{bid}.attn_output.bias": _A + "o_proj.bias",
    **c.DENSE_MLP, **c.GROUPED_MOE, **c.NEXTN,
}
_GLOBAL = {k: v for k, v in c.DECODER_TENSORS.items() if "{bid}" not in k}
_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
         "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size", "rope.freq_base": "rope_theta",
         "attention.head_count": "num_attention_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
         "vocab_size": "vocab_size", "attention.q_lora_rank": "q_lora_rank",
         "attention.kv_lora_rank": "kv_lora_rank", "rope.dimension_count": "qk_rope_head_dim", **c.MOE_KEYS}


def _head_dims(cfg: dict, f) -> None:
    """qk_nope_head_dim / v_head_dim from the MLA lengths (absorbed files) or the plain ones (older files)."""
    a, dr = f.architecture, cfg["qk_rope_head_dim"]
    k_len, v_len = f.meta(f"{a}.attention.key_length_mla"), f.meta(f"{a}.attention.value_length_mla")
    if k_len is None:
        k_len, v_len = f.meta(f"{a}.attention.key_length"), f.meta(f"{a}.attention.value_length")
    if k_len is None or v_len is None:
        raise ModelLoadError(f"{f.path}: GGUF metadata lacks {a}.attention.key_length_mla / value_length_mla")
    cfg["qk_nope_head_dim"], cfg["v_head_dim"] = int(k_len) - dr, int(v_len)
    cfg["head_dim"] = dr


def _rope(cfg: dict, f) -> dict:
    rp = c.rope_parameters({**cfg, "head_dim": 2 * cfg["qk_rope_head_dim"]}, f)
    log_mul = f.meta(f"{f.architecture}.rope.scaling.yarn_log_multiplier")
    if rp["rope_type"] == "yarn" and log_mul:
        rp["mscale_all_dim"] = rp["mscale"] = float(str(np.float32(log_mul))) / 0.1  # as config.json spelled it
    attn = f.meta(f"{f.architecture}.rope.scaling.yarn_attn_factor")
    if rp["rope_type"] == "yarn" and attn is not None:
        rp["attention_factor"] = float(attn)
    return rp


def _finalize(cfg, f):
    L, n = c.split_nextn(cfg, f)
    c.uniform(cfg, f, "num_attention_heads", "intermediate_size")
    for key in ("num_attention_heads", "kv_lora_rank", "qk_rope_head_dim"):
        if key not in cfg:
            gk = next(g for g, h in _KEYS.items() if h == key)
            raise ModelLoadError(f"{f.path}: GGUF metadata lacks deepseek2.{gk}")
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]  # the file's 1 is MLA-as-MQA, not the model's
    cfg.setdefault("q_lora_rank", None)
    _head_dims(cfg, f)
    cfg["rope_parameters"], cfg["rope_interleave"] = _rope(cfg, f), True
    c.grouped_moe_config(cfg, f)
    names = set(f.tensor_names)
    cfg["attention_bias"] = "blk.0.attn_kv_a_mqa.bias" in names
    attn = ["attn_norm.weight", "ffn_norm.weight", "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight",
            "attn_output.weight"]
    attn += ["attn_q.weight"] if cfg["q_lora_rank"] is None else ["attn_q_a.weight", "attn_q_a_norm.weight",
                                                                 "attn_q_b.weight"]
    attn += ["attn_kv_b.weight"] if "blk.0.attn_kv_b.weight" in names else ["attn_k_b.weight", "attn_v_b.weight"]
    blocks = {i: attn + c.grouped_moe_layer(cfg, i) for i in range(L)}
    blocks.update({i: attn + c.grouped_moe_layer({**cfg, "first_k_dense_replace": 0}, i) + list(c.NEXTN_REQUIRED)
                   for i in range(L, L + n)})
    c.require(f, blocks)


def _regroup(weights: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """attn_k_b [H, R, Dn] + attn_v_b [H, Dv, R] -> kv_b_proj [H * (Dn + Dv), R], as before the converter's split."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".self_attn.k_b_proj.weight"):
            vb = weights.get(k.replace("k_b_proj", "v_b_proj"))
            if vb is None:
                raise ModelLoadError(f"{k}: attn_k_b without attn_v_b")
            if v.dim() != 3 or vb.dim() != 3 or v.shape[0] != vb.shape[0] or v.shape[1] != vb.shape[2]:
                raise ModelLoadError(f"{k}: attn_k_b {tuple(v.shape)} and attn_v_b {tuple(vb.shape)} are not "
                                     f"[H, R, Dn] and [H, Dv, R]")
            kv_b = torch.cat([v.transpose(1, 2), vb], dim=1)  # [H, Dn + Dv, R]
            out[k.replace("k_b_proj", "kv_b_proj")] = kv_b.reshape(-1, kv_b.shape[-1]).contiguous()
        elif not k.endswith(".self_attn.v_b_proj.weight"):
            out[k] = v
    return out


ARCH = GGUFArch(
    model_type="deepseek_v3",
    architectures=["DeepseekV3ForCausalLM"],
    config_keys=_KEYS,
    config_defaults={**c.CONFIG_DEFAULTS},
    tensors={**_GLOBAL, **_LAYER},
    optional={"output.weight", *_LAYER},
    finalize=_finalize,
    regroup=_regroup,
)
