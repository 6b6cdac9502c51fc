"""GGUF arch `llama`: Llama 2 / 3.x, SmolLM2, Mistral (llama.cpp writes Mistral as `llama`).

The converter permutes q_proj / k_proj rows (and biases) for RoPE (LlamaModel.permute with n_head, n_head_kv);
the fixups undo it. Llama 3.1+ scaling comes back from `rope_freqs.weight` as freq_factors RoPE.
"""

from __future__ import annotations

from tandem.loading.gguf_archs import common as c
from tandem.loading.gguf_archs.base import GGUFArch

_BIAS = {**c.QKV_BIAS, "blk.{bid}.attn_output.bias": "model.layers.{bid}.self_attn.o_proj.bias"}


def _finalize(cfg, f):
    c.no_experts(cfg, f)
    c.finalize_decoder(cfg, f)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in f.tensor_names  # HF: one flag for q, k, v and o biases


ARCH = GGUFArch(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    config_keys=c.CONFIG_KEYS,
    config_defaults={**c.CONFIG_DEFAULTS, "mlp_bias": False},
    tensors={**c.DECODER_TENSORS, **c.DENSE_MLP, **_BIAS},
    optional={"output.weight", *_BIAS},
    fixups={r"^blk\.\d+\.attn_q\.(weight|bias)$": c.unpermute_q, r"^blk\.\d+\.attn_k\.(weight|bias)$": c.unpermute_k},
    finalize=_finalize,
    derived={c.ROPE_FREQS},
)
