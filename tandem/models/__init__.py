"""Model registry: HF model_type -> module with ModelArgs and Model (one file per family)."""

from __future__ import annotations

import importlib

from tandem.errors import ModelLoadError

# model_type -> module name under tandem.models
REGISTRY = {
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gemma4_text": "gemma4",
    "gemma4": "gemma4",
    "gemma4_assistant": "gemma4_assistant",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5",
    "glm4_moe": "glm4_moe",
    "deepseek_v3": "deepseek_v3",
    "mimo": "mimo",
    "step3p5": "step3p5",
    "step3p7": "step3p5",
}


def get_family(model_type: str):
    """The module implementing `model_type`, or a clear error listing what is supported."""
    name = REGISTRY.get(model_type)
    if name is None:
        raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {sorted(REGISTRY)}")
    return importlib.import_module(f"tandem.models.{name}")


def build(config: dict, device="cpu", dtype=None):
    """Instantiate a model from an HF-style config dict (a `text_config` is used when present)."""
    model_type = config.get("model_type", "")
    family = get_family(model_type)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if getattr(family, "FULL_CONFIG", False):  # e.g. gemma4_assistant: top-level fields + its text_config
        text = config
    args = family.ModelArgs.from_dict(text)
    return family.Model(args)
