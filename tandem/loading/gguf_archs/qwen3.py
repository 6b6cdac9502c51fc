"""GGUF arch `qwen3`: per-head q/k RMSNorm, head_dim from `attention.key_length`, no biases, no permutation."""

from __future__ import annotations

from tandem.loading.gguf_archs import common as c
from tandem.loading.gguf_archs.base import GGUFArch


def _finalize(cfg, f):
    c.no_experts(cfg, f)
    c.finalize_decoder(cfg, f)


ARCH = GGUFArch(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    config_keys=c.CONFIG_KEYS,
    config_defaults={**c.CONFIG_DEFAULTS, "use_sliding_window": False},
    tensors={**c.DECODER_TENSORS, **c.DENSE_MLP, **c.QK_NORM},
    optional={"output.weight"},
    finalize=_finalize,
)
