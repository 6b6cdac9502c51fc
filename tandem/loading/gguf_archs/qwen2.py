"""GGUF arch `qwen2` (Qwen2 / Qwen2.5): q/k/v biases, no q/k permutation (Qwen2Model is not a LlamaModel)."""

from __future__ import annotations

from tandem.loading.gguf_archs import common as c
from tandem.loading.gguf_archs.base import GGUFArch


def _finalize(cfg, f):
    c.no_experts(cfg, f)
    c.finalize_decoder(cfg, f)


ARCH = GGUFArch(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    config_keys=c.CONFIG_KEYS,
    config_defaults={**c.CONFIG_DEFAULTS, "use_sliding_window": False},  # llama.cpp's qwen2 graph has no window
    tensors={**c.DECODER_TENSORS, **c.DENSE_MLP, **c.QKV_BIAS},
    optional={"output.weight"},
    finalize=_finalize,
)
