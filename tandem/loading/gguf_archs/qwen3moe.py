"""GGUF arch `qwen3moe`: qwen3 attention + a softmax top-k MoE in every layer (no shared expert).

The converter stacks the experts into 3D tensors `ffn_{gate,up,down}_exps` ([E, I, D] / [E, D, I] in torch order);
they map to the separate `mlp.experts.{gate,up,down}_proj` tensors the model's sanitize() fuses. llama.cpp always
renormalizes the top-k weights (norm_topk_prob) and treats every layer as sparse.
"""

from __future__ import annotations

from tandem.errors import ModelLoadError
from tandem.loading.gguf_archs import common as c
from tandem.loading.gguf_archs.base import GGUFArch

_MOE = {
    "blk.{bid}.ffn_gate_inp.weight": "model.layers.{bid}.mlp.gate.weight",
    "blk.{bid}.ffn_gate_exps.weight": "model.layers.{bid}.mlp.experts.gate_proj",
    "blk.{bid}.ffn_up_exps.weight": "model.layers.{bid}.mlp.experts.up_proj",
    "blk.{bid}.ffn_down_exps.weight": "model.layers.{bid}.mlp.experts.down_proj",
}


def _finalize(cfg, f):
    missing = [k for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if k not in cfg]
    if missing:
        raise ModelLoadError(f"{f.path}: GGUF metadata lacks the qwen3moe key(s) for {missing}")
    c.finalize_decoder(cfg, f)


ARCH = GGUFArch(
    model_type="qwen3_moe",
    architectures=["Qwen3MoeForCausalLM"],
    config_keys={**c.CONFIG_KEYS, "expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
                 "expert_feed_forward_length": "moe_intermediate_size"},
    config_defaults={**c.CONFIG_DEFAULTS, "use_sliding_window": False, "norm_topk_prob": True,
                     "decoder_sparse_step": 1, "mlp_only_layers": []},
    tensors={**c.DECODER_TENSORS, **c.QK_NORM, **_MOE},
    optional={"output.weight"},
    finalize=_finalize,
)
