"""GGUF arch `gemma3` (Gemma 3 text): norms stored as (1 + w), sliding/global layer pattern, no q/k permutation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tandem.errors import ModelLoadError
from tandem.loading.gguf_archs.base import GGUFArch

if TYPE_CHECKING:
    from tandem.loading.gguf import GGUFFile

TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{bid}.attn_q.weight": "model.layers.{bid}.self_attn.q_proj.weight",
    "blk.{bid}.attn_k.weight": "model.layers.{bid}.self_attn.k_proj.weight",
    "blk.{bid}.attn_v.weight": "model.layers.{bid}.self_attn.v_proj.weight",
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.attn_q_norm.weight": "model.layers.{bid}.self_attn.q_norm.weight",
    "blk.{bid}.attn_k_norm.weight": "model.layers.{bid}.self_attn.k_norm.weight",
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.post_attention_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.pre_feedforward_layernorm.weight",
    "blk.{bid}.post_ffw_norm.weight": "model.layers.{bid}.post_feedforward_layernorm.weight",
    "blk.{bid}.ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj.weight",
    "blk.{bid}.ffn_up.weight": "model.layers.{bid}.mlp.up_proj.weight",
    "blk.{bid}.ffn_down.weight": "model.layers.{bid}.mlp.down_proj.weight",
}


def _minus_one(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    # Gemma RMSNorm computes x * (1 + w); llama.cpp's converter stores (w + 1) so its norm is a plain x * w'.
    return t - 1.0


def _finalize(cfg: dict, f: "GGUFFile") -> None:
    # Attention scale: llama.cpp uses 1/sqrt(hidden/heads) for the 27B (62 blocks) and 1/sqrt(head_dim) otherwise,
    # which is what each HF config.json's query_pre_attn_scalar says (168 for 27B, 256 for the others).
    n_layers = cfg["num_hidden_layers"]
    cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == 62
                                    else cfg["head_dim"])
    # llama.cpp: every 6th layer is global (set_swa_pattern(6)); local layers use rope base 10000 (hard-coded).
    p = cfg["sliding_window_pattern"]
    cfg["layer_types"] = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n_layers)]
    # Global layers of the 4B/12B/27B use linear RoPE scaling (factor 8), stored as rope.scaling.*.
    kind = f.meta("gemma3.rope.scaling.type")
    factor = f.meta("gemma3.rope.scaling.factor")
    full = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    if kind is not None and kind != "none" and factor is not None:
        if kind != "linear":
            raise ModelLoadError(f"{f.path}: unsupported gemma3 rope scaling {kind!r} (only 'linear')")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        full = {"rope_type": "linear", "factor": float(factor), "rope_theta": cfg["rope_theta"]}
    cfg["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default",
                                                    "rope_theta": cfg["rope_local_base_freq"]}}


ARCH = GGUFArch(
    model_type="gemma3_text",
    architectures=["Gemma3ForCausalLM"],
    config_keys={
        "context_length": "max_position_embeddings",
        "block_count": "num_hidden_layers",
        "feed_forward_length": "intermediate_size",
        "embedding_length": "hidden_size",
        "rope.freq_base": "rope_theta",
        "attention.key_length": "head_dim",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "attention.sliding_window": "sliding_window",
        "vocab_size": "vocab_size",
    },
    config_defaults={
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "sliding_window_pattern": 6,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
    },
    tensors=TENSORS,
    optional={"output.weight"},
    # verified against transformers (Gemma2TensorProcessor: every "norm.weight" gets -1) and by comparing
    # state dicts with AutoModelForCausalLM.from_pretrained(gguf_file=...) in tests/test_real_model.py.
    fixups={r"norm\.weight$": _minus_one},
    finalize=_finalize,
)
