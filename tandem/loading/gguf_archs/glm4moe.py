"""GGUF arch `glm4moe` (GLM-4.5 / 4.5-Air), as conversion/glm.py Glm4MoeModel writes it.

block_count includes the `nextn_predict_layers` MTP layers, appended at blk.{L..}: their decoder block under the
trunk names plus `blk.{L}.nextn.*`; they load as the hub's `model.layers.{L + j}.*`, which the model sets aside in
`nextn_weights`. No q/k permutation (GLM-4.5 is NeoX-ordered already); partial rotary is stored only as
rope.dimension_count = head_dim * partial_rotary_factor; q/k/v biases and q/k norms only as the tensors themselves.
"""

from __future__ import annotations

from tandem.errors import ModelLoadError
from tandem.loading.gguf_archs import common as c
from tandem.loading.gguf_archs.base import GGUFArch

_LAYER = {
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.post_attention_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    **{f"blk.{{bid}}.attn_{g}.{w}": f"model.layers.{{bid}}.self_attn.{g}_proj.{w}"
       for g in ("q", "k", "v") for w in ("weight", "bias")},
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    **c.QK_NORM, **c.DENSE_MLP, **c.GROUPED_MOE, **c.NEXTN,
}
_GLOBAL = {k: v for k, v in c.DECODER_TENSORS.items() if "{bid}" not in k}


def _finalize(cfg, f):
    L, n = c.split_nextn(cfg, f)
    c.uniform(cfg, f, "num_attention_heads", "num_key_value_heads", "intermediate_size")
    if "num_attention_heads" not in cfg:
        raise ModelLoadError(f"{f.path}: GGUF metadata lacks glm4moe.attention.head_count")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    rot = int(f.meta("glm4moe.rope.dimension_count") or cfg["head_dim"] // 2)
    cfg["partial_rotary_factor"] = rot / cfg["head_dim"]
    cfg["rope_parameters"] = c.rope_parameters(cfg, f)
    c.grouped_moe_config(cfg, f)
    names = set(f.tensor_names)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    cfg["use_qk_norm"] = "blk.0.attn_q_norm.weight" in names
    attn = ["attn_norm.weight", "post_attention_norm.weight", "attn_output.weight"]
    attn += [f"attn_{g}.{w}" for g in "qkv" for w in (("weight", "bias") if cfg["attention_bias"] else ("weight",))]
    attn += ["attn_q_norm.weight", "attn_k_norm.weight"] if cfg["use_qk_norm"] else []
    blocks = {i: attn + c.grouped_moe_layer(cfg, i) for i in range(L)}
    # an MTP block is always MoE (transformers' get_mtp_config: first_k_dense_replace = 0)
    blocks.update({i: attn + c.grouped_moe_layer({**cfg, "first_k_dense_replace": 0}, i) + list(c.NEXTN_REQUIRED)
                   for i in range(L, L + n)})
    c.require(f, blocks)


ARCH = GGUFArch(
    model_type="glm4_moe",
    architectures=["Glm4MoeForCausalLM"],
    config_keys={**c.CONFIG_KEYS, **c.MOE_KEYS},
    config_defaults={**c.CONFIG_DEFAULTS},
    tensors={**_GLOBAL, **_LAYER},
    optional={"output.weight", *_LAYER},
    finalize=_finalize,
)
